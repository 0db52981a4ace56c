//! Inbound TCP: once the authorization point allows the connection, bytes flow both ways between
//! the peer and the app until either side closes, the connection idles out, the peer's
//! certificate expires, or a new policy no longer allows the peer. A listener with `proxy-v2`
//! first tells the app who called, in a PROXY protocol v2 header ([`super::proxy_header`]).

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::authz::{Authorizer, Peer};
use crate::conn::{Shared, copy_bidirectional_idle};
use crate::settings::Inbound;

/// Proxies one authenticated TCP connection to the app, if the policy allows it. `local` is the
/// address the peer connected to (the PROXY header's destination).
pub async fn proxy(
    tls: impl AsyncRead + AsyncWrite + Unpin,
    peer: Peer,
    local: SocketAddr,
    authz: &Authorizer,
    spec: &Inbound,
    shared: &Shared,
) {
    // Read before the decision: a policy applied while the app's connection opens is decided
    // again once the bytes flow (`Authorizer::revoked`).
    let decided_under = authz.policy_version();
    if authz.connection(&peer).is_err() {
        return;
    }
    let app = match tokio::time::timeout(
        shared.limits.connect_timeout,
        TcpStream::connect(spec.target),
    )
    .await
    {
        Ok(Ok(app)) => app,
        Ok(Err(error)) => {
            if let Some(left_out) = super::APP_FAILED.take() {
                tracing::warn!(%error, app_addr = %spec.target, left_out, "app unreachable");
            }
            return;
        }
        Err(_) => {
            if let Some(left_out) = super::APP_FAILED.take() {
                tracing::warn!(app_addr = %spec.target, left_out, "app connect timed out");
            }
            return;
        }
    };
    let mut app = app;
    let _ = app.set_nodelay(true);
    if spec.proxy_protocol {
        let header = super::proxy_header::encode(peer.addr, local, peer.id().as_str());
        if let Err(error) = app.write_all(&header).await {
            if let Some(left_out) = super::APP_FAILED.take() {
                tracing::warn!(%error, app_addr = %spec.target, left_out, "app closed before the PROXY header");
            }
            return;
        }
    }
    // The trust may have changed since the handshake was verified (a peer can draw its handshake
    // out, and the app's connection takes a moment): looked at again before the first byte goes
    // to the app. From here on the connection's watch (`closing`) ends it.
    let mut trust_key = peer.trust_key;
    if let Some(why) = shared.creds.distrusts(
        &peer.verified,
        &peer.chain,
        webpki::KeyUsage::client_auth(),
        &mut trust_key,
        peer.expiry(shared.limits.cap_connection_age),
    ) {
        tracing::info!(peer = %peer.id(), reason = %why, "closing: the trust in force no longer trusts the peer");
        let _ = app.set_zero_linger();
        return;
    }
    let copy = copy_bidirectional_idle(tls, &mut app, shared.limits.idle_timeout);
    let deadline = peer.deadline(shared.limits.cap_connection_age);
    let ended = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let id = peer.id();
    // Polled when one of them was woken, not at every wake of the copy (each chunk of data).
    let closing = std::pin::pin!(async {
        tokio::select! {
            () = ended => tracing::info!(peer = %id, "closing: the peer's certificate expired"),
            () = authz.revoked(&peer, None, decided_under) => {}
        }
    });
    let clean = tokio::select! {
        r = copy => match r {
            Ok((up, down)) => {
                tracing::debug!(peer = %id, up, down, "tcp connection closed");
                true
            }
            Err(error) => {
                tracing::debug!(%error, peer = %id, "tcp connection ended");
                crate::conn::ended_quietly(&error)
            }
        },
        () = meshid_runtime::wake::WhenWoken::new(closing) => false,
    };
    if !clean {
        // The peer's stream was cut (a reset, a close without TLS's close_notify, which an attacker
        // on the path can forge) or we cut it: the app must not take it for a whole stream.
        let _ = app.set_zero_linger();
    }
}
