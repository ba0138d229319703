//! Hybrid exchanges started, completed and failed, and how long the
//! completed ones took, per role. The tasks that run exchanges count into
//! [`ExchangeStats`] (atomics, no lock); the driver copies a snapshot into
//! `status.json` once a second, and `/metrics` renders that snapshot: one
//! source for both.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::Role;

/// Upper bounds (seconds) of `keyd_exchange_duration_seconds`: a hybrid
/// exchange on a LAN takes a few milliseconds; a new QUIC connection over a
/// long path, or a peer under load, up to the exchange deadline (10 s).
pub const DURATION_BOUNDS: [f64; 12] = [
    0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets: one per bound, and the overflow bucket.
const BUCKETS: usize = DURATION_BOUNDS.len() + 1;

/// No `completed` counter of its own: it is the sum of the buckets, so a
/// snapshot's `completed` and the histogram's `_count` always agree.
#[derive(Default)]
struct RoleStats {
    started: AtomicU64,
    failed: AtomicU64,
    /// Non-cumulative: `buckets[i]` counts durations in (bound[i-1], bound[i]].
    buckets: [AtomicU64; BUCKETS],
    sum_micros: AtomicU64,
}

/// Live counters, shared by every exchange task.
#[derive(Default)]
pub struct ExchangeStats {
    initiator: RoleStats,
    responder: RoleStats,
}

impl ExchangeStats {
    fn role(&self, role: Role) -> &RoleStats {
        match role {
            Role::Initiator => &self.initiator,
            Role::Responder => &self.responder,
        }
    }

    /// An exchange began: as initiator, a dial; as responder, a msg1 that
    /// passed mac1 and admission control (public-key work is about to start).
    pub fn started(&self, role: Role) {
        self.role(role).started.fetch_add(1, Ordering::Relaxed);
    }

    /// It ended with a key agreed, `took` after it started.
    pub fn completed(&self, role: Role, took: Duration) {
        let r = self.role(role);
        r.buckets[bucket_of(took)].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        r.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// It ended without a key.
    pub fn failed(&self, role: Role) {
        self.role(role).failed.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now. Each is read on its own (no lock against the
    /// exchange tasks), so an exchange that completes during the snapshot
    /// may be in `duration_buckets` (and `completed`, their sum) but not yet
    /// in `duration_sum_micros`, or the reverse: `_sum` may be off by one
    /// exchange's duration for one scrape, as with Prometheus' own clients.
    /// `started` may likewise be read before an exchange that then completes.
    pub fn snapshot(&self) -> ExchangeCounters {
        let of = |r: &RoleStats| {
            let duration_buckets: Vec<u64> = r
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
            RoleCounters {
                started: r.started.load(Ordering::Relaxed),
                completed: duration_buckets.iter().sum(),
                failed: r.failed.load(Ordering::Relaxed),
                duration_buckets,
                duration_sum_micros: r.sum_micros.load(Ordering::Relaxed),
            }
        };
        ExchangeCounters {
            initiator: of(&self.initiator),
            responder: of(&self.responder),
        }
    }
}

/// The bucket a duration falls in: the first bound at or above it.
fn bucket_of(took: Duration) -> usize {
    let secs = took.as_secs_f64();
    DURATION_BOUNDS
        .iter()
        .position(|b| secs <= *b)
        .unwrap_or(DURATION_BOUNDS.len())
}

/// What `status.json` holds (`exchanges`), per role.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeCounters {
    pub initiator: RoleCounters,
    pub responder: RoleCounters,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleCounters {
    pub started: u64,
    pub completed: u64,
    pub failed: u64,
    /// Completed exchanges per bucket of [`DURATION_BOUNDS`] (not
    /// cumulative), the last one above every bound.
    pub duration_buckets: Vec<u64>,
    pub duration_sum_micros: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fall_in_the_first_bucket_at_or_above_them() {
        let ms = Duration::from_millis;
        assert_eq!(bucket_of(Duration::ZERO), 0);
        assert_eq!(bucket_of(ms(2)), 0, "a bound is inclusive");
        assert_eq!(bucket_of(ms(3)), 1);
        assert_eq!(bucket_of(ms(100)), 5);
        assert_eq!(
            bucket_of(Duration::from_secs(10)),
            DURATION_BOUNDS.len() - 1
        );
        assert_eq!(bucket_of(Duration::from_secs(11)), DURATION_BOUNDS.len());
    }

    #[test]
    fn counts_are_kept_per_role() {
        let s = ExchangeStats::default();
        s.started(Role::Initiator);
        s.started(Role::Initiator);
        s.completed(Role::Initiator, Duration::from_millis(30));
        s.failed(Role::Initiator);
        s.started(Role::Responder);
        let c = s.snapshot();
        assert_eq!(
            (
                c.initiator.started,
                c.initiator.completed,
                c.initiator.failed
            ),
            (2, 1, 1)
        );
        assert_eq!(c.initiator.duration_buckets.len(), BUCKETS);
        assert_eq!(
            c.initiator.duration_buckets[4], 1,
            "30 ms is in (25, 50] ms"
        );
        assert_eq!(c.initiator.duration_sum_micros, 30_000);
        assert_eq!(
            (
                c.responder.started,
                c.responder.completed,
                c.responder.failed
            ),
            (1, 0, 0)
        );
        assert_eq!(c.responder.duration_buckets.iter().sum::<u64>(), 0);
    }

    /// Exchanges complete while the driver takes its snapshot: in every
    /// snapshot, the completed count is the histogram's count.
    #[test]
    fn completed_and_the_histogram_count_agree_in_every_snapshot() {
        let s = std::sync::Arc::new(ExchangeStats::default());
        let writers: Vec<_> = (0..2)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..200_000u64 {
                        s.completed(Role::Responder, Duration::from_micros(i % 20_000));
                    }
                })
            })
            .collect();
        while !writers.iter().all(|w| w.is_finished()) {
            let c = s.snapshot().responder;
            assert_eq!(c.completed, c.duration_buckets.iter().sum::<u64>());
        }
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(s.snapshot().responder.completed, 400_000);
    }
}
