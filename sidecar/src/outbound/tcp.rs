//! Outbound TCP: the app's plaintext bytes flow to the upstream over mTLS until either side closes,
//! the connection idles out, or the upstream's certificate expires.

use tokio::io::{AsyncRead, AsyncWrite};

use super::dial::{Alpn, dial_with, upstream_deadline, upstream_revoked};
use crate::conn::{ConnSlot, Shared, copy_bidirectional_idle};
use crate::http::root_cause;
use crate::settings::Outbound;

pub async fn proxy(
    app: impl AsyncRead + AsyncWrite + Unpin,
    spec: &Outbound,
    index: usize,
    shared: &Shared,
    slot: &ConnSlot,
) {
    let (tls, presented) = match dial_with(spec, index, shared, Alpn::H2).await {
        Ok(dialled) => {
            // A TCP client may stay silent (the server speaks first): the upstream took it, so it
            // is no longer displaced at the limit.
            slot.proven();
            dialled
        }
        Err(error) => {
            tracing::warn!(reason = %root_cause(&error), "closing the app's connection: upstream unavailable");
            return;
        }
    };
    // No connection outlives the upstream identity that opened it.
    let deadline = upstream_deadline(&tls, shared.limits.cap_connection_age);
    let expired = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let revoked = upstream_revoked(&tls, &presented, spec.local.port(), shared);
    drop(presented);
    // Polled when one of them was woken, not at every wake of the copy (each chunk of data).
    let ended = std::pin::pin!(async {
        tokio::select! {
            () = expired => tracing::info!("closing: the upstream's certificate expired"),
            () = revoked => {}
        }
    });
    tokio::select! {
        r = copy_bidirectional_idle(app, tls, shared.limits.idle_timeout) => {
            if let Err(error) = r {
                tracing::debug!(%error, "tcp connection ended");
            }
        }
        () = meshid_runtime::wake::WhenWoken::new(ended) => {}
    }
}
