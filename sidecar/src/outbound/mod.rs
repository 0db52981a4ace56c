//! Outbound listeners: the app connects in plaintext to `127.0.0.1:<local>`; we originate mTLS to the
//! upstream with our certificate and refuse any server whose SPIFFE ID is not the expected one
//! ([`dial`]), then carry TCP ([`tcp`]) or HTTP ([`http`]): a bodiless idempotent HTTP/1.1 request
//! alone in flight over a pooled HTTP/1.1 connection ([`h1`]), the rest over one multiplexed h2
//! connection ([`upstream`]).

pub mod dial;
pub mod h1;
pub mod http;
pub(crate) mod silence;
pub mod tcp;
pub mod upstream;

use std::sync::Arc;

use meshid_identity::policy::Protocol;
use meshid_runtime::admission::Displaceable;
use tokio::net::TcpListener;
use tracing::Instrument;

use self::http::OutboundHttp;
use crate::conn::{ConnLimit, ConnSlot, Metered, Shared};
use crate::metrics::{ConnLabels, ConnMetrics};
use crate::settings::Outbound;
use upstream::H2Upstream;

/// Runs one outbound listener until shutdown.
pub async fn serve(
    listener: TcpListener,
    spec: Outbound,
    index: usize,
    shared: Shared,
    limit: ConnLimit,
) {
    let port = spec.local.port();
    // Every dial of this listener (one per app connection in TCP mode, the HTTP pools' dials)
    // holds one of these from its name lookup to the end of its handshake.
    let dials = dial::DialPermits::new(dial::MAX_DIALS_IN_PROGRESS);
    let http = (spec.protocol == Protocol::Http).then(|| {
        Arc::new(OutboundHttp {
            port,
            remote: spec.remote.clone(),
            upstream: H2Upstream::new(spec.clone(), index, shared.clone(), dials.clone()),
            h1: h1::pool(Arc::new(spec.clone()), index, shared.clone(), dials.clone()),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            pace: h1::Pace::new(),
            last_host: std::sync::Mutex::new(None),
        })
    });
    // The upstream's verified identity is the expected one (the handshake refuses any other), so
    // the peer label is known before the first connection.
    let peer = shared.metrics.peer_label(&spec.expected);
    shared.metrics.listener("outbound", port, Some(&peer));
    let mut shutdown = shared.shutdown.clone();
    while let Some((tcp, addr)) =
        meshid_runtime::net::accept(&listener, &mut shutdown, "outbound").await
    {
        let admitted = match limit.admit(addr.ip()) {
            Ok(admitted) => admitted,
            Err(refused) => {
                shared.metrics.refused("outbound", port, refused.reason());
                continue;
            }
        };
        let displaced = admitted.displaced_another;
        if displaced {
            shared.metrics.refused("outbound", port, "displaced");
        }
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let spec = spec.clone();
        let http = http.clone();
        let peer = peer.clone();
        let dials = dials.clone();
        let span = tracing::info_span!("outbound", port, upstream = %spec.remote, app_addr = %addr);
        tokio::spawn(
            async move {
                let labels = ConnLabels {
                    direction: "outbound",
                    port,
                };
                shared.metrics.connections.get_or_create(&labels).inc();
                let open = shared
                    .metrics
                    .connections_open
                    .get_or_create(&labels)
                    .clone();
                let slot = ConnSlot::new(admitted.ticket, open);
                let metrics = ConnMetrics::new(&shared.metrics, "outbound", port, peer);
                let app = Metered::new(Displaceable::new(tcp, admitted.displacement), &metrics);
                match http {
                    Some(http) => {
                        self::http::serve_outbound(app, http, &shared, slot, metrics).await
                    }
                    None => {
                        // The stream holds the byte counters.
                        drop(metrics);
                        // Boxed: an HTTP connection's task need not be as large as this future.
                        Box::pin(tcp::proxy(app, &spec, index, &shared, &slot, &dials)).await
                    }
                }
                shared.heap.freed();
            }
            .instrument(span),
        );
        if displaced {
            // At the cap under a flood: let the connections just admitted (a real client's among them)
            // move their handshakes on before the next arrival displaces the oldest of them.
            tokio::task::yield_now().await;
        }
    }
}
