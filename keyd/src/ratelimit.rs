//! Bounding the rate of log lines an attacker can cause. A refusal is logged
//! through a [`LogLimiter`] keyed by a static reason label: each label gets
//! a token bucket (a burst, then a steady rate), and a line that is let
//! through says how many of its kind were dropped since the previous one.
//! Sans-IO: time comes in as an argument, so the tests run on simulated time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines let through at once for a label before the steady rate applies.
pub const DEFAULT_BURST: u32 = 10;
/// The steady rate, per label: one line per this interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// What to do with one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` lines of the same label were dropped since the
    /// last one logged (say "(N similar suppressed)" when it is not 0).
    Log { suppressed: u64 },
    /// Drop it; it is counted and reported with the next logged line.
    Suppress,
}

#[derive(Debug)]
struct Bucket {
    tokens: u32,
    /// The time up to which refills have been credited.
    refilled: Instant,
    suppressed: u64,
}

/// A token bucket per reason label. Memory is bounded by the number of
/// distinct labels, which are `&'static str` constants in the program.
#[derive(Debug)]
pub struct LogLimiter {
    burst: u32,
    interval: Duration,
    buckets: HashMap<&'static str, Bucket>,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new(DEFAULT_BURST, DEFAULT_INTERVAL)
    }
}

impl LogLimiter {
    /// `burst` lines at once per label, then one per `interval`. A zero
    /// interval lets everything through; a zero burst is taken as 1.
    pub fn new(burst: u32, interval: Duration) -> Self {
        Self {
            burst: burst.max(1),
            interval,
            buckets: HashMap::new(),
        }
    }

    /// Decides whether a line with reason `key` may be logged at `now`.
    pub fn check(&mut self, key: &'static str, now: Instant) -> Verdict {
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            refilled: now,
            suppressed: 0,
        });
        refill(bucket, self.burst, self.interval, now);
        if bucket.tokens == 0 {
            bucket.suppressed += 1;
            return Verdict::Suppress;
        }
        bucket.tokens -= 1;
        Verdict::Log {
            suppressed: std::mem::take(&mut bucket.suppressed),
        }
    }

    /// Takes the counts of lines dropped since each label last logged, so a
    /// periodic tick can report a flood that stopped (after which no line
    /// of that label would carry the count).
    pub fn take_suppressed(&mut self) -> Vec<(&'static str, u64)> {
        let mut out: Vec<_> = self
            .buckets
            .iter_mut()
            .filter(|(_, b)| b.suppressed > 0)
            .map(|(k, b)| (*k, std::mem::take(&mut b.suppressed)))
            .collect();
        out.sort_unstable();
        out
    }
}

fn refill(bucket: &mut Bucket, burst: u32, interval: Duration, now: Instant) {
    if interval.is_zero() {
        bucket.tokens = burst;
        bucket.refilled = now;
        return;
    }
    // A `now` earlier than the last refill (callers' clocks read out of
    // order) credits nothing.
    let elapsed = now.saturating_duration_since(bucket.refilled);
    let earned = elapsed.as_nanos() / interval.as_nanos();
    let room = u128::from(burst - bucket.tokens);
    if earned >= room {
        bucket.tokens = burst;
        bucket.refilled = bucket.refilled.max(now);
    } else if earned > 0 {
        // Credit whole intervals only, keeping the remainder for next time.
        // `earned` < `room` <= u32::MAX, so both conversions are exact.
        bucket.tokens += earned as u32;
        bucket.refilled += interval * earned as u32;
    }
}

/// A [`LogLimiter`] behind a mutex, for callers on several tasks or threads.
/// The lock is held only inside [`check`](Self::check), which never awaits.
#[derive(Debug, Default)]
pub struct SharedLogLimiter(Mutex<LogLimiter>);

impl SharedLogLimiter {
    pub fn new(burst: u32, interval: Duration) -> Self {
        Self(Mutex::new(LogLimiter::new(burst, interval)))
    }

    /// [`LogLimiter::check`].
    pub fn check(&self, key: &'static str, now: Instant) -> Verdict {
        // A panic elsewhere while holding the lock leaves counters that are
        // still valid; keep limiting rather than propagate it.
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check(key, now)
    }

    /// Logs `line()` as a warning if `key` is within its rate, saying how
    /// many lines like it were suppressed since the last one.
    pub fn warn(&self, key: &'static str, line: impl FnOnce() -> String) {
        if let Verdict::Log { suppressed } = self.check(key, Instant::now()) {
            if suppressed > 0 {
                tracing::warn!("{} ({suppressed} similar suppressed)", line());
            } else {
                tracing::warn!("{}", line());
            }
        }
    }

    /// [`LogLimiter::take_suppressed`].
    pub fn take_suppressed(&self) -> Vec<(&'static str, u64)> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_suppressed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn logged(l: &mut LogLimiter, key: &'static str, now: Instant, n: usize) -> usize {
        (0..n)
            .filter(|_| matches!(l.check(key, now), Verdict::Log { .. }))
            .count()
    }

    #[test]
    fn a_burst_then_one_per_interval() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(10, S);
        assert_eq!(logged(&mut l, "bad-cert", t0, 1000), 10);
        assert_eq!(logged(&mut l, "bad-cert", t0 + S / 2, 1000), 0);
        assert_eq!(logged(&mut l, "bad-cert", t0 + S, 1000), 1);
        assert_eq!(logged(&mut l, "bad-cert", t0 + 3 * S, 1000), 2);
    }

    #[test]
    fn a_flood_like_the_one_seen_is_bounded() {
        // 27,937 lines in 20 s from one connection: now at most burst + 20.
        let t0 = Instant::now();
        let mut l = LogLimiter::default();
        let step = Duration::from_secs(20) / 27_937;
        let n = (0..27_937u32)
            .filter(|&i| matches!(l.check("refused", t0 + step * i), Verdict::Log { .. }))
            .count();
        assert!(n <= DEFAULT_BURST as usize + 20, "{n}");
        assert!(n >= DEFAULT_BURST as usize + 19, "{n}");
    }

    #[test]
    fn the_next_logged_line_counts_what_was_suppressed() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(2, S);
        assert_eq!(l.check("k", t0), Verdict::Log { suppressed: 0 });
        assert_eq!(l.check("k", t0), Verdict::Log { suppressed: 0 });
        for _ in 0..5 {
            assert_eq!(l.check("k", t0), Verdict::Suppress);
        }
        assert_eq!(l.check("k", t0 + S), Verdict::Log { suppressed: 5 });
        assert_eq!(l.check("k", t0 + S), Verdict::Suppress);
        assert_eq!(l.check("k", t0 + 2 * S), Verdict::Log { suppressed: 1 });
    }

    #[test]
    fn labels_have_separate_buckets() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(3, S);
        assert_eq!(logged(&mut l, "a", t0, 100), 3);
        assert_eq!(logged(&mut l, "b", t0, 100), 3);
        assert_eq!(l.check("a", t0 + S), Verdict::Log { suppressed: 97 });
    }

    #[test]
    fn a_quiet_label_refills_only_up_to_the_burst() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(4, S);
        assert_eq!(logged(&mut l, "k", t0, 4), 4);
        assert_eq!(logged(&mut l, "k", t0 + 3600 * S, 100), 4);
    }

    #[test]
    fn partial_intervals_are_not_lost() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(2, S);
        assert_eq!(logged(&mut l, "k", t0, 2), 2);
        // Checks at 0.6 s and 1.2 s: the first earns nothing; the second
        // must still see the full second since t0.
        assert_eq!(logged(&mut l, "k", t0 + S * 6 / 10, 1), 0);
        assert_eq!(logged(&mut l, "k", t0 + S * 12 / 10, 1), 1);
        // Next token at 2 s, not 2.2 s. (A full bucket earns nothing, so
        // with a burst of 1 it would rightly be 2.2 s.)
        assert_eq!(logged(&mut l, "k", t0 + S * 2, 1), 1);
    }

    #[test]
    fn time_going_backwards_earns_nothing() {
        let t0 = Instant::now() + 10 * S;
        let mut l = LogLimiter::new(1, S);
        assert_eq!(logged(&mut l, "k", t0, 1), 1);
        assert_eq!(logged(&mut l, "k", t0 - 5 * S, 10), 0);
        assert_eq!(logged(&mut l, "k", t0 + S, 10), 1);
    }

    #[test]
    fn take_suppressed_reports_a_flood_that_stopped() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(1, S);
        logged(&mut l, "b", t0, 3);
        logged(&mut l, "a", t0, 2);
        logged(&mut l, "c", t0, 1);
        assert_eq!(l.take_suppressed(), vec![("a", 1), ("b", 2)]);
        assert_eq!(l.take_suppressed(), vec![]);
        assert_eq!(l.check("b", t0 + S), Verdict::Log { suppressed: 0 });
    }

    #[test]
    fn zero_interval_lets_everything_through() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(1, Duration::ZERO);
        assert_eq!(logged(&mut l, "k", t0, 50), 50);
    }

    #[test]
    fn shared_limiter_limits_across_threads() {
        let t0 = Instant::now();
        let l = SharedLogLimiter::new(5, S);
        let n: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..100)
                            .filter(|_| matches!(l.check("k", t0), Verdict::Log { .. }))
                            .count()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(n, 5);
        assert_eq!(l.take_suppressed(), vec![("k", 395)]);
    }
}
