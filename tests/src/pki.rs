//! Certificate fixtures made in code: workload keys and CSRs, and foreign CAs that are not ours.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A workload key and a CSR for it (the CSR asks for nothing in particular).
pub struct WorkloadKey {
    pub key: KeyPair,
    pub csr: Vec<u8>,
}

impl WorkloadKey {
    /// A fresh ECDSA P-256 key and its CSR.
    pub fn new() -> Self {
        let key = KeyPair::generate().expect("keygen");
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .expect("csr")
            .der()
            .to_vec();
        Self { key, csr }
    }

    /// A key whose CSR asks for a different identity (the CA must ignore it).
    pub fn asking_for(uri: &str, dns: &str) -> Self {
        let key = KeyPair::generate().expect("keygen");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "admin");
        params.subject_alt_names = vec![
            SanType::URI(uri.try_into().expect("uri")),
            SanType::DnsName(dns.try_into().expect("dns")),
        ];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).expect("csr").der().to_vec();
        Self { key, csr }
    }

    /// The private key in the form rustls takes.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

impl Default for WorkloadKey {
    fn default() -> Self {
        Self::new()
    }
}

/// A CA that is not ours, issuing certificates that look like ours.
pub struct ForeignCa {
    pub root_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// What its workload chains carry after the leaf (an intermediate's certificate).
    below_leaf: Vec<CertificateDer<'static>>,
}

impl ForeignCa {
    pub fn new() -> Self {
        let key = KeyPair::generate().expect("keygen");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "foreign root");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-signed");
        Self {
            root_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            below_leaf: Vec::new(),
        }
    }

    /// An intermediate of this CA that expires at `not_after` (an issuer outside meshid may let
    /// the leaves it signs outlive it): its workload chains are leaf, intermediate.
    pub fn intermediate_until(&self, not_after: time::OffsetDateTime) -> Self {
        let key = KeyPair::generate().expect("keygen");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "foreign intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Self {
            root_der: self.root_der.clone(),
            below_leaf: vec![cert.der().clone()],
            issuer: Issuer::new(params, key),
        }
    }

    /// A workload certificate for `spiffe_id` with a fresh key, issued a minute ago (a meshid CA
    /// counts a certificate without its attested-at extension as attested at its not-before).
    pub fn workload(
        &self,
        spiffe_id: &str,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().expect("keygen");
        let mut params = CertificateParams::default();
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().expect("uri"))];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        (
            std::iter::once(cert.der().clone())
                .chain(self.below_leaf.iter().cloned())
                .collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

impl Default for ForeignCa {
    fn default() -> Self {
        Self::new()
    }
}

/// PEM text of a DER certificate.
pub fn pem(der: &[u8]) -> String {
    meshid_ca::authority::pem_cert(der)
}

/// A leaf signed by `authority`'s intermediate from parameters the test shapes (`shape` starts from
/// a client+server leaf with no SANs): forged SANs, wrong key usages, odd extensions. Returns the
/// chain (leaf, intermediate) and the leaf's PKCS#8 key.
pub fn forge_leaf(
    authority: &meshid_ca::authority::Authority,
    shape: impl FnOnce(&mut CertificateParams),
) -> (Vec<CertificateDer<'static>>, Vec<u8>) {
    let key = KeyPair::generate().expect("keygen");
    let mut params = CertificateParams::default();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    shape(&mut params);
    let cert = params.signed_by(&key, &authority.issuer).expect("sign");
    (
        vec![cert.der().clone(), authority.intermediate_der.clone()],
        key.serialize_der(),
    )
}

/// A leaf for `id` one level below where it may be: signed by a middle certificate that
/// `authority`'s intermediate signs (shaped by `shape_middle`), presented with the whole chain. A
/// middle that is not a CA, or is one below a path-length-0 intermediate, must not verify.
pub fn forge_below_extra_level(
    authority: &meshid_ca::authority::Authority,
    id: &str,
    shape_middle: impl FnOnce(&mut CertificateParams),
) -> (Vec<CertificateDer<'static>>, Vec<u8>) {
    let middle_key = KeyPair::generate().expect("keygen");
    let mut middle = CertificateParams::default();
    middle.distinguished_name = rcgen::DistinguishedName::new();
    middle.distinguished_name.push(DnType::CommonName, "middle");
    shape_middle(&mut middle);
    let middle_cert = middle
        .signed_by(&middle_key, &authority.issuer)
        .expect("sign middle");
    let middle_issuer = Issuer::new(middle, middle_key);
    let key = KeyPair::generate().expect("keygen");
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.try_into().expect("uri"))];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let cert = params.signed_by(&key, &middle_issuer).expect("sign leaf");
    (
        vec![
            cert.der().clone(),
            middle_cert.der().clone(),
            authority.intermediate_der.clone(),
        ],
        key.serialize_der(),
    )
}

/// An enterprise root that other teams' issuing CAs chain to as well: meshid imports it
/// (`meshid-ca init --root-cert --root-key`), and a sibling CA under it mints look-alikes.
pub struct EnterpriseRoot {
    pub cert_pem: String,
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl EnterpriseRoot {
    pub fn new() -> Self {
        let key = KeyPair::generate().expect("keygen");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Example Corp");
        params
            .distinguished_name
            .push(DnType::CommonName, "Example Corp Root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-signed");
        let key_pem = key.serialize_pem();
        Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// Another team's issuing CA under this root, and a workload certificate it issues for
    /// `spiffe_id`, shaped as meshid's are: the chain (leaf, sibling intermediate) and the key.
    pub fn sibling_workload(
        &self,
        spiffe_id: &str,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        self.sibling_leaf(SanType::URI(spiffe_id.try_into().expect("uri")))
    }

    /// Another team's issuing CA under this root, and a TLS server certificate it issues for the
    /// DNS name `name` (as an impostor of the meshid CA would hold): the chain and the key.
    pub fn sibling_server(
        &self,
        name: &str,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        self.sibling_leaf(SanType::DnsName(name.try_into().expect("dns name")))
    }

    fn sibling_leaf(&self, san: SanType) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let ca_key = KeyPair::generate().expect("keygen");
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "Example Corp payments team CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.signed_by(&ca_key, &self.issuer).expect("sibling CA");
        let sibling = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("keygen");
        let mut params = CertificateParams::default();
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
        params.subject_alt_names = vec![san];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &sibling).expect("sign");
        (
            vec![cert.der().clone(), ca_cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

impl Default for EnterpriseRoot {
    fn default() -> Self {
        Self::new()
    }
}
