//! The fallback ladder for one peer (docs/edge.md): which rung carries its
//! WireGuard packets now, when to probe which rung, and when to move.
//!
//! Sans-IO: the driver passes time in, sends the probes `poll_probe` asks
//! for, reports what came back (`on_outcome`, `on_traffic`), calls
//! `handle_timeout` at `poll_timeout`, and applies each `poll_change`.
//!
//! Rules: the current rung is probed every `probe_interval`, every other
//! allowed rung every `other_interval`; a probe without an outcome after
//! `probe_timeout` is lost. When the current rung has heard nothing (no
//! answer, no traffic) for `down_after`, move down to the best lower rung
//! heard within `other_interval + probe_timeout`, else optimistically to the
//! next lower one. When a better rung has `up_after` consecutive answered
//! probes (a loss resets the count), move up to the best such rung. A pinned
//! ladder never moves and probes only its rung.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use mesh_proto::UnixTime;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A way to carry a peer's WireGuard packets; best first, so `Direct < Quic < Tcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rung {
    /// WireGuard UDP straight between the data planes.
    Direct,
    /// WireGuard packets in QUIC datagrams between the keyds.
    Quic,
    /// The same, framed, over TLS on TCP between the keyds.
    Tcp,
}

impl Rung {
    pub const ALL: [Rung; 3] = [Rung::Direct, Rung::Quic, Rung::Tcp];

    pub fn as_str(self) -> &'static str {
        match self {
            Rung::Direct => "direct",
            Rung::Quic => "quic",
            Rung::Tcp => "tcp",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Rung {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LadderConfig {
    /// The rungs this peer may use, best first, non-empty, no duplicates.
    pub allowed: Vec<Rung>,
    /// Use only this rung (must be allowed).
    pub pin: Option<Rung>,
    /// Probing the current rung.
    pub probe_interval: Duration,
    /// A probe with no outcome after this long is lost.
    pub probe_timeout: Duration,
    /// The current rung silent this long: move down.
    pub down_after: Duration,
    /// Probing the other allowed rungs.
    pub other_interval: Duration,
    /// Consecutive answered probes on a better rung before moving up.
    pub up_after: u32,
}

impl Default for LadderConfig {
    fn default() -> Self {
        Self {
            allowed: Rung::ALL.to_vec(),
            pin: None,
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(1),
            down_after: Duration::from_secs(3),
            other_interval: Duration::from_secs(5),
            up_after: 3,
        }
    }
}

/// Messages name the keyd.toml fields (`[edge] rungs`, `pin`) or the
/// config field for the timings, which are not user settings yet.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LadderConfigError {
    #[error("edge.rungs is empty: allow at least one of direct, quic, tcp")]
    Empty,
    #[error("edge.rungs lists {0} twice")]
    Duplicate(Rung),
    #[error("edge.rungs must be best first (direct, quic, tcp): {later} comes after {earlier}")]
    Order { earlier: Rung, later: Rung },
    #[error("edge.pin = \"{0}\" is not in edge.rungs")]
    PinNotAllowed(Rung),
    #[error("ladder {field} must be more than zero")]
    Zero { field: &'static str },
}

impl LadderConfig {
    pub fn validate(&self) -> Result<(), LadderConfigError> {
        if self.allowed.is_empty() {
            return Err(LadderConfigError::Empty);
        }
        for (i, &r) in self.allowed.iter().enumerate() {
            if self.allowed[..i].contains(&r) {
                return Err(LadderConfigError::Duplicate(r));
            }
        }
        for pair in self.allowed.windows(2) {
            if let [earlier, later] = *pair
                && later < earlier
            {
                return Err(LadderConfigError::Order { earlier, later });
            }
        }
        if let Some(pin) = self.pin
            && !self.allowed.contains(&pin)
        {
            return Err(LadderConfigError::PinNotAllowed(pin));
        }
        for (field, d) in [
            ("probe_interval", self.probe_interval),
            ("probe_timeout", self.probe_timeout),
            ("down_after", self.down_after),
            ("other_interval", self.other_interval),
        ] {
            if d.is_zero() {
                return Err(LadderConfigError::Zero { field });
            }
        }
        if self.up_after == 0 {
            return Err(LadderConfigError::Zero { field: "up_after" });
        }
        Ok(())
    }
}

/// What became of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answered { rtt: Duration },
    Lost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// The current rung stopped answering.
    Silent,
    /// A better rung answers again.
    Recovered,
    /// The configuration pins this rung (the ladder's first entry).
    Pinned,
    /// The ladder's first entry: the best allowed rung.
    Start,
}

/// One move (or the start, where `from == to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub from: Rung,
    pub to: Rung,
    pub reason: Reason,
    pub at: Instant,
}

/// The round-trip time of a rung's probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rtt {
    /// Smoothed like TCP's SRTT (each sample weighs 1/8).
    pub smoothed: Duration,
    pub last: Duration,
}

/// Round-trip times in milliseconds; `None` where unknown or not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RttMs {
    pub direct: Option<f64>,
    pub quic: Option<f64>,
    pub tcp: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChangeStatus {
    pub from: Rung,
    pub to: Rung,
    pub reason: Reason,
    /// Unix seconds.
    pub at: UnixTime,
}

/// A peer's `path` in `keyd status --json`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LadderStatus {
    pub rung: Rung,
    pub rtt_ms: RttMs,
    /// Moves so far (the start is not one).
    pub changes: u64,
    /// The last move, or the start before any.
    pub last_change: Option<ChangeStatus>,
}

/// Outstanding probes per rung beyond this are counted lost at once, so a
/// driver that never reports outcomes cannot grow the ladder.
const MAX_OUTSTANDING: usize = 4;
/// Changes not yet polled beyond this drop the oldest (status keeps the last).
const MAX_QUEUED_CHANGES: usize = 16;

#[derive(Debug, Clone, Default)]
struct RungState {
    /// Probed and usable: allowed, and the pin if there is one.
    enabled: bool,
    next_probe: Option<Instant>,
    /// Send times of probes without an outcome, oldest first.
    outstanding: VecDeque<Instant>,
    /// The last answer or traffic.
    last_heard: Option<Instant>,
    /// Consecutive answered probes since the last loss.
    streak: u32,
    rtt: Option<Rtt>,
}

#[derive(Debug, Clone)]
pub struct Ladder {
    config: LadderConfig,
    rungs: [RungState; 3],
    current: Rung,
    /// When the current rung became current: a rung moved to gets
    /// `down_after` from then to be heard.
    since: Instant,
    changes: u64,
    last_change: Change,
    queued: VecDeque<Change>,
    /// Off: see [`Ladder::set_active`].
    active: bool,
}

impl Ladder {
    /// Starts on the pinned rung, else the best allowed one, and probes every
    /// enabled rung at once. Expects a validated config; an invalid one does
    /// not panic (an empty `allowed` behaves as direct only, a pin that is not
    /// allowed is still used, zero timings act as 1 ms).
    pub fn new(mut config: LadderConfig, now: Instant) -> Self {
        const FLOOR: Duration = Duration::from_millis(1);
        for d in [
            &mut config.probe_interval,
            &mut config.probe_timeout,
            &mut config.down_after,
            &mut config.other_interval,
        ] {
            *d = (*d).max(FLOOR);
        }
        config.up_after = config.up_after.max(1);
        let mut rungs: [RungState; 3] = Default::default();
        for r in Rung::ALL {
            let enabled = match config.pin {
                Some(pin) => r == pin,
                None => config.allowed.contains(&r),
            };
            rungs[r.index()].enabled = enabled;
            rungs[r.index()].next_probe = enabled.then_some(now);
        }
        let (current, reason) = match config.pin {
            Some(pin) => (pin, Reason::Pinned),
            None => (
                config.allowed.iter().min().copied().unwrap_or(Rung::Direct),
                Reason::Start,
            ),
        };
        if !rungs[current.index()].enabled {
            rungs[current.index()].enabled = true;
            rungs[current.index()].next_probe = Some(now);
        }
        let start = Change {
            from: current,
            to: current,
            reason,
            at: now,
        };
        Self {
            config,
            rungs,
            current,
            since: now,
            changes: 0,
            last_change: start,
            queued: VecDeque::from([start]),
            active: true,
        }
    }

    /// Switches the ladder off or on. Off, it probes nothing and moves
    /// nowhere (the driver keeps the data plane where it is); switched on,
    /// it starts afresh from `now`: every rung probed at once, and the
    /// current one given `down_after` from now to be heard, because time
    /// spent off is no evidence of silence.
    pub fn set_active(&mut self, active: bool, now: Instant) {
        if active && !self.active {
            self.since = now;
            for s in self.rungs.iter_mut().filter(|s| s.enabled) {
                s.next_probe = Some(now);
                s.outstanding.clear();
                s.streak = 0;
            }
        }
        self.active = active;
    }

    pub fn active(&self) -> bool {
        self.active
    }

    pub fn current(&self) -> Rung {
        self.current
    }

    pub fn config(&self) -> &LadderConfig {
        &self.config
    }

    /// The rung's round-trip time, if any probe on it was answered.
    pub fn rtt(&self, rung: Rung) -> Option<Rtt> {
        self.rungs[rung.index()].rtt
    }

    fn interval(&self, rung: Rung) -> Duration {
        if rung == self.current {
            self.config.probe_interval
        } else {
            self.config.other_interval
        }
    }

    /// A rung to probe now; call until `None`. Each returned probe is
    /// outstanding until `on_outcome` or `probe_timeout`.
    pub fn poll_probe(&mut self, now: Instant) -> Option<Rung> {
        if !self.active {
            return None;
        }
        self.handle_timeout(now);
        let rung = Rung::ALL.into_iter().find(|r| {
            let s = &self.rungs[r.index()];
            s.enabled && s.next_probe.is_some_and(|t| t <= now)
        })?;
        let interval = self.interval(rung);
        let s = &mut self.rungs[rung.index()];
        s.next_probe = Some(now + interval);
        if s.outstanding.len() >= MAX_OUTSTANDING {
            s.outstanding.pop_front();
            s.streak = 0;
        }
        s.outstanding.push_back(now);
        Some(rung)
    }

    /// What became of a probe on `rung`.
    ///
    /// An answer is matched to the outstanding probe sent nearest to
    /// `now - rtt` and counts towards moving up; one with no outstanding
    /// probe left (later than `probe_timeout`, already counted lost) still
    /// shows the rung works and gives an RTT sample, but is no step up.
    /// A loss resets the run of answers and takes no probe off the
    /// outstanding list: the ladder's own timeout does that, so a loss the
    /// driver reports at the timeout (or twice) can never swallow the next
    /// probe.
    pub fn on_outcome(&mut self, rung: Rung, outcome: Outcome, now: Instant) {
        // A probe from before the ladder was switched off counts for nothing.
        if !self.active {
            return;
        }
        self.expire_probes(now);
        let s = &mut self.rungs[rung.index()];
        if !s.enabled {
            return;
        }
        match outcome {
            Outcome::Answered { rtt } => {
                let sent = now.checked_sub(rtt).unwrap_or(now);
                let distance = |t: Instant| t.max(sent) - t.min(sent);
                let probe = (0..s.outstanding.len())
                    .min_by_key(|&i| s.outstanding.get(i).map(|t| distance(*t)));
                let in_time = probe.and_then(|i| s.outstanding.remove(i)).is_some();
                if in_time {
                    s.streak = s.streak.saturating_add(1);
                }
                s.last_heard = Some(now);
                s.rtt = Some(match s.rtt {
                    None => Rtt {
                        smoothed: rtt,
                        last: rtt,
                    },
                    Some(old) => Rtt {
                        smoothed: old.smoothed.mul_f64(7.0 / 8.0) + rtt.mul_f64(1.0 / 8.0),
                        last: rtt,
                    },
                });
                if in_time {
                    self.climb(now);
                }
            }
            Outcome::Lost => s.streak = 0,
        }
    }

    /// Packets arrived over `rung`: it works, as good as an answer for
    /// staying on it or going down to it, but without an RTT and not a step
    /// towards moving up (only probes are, so one-way traffic cannot lure
    /// the ladder up).
    pub fn on_traffic(&mut self, rung: Rung, now: Instant) {
        let s = &mut self.rungs[rung.index()];
        if s.enabled {
            s.last_heard = Some(now);
        }
    }

    /// When `poll_probe` and `handle_timeout` need calling next (off: not
    /// before a day, nothing is due).
    pub fn poll_timeout(&self) -> Instant {
        if !self.active {
            return self.since + Duration::from_secs(86_400);
        }
        let mut next = self.down_deadline();
        for s in self.rungs.iter().filter(|s| s.enabled) {
            let lost = s
                .outstanding
                .front()
                .map(|t| *t + self.config.probe_timeout);
            for t in [s.next_probe, lost].into_iter().flatten() {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        // The current rung always has a next probe; this is only a fallback.
        next.unwrap_or(self.since + self.config.probe_interval)
    }

    /// Counts lost probes and applies the down rule.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.active {
            return;
        }
        self.expire_probes(now);
        if self.down_deadline().is_some_and(|t| t <= now) {
            self.descend(now);
        }
    }

    /// Each move once, oldest first; the first is the start (or the pin).
    pub fn poll_change(&mut self) -> Option<Change> {
        self.queued.pop_front()
    }

    /// For `keyd status`; the last change's time in Unix seconds from the
    /// wall clock now.
    pub fn status(&self, now: Instant) -> LadderStatus {
        self.status_at(now, crate::time::unix_now())
    }

    /// `status` with the wall clock given: `unix_now` is the Unix time at `now`.
    pub fn status_at(&self, now: Instant, unix_now: UnixTime) -> LadderStatus {
        let ms = |r: Rung| {
            self.rungs[r.index()]
                .rtt
                .map(|rtt| rtt.smoothed.as_secs_f64() * 1000.0)
        };
        let c = self.last_change;
        let ago = now.saturating_duration_since(c.at).as_secs();
        LadderStatus {
            rung: self.current,
            rtt_ms: RttMs {
                direct: ms(Rung::Direct),
                quic: ms(Rung::Quic),
                tcp: ms(Rung::Tcp),
            },
            changes: self.changes,
            last_change: Some(ChangeStatus {
                from: c.from,
                to: c.to,
                reason: c.reason,
                at: unix_now.saturating_sub(ago),
            }),
        }
    }

    fn expire_probes(&mut self, now: Instant) {
        let timeout = self.config.probe_timeout;
        for s in &mut self.rungs {
            while s.outstanding.front().is_some_and(|t| *t + timeout <= now) {
                s.outstanding.pop_front();
                s.streak = 0;
            }
        }
    }

    fn lower(&self) -> impl Iterator<Item = Rung> + '_ {
        let current = self.current;
        Rung::ALL
            .into_iter()
            .filter(move |r| *r > current && self.rungs[r.index()].enabled)
    }

    /// When the current rung will have been silent for `down_after`; `None`
    /// when pinned or when there is nothing lower to go to.
    fn down_deadline(&self) -> Option<Instant> {
        if self.config.pin.is_some() || self.lower().next().is_none() {
            return None;
        }
        let heard = self.rungs[self.current.index()].last_heard;
        let quiet_since = heard.map_or(self.since, |h| h.max(self.since));
        Some(quiet_since + self.config.down_after)
    }

    fn descend(&mut self, now: Instant) {
        let recent = self.config.other_interval + self.config.probe_timeout;
        let heard = |r: &Rung| {
            self.rungs[r.index()]
                .last_heard
                .is_some_and(|h| now.saturating_duration_since(h) <= recent)
        };
        let Some(to) = self.lower().find(heard).or_else(|| self.lower().next()) else {
            return;
        };
        // Its old run of answers predates the silence.
        self.rungs[self.current.index()].streak = 0;
        self.move_to(to, Reason::Silent, now);
    }

    fn climb(&mut self, now: Instant) {
        if self.config.pin.is_some() {
            return;
        }
        let up_after = self.config.up_after;
        let current = self.current;
        let to = Rung::ALL.into_iter().find(|r| {
            let s = &self.rungs[r.index()];
            *r < current && s.enabled && s.streak >= up_after
        });
        if let Some(to) = to {
            self.move_to(to, Reason::Recovered, now);
        }
    }

    fn move_to(&mut self, to: Rung, reason: Reason, now: Instant) {
        let from = self.current;
        self.current = to;
        self.since = now;
        // The new rung is probed now and then often; the old one joins the
        // others' slower schedule.
        self.rungs[to.index()].next_probe = Some(now);
        self.rungs[from.index()].next_probe = Some(now + self.config.other_interval);
        let change = Change {
            from,
            to,
            reason,
            at: now,
        };
        self.changes += 1;
        self.last_change = change;
        if self.queued.len() >= MAX_QUEUED_CHANGES {
            self.queued.pop_front();
        }
        self.queued.push_back(change);
    }
}

#[cfg(test)]
mod tests {
    //! Simulated time only: a tiny driver moves probes and answers between
    //! the ladder and per-rung answer rules.

    use super::*;

    const RTT: Duration = Duration::from_millis(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// Whether a probe sent on a rung at a time gets an answer.
    type Rule = Box<dyn FnMut(Instant) -> bool>;

    fn up() -> Rule {
        Box::new(|_| true)
    }

    fn down() -> Rule {
        Box::new(|_| false)
    }

    /// Answers probes sent before `t`, then none.
    fn until(t: Instant) -> Rule {
        Box::new(move |now| now < t)
    }

    /// Answers probes sent from `t` on.
    fn from(t: Instant) -> Rule {
        Box::new(move |now| now >= t)
    }

    /// Answers according to `script`, one entry per probe, then none.
    fn script(s: &[bool]) -> Rule {
        let mut s: VecDeque<bool> = s.iter().copied().collect();
        Box::new(move |_| s.pop_front().unwrap_or(false))
    }

    struct Sim {
        ladder: Ladder,
        t0: Instant,
        t: Instant,
        rules: [Rule; 3],
        in_flight: Vec<(Instant, Rung)>,
        probes: Vec<(Instant, Rung)>,
        answered: [u32; 3],
        /// Each change with the answers delivered per rung when it happened.
        changes: Vec<(Change, [u32; 3])>,
    }

    impl Sim {
        fn new(config: LadderConfig, rules: [Rule; 3]) -> Self {
            let t0 = Instant::now();
            Self {
                ladder: Ladder::new(config, t0),
                t0,
                t: t0,
                rules,
                in_flight: Vec::new(),
                probes: Vec::new(),
                answered: [0; 3],
                changes: Vec::new(),
            }
        }

        fn at(&self, d: Duration) -> Instant {
            self.t0 + d
        }

        /// Runs the driver loop until `t0 + d`.
        fn run(&mut self, d: Duration) {
            let end = self.t0 + d;
            loop {
                self.ladder.handle_timeout(self.t);
                while let Some(r) = self.ladder.poll_probe(self.t) {
                    self.probes.push((self.t, r));
                    if (self.rules[r.index()])(self.t) {
                        self.in_flight.push((self.t + RTT, r));
                    }
                }
                while let Some(c) = self.ladder.poll_change() {
                    self.changes.push((c, self.answered));
                }
                let timeout = self.ladder.poll_timeout();
                // Drained: the next wake-up is in the future (no busy loop).
                assert!(
                    timeout > self.t,
                    "poll_timeout {timeout:?} not after {:?}",
                    self.t
                );
                let answer = self.in_flight.iter().map(|(t, _)| *t).min();
                let next = answer.map_or(timeout, |a| a.min(timeout));
                if next > end {
                    self.t = end;
                    return;
                }
                self.t = next;
                let now = self.t;
                let (due, later) = self.in_flight.drain(..).partition(|(t, _)| *t <= now);
                self.in_flight = later;
                for (_, r) in due {
                    self.answered[r.index()] += 1;
                    self.ladder
                        .on_outcome(r, Outcome::Answered { rtt: RTT }, now);
                }
            }
        }

        fn moves(&self) -> Vec<(Rung, Rung, Reason)> {
            self.changes
                .iter()
                .filter(|(c, _)| c.from != c.to)
                .map(|(c, _)| (c.from, c.to, c.reason))
                .collect()
        }

        fn probed(&self, r: Rung) -> usize {
            self.probes.iter().filter(|(_, p)| *p == r).count()
        }
    }

    #[test]
    fn starts_on_best_allowed_and_probes_all() {
        let t0 = Instant::now();
        let mut l = Ladder::new(LadderConfig::default(), t0);
        assert_eq!(l.current(), Rung::Direct);
        let first = l.poll_change().unwrap();
        assert_eq!(
            (first.from, first.to, first.reason, first.at),
            (Rung::Direct, Rung::Direct, Reason::Start, t0)
        );
        assert_eq!(l.poll_change(), None);
        let probes: Vec<Rung> = std::iter::from_fn(|| l.poll_probe(t0)).collect();
        assert_eq!(probes, Rung::ALL);
        // Then: the current rung after probe_timeout/probe_interval, the others later.
        assert_eq!(l.poll_timeout(), t0 + secs(1));
        for r in [Rung::Direct, Rung::Quic, Rung::Tcp] {
            l.on_outcome(r, Outcome::Answered { rtt: RTT }, t0 + RTT);
        }
        assert_eq!(l.poll_probe(t0 + ms(999)), None);
        for n in 1..=4 {
            let t = t0 + secs(n);
            assert_eq!(l.poll_probe(t), Some(Rung::Direct));
            assert_eq!(l.poll_probe(t), None);
            l.on_outcome(Rung::Direct, Outcome::Answered { rtt: RTT }, t + RTT);
        }
        let t = t0 + secs(5);
        let probes: Vec<Rung> = std::iter::from_fn(|| l.poll_probe(t)).collect();
        assert_eq!(probes, Rung::ALL);

        let l = Ladder::new(
            LadderConfig {
                allowed: vec![Rung::Quic, Rung::Tcp],
                ..LadderConfig::default()
            },
            t0,
        );
        assert_eq!(l.current(), Rung::Quic);
    }

    #[test]
    fn steady_when_all_answer() {
        let mut s = Sim::new(LadderConfig::default(), [up(), up(), up()]);
        s.run(secs(120));
        assert_eq!(s.moves(), []);
        assert_eq!(s.ladder.current(), Rung::Direct);
        // Current every second, the others every five.
        assert_eq!(s.probed(Rung::Direct), 121);
        assert_eq!(s.probed(Rung::Quic), 25);
        assert_eq!(s.probed(Rung::Tcp), 25);
    }

    #[test]
    fn moves_down_within_down_after_plus_probe_timeout() {
        let c = LadderConfig::default();
        for silent_ms in [10_000u64, 10_001, 10_500, 10_999, 12_345] {
            let t0 = Instant::now();
            let mut s = Sim::new(c.clone(), [until(t0 + ms(silent_ms)), up(), up()]);
            s.t0 = t0;
            s.ladder = Ladder::new(c.clone(), t0);
            s.t = t0;
            s.run(secs(30));
            assert_eq!(s.moves(), [(Rung::Direct, Rung::Quic, Reason::Silent)]);
            let at = s.changes[1].0.at;
            let silent = t0 + ms(silent_ms);
            assert!(at > silent, "moved before the rung went silent");
            assert!(
                at <= silent + c.down_after + c.probe_timeout,
                "moved {:?} after silence",
                at - silent
            );
        }
    }

    #[test]
    fn skips_a_lower_rung_that_does_not_answer() {
        let mut s = Sim::new(
            LadderConfig::default(),
            [until(Instant::now() + secs(10)), down(), up()],
        );
        s.t0 = s.t;
        s.rules[0] = until(s.at(secs(10)));
        s.run(secs(60));
        assert_eq!(s.moves(), [(Rung::Direct, Rung::Tcp, Reason::Silent)]);
        assert_eq!(s.ladder.current(), Rung::Tcp);
    }

    #[test]
    fn goes_down_optimistically_when_no_lower_rung_answered() {
        // Nothing answers below: the next lower rung gets its chance, then the next.
        let mut s = Sim::new(LadderConfig::default(), [down(), down(), down()]);
        s.run(secs(60));
        assert_eq!(
            s.moves(),
            [
                (Rung::Direct, Rung::Quic, Reason::Silent),
                (Rung::Quic, Rung::Tcp, Reason::Silent)
            ]
        );
        assert_eq!(s.changes[1].0.at, s.at(secs(3)));
        assert_eq!(s.changes[2].0.at, s.at(secs(6)));
        // The rung moved to is probed at once, then every probe_interval.
        assert!(s.probes.contains(&(s.at(secs(3)), Rung::Quic)));
        assert!(s.probes.contains(&(s.at(secs(4)), Rung::Quic)));
        // At the lowest rung it stays.
        assert_eq!(s.ladder.current(), Rung::Tcp);
    }

    #[test]
    fn an_optimistic_rung_that_answers_is_kept() {
        // Quic's answers start only after the move (e.g. its connection was
        // still being set up): it is kept, Tcp is not tried.
        let mut s = Sim::new(LadderConfig::default(), [down(), down(), up()]);
        s.rules[1] = from(s.at(secs(3)));
        // Tcp answering before: down goes straight to Tcp; so make Tcp silent.
        s.rules[2] = down();
        s.run(secs(60));
        assert_eq!(s.moves(), [(Rung::Direct, Rung::Quic, Reason::Silent)]);
    }

    #[test]
    fn moves_up_after_up_after_consecutive_answers() {
        let mut s = Sim::new(LadderConfig::default(), [down(), up(), up()]);
        s.run(secs(20));
        assert_eq!(s.ladder.current(), Rung::Quic);
        let before = s.answered[0];
        assert_eq!(before, 0);
        s.rules[0] = up();
        s.run(secs(60));
        assert_eq!(
            s.moves(),
            [
                (Rung::Direct, Rung::Quic, Reason::Silent),
                (Rung::Quic, Rung::Direct, Reason::Recovered)
            ]
        );
        // Exactly on the third answer, not the second.
        assert_eq!(s.changes[2].1[0], 3);
    }

    #[test]
    fn a_loss_resets_the_climb() {
        let mut s = Sim::new(LadderConfig::default(), [down(), up(), up()]);
        s.run(secs(20));
        assert_eq!(s.ladder.current(), Rung::Quic);
        // Two answers, a loss, then answers: up on the third after the
        // loss, i.e. the fifth in all, not the third.
        let mut script = script(&[true, true, false]);
        let mut n = 0;
        s.rules[0] = Box::new(move |t| {
            n += 1;
            if n <= 3 { script(t) } else { true }
        });
        s.run(secs(120));
        assert_eq!(
            s.moves(),
            [
                (Rung::Direct, Rung::Quic, Reason::Silent),
                (Rung::Quic, Rung::Direct, Reason::Recovered)
            ]
        );
        assert_eq!(s.changes.last().unwrap().1[0], 5);
    }

    #[test]
    fn a_loss_reported_by_the_driver_resets_the_climb() {
        let t0 = Instant::now();
        let mut l = Ladder::new(
            LadderConfig {
                allowed: vec![Rung::Direct, Rung::Quic],
                ..LadderConfig::default()
            },
            t0,
        );
        // Force the move to Quic: nothing heard for 3 s.
        l.handle_timeout(t0 + secs(3));
        assert_eq!(l.current(), Rung::Quic);
        let mut t = t0 + secs(3);
        let mut probe_direct = |l: &mut Ladder, outcome: Outcome| {
            t += secs(5);
            while let Some(r) = l.poll_probe(t) {
                if r != Rung::Direct {
                    l.on_outcome(r, Outcome::Answered { rtt: RTT }, t);
                }
            }
            l.on_outcome(Rung::Direct, outcome, t + RTT);
            // A second report of the same loss is not counted twice, and
            // does not eat a later probe's answer.
            if outcome == Outcome::Lost {
                l.on_outcome(Rung::Direct, Outcome::Lost, t + RTT);
            }
        };
        let ok = Outcome::Answered { rtt: RTT };
        probe_direct(&mut l, ok);
        probe_direct(&mut l, ok);
        probe_direct(&mut l, Outcome::Lost);
        probe_direct(&mut l, ok);
        probe_direct(&mut l, ok);
        assert_eq!(l.current(), Rung::Quic);
        probe_direct(&mut l, ok);
        assert_eq!(l.current(), Rung::Direct);
    }

    #[test]
    fn late_answers_are_evidence_but_no_step_up() {
        let mut s = Sim::new(LadderConfig::default(), [down(), up(), up()]);
        s.run(secs(20));
        assert_eq!(s.ladder.current(), Rung::Quic);
        // Direct answers every probe, but 1.5 s late: it works (heard) and
        // has an RTT, but never earns the climb.
        let mut t = secs(20);
        let mut sent = Vec::new();
        while t < secs(300) {
            s.run(t);
            sent.extend(s.probes.drain(..).filter(|(_, r)| *r == Rung::Direct));
            let now = s.t;
            let late = ms(1500);
            sent.retain(|(at, _)| {
                if *at + late <= now {
                    s.ladder
                        .on_outcome(Rung::Direct, Outcome::Answered { rtt: late }, *at + late);
                    false
                } else {
                    true
                }
            });
            t += ms(100);
        }
        assert_eq!(s.ladder.current(), Rung::Quic);
        assert_eq!(s.ladder.rtt(Rung::Direct).map(|r| r.last), Some(ms(1500)));
    }

    #[test]
    fn a_loss_reported_at_the_timeout_does_not_swallow_the_next_probe() {
        // Probes as often as they time out, so the next probe is in flight
        // when the driver reports the last one lost.
        let t0 = Instant::now();
        let config = LadderConfig {
            allowed: vec![Rung::Direct, Rung::Quic],
            other_interval: secs(1),
            ..LadderConfig::default()
        };
        let mut l = Ladder::new(config, t0);
        l.handle_timeout(t0 + secs(3));
        assert_eq!(l.current(), Rung::Quic);
        let ok = Outcome::Answered { rtt: RTT };
        // Each second a Direct probe goes out; then the driver reports the
        // previous one's outcome (a loss at its timeout, i.e. after the new
        // probe went out, or an answer).
        let step = |l: &mut Ladder, n: u64, previous: Option<Outcome>| {
            let t = t0 + secs(3 + n);
            while let Some(r) = l.poll_probe(t) {
                if r == Rung::Quic {
                    l.on_outcome(r, ok, t);
                }
            }
            if let Some(o) = previous {
                l.on_outcome(Rung::Direct, o, t);
            }
        };
        let answer = |l: &mut Ladder, n: u64| {
            l.on_outcome(Rung::Direct, ok, t0 + secs(3 + n) + RTT);
        };
        step(&mut l, 0, None);
        step(&mut l, 1, Some(Outcome::Lost)); // probe 0 lost
        step(&mut l, 2, Some(Outcome::Lost)); // probe 1 lost, 2 in flight
        answer(&mut l, 2);
        step(&mut l, 3, None);
        answer(&mut l, 3);
        assert_eq!(l.current(), Rung::Quic);
        step(&mut l, 4, None);
        // Probe 2's answer counted although its loss-report neighbour came
        // after it was sent: up on the third answer.
        answer(&mut l, 4);
        assert_eq!(l.current(), Rung::Direct);
    }

    #[test]
    fn flapping_rung_never_wins_the_climb() {
        let mut s = Sim::new(LadderConfig::default(), [down(), up(), up()]);
        s.run(secs(20));
        let mut n = 0u32;
        s.rules[0] = Box::new(move |_| {
            n += 1;
            n.is_multiple_of(2)
        });
        s.run(secs(3600));
        assert!(s.answered[0] > 300);
        assert_eq!(s.moves(), [(Rung::Direct, Rung::Quic, Reason::Silent)]);
    }

    #[test]
    fn flapping_current_rung_moves_are_bounded() {
        // Direct works for 20 s, fails for 20 s, and so on: the ladder
        // follows with at most one move down and one up per cycle, and each
        // move up waits for three answers in a row.
        let mut s = Sim::new(LadderConfig::default(), [down(), up(), up()]);
        let t0 = s.t0;
        s.rules[0] = Box::new(move |now| (now - t0).as_secs() % 40 < 20);
        s.run(secs(3600));
        let moves = s.moves();
        assert!(
            moves.len() <= 2 * 3600 / 40,
            "{} moves in an hour",
            moves.len()
        );
        assert!(moves.len() >= 3600 / 40, "the ladder stopped following");
        for (i, (c, answered)) in s.changes.iter().enumerate().skip(1) {
            if c.reason == Reason::Recovered {
                let before = s.changes[i - 1].1[0];
                assert!(answered[0] - before >= 3);
            }
        }
    }

    #[test]
    fn forbidden_rung_is_never_probed_or_used() {
        let config = LadderConfig {
            allowed: vec![Rung::Direct, Rung::Tcp],
            ..LadderConfig::default()
        };
        let mut s = Sim::new(config, [up(), up(), up()]);
        s.rules[0] = until(s.at(secs(10)));
        s.run(secs(60));
        assert_eq!(s.probed(Rung::Quic), 0);
        assert_eq!(s.moves(), [(Rung::Direct, Rung::Tcp, Reason::Silent)]);
        // Even when nothing answers, it is not tried.
        let config = LadderConfig {
            allowed: vec![Rung::Direct, Rung::Tcp],
            ..LadderConfig::default()
        };
        let mut s = Sim::new(config, [down(), down(), down()]);
        s.run(secs(60));
        assert_eq!(s.probed(Rung::Quic), 0);
        assert_eq!(s.ladder.current(), Rung::Tcp);
        // Traffic or answers on it are ignored.
        s.ladder.on_traffic(Rung::Quic, s.t);
        s.ladder
            .on_outcome(Rung::Quic, Outcome::Answered { rtt: RTT }, s.t);
        assert_eq!(s.ladder.rtt(Rung::Quic), None);
    }

    #[test]
    fn pinned_rung_is_the_only_one_probed_and_never_left() {
        let config = LadderConfig {
            pin: Some(Rung::Quic),
            ..LadderConfig::default()
        };
        let mut s = Sim::new(config, [up(), down(), up()]);
        s.run(secs(120));
        assert_eq!(s.ladder.current(), Rung::Quic);
        assert_eq!(s.probed(Rung::Direct), 0);
        assert_eq!(s.probed(Rung::Tcp), 0);
        assert_eq!(s.probed(Rung::Quic), 121);
        assert_eq!(s.moves(), []);
        assert_eq!(s.changes[0].0.reason, Reason::Pinned);
        // Answers elsewhere do not move it either.
        for _ in 0..10 {
            s.ladder
                .on_outcome(Rung::Direct, Outcome::Answered { rtt: RTT }, s.t);
        }
        assert_eq!(s.ladder.current(), Rung::Quic);
    }

    #[test]
    fn traffic_keeps_a_rung_up_without_probe_answers() {
        // A data plane that does not answer probes (wireguard-go): packets
        // arriving over the rung are the evidence.
        let mut s = Sim::new(LadderConfig::default(), [down(), up(), up()]);
        let mut t = secs(0);
        while t < secs(60) {
            s.run(t);
            let now = s.t;
            s.ladder.on_traffic(Rung::Direct, now);
            t += ms(500);
        }
        assert_eq!(s.ladder.current(), Rung::Direct);
        assert_eq!(s.moves(), []);
        // The traffic stops: down within down_after.
        s.run(secs(64));
        assert_eq!(s.moves(), [(Rung::Direct, Rung::Quic, Reason::Silent)]);
        assert!(s.changes[1].0.at <= s.at(ms(59_500) + secs(3)));
        // Traffic is not a step up: only answered probes are.
        let mut t = secs(64);
        while t < secs(120) {
            s.run(t);
            let now = s.t;
            s.ladder.on_traffic(Rung::Direct, now);
            t += ms(100);
        }
        assert_eq!(s.ladder.current(), Rung::Quic);
    }

    #[test]
    fn rtt_is_smoothed_and_reported() {
        let t0 = Instant::now();
        let mut l = Ladder::new(LadderConfig::default(), t0);
        while l.poll_probe(t0).is_some() {}
        l.on_outcome(Rung::Direct, Outcome::Answered { rtt: ms(8) }, t0 + ms(8));
        assert_eq!(
            l.rtt(Rung::Direct),
            Some(Rtt {
                smoothed: ms(8),
                last: ms(8)
            })
        );
        assert_eq!(l.poll_probe(t0 + secs(1)), Some(Rung::Direct));
        l.on_outcome(
            Rung::Direct,
            Outcome::Answered { rtt: ms(16) },
            t0 + secs(1) + ms(16),
        );
        assert_eq!(
            l.rtt(Rung::Direct),
            Some(Rtt {
                smoothed: ms(9),
                last: ms(16)
            })
        );
        l.on_outcome(Rung::Quic, Outcome::Answered { rtt: ms(1) }, t0 + ms(1));
        let status = l.status_at(t0 + secs(100), 1_795_000_000);
        let json = serde_json::to_value(status).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "rung": "direct",
                "rtt_ms": {"direct": 9.0, "quic": 1.0, "tcp": null},
                "changes": 0,
                "last_change": {"from": "direct", "to": "direct", "reason": "start",
                                "at": 1_795_000_000u64 - 100},
            })
        );
    }

    #[test]
    fn status_counts_moves() {
        let mut s = Sim::new(LadderConfig::default(), [down(), up(), up()]);
        s.run(secs(10));
        let status = s.ladder.status_at(s.at(secs(10)), 1000);
        assert_eq!(status.rung, Rung::Quic);
        assert_eq!(status.changes, 1);
        assert_eq!(
            status.last_change,
            Some(ChangeStatus {
                from: Rung::Direct,
                to: Rung::Quic,
                reason: Reason::Silent,
                at: 1000 - 7,
            })
        );
        assert_eq!(serde_json::from_str::<Rung>("\"tcp\"").unwrap(), Rung::Tcp);
    }

    #[test]
    fn config_validation() {
        let ok = LadderConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        let with = |f: &dyn Fn(&mut LadderConfig)| {
            let mut c = LadderConfig::default();
            f(&mut c);
            c.validate()
        };
        assert_eq!(with(&|c| c.allowed.clear()), Err(LadderConfigError::Empty));
        assert_eq!(
            with(&|c| c.allowed = vec![Rung::Quic, Rung::Quic]),
            Err(LadderConfigError::Duplicate(Rung::Quic))
        );
        assert_eq!(
            with(&|c| c.allowed = vec![Rung::Tcp, Rung::Direct]),
            Err(LadderConfigError::Order {
                earlier: Rung::Tcp,
                later: Rung::Direct
            })
        );
        assert_eq!(
            with(&|c| {
                c.allowed = vec![Rung::Direct, Rung::Tcp];
                c.pin = Some(Rung::Quic);
            }),
            Err(LadderConfigError::PinNotAllowed(Rung::Quic))
        );
        assert_eq!(with(&|c| c.pin = Some(Rung::Tcp)), Ok(()));
        assert_eq!(
            with(&|c| c.probe_timeout = Duration::ZERO),
            Err(LadderConfigError::Zero {
                field: "probe_timeout"
            })
        );
        assert_eq!(
            with(&|c| c.up_after = 0),
            Err(LadderConfigError::Zero { field: "up_after" })
        );
        assert_eq!(
            LadderConfigError::PinNotAllowed(Rung::Quic).to_string(),
            "edge.pin = \"quic\" is not in edge.rungs"
        );
    }

    /// The CI failure of stop 17: a ladder off (our data plane's probe
    /// answer or the peer's HELLO not known yet) for longer than
    /// `down_after` must not count that time as silence: switched on, it
    /// moved to quic at once, without one probe on direct.
    #[test]
    fn time_switched_off_is_not_silence() {
        let c = LadderConfig::default();
        let mut s = Sim::new(c.clone(), [up(), up(), up()]);
        s.ladder.set_active(false, s.t0);
        // Off: nothing to probe, nothing moves, however long.
        let off = s.t0 + secs(10);
        s.ladder.handle_timeout(off);
        assert_eq!(s.ladder.poll_probe(off), None);
        s.t = off;
        s.ladder.set_active(true, off);
        s.run(secs(30));
        assert_eq!(s.moves(), [], "moved without probing first");
        assert_eq!(s.ladder.current(), Rung::Direct);
        // Probing starts again at once: every rung, the moment it is on.
        assert_eq!(s.probes.first(), Some(&(off, Rung::Direct)));
        assert!(s.probed(Rung::Direct) >= 20);

        // Direct silent since before the ladder was off: it moves, but only
        // `down_after` (and a probe timeout) after it was switched on.
        let mut s = Sim::new(c.clone(), [down(), up(), up()]);
        s.ladder.set_active(false, s.t0);
        s.t = off;
        s.ladder.set_active(true, off);
        s.run(secs(30));
        assert_eq!(s.moves(), [(Rung::Direct, Rung::Quic, Reason::Silent)]);
        let at = s.changes.last().map(|(ch, _)| ch.at).unwrap();
        assert!(at >= off + c.down_after, "moved {:?} after on", at - off);
    }

    #[test]
    fn invalid_config_does_not_panic_or_spin() {
        let config = LadderConfig {
            allowed: vec![],
            probe_interval: Duration::ZERO,
            other_interval: Duration::ZERO,
            down_after: Duration::ZERO,
            probe_timeout: Duration::ZERO,
            up_after: 0,
            pin: None,
        };
        let mut s = Sim::new(config, [down(), down(), down()]);
        s.run(secs(2));
        assert_eq!(s.ladder.current(), Rung::Direct);
    }
}
