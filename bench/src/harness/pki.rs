//! The benchmark's certificates: one root, one signing intermediate, ECDSA P-256 leaves for the server
//! and client identities; every contender uses these same files.

use std::path::PathBuf;

use anyhow::Result;
use meshid_tests::mesh::{TestPki, Workload};

pub const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";

/// Leaf + intermediate and key PEM files, and the same as one file (haproxy's `crt`).
#[derive(Debug, Clone)]
pub struct Creds {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub combined: PathBuf,
}

/// The bench PKI; the files live as long as this value.
pub struct BenchPki {
    pki: TestPki,
    pub bundle: PathBuf,
    pub server: Creds,
    pub client: Creds,
}

impl BenchPki {
    pub fn new() -> Result<Self> {
        let pki = TestPki::new();
        let server = creds(&pki, pki.workload(SERVER_ID), "server")?;
        let client = creds(&pki, pki.workload(CLIENT_ID), "client")?;
        Ok(Self {
            bundle: pki.bundle_path.clone(),
            server,
            client,
            pki,
        })
    }

    pub fn dir(&self) -> PathBuf {
        self.pki.dir.path().to_path_buf()
    }
}

fn creds(pki: &TestPki, w: Workload, name: &str) -> Result<Creds> {
    let combined = pki.dir.path().join(format!("{name}-combined.pem"));
    let mut pem = std::fs::read_to_string(&w.cert_path)?;
    pem.push_str(&std::fs::read_to_string(&w.key_path)?);
    std::fs::write(&combined, pem)?;
    Ok(Creds {
        cert: w.cert_path,
        key: w.key_path,
        combined,
    })
}

/// The uppercase hex of `s`'s bytes, as haproxy's `hex` converter prints them.
pub fn hex_upper(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02X}")).collect()
}
