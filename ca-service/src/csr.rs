//! Checking a PKCS#10 certification request and keeping only its public key.
//!
//! The CA trusts nothing in a CSR but the key, and the key only after the CSR's self-signature proves the
//! caller holds it. Subject, SANs, extensions and attributes are ignored on purpose.

use rcgen::{PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PKCS_RSA_SHA256};
use rcgen::{PublicKeyData, SignatureAlgorithm};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

/// The largest CSR accepted, in bytes. An RSA-4096 CSR is about 1.7 KiB.
pub const MAX_CSR_LEN: usize = 8 * 1024;
/// The smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// The largest RSA modulus accepted, in bits (bigger keys only cost the CA time).
pub const MAX_RSA_BITS: usize = 8192;

/// Why a CSR was refused. Becomes `InvalidArgument` for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    #[error("csr is empty")]
    Empty,
    #[error("csr is {0} bytes, more than the {MAX_CSR_LEN} allowed")]
    TooLarge(usize),
    #[error("csr is not a DER PKCS#10 request")]
    Malformed,
    #[error("csr has trailing bytes after its DER encoding")]
    TrailingData,
    #[error("csr is signed with an algorithm that is not accepted (use SHA-256 or stronger)")]
    UnsupportedSignatureAlgorithm,
    #[error("csr signature does not verify")]
    BadSignature,
    #[error(
        "csr key type is not accepted (use ECDSA P-256 or P-384, Ed25519, or RSA of 2048 bits or more)"
    )]
    UnsupportedKey,
    #[error("csr RSA key has {0} bits; between {MIN_RSA_BITS} and {MAX_RSA_BITS} are accepted")]
    RsaKeySize(usize),
}

/// The public key of a CSR whose signature verified, with the algorithm the CA writes for it.
#[derive(Clone, PartialEq, Eq)]
pub struct CsrPublicKey {
    /// The subjectPublicKey BIT STRING content.
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl std::fmt::Debug for CsrPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsrPublicKey")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

impl CsrPublicKey {
    /// Parses a DER CSR, verifies its self-signature, checks its key type, and returns its key.
    pub fn from_csr_der(der: &[u8]) -> Result<Self, CsrError> {
        if der.is_empty() {
            return Err(CsrError::Empty);
        }
        if der.len() > MAX_CSR_LEN {
            return Err(CsrError::TooLarge(der.len()));
        }
        let (rest, csr) =
            X509CertificationRequest::from_der(der).map_err(|_| CsrError::Malformed)?;
        if !rest.is_empty() {
            return Err(CsrError::TrailingData);
        }

        let sig = &csr.signature_algorithm.algorithm;
        let strong = [
            &OID_SIG_ECDSA_WITH_SHA256,
            &OID_SIG_ECDSA_WITH_SHA384,
            &OID_SIG_ED25519,
            &OID_PKCS1_SHA256WITHRSA,
            &OID_PKCS1_SHA384WITHRSA,
            &OID_PKCS1_SHA512WITHRSA,
            &OID_PKCS1_RSASSAPSS,
        ];
        if !strong.contains(&sig) {
            return Err(CsrError::UnsupportedSignatureAlgorithm);
        }

        // The key must be what its label says and the signature made by such a key: a verifier
        // picks its algorithm from the signature's label and reads the key bytes as that algorithm
        // wants, so an Ed25519 key labelled P-256 and signed with Ed25519 verifies, and the CA
        // would certify a key that is not what the certificate says it is (an RSA key under
        // another label would skip the RSA size check too).
        let spki = &csr.certification_request_info.subject_pki;
        let key_oid = &spki.algorithm.algorithm;
        let raw = spki.subject_public_key.data.as_ref();
        let ecdsa = [&OID_SIG_ECDSA_WITH_SHA256, &OID_SIG_ECDSA_WITH_SHA384];
        let rsa = [
            &OID_PKCS1_SHA256WITHRSA,
            &OID_PKCS1_SHA384WITHRSA,
            &OID_PKCS1_SHA512WITHRSA,
            &OID_PKCS1_RSASSAPSS,
        ];
        let alg: &'static SignatureAlgorithm = if *key_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .ok_or(CsrError::UnsupportedKey)?;
            // An uncompressed point (0x04, then X and Y) of the curve's size.
            let (alg, point_len): (&'static SignatureAlgorithm, usize) = if curve == OID_EC_P256 {
                (&PKCS_ECDSA_P256_SHA256, 65)
            } else if curve == OID_NIST_EC_P384 {
                (&PKCS_ECDSA_P384_SHA384, 97)
            } else {
                return Err(CsrError::UnsupportedKey);
            };
            if raw.len() != point_len || raw.first() != Some(&0x04) {
                return Err(CsrError::UnsupportedKey);
            }
            if !ecdsa.contains(&sig) {
                return Err(CsrError::BadSignature);
            }
            alg
        } else if *key_oid == OID_SIG_ED25519 {
            if raw.len() != 32 || spki.algorithm.parameters.is_some() {
                return Err(CsrError::UnsupportedKey);
            }
            if *sig != OID_SIG_ED25519 {
                return Err(CsrError::BadSignature);
            }
            &PKCS_ED25519
        } else if *key_oid == OID_PKCS1_RSAENCRYPTION {
            if !rsa.contains(&sig) {
                return Err(CsrError::BadSignature);
            }
            let bits = match spki.parsed() {
                Ok(PublicKey::RSA(rsa)) => modulus_bits(rsa.modulus),
                _ => return Err(CsrError::Malformed),
            };
            if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
                return Err(CsrError::RsaKeySize(bits));
            }
            &PKCS_RSA_SHA256
        } else {
            return Err(CsrError::UnsupportedKey);
        };

        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
        Ok(Self {
            raw: spki.subject_public_key.data.to_vec(),
            alg,
        })
    }

    /// The subjectPublicKey bytes (an uncompressed point for ECDSA), for comparing keys.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }
}

fn modulus_bits(modulus: &[u8]) -> usize {
    let trimmed: &[u8] = match modulus.iter().position(|b| *b != 0) {
        Some(i) => &modulus[i..],
        None => return 0,
    };
    trimmed.len() * 8 - trimmed[0].leading_zeros() as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, PKCS_RSA_SHA256};

    fn csr_for(key: &KeyPair) -> Vec<u8> {
        let params = CertificateParams::new(vec!["ignored.example".to_owned()]).expect("params");
        params.serialize_request(key).unwrap().der().to_vec()
    }

    #[test]
    fn accepts_supported_keys_and_returns_the_key() {
        for alg in [
            &PKCS_ECDSA_P256_SHA256,
            &PKCS_ECDSA_P384_SHA384,
            &PKCS_ED25519,
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let got = CsrPublicKey::from_csr_der(&csr_for(&key)).unwrap();
            assert_eq!(got.raw(), key.public_key_raw());
            assert_eq!(PublicKeyData::algorithm(&got), alg);
        }
        let rsa = KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
        assert!(CsrPublicKey::from_csr_der(&csr_for(&rsa)).is_ok());
    }

    /// DER: a tag, a length, the content.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else if len <= 0xff {
            out.extend_from_slice(&[0x81, len as u8]);
        } else {
            out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
        }
        out.extend_from_slice(content);
        out
    }

    const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
    const SHA256_WITH_RSA: &[u8] = &[
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x05, 0x00,
    ];

    /// A CSR whose key `key_raw` is labelled `key_alg` (the AlgorithmIdentifier's content), signed
    /// by `signer` under the label `sig_alg`: a forgery rcgen would never write.
    fn csr_labelled(key_alg: &[u8], key_raw: &[u8], sig_alg: &[u8], signer: &KeyPair) -> Vec<u8> {
        use rcgen::SigningKey;
        let mut bits = vec![0u8];
        bits.extend_from_slice(key_raw);
        let spki = tlv(0x30, &[tlv(0x30, key_alg), tlv(0x03, &bits)].concat());
        let info = tlv(
            0x30,
            &[tlv(0x02, &[0]), tlv(0x30, &[]), spki, tlv(0xa0, &[])].concat(),
        );
        let mut sig = vec![0u8];
        sig.extend_from_slice(&signer.sign(&info).unwrap());
        tlv(0x30, &[info, tlv(0x30, sig_alg), tlv(0x03, &sig)].concat())
    }

    #[test]
    fn refuses_bad_csrs() {
        let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let rsa = KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
        let p256_label = [EC_PUBLIC_KEY, P256].concat();
        // The forgery is well made: honestly labelled, it is accepted.
        assert!(
            CsrPublicKey::from_csr_der(&csr_labelled(ED25519, ed.public_key_raw(), ED25519, &ed))
                .is_ok()
        );
        let key = KeyPair::generate().unwrap();
        let good = csr_for(&key);
        let mut bad_sig = good.clone();
        let last = bad_sig.len() - 1;
        bad_sig[last] ^= 0x01;
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"x");
        let cases: Vec<(&str, Vec<u8>, CsrError)> = vec![
            ("empty", vec![], CsrError::Empty),
            ("garbage", b"not a csr at all".to_vec(), CsrError::Malformed),
            (
                "oversized",
                vec![0x30; MAX_CSR_LEN + 1],
                CsrError::TooLarge(MAX_CSR_LEN + 1),
            ),
            ("bad signature", bad_sig, CsrError::BadSignature),
            ("trailing bytes", trailing, CsrError::TrailingData),
            (
                "truncated",
                good[..good.len() / 2].to_vec(),
                CsrError::Malformed,
            ),
            (
                "an Ed25519 key labelled P-256, signed with Ed25519",
                csr_labelled(&p256_label, ed.public_key_raw(), ED25519, &ed),
                CsrError::UnsupportedKey,
            ),
            (
                "an RSA key labelled P-256, signed with RSA (no size check)",
                csr_labelled(&p256_label, rsa.public_key_raw(), SHA256_WITH_RSA, &rsa),
                CsrError::UnsupportedKey,
            ),
            (
                "an RSA key labelled Ed25519, signed with RSA",
                csr_labelled(ED25519, rsa.public_key_raw(), SHA256_WITH_RSA, &rsa),
                CsrError::UnsupportedKey,
            ),
            (
                "a P-256 key, signed under the Ed25519 label",
                csr_labelled(&p256_label, key.public_key_raw(), ED25519, &ed),
                CsrError::BadSignature,
            ),
            (
                "an Ed25519 key, signed under the RSA label",
                csr_labelled(ED25519, ed.public_key_raw(), SHA256_WITH_RSA, &ed),
                CsrError::BadSignature,
            ),
        ];
        for (name, der, want) in cases {
            assert_eq!(CsrPublicKey::from_csr_der(&der).err(), Some(want), "{name}");
        }
    }

    #[test]
    fn modulus_bits_counts_significant_bits() {
        assert_eq!(modulus_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(modulus_bits(&[0x01, 0x00]), 9);
        assert_eq!(modulus_bits(&[0, 0]), 0);
    }
}
