//! How often the ladder may try to open a carrier that failed: each try
//! costs the peer a connection and an exchange against its per-source
//! budget (burst 8, then 2 per second, admission.rs), so a peer that
//! refuses us (not a member yet, restarting, under load) must not be
//! retried every second, or its budget never refills and it keeps refusing
//! after the reason is gone. Exponential, 2 s to 30 s, reset by a success.

use std::time::{Duration, Instant};

pub const FIRST_DELAY: Duration = Duration::from_secs(2);
pub const MAX_DELAY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Default)]
pub struct ConnectBackoff {
    /// No try before this (none yet: try now).
    next: Option<Instant>,
    delay: Duration,
}

impl ConnectBackoff {
    pub fn may_try(&self, now: Instant) -> bool {
        self.next.is_none_or(|t| now >= t)
    }

    pub fn failed(&mut self, now: Instant) {
        self.delay = (self.delay * 2).clamp(FIRST_DELAY, MAX_DELAY);
        self.next = Some(now + self.delay);
    }

    pub fn succeeded(&mut self) {
        *self = Self::default();
    }

    pub fn delay(&self) -> Duration {
        self.delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_two_to_thirty_seconds_and_resets_on_success() {
        let t0 = Instant::now();
        let mut b = ConnectBackoff::default();
        assert!(b.may_try(t0));
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..6 {
            b.failed(now);
            assert!(!b.may_try(now + b.delay() - Duration::from_millis(1)));
            now += b.delay();
            assert!(b.may_try(now));
            waits.push(b.delay().as_secs());
        }
        assert_eq!(waits, [2, 4, 8, 16, 30, 30]);
        b.succeeded();
        assert!(b.may_try(now));
        b.failed(now);
        assert_eq!(b.delay(), FIRST_DELAY);
    }

    /// Tries at most as often as the peer's per-source budget refills
    /// (2 per second): over a minute of failures, a handful of tries.
    #[test]
    fn a_refusing_peer_is_tried_a_handful_of_times_a_minute() {
        let t0 = Instant::now();
        let mut b = ConnectBackoff::default();
        let mut tries = 0;
        for ms in (0..60_000).step_by(100) {
            let now = t0 + Duration::from_millis(ms);
            if b.may_try(now) {
                tries += 1;
                b.failed(now);
            }
        }
        assert_eq!(tries, 5, "at 0, 2, 6, 14 and 30 s");
    }
}
