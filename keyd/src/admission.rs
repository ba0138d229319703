//! What keyd lets in before anyone is authenticated, as a sans-IO state
//! machine: every incoming QUIC connection and every exchange a peer opens
//! asks here first, so what an unauthenticated host can make keyd do is
//! bounded in CPU and memory whatever it sends.
//!
//! * **Source filter.** Only the IP addresses of the roster's keyd endpoints
//!   may connect, unless `accept_unlisted_sources` (nodes behind NAT, whose
//!   address the roster cannot know) is set. Others are ignored: no reply.
//! * **Per-source rate.** Each source address gets a token bucket for new
//!   connections and exchanges; the table of sources is bounded (the least
//!   recently seen source is forgotten first).
//! * **Global caps.** At most `max_connections` connections and at most
//!   `max_handshakes` exchanges in progress at once. From half of the
//!   handshake cap on, keyd is *under load*: new connections must first prove
//!   their address (QUIC retry) and msg1 must carry a valid cookie (mac2).
//!
//! The driver (daemon.rs) holds it behind a mutex, never across an await.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct AdmissionConfig {
    pub max_connections: usize,
    /// Connections from one source address at once (members behind one NAT
    /// share an address; an attacker's address does not get more).
    pub max_connections_per_source: usize,
    pub max_handshakes: usize,
    /// Tokens per source: burst, and one more every `refill`.
    pub source_burst: u32,
    pub source_refill: Duration,
    /// Sources remembered at most (each costs a few dozen bytes).
    pub max_sources: usize,
    pub accept_unlisted_sources: bool,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_connections_per_source: 8,
            max_handshakes: 16,
            source_burst: 8,
            source_refill: Duration::from_millis(500),
            max_sources: 4096,
            accept_unlisted_sources: false,
        }
    }
}

/// Why something was not let in. Labels are the refusal counters' keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    UnlistedSource,
    SourceRateLimited,
    TooManyConnections,
    TooManyConnectionsFromSource,
    TooManyHandshakes,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Self::UnlistedSource,
        Self::SourceRateLimited,
        Self::TooManyConnections,
        Self::TooManyConnectionsFromSource,
        Self::TooManyHandshakes,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::UnlistedSource => "unlisted_source",
            Self::SourceRateLimited => "source_rate_limited",
            Self::TooManyConnections => "too_many_connections",
            Self::TooManyConnectionsFromSource => "too_many_connections_from_source",
            Self::TooManyHandshakes => "too_many_handshakes",
        }
    }
}

/// What to do with a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionDecision {
    Accept,
    /// Under load and the address is not proven yet: send a QUIC retry.
    Retry,
    Refuse(Refusal),
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

pub struct Admission {
    config: AdmissionConfig,
    listed: HashSet<IpAddr>,
    connection_cap: usize,
    sources: HashMap<IpAddr, Bucket>,
    /// Open connections per source (entries removed at zero).
    per_source: HashMap<IpAddr, usize>,
    connections: usize,
    handshakes: usize,
    refusals: BTreeMap<&'static str, u64>,
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Self {
        Self {
            connection_cap: config.max_connections,
            listed: HashSet::new(),
            sources: HashMap::new(),
            per_source: HashMap::new(),
            connections: 0,
            handshakes: 0,
            refusals: BTreeMap::new(),
            config,
        }
    }

    /// The keyd addresses of the roster's members (on every roster change).
    /// Every lower member keeps a connection to this node, so the connection
    /// cap grows with the mesh: twice the members, at least the configured.
    pub fn set_listed(&mut self, ips: impl IntoIterator<Item = IpAddr>) {
        self.listed = ips.into_iter().collect();
        self.connection_cap = self.config.max_connections.max(2 * self.listed.len());
    }

    /// Raises the connection cap to at least `n` (the authority: one
    /// subscription per enrolled node, whatever addresses they share).
    /// Call it after [`Self::set_listed`], which sets the cap afresh.
    pub fn raise_connection_cap(&mut self, n: usize) {
        self.connection_cap = self.connection_cap.max(n);
    }

    /// From half the handshake cap on, new work must prove its address.
    pub fn under_load(&self) -> bool {
        self.handshakes * 2 >= self.config.max_handshakes
    }

    /// A new connection from `source`; `validated` is true once QUIC retry
    /// proved the address. On `Accept` the caller must call
    /// [`Self::connection_closed`] when it ends.
    pub fn connection(
        &mut self,
        source: IpAddr,
        validated: bool,
        now: Instant,
    ) -> ConnectionDecision {
        let decision = if !self.config.accept_unlisted_sources && !self.listed.contains(&source) {
            ConnectionDecision::Refuse(Refusal::UnlistedSource)
        } else if self.connections >= self.connection_cap {
            ConnectionDecision::Refuse(Refusal::TooManyConnections)
        } else if self.per_source.get(&source).copied().unwrap_or(0)
            >= self.config.max_connections_per_source
        {
            ConnectionDecision::Refuse(Refusal::TooManyConnectionsFromSource)
        } else if !validated {
            // Every new connection proves its address first (one stateless
            // retry packet): otherwise packets spoofed from a member's
            // address would spend that member's tokens and slots. Members
            // keep their connections, so this costs one round trip rarely.
            return ConnectionDecision::Retry;
        } else if !self.take_token(source, now) {
            ConnectionDecision::Refuse(Refusal::SourceRateLimited)
        } else {
            self.connections += 1;
            *self.per_source.entry(source).or_default() += 1;
            ConnectionDecision::Accept
        };
        if let ConnectionDecision::Refuse(r) = decision {
            self.count(r);
        }
        decision
    }

    pub fn connection_closed(&mut self, source: IpAddr) {
        self.connections = self.connections.saturating_sub(1);
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
    }

    /// A peer opened an exchange. `Ok(under_load)`: go ahead (and require a
    /// cookie if under load); the caller must call [`Self::handshake_done`].
    pub fn handshake(&mut self, source: IpAddr, now: Instant) -> Result<bool, Refusal> {
        let refusal = if self.handshakes >= self.config.max_handshakes {
            Refusal::TooManyHandshakes
        } else if !self.take_token(source, now) {
            Refusal::SourceRateLimited
        } else {
            let under_load = self.under_load();
            self.handshakes += 1;
            return Ok(under_load);
        };
        self.count(refusal);
        Err(refusal)
    }

    pub fn handshake_done(&mut self) {
        self.handshakes = self.handshakes.saturating_sub(1);
    }

    /// Counts a refusal decided elsewhere (bad mac1, a failed exchange).
    pub fn count_label(&mut self, label: &'static str) {
        *self.refusals.entry(label).or_default() += 1;
    }

    pub fn refusals(&self) -> &BTreeMap<&'static str, u64> {
        &self.refusals
    }

    pub fn in_progress(&self) -> (usize, usize) {
        (self.connections, self.handshakes)
    }

    fn count(&mut self, r: Refusal) {
        self.count_label(r.label());
    }

    fn take_token(&mut self, source: IpAddr, now: Instant) -> bool {
        if !self.sources.contains_key(&source) && self.sources.len() >= self.config.max_sources {
            self.forget_oldest();
        }
        let (burst, refill) = (
            f64::from(self.config.source_burst),
            self.config.source_refill.as_secs_f64().max(1e-6),
        );
        let b = self.sources.entry(source).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let earned = now.saturating_duration_since(b.last).as_secs_f64() / refill;
        b.tokens = (b.tokens + earned).min(burst);
        b.last = now.max(b.last);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Linear in the table, but only when it is full, and bounded.
    fn forget_oldest(&mut self) {
        if let Some(oldest) = self
            .sources
            .iter()
            .min_by_key(|(_, b)| b.last)
            .map(|(ip, _)| *ip)
        {
            self.sources.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_refusal() {
        // No wildcard: a new variant does not compile until it is in ALL.
        for r in Refusal::ALL {
            match r {
                Refusal::UnlistedSource
                | Refusal::SourceRateLimited
                | Refusal::TooManyConnections
                | Refusal::TooManyConnectionsFromSource
                | Refusal::TooManyHandshakes => {}
            }
        }
        let mut labels: Vec<_> = Refusal::ALL.iter().map(|r| r.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), 5);
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    fn admission(config: AdmissionConfig) -> Admission {
        let mut a = Admission::new(config);
        a.set_listed([ip(1), ip(2)]);
        a
    }

    #[test]
    fn unlisted_sources_are_refused_unless_configured() {
        let t = Instant::now();
        let mut a = admission(AdmissionConfig::default());
        assert_eq!(
            a.connection(ip(9), true, t),
            ConnectionDecision::Refuse(Refusal::UnlistedSource)
        );
        assert_eq!(a.connection(ip(1), true, t), ConnectionDecision::Accept);
        assert_eq!(a.refusals()["unlisted_source"], 1);
        let mut open = admission(AdmissionConfig {
            accept_unlisted_sources: true,
            ..Default::default()
        });
        assert_eq!(open.connection(ip(9), true, t), ConnectionDecision::Accept);
    }

    #[test]
    fn a_source_gets_its_burst_then_one_per_refill() {
        let t = Instant::now();
        let mut a = admission(AdmissionConfig::default());
        for _ in 0..8 {
            assert_eq!(a.connection(ip(1), true, t), ConnectionDecision::Accept);
            a.connection_closed(ip(1));
        }
        assert_eq!(
            a.connection(ip(1), true, t),
            ConnectionDecision::Refuse(Refusal::SourceRateLimited)
        );
        // Another source is not affected.
        assert_eq!(a.connection(ip(2), true, t), ConnectionDecision::Accept);
        let later = t + Duration::from_millis(500);
        assert_eq!(a.connection(ip(1), true, later), ConnectionDecision::Accept);
        assert_eq!(
            a.connection(ip(1), true, later),
            ConnectionDecision::Refuse(Refusal::SourceRateLimited)
        );
    }

    #[test]
    fn one_source_holds_a_bounded_number_of_connections() {
        let t = Instant::now();
        let mut a = admission(AdmissionConfig {
            max_connections_per_source: 2,
            ..Default::default()
        });
        assert_eq!(a.connection(ip(1), true, t), ConnectionDecision::Accept);
        assert_eq!(a.connection(ip(1), true, t), ConnectionDecision::Accept);
        assert_eq!(
            a.connection(ip(1), true, t),
            ConnectionDecision::Refuse(Refusal::TooManyConnectionsFromSource)
        );
        assert_eq!(a.connection(ip(2), true, t), ConnectionDecision::Accept);
        a.connection_closed(ip(1));
        assert_eq!(a.connection(ip(1), true, t), ConnectionDecision::Accept);
    }

    #[test]
    fn connections_are_capped() {
        let t = Instant::now();
        let mut a = Admission::new(AdmissionConfig {
            max_connections: 2,
            accept_unlisted_sources: true,
            ..Default::default()
        });
        assert_eq!(a.connection(ip(3), true, t), ConnectionDecision::Accept);
        assert_eq!(a.connection(ip(4), true, t), ConnectionDecision::Accept);
        assert_eq!(
            a.connection(ip(5), true, t),
            ConnectionDecision::Refuse(Refusal::TooManyConnections)
        );
        a.connection_closed(ip(3));
        assert_eq!(a.connection(ip(5), true, t), ConnectionDecision::Accept);
        assert_eq!(a.in_progress().0, 2);
    }

    #[test]
    fn handshakes_are_capped_and_load_is_reported() {
        let t = Instant::now();
        let mut a = admission(AdmissionConfig {
            max_handshakes: 4,
            source_burst: 100,
            ..Default::default()
        });
        assert_eq!(a.handshake(ip(1), t), Ok(false));
        assert_eq!(a.handshake(ip(1), t), Ok(false));
        assert!(a.under_load());
        assert_eq!(a.handshake(ip(1), t), Ok(true), "a cookie is now required");
        assert_eq!(a.connection(ip(2), true, t), ConnectionDecision::Accept);
        assert_eq!(a.handshake(ip(2), t), Ok(true));
        assert_eq!(a.handshake(ip(2), t), Err(Refusal::TooManyHandshakes));
        for _ in 0..4 {
            a.handshake_done();
        }
        assert!(!a.under_load());
        assert_eq!(a.refusals()["too_many_handshakes"], 1);
    }

    #[test]
    fn the_source_table_is_bounded() {
        let t = Instant::now();
        let mut a = Admission::new(AdmissionConfig {
            max_sources: 3,
            accept_unlisted_sources: true,
            source_burst: 1,
            ..Default::default()
        });
        for last in 1..=10 {
            let now = t + Duration::from_millis(u64::from(last));
            assert_eq!(
                a.connection(ip(last), true, now),
                ConnectionDecision::Accept
            );
            a.connection_closed(ip(last));
            assert!(a.sources.len() <= 3);
            assert!(a.per_source.is_empty(), "closed connections are forgotten");
        }
        // The newest sources are remembered: ip(10) has no token left.
        assert_eq!(
            a.connection(ip(10), true, t + Duration::from_millis(10)),
            ConnectionDecision::Refuse(Refusal::SourceRateLimited)
        );
    }

    /// Packets spoofed from a member's address cannot spend its budget: an
    /// unproven address gets a stateless retry and costs nothing.
    #[test]
    fn an_unproven_address_gets_a_retry_and_spends_nothing() {
        let t = Instant::now();
        let mut a = admission(AdmissionConfig {
            max_connections_per_source: 1,
            ..Default::default()
        });
        for _ in 0..100 {
            assert_eq!(a.connection(ip(1), false, t), ConnectionDecision::Retry);
        }
        assert_eq!(a.in_progress().0, 0);
        assert_eq!(a.connection(ip(1), true, t), ConnectionDecision::Accept);
    }

    #[test]
    fn the_connection_cap_grows_with_the_mesh() {
        let t = Instant::now();
        let mut a = Admission::new(AdmissionConfig {
            max_connections: 2,
            ..Default::default()
        });
        a.set_listed((1..=100).map(ip));
        for last in 1..=100 {
            assert_eq!(a.connection(ip(last), true, t), ConnectionDecision::Accept);
        }
    }
}
