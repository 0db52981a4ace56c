//! Random serial numbers and fingerprints.

use rcgen::SerialNumber;

/// A 128-bit random, positive, non-zero certificate serial number (RFC 5280 allows up to 20 octets).
pub fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    loop {
        // The system RNG does not fail on Linux; if it ever did, retrying is the only safe answer.
        if aws_lc_rs::rand::fill(&mut bytes).is_ok() {
            bytes[0] &= 0x7f;
            bytes[0] |= 0x40;
            return SerialNumber::from_slice(&bytes);
        }
    }
}

/// Lowercase hex SHA-256 of some bytes (certificate fingerprints, token hashes).
pub use meshid_identity::pem::sha256_hex;
