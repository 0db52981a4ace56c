//! Who gets a connection slot: every listener's cap on open connections, an optional cap per source
//! address, and displacement at the cap.
//!
//! A connection is *unproven* from accept until it has shown it is a real client: its TLS handshake
//! completed with an authenticated peer, or its first request arrived, as its listener decides
//! ([`Ticket::proven`]). At the cap, a newcomer is not refused while any connection is unproven: it
//! takes the place of the oldest unproven connection of the source that holds the most unproven
//! ones, and that connection is closed ([`Displaceable`]). Sources that hold a proven connection
//! (a peer sidecar with its pooled connection, a sidecar with its bundle stream, the API server with
//! its keep-alive connections) lose an unproven one only after every other source has lost all of
//! theirs, as long as they hold at most [`SHIELDED_UNPROVEN`] unproven ones: past that, a source is
//! ranked as one without a proven connection (so a few valid credentials spread over many
//! addresses cannot each shield a flood of unproven connections behind one proven one). A flood of silent or slow connections, from one host or from many, so cannot keep a real
//! client out: the client's own connection is unproven only for the milliseconds its handshake
//! takes, and its source holds the fewest unproven connections, or a proven one. Only when every
//! open connection is proven is a newcomer refused.
//!
//! Proven connections are never displaced: they end by the listener's own timeouts.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, oneshot};

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its source already holds its cap of connections.
    PerSource,
    /// The listener is at its cap and every open connection is proven.
    Full,
}

impl Refused {
    /// The `reason` label of a refused-connections counter.
    pub fn reason(self) -> &'static str {
        match self {
            Self::PerSource => "max_connections_per_source",
            Self::Full => "max_connections",
        }
    }
}

/// A listener's slots. Cheap to clone: clones share the slots.
#[derive(Clone, Debug)]
pub struct Admission {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    max: usize,
    max_per_source: usize,
    /// At the per-source cap, a newcomer takes the place of its own source's oldest unproven
    /// connection, if it has one ([`Admission::displacing_within_source`]).
    displace_own: bool,
    /// How many leading bits of an IPv6 address name its source (128: the address itself).
    ipv6_prefix: u8,
    state: Mutex<State>,
    /// Woken when the last slot is given back.
    empty: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Slots taken. A displaced connection's slot passed to its successor at once.
    taken: usize,
    next: u64,
    sources: HashMap<IpAddr, Source>,
    /// Sources with unproven connections, the last is the next to lose one.
    ranking: BTreeSet<Rank>,
    /// Displaced connections whose tickets are not dropped yet (they hold no slot).
    displaced: HashSet<u64>,
}

/// A source's place in the ranking: (not shielded by a proven connection, how many unproven ones,
/// its oldest unproven one first, address).
type Rank = (bool, usize, Reverse<u64>, IpAddr);

/// The most unproven connections a source holding a proven one keeps shielded: ranked behind every
/// source without one. A real client's source rarely has more handshakes under way at once (an
/// outbound sidecar dialing pooled connections to a busy upstream, the API server opening
/// connections); a source with more is ranked as one with no proven connection, and, holding the
/// most, loses one first.
pub const SHIELDED_UNPROVEN: usize = 16;

#[derive(Debug, Default)]
struct Source {
    /// Open connections from this source, proven or not, displaced ones until they are dropped.
    open: usize,
    /// Open proven connections from this source.
    proven: usize,
    /// Unproven connections, oldest first, with the way to close each.
    unproven: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Source {
    fn rank(&self, ip: IpAddr) -> Option<Rank> {
        let (&oldest, _) = self.unproven.first_key_value()?;
        let shielded = self.proven > 0 && self.unproven.len() <= SHIELDED_UNPROVEN;
        Some((!shielded, self.unproven.len(), Reverse(oldest), ip))
    }
}

impl State {
    /// Changes one source, keeping the ranking right and the table free of empty sources.
    fn source<R>(&mut self, ip: IpAddr, change: impl FnOnce(&mut Source) -> R) -> R {
        let source = self.sources.entry(ip).or_default();
        if let Some(rank) = source.rank(ip) {
            self.ranking.remove(&rank);
        }
        let out = change(source);
        if let Some(rank) = source.rank(ip) {
            self.ranking.insert(rank);
        }
        if source.open == 0 && source.unproven.is_empty() {
            self.sources.remove(&ip);
        }
        out
    }
}

/// An admitted connection.
#[derive(Debug)]
pub struct Admitted {
    /// The connection's slot, given back when dropped.
    pub ticket: Ticket,
    /// Resolves when the connection is displaced; give it to [`Displaceable`].
    pub displacement: Displacement,
    /// Whether another connection was displaced to make room for this one.
    pub displaced_another: bool,
}

impl Admission {
    /// At most `max` connections open, at most `max_per_source` of them from one address.
    pub fn new(max: usize, max_per_source: Option<usize>) -> Self {
        Self::grouping_ipv6(max, max_per_source, 128)
    }

    /// [`Self::new`], but an IPv6 source is its first `prefix` bits (64: a /64, which one host
    /// may hold whole and draw addresses from at will), for the per-source cap and for the
    /// displacement order alike. IPv4 sources stay single addresses.
    pub fn grouping_ipv6(max: usize, max_per_source: Option<usize>, prefix: u8) -> Self {
        Self {
            inner: Arc::new(Inner {
                max,
                max_per_source: max_per_source.unwrap_or(usize::MAX),
                displace_own: false,
                ipv6_prefix: prefix.min(128),
                state: Mutex::new(State::default()),
                empty: Notify::new(),
            }),
        }
    }

    /// [`Self::new`], but a source at `max_per_source` is not refused while it holds an unproven
    /// connection: the newcomer takes the place of its source's oldest one. For a listener whose
    /// sources are few and each stands for many clients (the users of the processes on a unix
    /// socket): a source's silent connections then cannot keep its own real clients out, and its
    /// cap still leaves the other sources their room.
    pub fn displacing_within_source(max: usize, max_per_source: usize) -> Self {
        let mut admission = Self::new(max, Some(max_per_source));
        if let Some(inner) = Arc::get_mut(&mut admission.inner) {
            inner.displace_own = true;
        }
        admission
    }

    /// A slot for a connection from `source`, displacing an unproven connection at the cap.
    pub fn admit(&self, source: IpAddr) -> Result<Admitted, Refused> {
        // An IPv4 client of a dual-stack listener arrives as ::ffff:a.b.c.d: one source either way.
        let ip = match source.to_canonical() {
            IpAddr::V6(v6) if self.inner.ipv6_prefix < 128 => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.inner.ipv6_prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
            ip => ip,
        };
        let mut state = self.inner.lock();
        let at_source_cap =
            state.sources.get(&ip).map_or(0, |s| s.open) >= self.inner.max_per_source;
        let own_victim = if at_source_cap {
            let oldest = state
                .sources
                .get(&ip)
                .and_then(|s| s.unproven.keys().next().copied());
            match oldest {
                Some(victim) if self.inner.displace_own => Some(victim),
                _ => return Err(Refused::PerSource),
            }
        } else {
            None
        };
        let displaced_another = if let Some(victim) = own_victim {
            // Its slot passes to the newcomer; its source's count goes down when it is dropped.
            state.source(ip, |s| {
                if let Some(close) = s.unproven.remove(&victim) {
                    let _ = close.send(());
                }
            });
            state.displaced.insert(victim);
            true
        } else if state.taken < self.inner.max {
            state.taken += 1;
            false
        } else {
            let Some(&(_, _, Reverse(victim), victim_ip)) = state.ranking.last() else {
                return Err(Refused::Full);
            };
            state.source(victim_ip, |s| {
                if let Some(close) = s.unproven.remove(&victim) {
                    let _ = close.send(());
                }
            });
            state.displaced.insert(victim);
            true
        };
        let seq = state.next;
        state.next += 1;
        let (close, closed) = oneshot::channel();
        state.source(ip, |s| {
            s.open += 1;
            s.unproven.insert(seq, close);
        });
        Ok(Admitted {
            ticket: Ticket {
                inner: self.inner.clone(),
                seq,
                ip,
                proven: AtomicBool::new(false),
            },
            displacement: Displacement(Some(closed)),
            displaced_another,
        })
    }

    /// Slots taken.
    pub fn open(&self) -> usize {
        self.inner.lock().taken
    }

    /// Waits until every slot is given back.
    pub async fn drained(&self) {
        loop {
            let empty = self.inner.empty.notified();
            tokio::pin!(empty);
            empty.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            empty.await;
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One connection's slot.
#[derive(Debug)]
pub struct Ticket {
    inner: Arc<Inner>,
    seq: u64,
    ip: IpAddr,
    proven: AtomicBool,
}

impl Ticket {
    /// The connection has shown it is a real client: it is never displaced from now on. Cheap
    /// after the first call (one atomic load), so a listener may call it on every request.
    pub fn proven(&self) {
        if self.proven.load(Ordering::Relaxed) || self.proven.swap(true, Ordering::Relaxed) {
            return;
        }
        let mut state = self.inner.lock();
        // Dropping the sender tells the connection's `Displaceable` to stop watching.
        let counted = state.source(self.ip, |s| {
            let was_unproven = s.unproven.remove(&self.seq).is_some();
            if was_unproven {
                s.proven += 1;
            }
            was_unproven
        });
        if !counted {
            // Displaced already: it never counts as its source's proven connection.
            self.proven.store(false, Ordering::Relaxed);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        if !state.displaced.remove(&self.seq) {
            state.taken = state.taken.saturating_sub(1);
        }
        state.source(self.ip, |s| {
            s.open = s.open.saturating_sub(1);
            if s.unproven.remove(&self.seq).is_none() && self.proven.load(Ordering::Relaxed) {
                s.proven = s.proven.saturating_sub(1);
            }
        });
        if state.taken == 0 {
            self.inner.empty.notify_waiters();
        }
    }
}

/// Resolves when its connection is displaced; never, once the connection is proven.
#[derive(Debug)]
pub struct Displacement(Option<oneshot::Receiver<()>>);

impl Displacement {
    /// One that never fires (a connection that cannot be displaced).
    pub fn never() -> Self {
        Self(None)
    }

    /// Ready(true) once displaced. After the connection is proven it is polled once more and then
    /// never again.
    // Inlined: it runs at every read, write and flush of a connection, and after the connection
    // is proven it is only the first check.
    #[inline]
    fn poll_displaced(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(rx) = &mut self.0 else {
            return false;
        };
        match Pin::new(rx).poll(cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(_)) => {
                // Proven (or the admission is gone): nothing to watch any more.
                self.0 = None;
                false
            }
            Poll::Pending => false,
        }
    }
}

/// The error a displaced connection's reads and writes fail with.
#[derive(Debug, thiserror::Error)]
#[error("displaced by a newer connection at the connection limit before it proved itself")]
pub struct Displaced;

/// Whether an error, or any error in its chain, is a displacement.
pub fn is_displaced(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<Displaced>() {
            return true;
        }
        // An io::Error's `source` skips the error it wraps.
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.get_ref().is_some_and(|inner| inner.is::<Displaced>())
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// A connection's socket that fails every read and write once the connection is displaced. What
/// drives the connection (a TLS handshake, an HTTP server) then ends it as it ends any broken
/// connection. Once proven, a read or write costs one branch more.
#[derive(Debug)]
pub struct Displaceable<T> {
    io: T,
    displacement: Displacement,
    displaced: bool,
}

impl<T> Displaceable<T> {
    pub fn new(io: T, displacement: Displacement) -> Self {
        Self {
            io,
            displacement,
            displaced: false,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.displaced && self.displacement.poll_displaced(cx) {
            self.displaced = true;
        }
        if self.displaced {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, Displaced));
        }
        Ok(())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Displaceable<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Displaceable<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::io::{AsyncReadExt, duplex};

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    fn displaced(d: &mut Displacement) -> bool {
        let waker = std::task::Waker::noop();
        d.poll_displaced(&mut Context::from_waker(waker))
    }

    #[test]
    fn ipv6_sources_may_be_grouped_by_prefix() {
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        // By /64: a host drawing addresses from its /64 is one source.
        let a = Admission::grouping_ipv6(10, Some(2), 64);
        let _one = a.admit(v6("2001:db8:0:1::1")).unwrap();
        let _two = a.admit(v6("2001:db8:0:1::ffff:2")).unwrap();
        assert_eq!(
            a.admit(v6("2001:db8:0:1:8000::3")).unwrap_err(),
            Refused::PerSource
        );
        let _other = a.admit(v6("2001:db8:0:2::1")).expect("another /64");
        // IPv4 (mapped or not) stays one address each.
        let _v4 = a.admit(ip(1)).unwrap();
        let _v4b = a.admit(v6("::ffff:127.0.0.2")).unwrap();
        let _v4c = a.admit(ip(2)).unwrap();
        assert_eq!(a.admit(ip(2)).unwrap_err(), Refused::PerSource);
        // Ungrouped (the default): each IPv6 address is its own source.
        let b = Admission::new(10, Some(1));
        let _one = b.admit(v6("2001:db8:0:1::1")).unwrap();
        let _two = b.admit(v6("2001:db8:0:1::2")).unwrap();
    }

    #[test]
    fn displacing_within_source_a_source_at_its_cap_loses_its_own_oldest_unproven() {
        let a = Admission::displacing_within_source(4, 2);
        let mut own1 = a.admit(ip(1)).unwrap();
        let mut own2 = a.admit(ip(1)).unwrap();
        // At its cap, a newcomer of the source takes its oldest unproven connection's place.
        let mut n = a.admit(ip(1)).unwrap();
        assert!(n.displaced_another);
        assert!(displaced(&mut own1.displacement));
        assert!(!displaced(&mut own2.displacement));
        assert_eq!(a.open(), 2, "the slot passed on");
        drop(own1);
        assert_eq!(a.open(), 2);
        assert_eq!(a.inner.lock().sources[&ip(1)].open, 2);
        // Both proven: the source is refused, and the others keep their room.
        own2.ticket.proven();
        n.ticket.proven();
        assert_eq!(a.admit(ip(1)).unwrap_err(), Refused::PerSource);
        let _other = a.admit(ip(2)).expect("another source");
        let _other2 = a.admit(ip(2)).expect("another source");
        assert!(!displaced(&mut n.displacement));
        // Without the option, a source at its cap is refused whatever it holds.
        let b = Admission::new(4, Some(1));
        let _one = b.admit(ip(1)).unwrap();
        assert_eq!(b.admit(ip(1)).unwrap_err(), Refused::PerSource);
    }

    #[test]
    fn under_the_cap_everyone_is_admitted_and_slots_come_back() {
        let a = Admission::new(2, None);
        let one = a.admit(ip(1)).unwrap();
        let two = a.admit(ip(1)).unwrap();
        assert!(!one.displaced_another && !two.displaced_another);
        assert_eq!(a.open(), 2);
        drop(one);
        assert_eq!(a.open(), 1);
        drop(two);
        assert_eq!(a.open(), 0);
        assert!(a.inner.lock().sources.is_empty());
        assert!(a.inner.lock().ranking.is_empty());
    }

    #[test]
    fn at_the_cap_the_oldest_unproven_of_the_busiest_source_makes_room() {
        let a = Admission::new(4, None);
        // The flooding host holds three unproven connections, the client one proven and nothing else.
        let mut f1 = a.admit(ip(9)).unwrap();
        let mut f2 = a.admit(ip(9)).unwrap();
        let mut f3 = a.admit(ip(9)).unwrap();
        let mut c = a.admit(ip(1)).unwrap();
        c.ticket.proven();
        // A newcomer from a third host: the flooder's oldest goes.
        let mut n = a.admit(ip(2)).unwrap();
        assert!(n.displaced_another);
        assert!(displaced(&mut f1.displacement));
        assert!(!displaced(&mut f2.displacement));
        assert!(!displaced(&mut f3.displacement));
        assert!(!displaced(&mut c.displacement));
        assert!(!displaced(&mut n.displacement));
        assert_eq!(a.open(), 4);
        // The displaced connection's end gives back no slot: its successor has it.
        drop(f1);
        assert_eq!(a.open(), 4);
        assert_eq!(a.inner.lock().sources[&ip(9)].open, 2);
        // The flooder still holds the most unproven connections (2 against 1).
        let _m = a.admit(ip(3)).unwrap();
        assert!(displaced(&mut f2.displacement));
        assert!(!displaced(&mut n.displacement));
    }

    #[test]
    fn a_source_holding_a_proven_connection_loses_an_unproven_one_last() {
        let a = Admission::new(4, None);
        // More flooding sources than slots: each holds one unproven connection, as does the client,
        // whose source also holds a proven one (a pooled connection).
        let pooled = a.admit(ip(1)).unwrap();
        pooled.ticket.proven();
        let mut client = a.admit(ip(1)).unwrap();
        let mut f1 = a.admit(ip(8)).unwrap();
        let mut f2 = a.admit(ip(9)).unwrap();
        let _n1 = a.admit(ip(10)).unwrap();
        let _n2 = a.admit(ip(11)).unwrap();
        assert!(displaced(&mut f1.displacement));
        assert!(displaced(&mut f2.displacement));
        assert!(
            !displaced(&mut client.displacement),
            "the client's handshake was cut"
        );
        // Once its pooled connection is gone, the client's source is ranked like any other.
        drop(pooled);
        let _n3 = a.admit(ip(12)).unwrap();
        assert!(!displaced(&mut client.displacement));
        let _n4 = a.admit(ip(13)).unwrap();
        assert!(
            displaced(&mut client.displacement),
            "the oldest unproven goes"
        );
    }

    #[test]
    fn a_proven_connection_shields_only_a_few_unproven_ones() {
        let a = Admission::new(SHIELDED_UNPROVEN + 5, None);
        // A source with one proven connection floods unproven ones behind it, past the shield.
        let liar = a.admit(ip(1)).unwrap();
        liar.ticket.proven();
        let mut flood: Vec<Admitted> = (0..=SHIELDED_UNPROVEN)
            .map(|_| a.admit(ip(1)).unwrap())
            .collect();
        // A real client's source: one proven connection and one handshake under way.
        let pooled = a.admit(ip(2)).unwrap();
        pooled.ticket.proven();
        let mut client = a.admit(ip(2)).unwrap();
        // A new client's handshake, from an address holding nothing else.
        let mut fresh = a.admit(ip(5)).unwrap();
        // At the cap: the flood loses its oldest first, though its source holds a proven one.
        let _newcomer = a.admit(ip(3)).unwrap();
        assert!(
            displaced(&mut flood[0].displacement),
            "the flood is not shielded"
        );
        assert!(!displaced(&mut fresh.displacement));
        assert!(!displaced(&mut client.displacement));
        // Back within the shield (16 unproven), it is ranked behind the sources without a proven
        // connection again: the oldest of those goes.
        let _next = a.admit(ip(4)).unwrap();
        assert!(displaced(&mut fresh.displacement));
        assert!(
            !flood[1..]
                .iter_mut()
                .any(|f| displaced(&mut f.displacement)),
            "shielded again"
        );
    }

    #[test]
    fn a_displaced_connection_that_proves_itself_late_counts_for_nothing() {
        let a = Admission::new(1, None);
        let old = a.admit(ip(1)).unwrap();
        let _new = a.admit(ip(2)).unwrap();
        old.ticket.proven();
        assert_eq!(a.inner.lock().sources[&ip(1)].proven, 0);
        drop(old);
        assert!(!a.inner.lock().sources.contains_key(&ip(1)));
    }

    #[test]
    fn among_equal_sources_the_oldest_unproven_connection_goes() {
        let a = Admission::new(3, None);
        let mut old = a.admit(ip(1)).unwrap();
        let mut mid = a.admit(ip(2)).unwrap();
        let mut young = a.admit(ip(3)).unwrap();
        let _n = a.admit(ip(4)).unwrap();
        assert!(displaced(&mut old.displacement));
        assert!(!displaced(&mut mid.displacement));
        assert!(!displaced(&mut young.displacement));
    }

    #[test]
    fn when_every_connection_is_proven_the_newcomer_is_refused() {
        let a = Admission::new(2, None);
        let mut one = a.admit(ip(1)).unwrap();
        let two = a.admit(ip(2)).unwrap();
        one.ticket.proven();
        two.ticket.proven();
        // Called again it is a no-op.
        one.ticket.proven();
        assert_eq!(a.admit(ip(3)).unwrap_err(), Refused::Full);
        // The proven connection's watcher stops watching and is never displaced.
        assert!(!displaced(&mut one.displacement));
        assert!(one.displacement.0.is_none());
        drop(two);
        assert!(a.admit(ip(3)).is_ok());
    }

    #[test]
    fn the_per_source_cap_counts_every_open_connection_and_ipv4_mapped_is_the_same_source() {
        let a = Admission::new(10, Some(2));
        let one = a.admit(ip(1)).unwrap();
        let mapped = IpAddr::V6(Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped());
        let two = a.admit(mapped).unwrap();
        two.ticket.proven();
        assert_eq!(a.admit(ip(1)).unwrap_err(), Refused::PerSource);
        assert!(a.admit(ip(2)).is_ok());
        drop(one);
        assert!(a.admit(ip(1)).is_ok());
    }

    #[test]
    fn a_displaced_connection_counts_against_its_source_until_it_is_dropped() {
        let a = Admission::new(1, Some(1));
        let old = a.admit(ip(1)).unwrap();
        let _new = a.admit(ip(2)).unwrap();
        assert_eq!(a.admit(ip(1)).unwrap_err(), Refused::PerSource);
        drop(old);
        assert!(a.inner.lock().displaced.is_empty());
        assert!(!a.inner.lock().sources.contains_key(&ip(1)));
    }

    #[tokio::test]
    async fn drained_waits_for_the_last_slot() {
        let a = Admission::new(2, None);
        let one = a.admit(ip(1)).unwrap();
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.drained().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(one);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("drained returns once the slot is back")
            .unwrap();
        a.drained().await;
    }

    #[tokio::test]
    async fn a_displaced_socket_fails_its_pending_read_with_a_displacement() {
        let a = Admission::new(1, None);
        let first = a.admit(ip(1)).unwrap();
        let (client, server) = duplex(64);
        let mut io = Displaceable::new(server, first.displacement);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            io.read(&mut buf).await
        });
        tokio::task::yield_now().await;
        let _second = a.admit(ip(2)).unwrap();
        let err = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .expect("the read wakes up")
            .unwrap()
            .unwrap_err();
        assert!(is_displaced(&err), "{err}");
        assert!(!is_displaced(&io::Error::other("something else")));
        drop(client);
    }

    #[tokio::test]
    async fn a_proven_socket_reads_on_after_a_newcomer_is_refused() {
        use tokio::io::AsyncWriteExt;
        let a = Admission::new(1, None);
        let first = a.admit(ip(1)).unwrap();
        first.ticket.proven();
        let (mut client, server) = duplex(64);
        let mut io = Displaceable::new(server, first.displacement);
        assert_eq!(a.admit(ip(2)).unwrap_err(), Refused::Full);
        client.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
    }
}
