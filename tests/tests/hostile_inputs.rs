//! Every parser that faces untrusted input, fed mutated and random bytes: it must answer with an error,
//! never panic. (A deterministic mutation loop that runs on stable Rust; coverage-guided fuzzing needs
//! a nightly toolchain this project does not pin.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use meshid_ca::csr::CsrPublicKey;
use meshid_identity::policy::Policy;
use meshid_identity::{SpiffeId, cert_identity_from_der, spiffe_id_from_der};
use meshid_tests::mesh::TestPki;
use meshid_tests::pki::WorkloadKey;
use meshid_tests::process::{Proc, free_addr};
use meshid_tests::tools::workspace_bin;

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Variants of `seed`: bit flips, byte replacements, truncations, insertions, duplicated spans.
fn mutations(seed: &[u8], rng: &mut Rng, count: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let mut v = seed.to_vec();
        for _ in 0..1 + rng.below(4) {
            if v.is_empty() {
                v.push(rng.next() as u8);
                continue;
            }
            let i = rng.below(v.len());
            match rng.below(5) {
                0 => v[i] ^= 1 << rng.below(8),
                1 => v[i] = rng.next() as u8,
                2 => v.truncate(i),
                3 => v.insert(i, rng.next() as u8),
                _ => {
                    let end = (i + 1 + rng.below(16)).min(v.len());
                    let span = v[i..end].to_vec();
                    v.splice(i..i, span);
                }
            }
        }
        out.push(v);
    }
    out
}

fn random_bytes(rng: &mut Rng, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|_| (0..rng.below(300)).map(|_| rng.next() as u8).collect())
        .collect()
}

#[test]
fn certificates_and_identities() {
    let pki = TestPki::new();
    let leaf = pki
        .workload("spiffe://cluster.local/ns/shop/sa/frontend")
        .chain[0]
        .to_vec();
    let mut rng = Rng(0x5eed_0001);
    let mut inputs = mutations(&leaf, &mut rng, 3000);
    inputs.extend(random_bytes(&mut rng, 500));
    // The seed itself reads: the mutations start from a certificate that gets past every check.
    assert_eq!(
        spiffe_id_from_der(&leaf).unwrap().as_str(),
        "spiffe://cluster.local/ns/shop/sa/frontend"
    );
    assert!(cert_identity_from_der(&leaf).is_ok());
    for input in inputs {
        let _ = spiffe_id_from_der(&input);
        let _ = cert_identity_from_der(&input);
    }
}

#[test]
fn spiffe_ids() {
    let mut rng = Rng(0x5eed_0002);
    let seed = b"spiffe://cluster.local/ns/shop/sa/frontend";
    for input in mutations(seed, &mut rng, 5000) {
        if let Ok(s) = std::str::from_utf8(&input)
            && let Ok(id) = SpiffeId::parse(s)
        {
            // Anything accepted round-trips and keeps its parts consistent.
            assert_eq!(id.as_str(), s);
            assert!(id.path().starts_with('/'));
            assert_eq!(SpiffeId::parse(id.as_str()).unwrap(), id);
        }
    }
}

#[test]
fn certification_requests() {
    let csr = WorkloadKey::new().csr;
    let mut rng = Rng(0x5eed_0003);
    use x509_parser::prelude::FromDer;
    /// The bytes a CSR's signature covers, and the signature.
    fn signed(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
            .expect("an accepted CSR parses");
        (
            csr.certification_request_info.raw.to_vec(),
            csr.signature_value.data.to_vec(),
        )
    }
    assert!(
        CsrPublicKey::from_csr_der(&csr).is_ok(),
        "the seed is accepted"
    );
    let seed = signed(&csr);
    let mut accepted = 0;
    let mut inputs = mutations(&csr, &mut rng, 3000);
    inputs.extend(random_bytes(&mut rng, 500));
    for input in inputs {
        if CsrPublicKey::from_csr_der(&input).is_ok() {
            accepted += 1;
            // A mutated CSR only passes when the mutation left the signed part and its signature
            // as they were (a change to the outer framing or the algorithm's encoding may pass).
            assert!(
                signed(&input) == seed,
                "a changed CSR accepted: {input:02x?}"
            );
        }
    }
    assert!(accepted < 300, "{accepted} mutated CSRs accepted");
}

#[test]
fn policy_files() {
    let seed = b"mode: audit\ninbound:\n  - port: 8080\n    protocol: http\n    allow:\n      - id: spiffe://cluster.local/ns/ops/sa/*\n        methods: [GET]\n        paths: [/metrics, /api/*]\n";
    let mut rng = Rng(0x5eed_0004);
    assert!(
        Policy::parse(std::str::from_utf8(seed).unwrap()).is_ok(),
        "the seed is a valid policy"
    );
    for input in mutations(seed, &mut rng, 3000) {
        let text = String::from_utf8_lossy(&input);
        let _ = Policy::parse(&text);
    }
}

/// YAML that costs a parser far more than its size: alias expansion ("billion laughs"), deep flow
/// nesting (quadratic in the YAML parser), and a huge document. Each is refused with an error that
/// says why, instead of being expanded, parsed for seconds, or read whole.
#[test]
fn policy_files_that_attack_the_yaml_parser() {
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    let mut laughs = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for pair in names.windows(2) {
        let (prev, name) = (pair[0], pair[1]);
        let refs = vec![format!("*{prev}"); 10].join(", ");
        laughs.push_str(&format!("{name}: &{name} [{refs}]\n"));
    }
    laughs.push_str("inbound: *i\n");
    let deep = format!("inbound: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let huge = format!(
        "inbound:\n{}",
        "  - port: 8080\n    protocol: http\n    allow: []\n".repeat(200_000)
    );
    // One long string, repeated by aliases (each node cheap, each string whole).
    let long_laughs = format!(
        "a: &a {}\ninbound: [{}]\n",
        "x".repeat(512 * 1024),
        "*a,".repeat(170_000)
    );
    for (name, text, says) in [
        ("billion laughs", laughs, "repetition limit exceeded"),
        (
            "aliases of a long string",
            long_laughs,
            "strings, aliases repeated",
        ),
        ("deep nesting", deep, "nested deeper"),
        ("huge", huge, "larger than the limit"),
    ] {
        match Policy::parse(&text) {
            Ok(_) => panic!("{name}: accepted"),
            Err(e) => assert!(e.to_string().contains(says), "{name}: {e}"),
        }
    }
}

#[test]
fn service_account_tokens() {
    use meshid_ca::auth::{JwtAuthenticator, JwtConfig};
    let cluster = meshid_tests::fake_cluster::FakeCluster::new();
    let dir = tempfile::tempdir().unwrap();
    cluster.write_jwks(&dir.path().join("jwks.json"));
    let auth = JwtAuthenticator::new(
        JwtConfig {
            jwks: meshid_ca::auth::JwksSource::File(dir.path().join("jwks.json")),
            issuer: meshid_tests::fake_cluster::ISSUER.into(),
            audience: meshid_tests::fake_cluster::AUDIENCE.into(),
            allowed_namespaces: None,
            max_token_lifetime: meshid_ca::auth::JwtConfig::DEFAULT_MAX_TOKEN_LIFETIME,
            dangerous_accept_unbound_tokens: false,
            token_review: false,
        },
        meshid_identity::TrustDomain::new("cluster.local").unwrap(),
    )
    .unwrap();
    let token = cluster.token("shop", "frontend");
    assert!(auth.authenticate(&token).is_ok());
    let genuine = token_bytes(&token).expect("the genuine token decodes");
    // The check below tells the genuine bytes from changed ones: a flipped signature bit is not
    // the same token, a non-canonical spelling of the signature's last character is.
    let mut flipped = token.clone().into_bytes();
    let last = flipped.len() - 1;
    flipped[last - 1] = if flipped[last - 1] == b'A' {
        b'B'
    } else {
        b'A'
    };
    assert_ne!(
        token_bytes(std::str::from_utf8(&flipped).unwrap()).as_ref(),
        Some(&genuine)
    );
    let respelled = non_canonical_spelling(&token).expect("the signature has spare bits");
    assert_ne!(respelled, token);
    assert_eq!(token_bytes(&respelled).as_ref(), Some(&genuine));

    let mut rng = Rng(0x5eed_0005);
    let mut accepted = 0;
    for input in mutations(token.as_bytes(), &mut rng, 3000) {
        let text = String::from_utf8_lossy(&input);
        if text != token && auth.authenticate(&text).is_ok() {
            // Any change to a signed token is refused, but for another spelling of the same
            // bytes (a flip inside base64's spare bits), which is still the genuine token.
            accepted += 1;
            assert_eq!(
                token_bytes(&text).as_ref(),
                Some(&genuine),
                "a mutated token was accepted: {text}"
            );
        }
    }
    eprintln!("{accepted} mutations accepted as other spellings of the genuine token");
}

/// A JWT's three segments, base64url-decoded as leniently as any verifier might (padding or not,
/// spare bits set or not): what was signed and the signature, whatever their spelling.
fn token_bytes(token: &str) -> Option<[Vec<u8>; 3]> {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    let lenient = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let mut parts = token.split('.');
    let mut next = || lenient.decode(parts.next()?).ok();
    let decoded = [next()?, next()?, next()?];
    parts.next().is_none().then_some(decoded)
}

/// `token` with its signature's last character changed in spare bits only: the same bytes.
fn non_canonical_spelling(token: &str) -> Option<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let signature = token.rsplit('.').next()?;
    // 2 or 3 characters in the last group carry 4 or 2 spare bits.
    let spare = match signature.len() % 4 {
        2 => 4,
        3 => 2,
        _ => return None,
    };
    let last = *token.as_bytes().last()?;
    let value = ALPHABET.iter().position(|c| *c == last)?;
    let other = ALPHABET[value ^ ((1 << spare) - 1)] as char;
    Some(format!("{}{other}", &token[..token.len() - 1]))
}

/// Credential paths that are not files: a FIFO in place of the key (a blocking `open` waits for a
/// writer for ever, with nothing logged) and a link to /dev/zero in place of the bundle (a read
/// that never ends, until memory runs out). The sidecar and the injector each refuse them at
/// start, naming the file, and exit at once (the sidecar's flags are checked before its files are
/// read; `sidecar_file_mode` covers its reads). Run with a memory limit, so that a regression
/// fails instead of taking the machine's memory.
#[test]
fn credential_paths_that_are_not_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fifo = d.join("fifo.key");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo");
    let zero = d.join("zero.pem");
    symlink("/dev/zero", &zero).unwrap();

    let pki = TestPki::new();
    let w = pki.workload("spiffe://cluster.local/ns/shop/sa/server");
    let san = "meshid-injector.meshid.svc";
    let ca = d.join("ca");
    let webhook = d.join("webhook");
    for args in [
        vec!["init", "--dir", ca.to_str().unwrap()],
        vec![
            "webhook-cert",
            "--dir",
            ca.to_str().unwrap(),
            "--dns",
            san,
            "--out-dir",
            webhook.to_str().unwrap(),
        ],
    ] {
        let out = Command::new(workspace_bin("meshid-ca"))
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    }

    let limited = |bin: &str| {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "ulimit -v 1048576 && exec \"$0\" \"$@\""])
            .arg(workspace_bin(bin));
        cmd
    };
    let sidecar = |key: &Path, bundle: &Path| {
        let mut cmd = limited("meshid-sidecar");
        cmd.arg("run")
            .arg("--cert")
            .arg(&w.cert_path)
            .arg("--key")
            .arg(key)
            .arg("--bundle")
            .arg(bundle)
            .arg("--outbound")
            .arg(format!(
                "{}=b:80,spiffe://cluster.local/ns/shop/sa/b",
                free_addr("127.0.0.1")
            ))
            .args(["--admin-listen", "127.0.0.1:0"]);
        cmd
    };
    let injector = |key: &Path, bundle: &Path| {
        let mut cmd = limited("meshid-injector");
        cmd.arg("--tls-cert")
            .arg(webhook.join("tls.crt"))
            .arg("--tls-key")
            .arg(key)
            .arg("--trust-bundle")
            .arg(bundle)
            .args(["--listen", "127.0.0.1:0", "--server-name", san])
            .args(["--sidecar-image", "registry.example/meshid/sidecar:0.1.0"])
            .args(["--ca-addr", "meshid-ca.meshid.svc:8443"]);
        cmd
    };
    let fifo_says = format!("{}: not a regular file", fifo.display());
    let zero_says = format!("{}: not a regular file", zero.display());
    let cases = [
        (
            "sidecar, key a FIFO",
            sidecar(&fifo, &pki.bundle_path),
            format!("--key: {}", fifo.display()),
        ),
        (
            "sidecar, bundle /dev/zero",
            sidecar(&w.key_path, &zero),
            format!("--bundle: {}", zero.display()),
        ),
        (
            "injector, key a FIFO",
            injector(&fifo, &ca.join("bundle.pem")),
            format!("--tls-key: {fifo_says}"),
        ),
        (
            "injector, bundle /dev/zero",
            injector(&webhook.join("tls.key"), &zero),
            format!("--trust-bundle: {zero_says}"),
        ),
    ];
    for (name, mut cmd, says) in cases {
        let log = d.join("stderr");
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .env("NO_COLOR", "1");
        let mut proc = Proc::spawn(name, &mut cmd);
        let status = proc.wait_timeout(Duration::from_secs(10));
        let stderr = std::fs::read_to_string(&log).unwrap();
        let status = status.unwrap_or_else(|| panic!("{name}: still running after 10 s: {stderr}"));
        assert_eq!(status.code(), Some(64), "{name}: {stderr}");
        assert!(stderr.contains(&says), "{name}: {says:?} not in {stderr}");
    }
}
