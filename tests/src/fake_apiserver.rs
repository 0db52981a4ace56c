//! A fake Kubernetes API server: HTTPS (rustls, its own CA made with rcgen) on 127.0.0.1, serving
//! `/openid/v1/jwks` and `/.well-known/openid-configuration` as kube-apiserver does, and any other
//! object a test puts at a path ([`FakeApiServer::serve`]: a MutatingWebhookConfiguration, a
//! ConfigMap), to callers presenting `Authorization: Bearer <token>` (401 otherwise). It reviews
//! tokens as kube-apiserver does (`POST /apis/authentication.k8s.io/v1/tokenreviews`): every token
//! is taken for its `sub`, but those whose pod a test deleted ([`FakeApiServer::delete_pod_of`]).
//! Tests change what it answers ([`Answer`]) and count the requests it gets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::fake_cluster;

/// What `/openid/v1/jwks` answers.
#[derive(Debug, Clone)]
pub enum Answer {
    /// 200 with this JSON document.
    Json(Value),
    /// This status and body, as given.
    Raw(u16, Vec<u8>),
    /// Close every connection at once, before TLS: the server is unreachable.
    Down,
}

/// Requests the server got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// `/openid/v1/jwks` requests with the right token.
    pub jwks: usize,
    /// `/.well-known/openid-configuration` requests with the right token.
    pub discovery: usize,
    /// Requests refused with 401 (no or wrong token).
    pub unauthorized: usize,
    /// TokenReviews with the right token.
    pub token_reviews: usize,
}

struct State {
    answer: Answer,
    /// Other paths and what they answer.
    objects: std::collections::HashMap<String, Answer>,
    token: String,
    counts: Counts,
    /// Tokens whose pod is gone: their review says so.
    gone: std::collections::HashSet<String>,
    /// What a TokenReview answers instead of reviewing, when set.
    review_answer: Option<Answer>,
    /// How long a TokenReview takes to answer.
    review_delay: std::time::Duration,
}

/// A running fake API server; stops when dropped.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    /// The CA bundle (PEM) its serving certificate chains to, as a pod's `ca.crt`.
    pub ca_file: PathBuf,
    /// A file holding the token it accepts, as a pod's service-account `token`.
    pub token_file: PathBuf,
    _dir: TempDir,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

/// A CA certificate (PEM) and an issuer for serving certificates under it.
pub fn test_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("keygen");
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).expect("self-signed");
    (cert.pem(), Issuer::new(params, key))
}

impl FakeApiServer {
    /// Starts serving `answer` to callers presenting the token now in [`FakeApiServer::token_file`].
    pub async fn start(answer: Answer) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca_pem, issuer) = test_ca("fake kubernetes CA");
        let key = KeyPair::generate().expect("keygen");
        let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("params");
        let cert = params.signed_by(&key, &issuer).expect("sign");
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("server config");
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca_pem).expect("write ca.crt");
        let token = "eyJhbGciOiJSUzI1NiJ9.ca-service-account-token.sig1".to_owned();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{token}\n")).expect("write token");

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            answer,
            objects: Default::default(),
            token,
            counts: Counts::default(),
            gone: Default::default(),
            review_answer: None,
            review_delay: std::time::Duration::ZERO,
        }));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let served = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                if matches!(served.lock().expect("state").answer, Answer::Down) {
                    drop(tcp);
                    continue;
                }
                let acceptor = acceptor.clone();
                let state = served.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move {
                            let (head, body) = req.into_parts();
                            let body = http_body_util::BodyExt::collect(
                                http_body_util::Limited::new(body, 1 << 20),
                            )
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                            let req = Request::from_parts(head, body);
                            let delay = state.lock().expect("state").review_delay;
                            if req.uri().path().ends_with("/tokenreviews") && !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            Ok::<_, std::convert::Infallible>(respond(&state, addr, &req))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            ca_file,
            token_file,
            _dir: dir,
            state,
            task,
        }
    }

    /// `https://127.0.0.1:PORT/openid/v1/jwks`.
    pub fn jwks_url(&self) -> String {
        format!("https://{}/openid/v1/jwks", self.addr)
    }

    /// `https://127.0.0.1:PORT/.well-known/openid-configuration`.
    pub fn discovery_url(&self) -> String {
        format!("https://{}/.well-known/openid-configuration", self.addr)
    }

    /// Changes what `/openid/v1/jwks` answers from the next request on.
    pub fn answer(&self, answer: Answer) {
        self.state.lock().expect("state").answer = answer;
    }

    /// Answers `answer` at `path` (any path but the two JWKS ones) from the next request on.
    pub fn serve(&self, path: &str, answer: Answer) {
        self.state
            .lock()
            .expect("state")
            .objects
            .insert(path.to_owned(), answer);
    }

    /// The base URL, `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Changes the token the server accepts (the token file is left as it is).
    pub fn accept_token(&self, token: &str) {
        self.state.lock().expect("state").token = token.to_owned();
    }

    /// The pod `token` is bound to is deleted: its reviews say it is not found.
    pub fn delete_pod_of(&self, token: &str) {
        self.state
            .lock()
            .expect("state")
            .gone
            .insert(token.to_owned());
    }

    /// TokenReviews answer `answer` instead of reviewing (`None`: review again).
    pub fn answer_reviews(&self, answer: Option<Answer>) {
        self.state.lock().expect("state").review_answer = answer;
    }

    /// TokenReviews take `delay` to answer (as a busy API server's).
    pub fn delay_reviews(&self, delay: std::time::Duration) {
        self.state.lock().expect("state").review_delay = delay;
    }

    pub fn counts(&self) -> Counts {
        self.state.lock().expect("state").counts
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What kube-apiserver's TokenReview answers for the review request `body`.
fn review(state: &State, body: &[u8]) -> Value {
    let token = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["spec"]["token"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let claims = token
        .split('.')
        .nth(1)
        .and_then(|p| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
        .unwrap_or_default();
    let pod = claims["kubernetes.io"]["pod"]["name"]
        .as_str()
        .unwrap_or_default();
    let status = if state.gone.contains(&token) {
        json!({
            "authenticated": false,
            "error": format!("[invalid bearer token, pod \"{pod}\" not found]"),
        })
    } else {
        json!({
            "authenticated": true,
            "user": {
                "username": claims["sub"],
                "extra": {
                    "authentication.kubernetes.io/pod-name": [pod],
                    "authentication.kubernetes.io/pod-uid": [claims["kubernetes.io"]["pod"]["uid"]],
                },
            },
            "audiences": claims["aud"],
        })
    };
    json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": { "creationTimestamp": null },
        "spec": {},
        "status": status,
    })
}

fn respond(state: &Mutex<State>, addr: SocketAddr, req: &Request<Bytes>) -> Response<Full<Bytes>> {
    let reply = |status: u16, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    };
    let mut state = state.lock().expect("state");
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if presented != Some(format!("Bearer {}", state.token).as_str()) {
        state.counts.unauthorized += 1;
        return reply(
            401,
            br#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#.to_vec(),
        );
    }
    match req.uri().path() {
        "/apis/authentication.k8s.io/v1/tokenreviews" if req.method() == http::Method::POST => {
            state.counts.token_reviews += 1;
            match &state.review_answer {
                Some(Answer::Json(v)) => reply(201, v.to_string().into_bytes()),
                Some(Answer::Raw(status, body)) => reply(*status, body.clone()),
                Some(Answer::Down) => reply(503, Vec::new()),
                None => reply(201, review(&state, req.body()).to_string().into_bytes()),
            }
        }
        "/.well-known/openid-configuration" => {
            state.counts.discovery += 1;
            let doc = json!({
                "issuer": fake_cluster::ISSUER,
                "jwks_uri": format!("https://{addr}/openid/v1/jwks"),
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            });
            reply(200, doc.to_string().into_bytes())
        }
        "/openid/v1/jwks" => {
            state.counts.jwks += 1;
            match &state.answer {
                Answer::Json(v) => reply(200, v.to_string().into_bytes()),
                Answer::Raw(status, body) => reply(*status, body.clone()),
                Answer::Down => reply(503, Vec::new()),
            }
        }
        path => match state.objects.get(path) {
            Some(Answer::Json(v)) => reply(200, v.to_string().into_bytes()),
            Some(Answer::Raw(status, body)) => reply(*status, body.clone()),
            Some(Answer::Down) => reply(503, Vec::new()),
            None => reply(
                404,
                br#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#
                    .to_vec(),
            ),
        },
    }
}
