//! A small PKI made in code, for the unit tests of every crate that checks certificates (the
//! `testing` feature; never in a shipped build): a root, a signing intermediate under it, and
//! workload leaves shaped as the CA issues them, or bent one way at a time.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

/// A root and an intermediate, like one meshid authority.
pub struct TestPki {
    pub root: CertificateDer<'static>,
    pub intermediate: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    root_issuer: std::sync::Arc<Issuer<'static, KeyPair>>,
}

/// How a leaf departs from what the CA issues.
#[derive(Debug, Clone, Default)]
pub struct LeafShape {
    /// URI SANs (default: the one ID asked for).
    pub uris: Option<Vec<String>>,
    /// Extended key usages (default: serverAuth + clientAuth).
    pub eku: Option<Vec<ExtendedKeyUsagePurpose>>,
    /// Mark the leaf as a CA.
    pub is_ca: bool,
    /// DNS SANs beside the URIs (a server certificate for `localhost`).
    pub dns: Vec<String>,
    /// Validity relative to now (default: from an hour ago to an hour ahead).
    pub valid: Option<(Duration, Duration)>,
    /// Carry the app-SVID mark, as the CA's answer to a sidecar asking for its app's SVID.
    pub app_svid: bool,
    /// Key usages (default: digitalSignature; keyCertSign too for `is_ca`).
    pub key_usages: Option<Vec<KeyUsagePurpose>>,
    /// More extensions, as (OID arcs, DER content): e.g. a malformed lineage.
    pub extensions: Vec<(Vec<u64>, Vec<u8>)>,
}

/// A workload certificate and its key.
pub struct TestLeaf {
    /// Leaf, then the intermediate.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

#[allow(clippy::expect_used)] // test fixtures: a failure here is a broken test, not bad input
impl TestPki {
    pub fn new(name: &str) -> Self {
        let root_key = KeyPair::generate().expect("keygen");
        let root_params = ca_params(&format!("{name} root"));
        let root = root_params.self_signed(&root_key).expect("root");
        let root_issuer = std::sync::Arc::new(Issuer::new(root_params, root_key));
        Self::under(
            root.der().clone(),
            root_issuer,
            &format!("{name} intermediate"),
        )
    }

    /// Another issuing CA under the same root (a sibling, as an enterprise root has many).
    pub fn sibling(&self, name: &str) -> Self {
        Self::under(self.root.clone(), self.root_issuer.clone(), name)
    }

    fn under(
        root: CertificateDer<'static>,
        root_issuer: std::sync::Arc<Issuer<'static, KeyPair>>,
        name: &str,
    ) -> Self {
        let key = KeyPair::generate().expect("keygen");
        let mut params = ca_params(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let intermediate = params
            .signed_by(&key, root_issuer.as_ref())
            .expect("intermediate");
        Self {
            root,
            intermediate: intermediate.der().clone(),
            issuer: Issuer::new(params, key),
            root_issuer,
        }
    }

    /// A leaf for `id` as the CA issues it.
    pub fn leaf(&self, id: &str) -> TestLeaf {
        self.leaf_shaped(id, &LeafShape::default())
    }

    /// A leaf for `id`, bent as `shape` says.
    pub fn leaf_shaped(&self, id: &str, shape: &LeafShape) -> TestLeaf {
        let key = KeyPair::generate().expect("keygen");
        let mut params = CertificateParams::default();
        let uris = shape.uris.clone().unwrap_or_else(|| vec![id.to_owned()]);
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI(u.as_str().try_into().expect("uri")))
            .chain(
                shape
                    .dns
                    .iter()
                    .map(|d| SanType::DnsName(d.as_str().try_into().expect("dns name"))),
            )
            .collect();
        params.extended_key_usages = shape.eku.clone().unwrap_or_else(|| {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        });
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if shape.is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages.push(KeyUsagePurpose::KeyCertSign);
        }
        if let Some(usages) = &shape.key_usages {
            params.key_usages = usages.clone();
        }
        let now = OffsetDateTime::now_utc();
        let (from, to) = shape
            .valid
            .unwrap_or((Duration::hours(-1), Duration::hours(1)));
        params.not_before = now + from;
        params.not_after = now + to;
        if shape.app_svid {
            params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
                crate::identity::APP_SVID_ARCS,
                crate::identity::APP_SVID_VALUE.to_vec(),
            )];
        }
        for (arcs, content) in &shape.extensions {
            params
                .custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    arcs,
                    content.clone(),
                ));
        }
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        TestLeaf {
            chain: vec![cert.der().clone(), self.intermediate.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}
