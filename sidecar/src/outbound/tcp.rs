//! Outbound TCP: the app's plaintext bytes flow to the upstream over mTLS until either side closes,
//! the connection idles out, or the upstream's certificate expires. A stream the upstream's side cut
//! short (a reset, or a close without TLS's `close_notify`) or that we cut (expiry, revocation)
//! reaches the app as a reset, as on the inbound side: never as an ordinary end.

use meshid_runtime::admission::Displaceable;
use tokio::net::TcpStream;

use super::dial::{Alpn, DialPermits, dial_with, upstream_deadline, upstream_revoked};
use crate::conn::{ConnSlot, Metered, Shared, copy_bidirectional_idle};
use crate::http::root_cause;
use crate::settings::Outbound;

/// Carries one app connection; `dials` are the listener's dials in progress, which each app
/// connection's dial takes one of (an app connection closed meanwhile does not end its dial).
pub async fn proxy(
    mut app: Metered<Displaceable<TcpStream>>,
    spec: &Outbound,
    index: usize,
    shared: &Shared,
    slot: &ConnSlot,
    dials: &DialPermits,
) {
    // Made in a block of their own, so that nothing of the dial is kept beside the copy: a local
    // that was borrowed stays in the future until its scope ends (the TLS stream's state, over
    // 1 KiB, with it), and so does one named at the function's level even once moved.
    let (copy, ended) = {
        let (tls, presented) = match dial_with(spec, index, shared, Alpn::H2, dials).await {
            Ok(dialled) => {
                // A TCP client may stay silent (the server speaks first): the upstream took it,
                // so it is no longer displaced at the limit.
                slot.proven();
                dialled
            }
            Err(error) => {
                if let Some(left_out) = super::dial::UPSTREAM_FAILED.take() {
                    tracing::warn!(reason = %root_cause(&error), left_out, "closing the app's connection: upstream unavailable");
                }
                return;
            }
        };
        // No connection outlives the upstream identity that opened it.
        let deadline = upstream_deadline(&tls, shared.limits.cap_connection_age);
        let expired = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let expiry = shared.limits.cap_connection_age.then_some(0);
        let revoked = upstream_revoked(&tls, &presented, spec.local.port(), shared, expiry);
        drop(presented);
        let ended = async move {
            tokio::select! {
                () = expired => tracing::info!("closing: the upstream's certificate expired"),
                _ = revoked => {}
            }
        };
        (
            copy_bidirectional_idle(&mut app, tls, shared.limits.idle_timeout),
            ended,
        )
    };
    // Polled when one of them was woken, not at every wake of the copy (each chunk of data).
    let ended = std::pin::pin!(ended);
    let clean = tokio::select! {
        r = copy => match r {
            Ok(_) => true,
            Err(error) => {
                tracing::debug!(%error, "tcp connection ended");
                crate::conn::ended_quietly(&error)
            }
        },
        () = meshid_runtime::wake::WhenWoken::new(ended) => false,
    };
    if !clean {
        // The app must not take a stream cut short for a whole one.
        let _ = app.get_ref().get_ref().set_zero_linger();
    }
}
