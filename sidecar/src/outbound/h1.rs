//! HTTP/1.1 over mTLS to the upstream sidecar, for the app's HTTP/1.1 requests that have no body
//! and an idempotent method (`GET`, `HEAD`, `DELETE`, `OPTIONS`...), when no other request of the
//! listener is waiting for its answer: pooled connections, one exchange at a time on each, written
//! and read by the task that serves the app's request ([`crate::bare`]). Everything else (bodies,
//! h2 and gRPC apps, requests while others are in flight) goes over h2 ([`super::upstream`]).
//!
//! Why both. A request alone gains nothing from h2, and the h2 codecs at both sidecars and the
//! hand-over between a request's task and the connection's task were the largest cost of a
//! request (`scripts/request-instructions.sh`): an HTTP/1.1 exchange is one TLS record each way,
//! read and written where the request is served. Measured on a benchmark pair at 1,000 req/s over
//! 32 connections: 35.4k instructions per request at the inbound instead of 50.4k, 29.3k at the
//! outbound instead of 43.0k, about a sixth less CPU. But with every request on HTTP/1.1, a
//! saturated pair served a quarter fewer requests: concurrent requests on one h2 connection share
//! reads, writes and TLS records, and one connection per request shares nothing. So requests
//! that find others in flight go together on h2.
//!
//! At most `--max-upstream-http1-connections` (64) of an upstream's pooled connections carry an
//! exchange at once; past it a request goes over h2. A response the app does not read holds its
//! connection, and the upstream counts every connection of ours against its
//! `--max-connections-per-peer` (1,000): without the cap, an app that asks for large responses one
//! after another and reads none would have us dial until the upstream refused all our connections,
//! the h2 one included.
//!
//! A pooled connection obeys the rules of the h2 one: it takes no new request once a renewed
//! certificate or a new bundle is in force (new connections present and verify those), nor within
//! [`super::upstream::RETIRE_MARGIN`] of the earlier of the two certificates' expiries; an exchange
//! under way ends at once when the bundle revokes the upstream. Only idempotent requests travel
//! here, so a pooled connection that the upstream closed as the request went out (its idle timeout,
//! its certificate's expiry) is retried on a new one safely. The kernel's TCP keep-alive watches
//! each connection for a vanished upstream (h2 connections are pinged instead).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Version};
use hyper::body::Body as HttpBody;
use meshid_runtime::wake::WhenWoken;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::dial::{Alpn, DialPermits, dial_with, upstream_http_ended};
use super::upstream::retire_at;
use crate::bare::{Bare, Dial, Wire};
use crate::conn::Shared;
use crate::creds::Snapshot;
use crate::http::root_cause;
use crate::settings::Outbound;
use crate::tls::ClientTlsStream;

/// How long an idle upstream connection is kept at most. Shorter than the upstream's wait for a
/// request head (its idle timeout, at most 60 s), so that it is ours that closes an idle
/// connection, not a request crossing the upstream's close. Never longer than the h2 connection's
/// ping period (`upstream_ping`): an h2 connection is known to be alive that recently (its last
/// ping was answered), an HTTP/1.1 one by its last exchange, so one idle for longer is not used
/// again (a stuck upstream would hold the request until its timeout).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// A request goes over HTTP/1.1 only while its listener's requests begin, on average, at least
/// this far apart (below about 2,000 a second), and none is waiting for its answer. Faster than
/// that, requests overlap often enough to share the h2 connection's reads, writes and TLS records,
/// and one sent alone among them costs several times a shared one: at saturation, letting every
/// request that found none in flight take HTTP/1.1 cost a benchmark pair 4% of its throughput,
/// though only 1.3% of requests took it.
pub const QUIET_GAP: Duration = Duration::from_micros(500);

/// The longest gap between two requests that [`Pace`] counts: after an idle spell, a burst is
/// recognised within about 16 requests.
const LONGEST_GAP: Duration = Duration::from_millis(4);

/// How an outbound listener's requests are paced: a moving average of the gaps between the starts
/// of its requests (weight 1/8 for the newest), shared by all its connections.
pub(crate) struct Pace {
    epoch: std::time::Instant,
    /// When the last request began, in nanoseconds after `epoch`.
    last_start: AtomicU64,
    /// The average gap, in nanoseconds.
    mean_gap: AtomicU64,
}

impl Pace {
    pub(crate) fn new() -> Self {
        Self {
            epoch: std::time::Instant::now(),
            last_start: AtomicU64::new(0),
            mean_gap: AtomicU64::new(nanos(LONGEST_GAP)),
        }
    }

    /// Counts a request beginning now with `others` of the listener's requests in flight; whether
    /// the listener is quiet enough for it to travel alone over HTTP/1.1.
    pub(crate) fn quiet(&self, others: usize) -> bool {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.quiet_at(now, others)
    }

    fn quiet_at(&self, now: u64, others: usize) -> bool {
        let last = self.last_start.swap(now, Ordering::Relaxed);
        let gap = now.saturating_sub(last).min(nanos(LONGEST_GAP));
        // Concurrent updates may lose one another's sample: an estimate is all this needs.
        let mean = self.mean_gap.load(Ordering::Relaxed);
        let mean = mean - mean / 8 + gap / 8;
        self.mean_gap.store(mean, Ordering::Relaxed);
        others == 0 && mean >= nanos(QUIET_GAP)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The error of a dial that found the upstream declining HTTP/1.1 ([`H1Dial::declined`]).
pub(crate) const DECLINED: &str = "the upstream did not agree to HTTP/1.1";

/// How long an upstream's refusal of HTTP/1.1 is remembered. Then a connection offering it is
/// dialed once more: the address may have been given to an HTTP-mode inbound since (a redeployed
/// service, another pod behind the same Service address), and a refusal costs one handshake.
pub const DECLINE_REMEMBERED: Duration = Duration::from_secs(300);

/// Until when an upstream's requests all go over h2, because it declined HTTP/1.1.
struct Declined {
    epoch: std::time::Instant,
    /// Nanoseconds after `epoch`; 0 while the upstream has not declined.
    until: AtomicU64,
}

impl Declined {
    fn new() -> Self {
        Self {
            epoch: std::time::Instant::now(),
            until: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        nanos(self.epoch.elapsed())
    }

    /// Whether a refusal is remembered at `now`. No clock is read while there was none.
    fn at(&self, now: impl FnOnce() -> u64) -> bool {
        let until = self.until.load(Ordering::Relaxed);
        until != 0 && now() < until
    }

    /// Remembers a refusal seen at `now`; whether none was remembered then (the one to log).
    fn seen_at(&self, now: u64) -> bool {
        let fresh = !self.at(|| now);
        let until = now.saturating_add(nanos(DECLINE_REMEMBERED)).max(1);
        self.until.store(until, Ordering::Relaxed);
        fresh
    }
}

/// Whether the app's request `req` travels over HTTP/1.1 to the upstream.
pub fn suits<B: HttpBody>(req: &Request<B>) -> bool {
    req.version() != Version::HTTP_2 && req.method().is_idempotent() && crate::bare::suits(req)
}

/// Dials mTLS connections offering ALPN `http/1.1` to one upstream.
pub(crate) struct H1Dial {
    spec: Arc<Outbound>,
    index: usize,
    shared: Shared,
    /// The upstream did not agree to ALPN `http/1.1`: its requests all go over h2 for a while.
    declined: Declined,
    /// The listener's dials in progress ([`DialPermits`]), shared with its h2 upstream.
    dials: DialPermits,
}

impl H1Dial {
    /// Whether the upstream declined HTTP/1.1 when a connection was dialed, within the last
    /// [`DECLINE_REMEMBERED`] (a TCP-mode inbound, whose app may speak h2 only, offers no ALPN; a
    /// server of another mesh may offer h2 only).
    pub(crate) fn declined(&self) -> bool {
        self.declined.at(|| self.declined.now())
    }
}

/// The pool of one outbound HTTP listener, closing idle connections in the background while it
/// lives. Must be called within the runtime.
pub(crate) fn pool(
    spec: Arc<Outbound>,
    index: usize,
    shared: Shared,
    dials: DialPermits,
) -> Arc<Bare<H1Dial>> {
    let idle_timeout = IDLE_TIMEOUT
        .min(shared.limits.upstream_ping)
        .max(Duration::from_millis(100));
    let max_busy = shared.limits.max_upstream_http1_connections;
    let pool = Bare::capped(
        H1Dial {
            spec,
            index,
            shared,
            declined: Declined::new(),
            dials,
        },
        idle_timeout,
        max_busy,
    );
    let weak = Arc::downgrade(&pool);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(idle_timeout / 2).await;
            match weak.upgrade() {
                Some(pool) => pool.prune(Instant::now()),
                None => return,
            }
        }
    });
    pool
}

impl fmt::Display for H1Dial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec.remote)
    }
}

type Revoked = WhenWoken<Pin<Box<dyn Future<Output = &'static str> + Send + Sync>>>;

/// One mTLS connection to the upstream, and what decides whether it may carry another exchange.
pub(crate) struct UpstreamWire {
    tls: ClientTlsStream<TcpStream>,
    /// No new exchange from this instant on (certificate expiries), when ages are capped.
    retire_at: Option<Instant>,
    /// The credentials the connection presents: no new exchange once others are in force.
    presented: Arc<Snapshot>,
    /// Resolves when the bundle revokes the upstream (logged and counted there) or its certificate
    /// expired a grace period ago ([`upstream_http_ended`]), with the reason; polled during
    /// exchanges, only when it was woken.
    revoked: Revoked,
}

impl Dial for H1Dial {
    type Wire = UpstreamWire;
    const WHO: &'static str = "the upstream";

    async fn dial(&self) -> Result<UpstreamWire, String> {
        let (tls, presented) = dial_with(
            &self.spec,
            self.index,
            &self.shared,
            Alpn::Http11,
            &self.dials,
        )
        .await
        .map_err(|e| root_cause(&e))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"http/1.1") {
            if self.declined.seen_at(self.declined.now()) {
                tracing::info!(
                    upstream = %self.spec.remote,
                    "the upstream did not agree to HTTP/1.1 (ALPN); all its requests go over h2 \
                     for {} s, then HTTP/1.1 is offered again",
                    DECLINE_REMEMBERED.as_secs()
                );
            }
            return Err(DECLINED.to_owned());
        }
        if let Err(error) = meshid_runtime::net::keepalive(tls.get_ref().0) {
            tracing::debug!(%error, upstream = %self.spec.remote, "TCP keep-alive not set");
        }
        let revoked: Revoked = WhenWoken::new(Box::pin(upstream_http_ended(
            &tls,
            &presented,
            self.spec.local.port(),
            &self.shared,
        )));
        Ok(UpstreamWire {
            retire_at: retire_at(&tls, &presented, &self.shared),
            tls,
            presented,
            revoked,
        })
    }

    fn fresh(&self, wire: &UpstreamWire) -> bool {
        wire.retire_at.is_none_or(|t| Instant::now() < t)
            && self.shared.creds.is_current(&wire.presented)
    }

    /// `--max-header-bytes`, as on the h2 path (its `SETTINGS_MAX_HEADER_LIST_SIZE`): a longer
    /// response head is a 502 to the app, its connection closed.
    fn max_head(&self) -> usize {
        self.shared.limits.max_header_bytes
    }

    /// `--idle-timeout`, as on the h2 path ([`super::silence`]).
    fn body_silence(&self) -> Option<Duration> {
        Some(self.shared.limits.idle_timeout)
    }
}

impl Wire for UpstreamWire {
    fn poll_abort(&mut self, cx: &mut Context<'_>) -> Poll<String> {
        Pin::new(&mut self.revoked).poll(cx).map(str::to_owned)
    }

    /// Any TLS record waiting on the socket (an idle upstream sends none: a close_notify, or bytes
    /// of a response past its end).
    fn unread_in_kernel(&self) -> bool {
        crate::bare::unread_in_kernel(self.tls.get_ref().0)
    }
}

impl AsyncRead for UpstreamWire {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for UpstreamWire {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn only_bodiless_idempotent_http1_requests_suit() {
        let req = |method: Method, version: Version| {
            Request::builder()
                .method(method)
                .version(version)
                .uri("/")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap()
        };
        for m in [Method::GET, Method::HEAD, Method::DELETE, Method::OPTIONS] {
            assert!(suits(&req(m.clone(), Version::HTTP_11)), "{m}");
            assert!(suits(&req(m.clone(), Version::HTTP_10)), "{m}");
            assert!(
                !suits(&req(m.clone(), Version::HTTP_2)),
                "{m} from an h2 app"
            );
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!suits(&req(m.clone(), Version::HTTP_11)), "{m}");
        }
        let with_body = Request::get("/")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"x")))
            .unwrap();
        assert!(!suits(&with_body));
    }

    #[test]
    fn requests_take_http1_only_while_the_listener_is_quiet() {
        let pace = Pace::new();
        let ms = |n: u64| n * 1_000_000;
        // A listener's first request, after an idle spell, and at 1,000 a second: quiet.
        assert!(pace.quiet_at(ms(1_000), 0));
        for i in 1..=50 {
            assert!(
                pace.quiet_at(ms(1_000 + i), 0),
                "request {i} at 1,000 a second"
            );
        }
        // Another request in flight: never.
        assert!(!pace.quiet_at(ms(1_052), 1));
        // A burst at 10,000 a second: quiet only until the average has caught up with it, and not
        // again while it lasts, even for a request that happens to find none in flight.
        let mut t = ms(1_052);
        let mut alone_on_h1 = 0;
        for i in 0..200 {
            t += 100_000;
            if pace.quiet_at(t, 0) {
                alone_on_h1 += 1;
                assert!(i < 20, "request {i} of the burst went over HTTP/1.1");
            }
        }
        assert!(alone_on_h1 < 20, "{alone_on_h1}");
        // The burst over, the listener is quiet again within a few requests.
        let quiet_again = (1..=20).position(|i| pace.quiet_at(t + ms(i * 2), 0));
        assert!(quiet_again.is_some_and(|i| i < 10), "{quiet_again:?}");
        // A clock that seems to go back (requests racing for the stamp) counts as no gap.
        let before = pace.mean_gap.load(Ordering::Relaxed);
        pace.quiet_at(t, 0);
        assert!(pace.mean_gap.load(Ordering::Relaxed) < before);
    }

    #[test]
    fn a_refusal_of_http1_is_remembered_for_a_while_then_tried_again() {
        let declined = Declined::new();
        let s = |n: u64| n * 1_000_000_000;
        let never = || -> u64 { panic!("the clock is read before any refusal") };
        assert!(!declined.at(never));
        // The first refusal is the one logged; another within the time is not, and extends it.
        assert!(declined.seen_at(s(10)));
        assert!(declined.at(|| s(10)));
        assert!(declined.at(|| s(10) + nanos(DECLINE_REMEMBERED) - 1));
        assert!(!declined.seen_at(s(20)));
        assert!(declined.at(|| s(20) + nanos(DECLINE_REMEMBERED) - 1));
        // Past it, HTTP/1.1 is offered again, and a new refusal is logged again.
        let past = s(20) + nanos(DECLINE_REMEMBERED);
        assert!(!declined.at(|| past));
        assert!(declined.seen_at(past));
        assert!(declined.at(|| past + 1));
        // A refusal at the epoch itself still counts.
        let at_epoch = Declined::new();
        at_epoch.seen_at(0);
        assert!(at_epoch.at(|| 0));
    }
}
