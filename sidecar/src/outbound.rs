//! Outbound listeners: the app connects in plaintext to `127.0.0.1:<local>`; we originate mTLS to the
//! upstream with our certificate and refuse any server whose SPIFFE ID is not the expected one.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
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
use crate::verify::failure_label;

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
            let reason = error
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .map(failure_label)
                .unwrap_or("protocol");
            shared.metrics.handshake_failed("outbound", port, reason);
            tracing::warn!(upstream = %spec.remote, expected = %spec.expected, reason = %root_cause(&error), "upstream refused");
            Err(error)
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
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .pool_idle_timeout(std::time::Duration::from_secs(90))
                .build(MeshConnector {
                    spec: Arc::new(spec.clone()),
                    index,
                    shared: shared.clone(),
                }),
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
    if let Err(error) = copy_bidirectional_idle(app, tls, shared.limits.idle_timeout).await {
        tracing::debug!(%error, "tcp connection ended");
    }
}

/// hyper connector: every connection goes to the configured upstream over mTLS.
#[derive(Clone)]
pub struct MeshConnector {
    spec: Arc<Outbound>,
    index: usize,
    shared: Shared,
}

impl tower::Service<Uri> for MeshConnector {
    type Response = MeshIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<MeshIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tls = dial(&this.spec, this.index, &this.shared).await?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok(MeshIo {
                inner: TokioIo::new(tls),
                h2,
            })
        })
    }
}

/// An mTLS connection to an upstream sidecar, as hyper sees it.
pub struct MeshIo {
    inner: TokioIo<TlsStream<TcpStream>>,
    h2: bool,
}

impl Connection for MeshIo {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 { c.negotiated_h2() } else { c }
    }
}

impl hyper::rt::Read for MeshIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MeshIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
}
