//! A bound on the memory of requests still arriving, whoever sends them.
//!
//! tonic sets aside room for a whole message as soon as its 5-byte length prefix is in (up to
//! [`crate::server::MAX_MESSAGE_BYTES`], on top of its 8 KiB read buffer), and keeps it until the
//! rest comes or the call's timeout (30 s) ends it. A client that declares a large message and
//! sends a few bytes of it therefore holds about 72 KiB per stream for nothing, anonymous clients
//! included. Per connection the streams are few ([`crate::server::MAX_STREAMS_PER_CONNECTION`]),
//! but connections are many (10,000, 256 per source), so a per-connection bound alone would still
//! let a few sources take gigabytes.
//!
//! So a call takes a place here from its first byte until its request body has ended (or the call
//! is dropped): at most [`ListenerLimits::max_arriving_requests`] on the process, and at most an
//! eighth of them from one source (an IPv6 source is its /64, as for the connection limits), so a
//! single host cannot take them all from the sidecars. Past either, the call is answered
//! `RESOURCE_EXHAUSTED` at once (the sidecar retries). A sidecar's request comes in one piece and
//! holds its place for microseconds; a bundle stream gives it back once its request is in.
//!
//! [`ListenerLimits::max_arriving_requests`]: crate::tls::ListenerLimits::max_arriving_requests

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::ReasonLabels;
use crate::tls::PeerInfo;

/// The share of the places one source may hold: an eighth.
const SOURCE_SHARE: usize = 8;

/// Places of calls whose request is still arriving, overall and per source.
#[derive(Debug)]
struct Places {
    max: usize,
    max_per_source: usize,
    held: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl Places {
    /// A place for a call from `source`, or the limit that refuses it (as the metric names it).
    fn take(self: &Arc<Self>, source: IpAddr) -> Result<Place, &'static str> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let (total, sources) = &mut *held;
        let of_source = sources.get(&source).copied().unwrap_or(0);
        if *total >= self.max {
            return Err("max_arriving_requests");
        }
        if of_source >= self.max_per_source {
            return Err("max_arriving_requests_per_source");
        }
        *total += 1;
        sources.insert(source, of_source + 1);
        Ok(Place {
            places: self.clone(),
            source,
        })
    }
}

/// One call's place; dropping it gives it back.
#[derive(Debug)]
struct Place {
    places: Arc<Places>,
    source: IpAddr,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut held = self.places.held.lock().unwrap_or_else(|e| e.into_inner());
        let (total, sources) = &mut *held;
        *total = total.saturating_sub(1);
        if let Some(n) = sources.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                sources.remove(&self.source);
            }
        }
    }
}

/// The source a connection counts against: its IP, an IPv6 one cut to its /64.
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct ArrivalsLayer {
    places: Arc<Places>,
    refused: Refused,
}

/// Calls refused, by the limit that refused them (`meshid_ca_calls_refused_total`).
type Refused = Family<ReasonLabels, Counter>;

impl ArrivalsLayer {
    /// At most `max` calls with their request still arriving, an eighth of them (at least one)
    /// from one source; the calls refused are counted in `refused`.
    pub fn new(max: usize, refused: Refused) -> Self {
        Self {
            places: Arc::new(Places {
                max,
                max_per_source: (max / SOURCE_SHARE).max(1),
                held: Mutex::default(),
            }),
            refused,
        }
    }
}

impl<S> tower::Layer<S> for ArrivalsLayer {
    type Service = Arrivals<S>;
    fn layer(&self, inner: S) -> Arrivals<S> {
        Arrivals {
            inner,
            places: self.places.clone(),
            refused: self.refused.clone(),
        }
    }
}

/// See [`ArrivalsLayer`].
#[derive(Debug, Clone)]
pub struct Arrivals<S> {
    inner: S,
    places: Arc<Places>,
    refused: Refused,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ResBody> tower::Service<http::Request<tonic::body::Body>> for Arrivals<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        use hyper::body::Body as _;
        // A request without a body holds nothing; nor does one on a connection we did not accept
        // (none in the CA: every connection has its PeerInfo).
        let from = req
            .extensions()
            .get::<PeerInfo>()
            .map(|p| source(p.remote_addr.ip()));
        let (Some(from), false) = (from, req.body().is_end_stream()) else {
            return Box::pin(self.inner.call(req));
        };
        let place = match self.places.take(from) {
            Ok(place) => place,
            Err(reason) => {
                self.refused.get_or_create(&ReasonLabels { reason }).inc();
                let status = tonic::Status::resource_exhausted(format!(
                    "too many requests arriving at once on this CA ({reason}); try again"
                ));
                let response = status.into_http::<ResBody>();
                return Box::pin(async move { Ok(response) });
            }
        };
        let req = req.map(|inner| {
            tonic::body::Body::new(meshid_runtime::body::HoldUntilEnd::new(inner, Some(place)))
        });
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_overall_and_per_source_and_given_back() {
        let layer = ArrivalsLayer::new(16, Refused::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let of_a: Vec<_> = (0..2).filter_map(|_| layer.places.take(a).ok()).collect();
        assert_eq!(of_a.len(), 2);
        assert_eq!(
            layer.places.take(a).unwrap_err(),
            "max_arriving_requests_per_source",
            "an eighth of 16 per source"
        );
        let mut others: Vec<_> = (3..20u8)
            .filter_map(|i| layer.places.take(IpAddr::from([10, 0, 1, i])).ok())
            .collect();
        assert_eq!(others.len(), 14, "16 overall");
        assert_eq!(layer.places.take(b).unwrap_err(), "max_arriving_requests");
        others.pop();
        assert!(
            layer.places.take(b).is_ok(),
            "a place given back is free again"
        );
        drop(of_a);
        assert!(!layer.places.held.lock().unwrap().1.contains_key(&a));
    }

    #[test]
    fn an_ipv6_source_is_its_slash_64() {
        let one: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let two: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        assert_eq!(source(one), source(two));
        assert_eq!(
            source("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
