//! Outbound listeners: the app connects in plaintext to `127.0.0.1:<local>`; we originate mTLS to the
//! upstream with our certificate and refuse any server whose SPIFFE ID is not the expected one.

use std::io;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::Instrument;

use crate::config::Outbound;
use crate::conn::{ConnLimit, Shared, copy_bidirectional_idle};
use crate::http::{OutboundHttp, root_cause};
use crate::metrics::ConnLabels;
use crate::policy::Protocol;
use crate::verify::{describe, failure_label};

/// Dials the upstream and completes mTLS with the current credentials, verifying its identity.
pub async fn dial(
    spec: &Outbound,
    index: usize,
    shared: &Shared,
) -> io::Result<TlsStream<TcpStream>> {
    let port = spec.local.port();
    let snapshot = shared
        .creds
        .current()
        .ok_or_else(|| io::Error::other("no certificate loaded yet"))?;
    if !snapshot.valid_at(crate::inbound::unix_now()) {
        return Err(io::Error::other(
            "our certificate is not valid now (failing closed)",
        ));
    }
    let config = snapshot
        .clients
        .get(index)
        .cloned()
        .ok_or_else(|| io::Error::other("no client configuration for this upstream"))?;
    let host = spec
        .remote
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(&spec.remote);
    // The name only feeds SNI; the verifier checks the SPIFFE ID, not this name.
    let name = ServerName::try_from(host.to_owned())
        .map_err(|_| io::Error::other(format!("bad upstream host {host:?}")))?;
    let tcp = tokio::time::timeout(
        shared.limits.connect_timeout,
        TcpStream::connect(spec.remote.as_str()),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = tcp.set_nodelay(true);
    let handshake = TlsConnector::from(config).connect(name, tcp);
    match tokio::time::timeout(shared.limits.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(error)) => {
            let tls_error = error
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>());
            let reason = tls_error.map(failure_label).unwrap_or("protocol");
            shared.metrics.handshake_failed("outbound", port, reason);
            tracing::warn!(upstream = %spec.remote, expected = %spec.expected, reason = %root_cause(&error), "upstream refused");
            match tls_error {
                Some(tls_error) => Err(io::Error::new(error.kind(), describe(tls_error))),
                None => Err(error),
            }
        }
        Err(_) => {
            shared.metrics.handshake_failed("outbound", port, "timeout");
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "tls handshake timed out",
            ))
        }
    }
}

/// Runs one outbound listener until shutdown.
pub async fn serve(
    listener: TcpListener,
    spec: Outbound,
    index: usize,
    shared: Shared,
    limit: ConnLimit,
) {
    let port = spec.local.port();
    let http = (spec.protocol == Protocol::Http).then(|| {
        Arc::new(OutboundHttp {
            port,
            remote: spec.remote.clone(),
            upstream: crate::upstream::H2Upstream::new(spec.clone(), index, shared.clone()),
        })
    });
    let mut shutdown = shared.shutdown.clone();
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, port, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = crate::conn::stopped(&mut shutdown) => return,
        };
        let Some(permit) = limit.try_acquire() else {
            shared.metrics.refused("outbound", port, "max_connections");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let spec = spec.clone();
        let http = http.clone();
        let span = tracing::info_span!("outbound", port, upstream = %spec.remote, app_addr = %addr);
        tokio::spawn(
            async move {
                let labels = ConnLabels {
                    direction: "outbound",
                    port,
                };
                shared.metrics.connections.get_or_create(&labels).inc();
                shared.metrics.connections_open.get_or_create(&labels).inc();
                match http {
                    Some(http) => crate::http::serve_outbound(tcp, http, &shared).await,
                    None => tcp_proxy(tcp, &spec, index, &shared).await,
                }
                shared.metrics.connections_open.get_or_create(&labels).dec();
                drop(permit);
            }
            .instrument(span),
        );
    }
}

async fn tcp_proxy(app: TcpStream, spec: &Outbound, index: usize, shared: &Shared) {
    let tls = match dial(spec, index, shared).await {
        Ok(tls) => tls,
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
    tokio::select! {
        r = copy_bidirectional_idle(app, tls, shared.limits.idle_timeout) => {
            if let Err(error) = r {
                tracing::debug!(%error, "tcp connection ended");
            }
        }
        () = expired => tracing::info!("closing: the upstream's certificate expired"),
    }
}

/// When a connection to an upstream must end (its certificate's expiry), if ages are capped.
pub(crate) fn upstream_deadline(
    tls: &TlsStream<TcpStream>,
    cap: bool,
) -> Option<tokio::time::Instant> {
    cap.then(|| {
        let not_after = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| meshid_proto::cert_identity_from_der(leaf).ok())
            .map_or(0, |i| i.not_after);
        crate::inbound::expiry_instant(not_after)
    })
}
