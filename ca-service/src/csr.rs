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

        let spki = &csr.certification_request_info.subject_pki;
        let key_oid = &spki.algorithm.algorithm;
        let alg: &'static SignatureAlgorithm = if *key_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .ok_or(CsrError::UnsupportedKey)?;
            if curve == OID_EC_P256 {
                &PKCS_ECDSA_P256_SHA256
            } else if curve == OID_NIST_EC_P384 {
                &PKCS_ECDSA_P384_SHA384
            } else {
                return Err(CsrError::UnsupportedKey);
            }
        } else if *key_oid == OID_SIG_ED25519 {
            &PKCS_ED25519
        } else if *key_oid == OID_PKCS1_RSAENCRYPTION {
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

    #[test]
    fn refuses_bad_csrs() {
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
