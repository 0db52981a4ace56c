//! The SPIFFE Workload API (`spiffe/workload/workload.proto`), served to the app on a unix domain
//! socket (`--workload-api-socket`; apps find it through `SPIFFE_ENDPOINT_SOCKET`), so that
//! go-spiffe, py-spiffe, java-spiffe and rust-spiffe clients get an identity without code of ours.
//!
//! - Every call must carry the metadata `workload.spiffe.io: true` (the specification's security
//!   header, against a browser or an SSRF-able client being tricked into calling): without it the
//!   call is refused with `InvalidArgument`.
//! - `FetchX509SVID`: the app's own SVID ([`crate::creds::app_svid`]: its own key, the pod's
//!   identity) with the trust bundle, sent at once and again at every renewal and bundle change.
//!   An expired SVID is never sent: while the only one held has expired the stream waits for the
//!   next, and a stream whose last SVID expires ends with `Unavailable` (the client's cue to stop
//!   using it and call again). Without a CA to issue from (file mode) it answers
//!   `PermissionDenied`.
//! - `FetchX509Bundles`: the trust domain's roots, at once and at every change.
//! - `FetchJWTSVID`: a JWT-SVID for the pod's identity and the audiences asked for (1 to 8, each
//!   at most 256 bytes: anything else is `InvalidArgument`), signed by the CA
//!   ([`crate::creds::jwt_svid`]; cached per audience set for half its life, never handed out
//!   expired). A `spiffe_id` other than the pod's is `PermissionDenied`.
//! - `FetchJWTBundles`: the trust domain's JWT keys as a JWK set, at once and at every change.
//! - `ValidateJWTSVID`: checks a token against those keys (ES256, `kid` in the bundle, `sub` of
//!   the trust domain, the audience, `exp`); an invalid token is `InvalidArgument` with the reason.
//! - Without a CA (file mode) the SVID methods answer `PermissionDenied`.
//!
//! gRPC C-core and grpc-java clients (py-spiffe, java-spiffe) send the socket's path as
//! `:authority`, which the HTTP/2 server refuses: [`authority`] rewrites it on the way in.
//!
//! The socket is made in a directory the sidecar owns (created if missing, mode 0750) and is
//! itself mode 0660: only the sidecar's user and group can call it (in Kubernetes the app shares
//! the sidecar's group through the pod's `fsGroup`).

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use meshid_proto::prost_types::{self, Struct};
use meshid_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use meshid_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};
use meshid_runtime::log_limit::LogLimit;
use meshid_runtime::time::unix_now;
use rustls::pki_types::CertificateDer;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

mod authority;
/// The socket's HTTP/2 rewriter, for the `workload_api_frames` fuzz target: not an API.
#[doc(hidden)]
pub use authority::fuzzing;
mod idle;

use crate::creds::CredentialStore;
use crate::creds::app_svid::{AppSvid, AppSvids};
use crate::creds::jwt_svid::{JwtSvidError, JwtSvids};
use crate::metrics::{Metrics, WorkloadApiLabels};

/// The metadata key every Workload API call must carry, with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Why the socket could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0}: the socket's directory must belong to the sidecar's user and be writable by no one \
         else (give the socket a directory of its own)"
    )]
    Directory(PathBuf),
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("{0} has no directory")]
    NoDirectory(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SocketError + '_ {
    move |source| SocketError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A socket path from a flag: a path, or a `unix://` URI as `SPIFFE_ENDPOINT_SOCKET` spells it.
pub fn socket_path(value: &str) -> PathBuf {
    let path = value
        .strip_prefix("unix://")
        .or_else(|| value.strip_prefix("unix:"))
        .unwrap_or(value);
    PathBuf::from(path)
}

/// Binds the Workload API socket at `path`: its directory is created (mode 0750) or must already
/// belong to this process's user and be writable by no one else (neither its group nor others); a
/// socket left by an earlier run is
/// replaced, anything else there is an error; the socket is mode 0660.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| SocketError::NoDirectory(path.to_owned()))?;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(io(dir))?;
    }
    let meta = std::fs::metadata(dir).map_err(io(dir))?;
    // Not `/proc/self`'s owner: root's once the process is not dumpable (`protect_memory`).
    let me = meshid_runtime::process::effective_uid();
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(SocketError::Directory(dir.to_owned()));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(io(path))?,
        Ok(_) => return Err(SocketError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(path)(e)),
    }
    let listener = UnixListener::bind(path).map_err(io(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io(path))?;
    Ok(listener)
}

/// How long a unary call waits for the sidecar's first certificate.
const IDENTITY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// At most this many connections to the socket at once. At the cap a newcomer takes the place of
/// the oldest connection that has not made a call yet (silent, or stopped after the HTTP/2
/// preface: [`meshid_runtime::admission`]); only when every connection has made one is it closed
/// at accept. Any container of the pod that shares the socket's group can connect: one that opened
/// connections and never called would otherwise keep the app from its SVIDs.
pub const MAX_CONNECTIONS: usize = 64;

/// At most this many of the [`MAX_CONNECTIONS`] from the processes of one user (the socket's peer
/// credentials): a container of the pod running as another user than the app's, that holds a
/// watching stream on every connection it can open (each has made a call, so none is displaced,
/// and a watching stream is never idle), leaves the app the rest. Processes of one user share
/// this: the socket cannot tell the app from another container running as the app's user.
pub const MAX_CONNECTIONS_PER_USER: usize = 48;

/// The admission source of a connection to the socket: its peer's user, by the kernel's
/// credentials of the connecting process (one source for a peer the kernel names none for).
fn source_of(client: &UnixStream) -> std::net::IpAddr {
    match client.peer_cred() {
        Ok(cred) => std::net::Ipv4Addr::from(cred.uid()).into(),
        Err(_) => std::net::Ipv6Addr::LOCALHOST.into(),
    }
}

/// How long an X.509-SVID stream waits for the replacement of an app SVID that was revoked
/// before it tells the app to stop using the one it holds (a revoked identity gets none).
const REPLACEMENT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest request message taken (tonic's default is 4 MiB): the largest request is a
/// `ValidateJWTSVID`'s token with its audience, a few KiB (audiences are at most 8 x 256 bytes). A
/// larger one is answered `OUT_OF_RANGE` without being read in. With it, what the connections'
/// unfinished requests can hold is bounded to [`MAX_CONNECTIONS`] x
/// [`MAX_STREAMS_PER_CONNECTION`] x (16 KiB and tonic's 8 KiB read buffer), 24 MiB (it was
/// about 4 GiB).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// Calls open at once on one connection (an app holds a few streams: X.509-SVIDs, bundles, a
/// JWT-SVID now and then); each is a task of the sidecar's.
const MAX_STREAMS_PER_CONNECTION: u32 = 16;

/// Serves the Workload API on `listener` until shutdown. Each connection goes through
/// [`authority::pump`], so clients that send the socket path as `:authority` are served too. A
/// connection with no call open for `idle_timeout` (the sidecar's `--idle-timeout`) is closed
/// ([`idle`]); a watching stream is a call open.
pub async fn serve(
    listener: UnixListener,
    store: Arc<CredentialStore>,
    metrics: Metrics,
    svids: Option<AppSvids>,
    jwt: Option<Arc<JwtSvids>>,
    idle_timeout: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let api = WorkloadApi {
        store,
        metrics,
        svids,
        jwt,
        shutdown: shutdown.clone(),
    };
    let (conns, incoming) = mpsc::channel::<std::io::Result<authority::Piped>>(8);
    let mut accept_shutdown = shutdown.clone();
    tokio::spawn(async move {
        // A source per user of the connecting processes (`source_of`).
        let slots = meshid_runtime::admission::Admission::displacing_within_source(
            MAX_CONNECTIONS,
            MAX_CONNECTIONS_PER_USER,
        );
        loop {
            let (client, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(error) => {
                        // As every accept loop (`meshid_runtime::net::accept_retrying`): out of
                        // file descriptors, a line per attempt would flood the log.
                        static LINES: LogLimit = LogLimit::new(5.0, 1.0);
                        if let Some(left_out) = LINES.take() {
                            tracing::warn!(%error, left_out, "workload API accept failed");
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                },
                () = meshid_runtime::net::stopped(&mut accept_shutdown) => return,
            };
            let admitted = match slots.admit(source_of(&client)) {
                Ok(admitted) => admitted,
                Err(refused) => {
                    // One line per connection attempt a local process makes: a burst, then one
                    // a second.
                    static FULL: LogLimit = LogLimit::new(10.0, 1.0);
                    if let Some(left_out) = FULL.take() {
                        let uid = client.peer_cred().map(|c| c.uid()).ok();
                        tracing::warn!(
                            MAX_CONNECTIONS,
                            MAX_CONNECTIONS_PER_USER,
                            ?uid,
                            reason = refused.reason(),
                            left_out,
                            "workload API connection limit reached, every connection in a call; \
                             closing a new connection"
                        );
                    }
                    continue;
                }
            };
            let (server, ours) = tokio::io::duplex(64 * 1024);
            let activity = idle::Activity::new();
            if conns
                .send(Ok(authority::Piped(server, activity.clone())))
                .await
                .is_err()
            {
                return;
            }
            tokio::spawn(async move {
                let ticket = admitted.ticket;
                let client =
                    meshid_runtime::admission::Displaceable::new(client, admitted.displacement);
                let on_call = || ticket.proven();
                // Closing both ends ends the connection for the client and for tonic.
                tokio::select! {
                    () = authority::pump(client, ours, &on_call) => {}
                    () = activity.idle_for(idle_timeout) => {
                        tracing::debug!("workload API connection closed: idle");
                    }
                }
            });
        }
    });
    let result = tonic::transport::Server::builder()
        .http2_max_header_list_size(authority::MAX_HEADER_LIST)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        // hyper's bound on streams reset for a client's protocol errors before GOAWAY
        // ENHANCE_YOUR_CALM (CVE-2025-8671): tonic's default of `None` would lift it.
        .http2_max_local_error_reset_streams(Some(1024))
        .layer(idle::TrackCallsLayer)
        .serve_with_incoming_shutdown(
            SpiffeWorkloadApiServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES),
            ReceiverStream::new(incoming),
            async move { meshid_runtime::net::stopped(&mut shutdown).await },
        )
        .await;
    if let Err(error) = result {
        tracing::error!(%error, "the Workload API stopped");
    }
}

struct WorkloadApi {
    store: Arc<CredentialStore>,
    metrics: Metrics,
    /// `None` in file mode: no CA to issue the app an SVID.
    svids: Option<AppSvids>,
    /// `None` in file mode, likewise.
    jwt: Option<Arc<JwtSvids>>,
    shutdown: watch::Receiver<bool>,
}

fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get(SECURITY_HEADER).map(|v| v.to_str()) {
        Some(Ok("true")) => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request: every Workload API call carries \
             `workload.spiffe.io: true`",
        )),
    }
}

fn concat(certs: &[CertificateDer<'_>]) -> Vec<u8> {
    certs
        .iter()
        .flat_map(|c| c.as_ref().iter().copied())
        .collect()
}

/// The trust domain's SPIFFE ID and its anchors for apps (roots; under an imported root, the
/// intermediates trust is pinned to instead), once the sidecar holds a certificate.
fn bundle(store: &CredentialStore) -> Option<(String, Vec<u8>)> {
    let snapshot = store.current()?;
    let td = format!("spiffe://{}", snapshot.identity.id.trust_domain());
    Some((td, concat(&store.app_anchors())))
}

fn x509_response(svid: &AppSvid, roots: Vec<u8>) -> X509svidResponse {
    X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: svid.id.as_str().to_owned(),
            x509_svid: concat(&svid.chain),
            x509_svid_key: svid.key.clone(),
            bundle: roots,
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    }
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A stream fed by `feed`, which ends when the client hangs up (its sends fail) or at shutdown.
fn streamed<T, F>(mut shutdown: watch::Receiver<bool>, feed: F) -> Streamed<T>
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<Result<T, Status>>) -> Pin<Box<dyn Future<Output = ()> + Send>>,
{
    let (tx, rx) = mpsc::channel(2);
    let feeding = feed(tx);
    tokio::spawn(async move {
        tokio::select! {
            () = feeding => {}
            () = meshid_runtime::net::stopped(&mut shutdown) => {}
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

impl WorkloadApi {
    async fn fetch_x509svid_call(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Streamed<X509svidResponse>>, Status> {
        check_header(&req)?;
        let Some(mut svids) = self.svids.clone() else {
            return Err(Status::permission_denied(
                "no SVID for the app: this sidecar has no CA to issue one (file mode)",
            ));
        };
        let store = self.store.clone();
        let stream = streamed(self.shutdown.clone(), move |tx| {
            Box::pin(async move {
                let mut bundle_changes = store.subscribe();
                // What was sent last: the SVID (by leaf) and the roots.
                let mut sent: Option<(Arc<AppSvid>, Vec<u8>)> = None;
                // Until when a revoked SVID's replacement is waited for (the sidecar asks the CA
                // for one as soon as the revocation arrives, as this stream learns of it).
                let mut replaced_by: Option<tokio::time::Instant> = None;
                loop {
                    let current = svids.borrow_and_update().clone();
                    let now = unix_now();
                    let usable = current.filter(|s| s.usable(now, &store.revocations()));
                    match (usable, &sent) {
                        (Some(svid), _) => {
                            let roots = concat(&store.app_anchors());
                            let same = sent
                                .as_ref()
                                .is_some_and(|(s, r)| Arc::ptr_eq(s, &svid) && *r == roots);
                            if !same {
                                if tx
                                    .send(Ok(x509_response(&svid, roots.clone())))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                                sent = Some((svid, roots));
                            }
                            replaced_by = None;
                        }
                        (None, Some((held, _)))
                            if held.valid_at(now)
                                && replaced_by.is_none_or(|t| tokio::time::Instant::now() < t) =>
                        {
                            // Revoked, not expired: its replacement is on its way.
                            replaced_by
                                .get_or_insert(tokio::time::Instant::now() + REPLACEMENT_WAIT);
                        }
                        (None, Some(_)) => {
                            // The SVID the app holds has expired, or was revoked and no new one
                            // came: tell it to stop using it.
                            let _ = tx
                                .send(Err(Status::unavailable(
                                    "the app's SVID expired or was revoked, and the CA has not \
                                     issued a new one",
                                )))
                                .await;
                            return;
                        }
                        (None, None) => {}
                    }
                    let expiry = sent.as_ref().map(|(s, _)| s.not_after);
                    let expired = async {
                        match expiry {
                            Some(t) => {
                                let left = u64::try_from(t - unix_now()).unwrap_or(0);
                                meshid_runtime::time::sleep_wall(std::time::Duration::from_secs(
                                    left,
                                ))
                                .await;
                            }
                            None => std::future::pending().await,
                        }
                    };
                    let waited = async {
                        match replaced_by {
                            Some(t) => tokio::time::sleep_until(t).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        r = svids.changed() => if r.is_err() { return },
                        r = bundle_changes.changed() => if r.is_err() { return },
                        () = expired => {}
                        () = waited => {}
                        () = tx.closed() => return,
                    }
                }
            })
        });
        Ok(Response::new(stream))
    }

    async fn fetch_x509_bundles_call(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Streamed<X509BundlesResponse>>, Status> {
        check_header(&req)?;
        let store = self.store.clone();
        let stream = streamed(self.shutdown.clone(), move |tx| {
            Box::pin(async move {
                let mut changes = store.subscribe();
                let mut sent: Option<(String, Vec<u8>)> = None;
                loop {
                    changes.borrow_and_update();
                    if let Some(now) = bundle(&store)
                        && sent.as_ref() != Some(&now)
                    {
                        let msg = X509BundlesResponse {
                            crl: Vec::new(),
                            bundles: HashMap::from([now.clone()]),
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                        sent = Some(now);
                    }
                    tokio::select! {
                        r = changes.changed() => if r.is_err() { return },
                        () = tx.closed() => return,
                    }
                }
            })
        });
        Ok(Response::new(stream))
    }

    fn jwt(&self) -> Result<&Arc<JwtSvids>, Status> {
        self.jwt.as_ref().ok_or_else(|| {
            Status::permission_denied(
                "no JWT-SVIDs for the app: this sidecar has no CA to issue them (file mode)",
            )
        })
    }

    /// The pod's identity; a call made while the sidecar is still getting its first certificate
    /// waits a little for it.
    async fn own_id(&self) -> Result<meshid_identity::SpiffeId, Status> {
        let mut changes = self.store.subscribe();
        let wait = async {
            loop {
                if let Some(s) = self.store.current() {
                    return Some(s.identity.id.clone());
                }
                if changes.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(IDENTITY_WAIT, wait)
            .await
            .ok()
            .flatten()
            .ok_or_else(|| Status::unavailable("the sidecar has no identity yet"))
    }

    async fn fetch_jwtsvid_call(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&req)?;
        let jwt = self.jwt()?;
        let req = req.into_inner();
        let own = self.own_id().await?;
        if !req.spiffe_id.is_empty() && req.spiffe_id != own.as_str() {
            return Err(Status::permission_denied(format!(
                "this workload is {own}: it has no JWT-SVID for {:.300}",
                req.spiffe_id
            )));
        }
        let svid = jwt.fetch(&req.audience).await.map_err(|e| match e {
            JwtSvidError::Audience(_) => Status::invalid_argument(e.to_string()),
            JwtSvidError::NoKeys => Status::unavailable(e.to_string()),
            JwtSvidError::Ca(e) => {
                Status::unavailable(format!("the CA did not issue a JWT-SVID: {e}"))
            }
        })?;
        if svid.expired_at(unix_now()) {
            return Err(Status::unavailable("the JWT-SVID at hand has expired"));
        }
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: svid.id.as_str().to_owned(),
                svid: svid.token,
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles_call(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Streamed<JwtBundlesResponse>>, Status> {
        check_header(&req)?;
        let mut keys = self.jwt()?.subscribe();
        let store = self.store.clone();
        let stream = streamed(self.shutdown.clone(), move |tx| {
            Box::pin(async move {
                let mut sent: Option<(String, Vec<u8>)> = None;
                loop {
                    let held = keys.borrow_and_update().clone();
                    let td = store
                        .current()
                        .map(|s| format!("spiffe://{}", s.identity.id.trust_domain()));
                    if let (Some(held), Some(td)) = (held, td) {
                        let now = (td, meshid_identity::jwt_svid::jwks(&held));
                        if sent.as_ref() != Some(&now) {
                            let msg = JwtBundlesResponse {
                                bundles: HashMap::from([now.clone()]),
                            };
                            if tx.send(Ok(msg)).await.is_err() {
                                return;
                            }
                            sent = Some(now);
                        }
                    }
                    tokio::select! {
                        r = keys.changed() => if r.is_err() { return },
                        () = tx.closed() => return,
                    }
                }
            })
        });
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid_call(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&req)?;
        let jwt = self.jwt()?;
        let req = req.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience is required"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid is required"));
        }
        let td = self.own_id().await?.trust_domain();
        let keys = jwt.keys().await.ok_or_else(|| {
            Status::unavailable("the sidecar has no JWT keys of its trust domain yet")
        })?;
        let verified =
            meshid_identity::jwt_svid::verify(&req.svid, &req.audience, &keys, &td, unix_now())
                .map_err(|e| Status::invalid_argument(format!("the JWT-SVID is not valid: {e}")))?;
        // A token signed before its subject or its certificate was revoked is still signed: the
        // revocation decides. The certificate by the serial and the lineage the token names (the
        // first serial of the lineage it was issued on: revoking a lineage refuses its tokens as
        // it refuses its renewals); a token without the claims, from a CA before them, by its
        // identity only.
        if let Some(why) = verified.revoked_by(&self.store.revocations()) {
            use meshid_identity::revocation::Revoked;
            let what = match &why {
                Revoked::Id(id) => format!("its subject {id} is revoked"),
                Revoked::Serial(s) if verified.serial.as_deref() == Some(s.as_str()) => {
                    format!("the certificate it was issued on, serial {s}, is revoked")
                }
                Revoked::Serial(s) => format!(
                    "the lineage of the certificate it was issued on, certificate serial {s}, \
                     is revoked"
                ),
            };
            return Err(Status::invalid_argument(format!(
                "the JWT-SVID is not valid: {what}"
            )));
        }
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: verified.id.as_str().to_owned(),
            claims: Some(claims_struct(verified.claims)),
        }))
    }
}

/// JWT claims as a `google.protobuf.Struct`.
fn claims_struct(claims: serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: claims
            .into_iter()
            .map(|(k, v)| (k, json_value(v)))
            .collect(),
    }
}

fn json_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(json_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(claims_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Counts every call by method and outcome.
fn counted<T>(metrics: &Metrics, method: &'static str, r: Result<T, Status>) -> Result<T, Status> {
    let code = match &r {
        Ok(_) => "ok",
        Err(s) => match s.code() {
            tonic::Code::InvalidArgument => "invalid_argument",
            tonic::Code::PermissionDenied => "permission_denied",
            tonic::Code::Unimplemented => "unimplemented",
            tonic::Code::Unavailable => "unavailable",
            _ => "other",
        },
    };
    metrics
        .workload_api_calls
        .get_or_create(&WorkloadApiLabels { method, code })
        .inc();
    r
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Streamed<X509svidResponse>;
    type FetchX509BundlesStream = Streamed<X509BundlesResponse>;
    type FetchJWTBundlesStream = Streamed<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        counted(
            &self.metrics,
            "FetchX509SVID",
            self.fetch_x509svid_call(req).await,
        )
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        counted(
            &self.metrics,
            "FetchX509Bundles",
            self.fetch_x509_bundles_call(req).await,
        )
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        counted(
            &self.metrics,
            "FetchJWTSVID",
            self.fetch_jwtsvid_call(req).await,
        )
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        counted(
            &self.metrics,
            "FetchJWTBundles",
            self.fetch_jwt_bundles_call(req).await,
        )
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        counted(
            &self.metrics,
            "ValidateJWTSVID",
            self.validate_jwtsvid_call(req).await,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_from_flags_and_uris() {
        assert_eq!(
            socket_path("/run/spiffe/api.sock"),
            Path::new("/run/spiffe/api.sock")
        );
        assert_eq!(
            socket_path("unix:///run/spiffe/api.sock"),
            Path::new("/run/spiffe/api.sock")
        );
        assert_eq!(
            socket_path("unix:/run/api.sock"),
            Path::new("/run/api.sock")
        );
    }

    #[tokio::test]
    async fn the_socket_is_made_private_in_a_directory_of_our_own() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("spiffe").join("api.sock");
        let listener = bind(&path).unwrap();
        let dir_mode = std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777;
        assert_eq!(dir_mode, 0o750);
        let sock = std::fs::metadata(&path).unwrap();
        assert!(sock.file_type().is_socket());
        assert_eq!(sock.mode() & 0o777, 0o660);
        // A socket left by an earlier run is replaced.
        drop(listener);
        bind(&path).unwrap();
        // Anything else in its place is not touched.
        let file = tmp.path().join("spiffe").join("file");
        std::fs::write(&file, "keep").unwrap();
        assert!(matches!(bind(&file), Err(SocketError::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
        // A directory everyone may write to is refused.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            bind(&open.join("api.sock")),
            Err(SocketError::Directory(_))
        ));
        // So is one its group may write to: a member could put its own socket in our place.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o770)).unwrap();
        assert!(matches!(
            bind(&open.join("api.sock")),
            Err(SocketError::Directory(_))
        ));
    }
}
