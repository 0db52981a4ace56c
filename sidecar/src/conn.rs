//! Pieces every listener shares: the per-listener context, connection permits, byte counting on the
//! connection's own side ([`Metered`]), and a bidirectional copy with half-close and an idle timeout.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use meshid_runtime::admission::{Admission, Admitted, Refused, Ticket};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::creds::CredentialStore;
use crate::metrics::Metrics;
use crate::policy::PolicyStore;
use crate::settings::Limits;

/// What every listener needs.
#[derive(Clone)]
pub struct Shared {
    pub creds: Arc<CredentialStore>,
    pub policy: PolicyStore,
    /// Moves on every applied policy change: open connections re-check that they are still allowed.
    pub policy_changed: watch::Receiver<u64>,
    pub metrics: Metrics,
    pub limits: Limits,
    /// Turns true on SIGTERM: listeners stop accepting, HTTP connections drain.
    pub shutdown: watch::Receiver<bool>,
    /// Recent denials by decision ID (`meshid-sidecar explain`).
    pub decisions: Arc<crate::decisions::DecisionLog>,
    /// What the inbound has seen (`meshid-sidecar suggest-policy`).
    pub observed: Arc<crate::observed::ObservedTraffic>,
    /// Told when connections free their buffers, so the freed pages go back to the kernel.
    pub heap: meshid_runtime::heap::Trimmer,
    /// The memory form bodies read whole to find `_method` may hold together
    /// (`--form-body-memory`; see [`crate::inbound::form_budget`]).
    pub form_bodies: crate::inbound::form_budget::FormBudget,
}

/// A listener's connection slots (see [`meshid_runtime::admission`]): at the limit a newcomer takes
/// the place of a connection that has not proved itself yet, or is refused when every one has;
/// draining waits until every slot is back.
#[derive(Clone, Debug)]
pub struct ConnLimit {
    admission: Admission,
}

impl ConnLimit {
    pub fn new(max: usize) -> Self {
        Self {
            admission: Admission::new(max, None),
        }
    }

    /// A slot for a connection from `source`.
    pub fn admit(&self, source: std::net::IpAddr) -> Result<Admitted, Refused> {
        self.admission.admit(source)
    }

    /// Waits until no connection holds a slot.
    pub async fn drained(&self) {
        self.admission.drained().await;
    }

    pub fn open(&self) -> usize {
        self.admission.open()
    }
}

/// One accepted connection's place: its slot, its peer's share (h2 or not) and its count in
/// `connections_open`, all given back when the last holder drops it. An upgraded HTTP connection
/// (a WebSocket tunnel) holds a clone after hyper hands the socket over, so it keeps counting
/// against `max_connections` and `max_connections_per_peer`.
#[derive(Debug)]
pub struct ConnSlot {
    ticket: Ticket,
    peer: std::sync::OnceLock<PeerShare>,
    open: prometheus_client::metrics::gauge::Gauge,
}

impl ConnSlot {
    pub fn new(ticket: Ticket, open: prometheus_client::metrics::gauge::Gauge) -> Arc<Self> {
        open.inc();
        Arc::new(Self {
            ticket,
            peer: std::sync::OnceLock::new(),
            open,
        })
    }

    /// Holds the connection's place in its peer's count for as long as the slot lives.
    pub fn hold_peer(&self, share: PeerShare) {
        let _ = self.peer.set(share);
    }

    /// The connection turned out to speak h2: counted among its peer's h2 connections
    /// ([`PeerShare::speak_h2`]). A connection held by no peer (the outbound's app side) is
    /// counted nowhere.
    pub fn speak_h2(&self) -> Result<(), PeerOverCap> {
        self.peer.get().map_or(Ok(()), PeerShare::speak_h2)
    }

    /// The identity of the peer whose share the connection holds.
    pub fn peer_id(&self) -> Option<&str> {
        self.peer.get().map(PeerShare::id)
    }

    /// The connection has proved itself (an authenticated peer, or the app's first request): it is
    /// no longer displaced at the limit.
    pub fn proven(&self) {
        self.ticket.proven();
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Inbound connections open per peer (an authenticated identity at one address: one pod; the
/// replicas of a workload share its identity but not their addresses) on one listener
/// (`--max-connections-per-peer`), and how many of them speak h2
/// (`--max-h2-connections-per-peer`). Proven connections are never displaced at the listener's
/// cap, so without this one workload holding a valid certificate could take every slot, or hold
/// an h2 connection's buffers in every one of them.
#[derive(Clone, Debug)]
pub struct PeerCounts {
    table: Arc<PeerTable>,
}

#[derive(Debug)]
struct PeerTable {
    max: usize,
    max_h2: usize,
    counts: std::sync::Mutex<std::collections::HashMap<PeerKey, PeerCount>>,
}

type PeerKey = (String, std::net::IpAddr);

#[derive(Debug, Default)]
struct PeerCount {
    open: usize,
    /// How many of the `open` ones speak h2.
    h2: usize,
    /// Told the log once that this peer reached its cap (until it drops below it).
    warned: bool,
    /// The same for its h2 cap.
    warned_h2: bool,
}

/// Why a peer's connection was refused: whether this is the first refusal since it reached its cap.
#[derive(Debug, PartialEq, Eq)]
pub struct PeerOverCap {
    pub first: bool,
}

impl PeerCounts {
    /// At most `max` connections per peer, `max_h2` of them speaking h2.
    pub fn new(max: usize, max_h2: usize) -> Self {
        Self {
            table: Arc::new(PeerTable {
                max,
                max_h2,
                counts: std::sync::Mutex::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<PeerKey, PeerCount>> {
        self.table.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One more connection for `id` at `ip`, unless that peer holds `max` already.
    pub fn try_acquire(&self, id: &str, ip: std::net::IpAddr) -> Result<PeerShare, PeerOverCap> {
        let key = (id.to_owned(), ip.to_canonical());
        let mut counts = self.lock();
        let count = counts.entry(key.clone()).or_default();
        if count.open >= self.table.max {
            let first = !count.warned;
            count.warned = true;
            return Err(PeerOverCap { first });
        }
        count.open += 1;
        Ok(PeerShare {
            counts: self.clone(),
            key,
            h2: AtomicBool::new(false),
        })
    }
}

/// One connection's place in its peer's count.
#[derive(Debug)]
pub struct PeerShare {
    counts: PeerCounts,
    key: PeerKey,
    /// Counted among its peer's h2 connections ([`PeerShare::speak_h2`]).
    h2: AtomicBool,
}

impl PeerShare {
    /// The connection turned out to speak h2: counted among its peer's h2 connections until it
    /// ends, unless that peer holds `max_h2` already. Once per connection (when it opens), never
    /// per request.
    pub fn speak_h2(&self) -> Result<(), PeerOverCap> {
        let mut counts = self.counts.lock();
        // This share keeps its peer's entry (`open` counts it), so the entry is there; were it
        // not, the connection would go uncounted: refuse it instead.
        let Some(count) = counts.get_mut(&self.key) else {
            return Err(PeerOverCap { first: false });
        };
        if self.h2.load(Ordering::Relaxed) {
            return Ok(());
        }
        if count.h2 >= self.counts.table.max_h2 {
            let first = !count.warned_h2;
            count.warned_h2 = true;
            return Err(PeerOverCap { first });
        }
        count.h2 += 1;
        self.h2.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The peer's identity.
    pub fn id(&self) -> &str {
        &self.key.0
    }
}

impl Drop for PeerShare {
    fn drop(&mut self) {
        let h2 = *self.h2.get_mut();
        let mut counts = self.counts.lock();
        if let Some(count) = counts.get_mut(&self.key) {
            count.open = count.open.saturating_sub(1);
            count.warned = false;
            if h2 {
                count.h2 = count.h2.saturating_sub(1);
                count.warned_h2 = false;
            }
            if count.open == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// The side of a connection that opened it (the peer's TLS stream inbound, the app's socket
/// outbound), counting the application bytes read from it (`received`) and written to it (`sent`):
/// plaintext, HTTP framing included, TLS records excluded. One relaxed atomic add per read or write
/// on counters resolved when the connection started (see [`crate::metrics::ConnMetrics`]).
#[derive(Debug)]
pub struct Metered<T> {
    inner: T,
    received: Counter,
    sent: Counter,
}

impl<T> Metered<T> {
    pub fn new(inner: T, metrics: &crate::metrics::ConnMetrics) -> Self {
        Self {
            inner,
            received: metrics.received.clone(),
            sent: metrics.sent.clone(),
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            this.received.inc_by(n as u64);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, data))?;
        this.sent.inc_by(n as u64);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        this.sent.inc_by(n as u64);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

fn now_millis(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

async fn pump<R, W>(
    mut from: R,
    mut to: W,
    activity: Arc<AtomicU64>,
    start: Instant,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Waiting for data, a pump holds only this small buffer (in its future): an idle TCP stream
    // or tunnel held two 16 KiB heap buffers for its whole life, 32 KiB a connection. A read that
    // fills it means more is waiting: the pump then reads on with a large buffer for as long as
    // data is ready, and frees it as soon as a read would wait.
    let mut small = [0u8; SMALL_READ];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut small).await?;
        if n == 0 {
            // Half-close: the other side learns there is no more data, but may keep sending.
            to.shutdown().await?;
            return Ok(total);
        }
        send(&mut to, &small[..n], &mut total, &activity, start).await?;
        if n < SMALL_READ {
            continue;
        }
        let mut large = vec![0u8; LARGE_READ];
        while let Some(read) = read_ready(&mut from, &mut large).await {
            let n = read?;
            if n == 0 {
                to.shutdown().await?;
                return Ok(total);
            }
            send(&mut to, &large[..n], &mut total, &activity, start).await?;
        }
    }
}

/// What a pump reads while it waits for data (see [`pump`]).
const SMALL_READ: usize = 2 * 1024;
/// What it reads while data keeps coming.
const LARGE_READ: usize = 16 * 1024;

/// One read into `buf` if data is ready now; `None` if the read would wait (nothing is lost: a
/// read that is not ready has read nothing).
async fn read_ready<R: AsyncRead + Unpin>(
    from: &mut R,
    buf: &mut [u8],
) -> Option<io::Result<usize>> {
    std::future::poll_fn(|cx| {
        let mut read = tokio::io::ReadBuf::new(buf);
        match Pin::new(&mut *from).poll_read(cx, &mut read) {
            Poll::Pending => Poll::Ready(None),
            Poll::Ready(r) => Poll::Ready(Some(r.map(|()| read.filled().len()))),
        }
    })
    .await
}

async fn send<W: AsyncWrite + Unpin>(
    to: &mut W,
    data: &[u8],
    total: &mut u64,
    activity: &AtomicU64,
    start: Instant,
) -> io::Result<()> {
    to.write_all(data).await?;
    // Writers may buffer (TLS records, coalescing): what was read is sent now.
    to.flush().await?;
    *total += data.len() as u64;
    activity.store(now_millis(start), Ordering::Relaxed);
    Ok(())
}

/// Whether a copy that ended in `error` ended in a way both ends may take as an ordinary close: the
/// idle timeout. Anything else (a reset, a TLS stream that ended without `close_notify`) cut a
/// stream short, and the other end is told with a reset, not a FIN.
pub fn ended_quietly(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::TimedOut
}

/// Copies both ways until both directions finish, propagating half-close; gives up when neither side
/// has sent anything for `idle`.
///
/// A plain function that splits both streams before its future is made: an `async fn` keeps its
/// arguments in its future for its whole life, a TLS stream's state (over 1 KiB) among them after
/// it had been moved into its halves.
pub fn copy_bidirectional_idle<A, B>(
    a: A,
    b: B,
    idle: Duration,
) -> impl std::future::Future<Output = io::Result<(u64, u64)>>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    async move {
        let start = Instant::now();
        let activity = Arc::new(AtomicU64::new(0));
        let (a_act, b_act) = (activity.clone(), activity.clone());
        // The pumps' futures are made inside this one: made outside and moved in, each would be
        // held twice (its 2 KiB buffer too), once where it was made and once where it is awaited.
        let both =
            async move { tokio::try_join!(pump(ar, bw, a_act, start), pump(br, aw, b_act, start)) };
        tokio::pin!(both);
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        loop {
            let last = activity.load(Ordering::Relaxed);
            let elapsed = now_millis(start).saturating_sub(last);
            let wait = Duration::from_millis(idle_ms.saturating_sub(elapsed).max(1));
            tokio::select! {
                r = &mut both => return r,
                () = tokio::time::sleep(wait) => {
                    let last = activity.load(Ordering::Relaxed);
                    if now_millis(start).saturating_sub(last) >= idle_ms {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        let (mut client, proxy_a) = duplex(64);
        let (proxy_b, mut server) = duplex(64);
        let task = tokio::spawn(copy_bidirectional_idle(
            proxy_a,
            proxy_b,
            Duration::from_secs(5),
        ));
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        // The server can still answer after the client half-closed.
        server.write_all(b"pong").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
        assert_eq!(task.await.unwrap().unwrap(), (4, 4));
    }

    /// Bulk data both ways arrives whole and in order (the pump switches to its large buffer and
    /// back), and a message that exactly fills the small buffer is passed on without waiting for
    /// more.
    #[tokio::test]
    async fn bulk_and_buffer_sized_messages_arrive_whole() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, proxy_a) = duplex(4096);
        let (proxy_b, mut server) = duplex(4096);
        let copy = tokio::spawn(copy_bidirectional_idle(
            proxy_a,
            proxy_b,
            Duration::from_secs(30),
        ));
        // Exactly SMALL_READ bytes, then silence: the answer must come back without more input.
        let message: Vec<u8> = (0..SMALL_READ).map(|i| (i % 251) as u8).collect();
        client.write_all(&message).await.unwrap();
        let mut got = vec![0u8; SMALL_READ];
        tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut got))
            .await
            .expect("a buffer-sized message is passed on at once")
            .unwrap();
        assert_eq!(got, message);
        // A megabyte each way at once.
        let up: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(7) % 253) as u8)
            .collect();
        let down: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(13) % 241) as u8)
            .collect();
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(server);
        let (u, d) = (up.clone(), down.clone());
        let writers = tokio::spawn(async move {
            let a = async {
                cw.write_all(&u).await.unwrap();
                cw.shutdown().await.unwrap();
            };
            let b = async {
                sw.write_all(&d).await.unwrap();
                sw.shutdown().await.unwrap();
            };
            tokio::join!(a, b);
        });
        let (mut at_server, mut at_client) = (Vec::new(), Vec::new());
        let (a, b) = tokio::join!(
            sr.read_to_end(&mut at_server),
            cr.read_to_end(&mut at_client)
        );
        a.unwrap();
        b.unwrap();
        writers.await.unwrap();
        assert_eq!(at_server, up);
        assert_eq!(at_client, down);
        let (to_server, to_client) = copy.await.unwrap().unwrap();
        assert_eq!(
            (to_server, to_client),
            ((SMALL_READ + (1 << 20)) as u64, 1 << 20)
        );
    }

    #[tokio::test]
    async fn metered_counts_what_crosses_its_side() {
        let metrics = crate::metrics::Metrics::default();
        let conn = crate::metrics::ConnMetrics::new(
            &metrics,
            "inbound",
            1,
            crate::metrics::PeerLabel(None),
        );
        let (client, proxy_a) = duplex(64);
        let (proxy_b, mut server) = duplex(64);
        let task = tokio::spawn(copy_bidirectional_idle(
            Metered::new(proxy_a, &conn),
            proxy_b,
            Duration::from_secs(5),
        ));
        let mut client = client;
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        server.write_all(b"hi").await.unwrap();
        server.shutdown().await.unwrap();
        client.read_to_end(&mut got).await.unwrap();
        task.await.unwrap().unwrap();
        assert_eq!((conn.received.get(), conn.sent.get()), (5, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_closed() {
        let (_client, proxy_a) = duplex(64);
        let (proxy_b, _server) = duplex(64);
        let err = copy_bidirectional_idle(proxy_a, proxy_b, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn a_peer_is_held_to_its_share_and_warned_about_once() {
        let peers = PeerCounts::new(2, 2);
        let (here, there) = (
            std::net::IpAddr::from([10, 0, 0, 1]),
            std::net::IpAddr::from([10, 0, 0, 2]),
        );
        let a = peers.try_acquire("spiffe://td/a", here).unwrap();
        let b = peers.try_acquire("spiffe://td/a", here).unwrap();
        assert_eq!(
            peers.try_acquire("spiffe://td/a", here).unwrap_err(),
            PeerOverCap { first: true }
        );
        assert_eq!(
            peers.try_acquire("spiffe://td/a", here).unwrap_err(),
            PeerOverCap { first: false }
        );
        // Another identity at the same address, and the same identity at another address (a
        // replica of the same workload), have shares of their own.
        let other = peers.try_acquire("spiffe://td/b", here).unwrap();
        let replica = peers.try_acquire("spiffe://td/a", there).unwrap();
        drop(a);
        let c = peers.try_acquire("spiffe://td/a", here).unwrap();
        assert_eq!(
            peers.try_acquire("spiffe://td/a", here).unwrap_err(),
            PeerOverCap { first: true }
        );
        drop((b, c, other, replica));
        assert!(peers.lock().is_empty(), "no entry left behind");
    }

    #[test]
    fn a_peer_speaks_h2_on_its_h2_share_only() {
        let peers = PeerCounts::new(4, 2);
        let ip = std::net::IpAddr::from([10, 0, 0, 1]);
        let share = || peers.try_acquire("spiffe://td/a", ip).unwrap();
        let (a, b, c, d) = (share(), share(), share(), share());
        a.speak_h2().unwrap();
        a.speak_h2().unwrap();
        b.speak_h2().unwrap();
        assert_eq!(c.speak_h2().unwrap_err(), PeerOverCap { first: true });
        assert_eq!(c.speak_h2().unwrap_err(), PeerOverCap { first: false });
        // Another peer's h2 share is its own.
        let other = peers.try_acquire("spiffe://td/b", ip).unwrap().speak_h2();
        assert!(other.is_ok());
        // A connection that never spoke h2 gives back no h2 share; an h2 one does.
        drop(d);
        assert_eq!(c.speak_h2().unwrap_err(), PeerOverCap { first: false });
        drop(a);
        c.speak_h2().unwrap();
        let e = share();
        assert_eq!(e.speak_h2().unwrap_err(), PeerOverCap { first: true });
        drop((b, c, e));
        assert!(peers.lock().is_empty(), "no entry left behind");
    }

    #[tokio::test]
    async fn limit_refuses_past_max_once_every_connection_is_proven() {
        let limit = ConnLimit::new(2);
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        let a = limit.admit(ip).unwrap();
        let b = limit.admit(ip).unwrap();
        a.ticket.proven();
        b.ticket.proven();
        assert_eq!(limit.admit(ip).unwrap_err(), Refused::Full);
        assert_eq!(limit.open(), 2);
        drop(a);
        assert!(limit.admit(ip).is_ok());
    }
}
