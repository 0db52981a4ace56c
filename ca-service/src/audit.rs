//! Audit lines of refused calls, bounded per source. A refusal needs no credential (a bad CSR, a
//! made-up token), so one caller could otherwise fill the CA's log. Each source (an IPv4 address,
//! an IPv6 /64) gets [`RefusalLimits::per_source`] lines per window and all sources together
//! [`RefusalLimits::overall`]; a refusal beyond is not written but counted
//! (`meshid_ca_audit_refusals_suppressed_total`, besides the refusal's own metrics, which count
//! every one), and when the window ends one line per source says how many of its refusals were
//! left out ("N more refusals from ADDR suppressed"), up to [`RefusalLimits::summaries`] sources,
//! then one line for the rest.
//!
//! Refusals of a proven identity (a certificate verified at the handshake, a token refused for
//! its identity's revocation: never one a credential merely claims) have a budget of their own,
//! the same size: junk refusals from an address, which need no credential, cannot use up the
//! lines that would name a revoked identity trying again from there.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

/// How many refusal lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalLimits {
    pub window: Duration,
    /// Lines per source per window.
    pub per_source: u32,
    /// Lines per window, every source together.
    pub overall: u32,
    /// Sources tracked apart per window; refusals from more are summarised together.
    pub sources: usize,
    /// Per-source summary lines per window; the rest in one line.
    pub summaries: usize,
}

impl Default for RefusalLimits {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            per_source: 20,
            overall: 600,
            sources: 4_096,
            summaries: 32,
        }
    }
}

/// A source of refusals: an IPv4 address, or an IPv6 /64 (one host may hold a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    V4(std::net::Ipv4Addr),
    V6Prefix(u64),
    /// No address (a call not over the TLS listener: tests).
    Unknown,
}

impl Source {
    pub fn of(addr: Option<SocketAddr>) -> Self {
        match addr.map(|a| a.ip().to_canonical()) {
            Some(IpAddr::V4(v4)) => Self::V4(v4),
            Some(IpAddr::V6(v6)) => Self::V6Prefix((v6.to_bits() >> 64) as u64),
            None => Self::Unknown,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::V4(a) => write!(f, "{a}"),
            Self::V6Prefix(p) => {
                let addr = std::net::Ipv6Addr::from_bits(u128::from(*p) << 64);
                write!(f, "{addr}/64")
            }
            Self::Unknown => f.write_str("an unknown address"),
        }
    }
}

#[derive(Debug)]
struct Window {
    started: Instant,
    written: u32,
    by_source: HashMap<Source, (u32, u64)>,
    /// Suppressed refusals from sources past `sources`.
    untracked: u64,
}

/// The budget of refusal lines, and the count of those left out.
#[derive(Debug)]
pub struct RefusalLog {
    limits: RefusalLimits,
    /// Refusals of no proven identity, then those of one.
    windows: [Mutex<Window>; 2],
    suppressed: Counter,
}

/// One line saying how many refusals were left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    /// `None`: the sources not summarised one by one.
    pub source: Option<Source>,
    /// How many sources this line stands for.
    pub sources: usize,
    pub refusals: u64,
    /// Refusals of proven identities (their own budget).
    pub proven: bool,
}

fn new_window(now: Instant) -> Mutex<Window> {
    Mutex::new(Window {
        started: now,
        written: 0,
        by_source: HashMap::new(),
        untracked: 0,
    })
}

impl RefusalLog {
    pub fn new(limits: RefusalLimits, suppressed: Counter) -> Self {
        let now = Instant::now();
        Self {
            limits,
            windows: [new_window(now), new_window(now)],
            suppressed,
        }
    }

    /// Whether a refusal from `source` at `now` gets its audit line; `proven`: the refused call's
    /// identity was proven (its budget is its own). One that does not is counted; a window that
    /// ended is summarised first ([`Self::flush`]).
    pub fn admit(&self, source: Source, proven: bool, now: Instant) -> bool {
        let ended = self.rotate(now);
        write_summaries(&ended);
        let mut w = self.lock(proven);
        let tracked = w.by_source.len() < self.limits.sources || w.by_source.contains_key(&source);
        let admitted = if tracked {
            let under_overall = w.written < self.limits.overall;
            let entry = w.by_source.entry(source).or_default();
            if entry.0 < self.limits.per_source && under_overall {
                entry.0 += 1;
                true
            } else {
                entry.1 += 1;
                false
            }
        } else {
            w.untracked += 1;
            false
        };
        if admitted {
            w.written += 1;
        } else {
            self.suppressed.inc();
        }
        admitted
    }

    /// Ends the window if it is over at `now`, writing its summary lines; returns them. Called
    /// every window by the server, so the last one is summarised when the refusals stop.
    pub fn flush(&self, now: Instant) -> Vec<Suppressed> {
        let ended = self.rotate(now);
        write_summaries(&ended);
        ended
    }

    /// Starts new windows where the current ones are over; the old ones' summaries.
    fn rotate(&self, now: Instant) -> Vec<Suppressed> {
        let mut lines = self.rotate_one(false, now);
        lines.extend(self.rotate_one(true, now));
        lines
    }

    fn rotate_one(&self, proven: bool, now: Instant) -> Vec<Suppressed> {
        let mut w = self.lock(proven);
        if now.saturating_duration_since(w.started) < self.limits.window {
            return Vec::new();
        }
        let old = std::mem::replace(
            &mut *w,
            Window {
                started: now,
                written: 0,
                by_source: HashMap::new(),
                untracked: 0,
            },
        );
        drop(w);
        let mut left_out: Vec<(Source, u64)> = old
            .by_source
            .into_iter()
            .filter(|(_, (_, n))| *n > 0)
            .map(|(s, (_, n))| (s, n))
            .collect();
        left_out.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        let mut lines: Vec<Suppressed> = left_out
            .iter()
            .take(self.limits.summaries)
            .map(|(s, n)| Suppressed {
                source: Some(*s),
                sources: 1,
                refusals: *n,
                proven,
            })
            .collect();
        let rest = left_out.get(self.limits.summaries..).unwrap_or(&[]);
        let rest_refusals = rest.iter().map(|(_, n)| n).sum::<u64>() + old.untracked;
        if rest_refusals > 0 {
            lines.push(Suppressed {
                source: None,
                sources: rest.len() + usize::from(old.untracked > 0),
                refusals: rest_refusals,
                proven,
            });
        }
        lines
    }

    fn lock(&self, proven: bool) -> std::sync::MutexGuard<'_, Window> {
        self.windows[usize::from(proven)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

fn write_summaries(lines: &[Suppressed]) {
    for line in lines {
        let of = if line.proven {
            " of proven identities"
        } else {
            ""
        };
        match line.source {
            Some(source) => tracing::warn!(
                target: "meshid_ca::audit",
                source = %source,
                suppressed = line.refusals,
                proven = line.proven,
                "{} more refusals{of} from {source} suppressed",
                line.refusals
            ),
            None => tracing::warn!(
                target: "meshid_ca::audit",
                suppressed = line.refusals,
                proven = line.proven,
                "{} more refusals{of} from other sources suppressed",
                line.refusals
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(limits: RefusalLimits) -> (RefusalLog, Counter) {
        let counter = Counter::default();
        (RefusalLog::new(limits, counter.clone()), counter)
    }

    #[test]
    fn a_source_gets_a_few_lines_per_window_and_a_summary() {
        let (log, suppressed) = log(RefusalLimits::default());
        let t0 = Instant::now();
        let a = Source::of(Some("192.0.2.7:40000".parse().unwrap()));
        let b = Source::of(Some("192.0.2.8:40000".parse().unwrap()));
        let written = (0..10_000).filter(|_| log.admit(a, false, t0)).count();
        assert_eq!(written, 20);
        assert_eq!(suppressed.get(), 9_980);
        // Another source has its own budget.
        assert!(log.admit(b, false, t0));
        // So do refusals of proven identities from the same source: its junk did not use them up.
        assert!(
            log.admit(a, true, t0),
            "a proven identity's refusal is written"
        );
        assert!(
            log.flush(t0 + Duration::from_secs(1)).is_empty(),
            "mid-window"
        );
        let summary = log.flush(t0 + Duration::from_secs(60));
        assert_eq!(
            summary,
            vec![Suppressed {
                source: Some(a),
                sources: 1,
                refusals: 9_980,
                proven: false,
            }]
        );
        // A new window: the budget again.
        assert!(log.admit(a, false, t0 + Duration::from_secs(61)));
        // The proven budget is as small per source.
        let t1 = t0 + Duration::from_secs(61);
        let proven = (0..100).filter(|_| log.admit(a, true, t1)).count();
        assert_eq!(proven, 20);
    }

    #[test]
    fn many_sources_are_bounded_overall_and_summarised_together() {
        let limits = RefusalLimits {
            per_source: 2,
            overall: 50,
            sources: 100,
            summaries: 3,
            ..RefusalLimits::default()
        };
        let (log, suppressed) = log(limits);
        let t0 = Instant::now();
        let mut written = 0;
        for i in 0..1_000u32 {
            // Every IPv6 address in its own /64.
            let ip = std::net::Ipv6Addr::from_bits(u128::from(i) << 64 | 1);
            let source = Source::of(Some(SocketAddr::new(ip.into(), 1)));
            for _ in 0..3 {
                written += usize::from(log.admit(source, false, t0));
            }
        }
        assert_eq!(written, 50);
        assert_eq!(suppressed.get(), 3_000 - 50);
        let summary = log.flush(t0 + limits.window);
        assert_eq!(summary.len(), 4, "{summary:?}");
        assert_eq!(summary.iter().map(|s| s.refusals).sum::<u64>(), 2_950);
        assert!(summary[3].source.is_none());
        // Addresses of one /64 are one source.
        let one = Source::of(Some("[2001:db8::1]:1".parse().unwrap()));
        let other = Source::of(Some("[2001:db8::2]:1".parse().unwrap()));
        assert_eq!(one, other);
        assert_eq!(one.to_string(), "2001:db8::/64");
    }
}
