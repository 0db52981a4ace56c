//! Which webhook connections are proven: never displaced at the connection cap
//! ([`meshid_runtime::admission`]). A connection is proven by its first well-formed
//! AdmissionReview answered, but the webhook does not know who sent it: the API server, or any pod
//! that reaches the port with a review it wrote itself (the chart leaves the port open to every
//! pod, as the API server's address is not known in advance). So one address holds at most
//! [`MAX_PROVEN_PER_SOURCE`] proven connections; its others stay displaceable however many reviews
//! they carry. Before, eight pods holding 64 connections each (the per-source cap), each with one
//! review answered, proved every slot of the 512, and every newcomer, the API server's
//! reconnections included, was refused at accept.
//!
//! The API server holds few connections: over HTTP/2 one per API server process, another only
//! when 64 reviews are in flight on it; several API server replicas behind one address (a proxy,
//! konnectivity) share the eight. Taking every slot now needs 64 addresses (pods) at the chart's
//! cap of 512.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use meshid_runtime::admission::Ticket;
use meshid_runtime::log_limit::LogLimit;

/// The most proven webhook connections one address holds.
pub const MAX_PROVEN_PER_SOURCE: usize = 8;

/// How many proven connections each address holds, shared by one listener's connections.
#[derive(Clone, Debug, Default)]
pub struct ProvenSources(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl ProvenSources {
    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Proven connections `source` holds now.
    pub fn held(&self, source: IpAddr) -> usize {
        self.lock().get(&source).copied().unwrap_or(0)
    }
}

/// One connection's slot ticket and its claim to a proven place of its address; the place is
/// given back when the connection ends (this is dropped).
#[derive(Debug)]
pub struct Proof {
    ticket: Ticket,
    source: IpAddr,
    sources: ProvenSources,
    /// Whether this connection holds one of its address's proven places.
    holds: AtomicBool,
}

impl Proof {
    pub fn new(ticket: Ticket, source: IpAddr, sources: ProvenSources) -> Self {
        Self {
            ticket,
            source,
            sources,
            holds: AtomicBool::new(false),
        }
    }

    /// A well-formed review was answered on this connection: it is proven if its address holds
    /// fewer than [`MAX_PROVEN_PER_SOURCE`] proven connections; otherwise it stays displaceable,
    /// and a later review tries again (one of the others may have closed). One atomic load once
    /// proven. Whether the connection holds a proven place now.
    pub fn prove(&self) -> bool {
        if self.holds.load(Ordering::Acquire) {
            return true;
        }
        let mut held = self.sources.lock();
        // Two streams of one HTTP/2 connection may get here at once: one place each connection.
        if self.holds.load(Ordering::Acquire) {
            return true;
        }
        let count = held.entry(self.source).or_insert(0);
        if *count >= MAX_PROVEN_PER_SOURCE {
            drop(held);
            static FULL: LogLimit = LogLimit::new(5.0, 1.0);
            if let Some(left_out) = FULL.take() {
                tracing::warn!(
                    source = %self.source,
                    max = MAX_PROVEN_PER_SOURCE,
                    left_out,
                    "an address holds the most proven webhook connections; its further \
                     connections stay displaceable at the connection cap"
                );
            }
            return false;
        }
        *count += 1;
        self.holds.store(true, Ordering::Release);
        drop(held);
        self.ticket.proven();
        true
    }
}

impl Drop for Proof {
    fn drop(&mut self) {
        if !self.holds.load(Ordering::Acquire) {
            return;
        }
        let mut held = self.sources.lock();
        if let Some(count) = held.get_mut(&self.source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_runtime::admission::Admission;

    fn proof(admission: &Admission, sources: &ProvenSources, ip: &str) -> Proof {
        let ip: IpAddr = ip.parse().unwrap();
        let admitted = admission.admit(ip).unwrap();
        Proof::new(admitted.ticket, ip, sources.clone())
    }

    #[test]
    fn one_address_proves_at_most_its_share_and_gets_places_back_as_connections_end() {
        let admission = Admission::new(64, None);
        let sources = ProvenSources::default();
        let mut held: Vec<Proof> = (0..MAX_PROVEN_PER_SOURCE + 3)
            .map(|_| proof(&admission, &sources, "10.0.0.9"))
            .collect();
        let proven = held.iter().filter(|p| p.prove()).count();
        assert_eq!(proven, MAX_PROVEN_PER_SOURCE);
        assert_eq!(
            sources.held("10.0.0.9".parse().unwrap()),
            MAX_PROVEN_PER_SOURCE
        );
        // Proving again changes nothing, for the proven and for the others.
        assert!(held[0].prove());
        assert!(!held[MAX_PROVEN_PER_SOURCE].prove());
        assert_eq!(
            sources.held("10.0.0.9".parse().unwrap()),
            MAX_PROVEN_PER_SOURCE
        );
        // Another address has its own share.
        let other = proof(&admission, &sources, "10.0.0.10");
        assert!(other.prove());
        // A proven connection ends: the next review on a displaceable one proves it.
        held.remove(0);
        assert_eq!(
            sources.held("10.0.0.9".parse().unwrap()),
            MAX_PROVEN_PER_SOURCE - 1
        );
        let last = held.len() - 1;
        assert!(held[last].prove());
        assert_eq!(
            sources.held("10.0.0.9".parse().unwrap()),
            MAX_PROVEN_PER_SOURCE
        );
        drop(held);
        drop(other);
        assert!(sources.lock().is_empty(), "every place given back");
    }

    #[test]
    fn a_connection_never_proven_gives_back_nothing() {
        let admission = Admission::new(64, None);
        let sources = ProvenSources::default();
        let proven: Vec<Proof> = (0..MAX_PROVEN_PER_SOURCE)
            .map(|_| proof(&admission, &sources, "10.0.0.9"))
            .collect();
        assert!(proven.iter().all(Proof::prove));
        drop(proof(&admission, &sources, "10.0.0.9"));
        assert_eq!(
            sources.held("10.0.0.9".parse().unwrap()),
            MAX_PROVEN_PER_SOURCE
        );
    }
}
