//! keyd's `/metrics`: the status the driver publishes once a second (the
//! same value it writes to `status.json`), rendered as Prometheus text. Pure
//! functions: [`fixed`] of the status alone (rendered once per status and
//! shared by every scrape, metrics/page.rs) and [`clock`] of the status and
//! the time of the scrape (ages, which keep growing if the driver stalls).
//! The series and their meaning: docs/operations.md, "keyd's metrics".

use std::collections::BTreeMap;

use mesh_proto::exposition::{Exposition, Histogram, Kind};

use crate::daemon::{ROSTER_EXPIRY_WARNING, Status};
use crate::edge::ladder::Rung;
use crate::firewall::FirewallState;
use crate::metrics::exchanges::{DURATION_BOUNDS, RoleCounters};
use crate::policy::{LocalState, PeerState};
use crate::refusals;

/// Refusal reasons that mean a host that is no member knocked: it has no
/// certificate from this network's CA, is not in the roster, or did not
/// even know this node's Noise key (no valid mac1), or its address is not a
/// member's.
pub const UNKNOWN_KNOCKS: [&str; 5] = [
    "unknown_ca",
    "not_in_roster",
    "wrong_network",
    "bad_mac1",
    "unlisted_source",
];

/// The refusal reason of an exchange offering a key epoch already used with
/// this pair (a replayed or rolled-back initiator).
pub const REPLAYED_EPOCH: &str = "stale_epoch";

const LOCAL_STATES: [(LocalState, &str); 6] = [
    (LocalState::Member, "member"),
    (LocalState::Revoked, "revoked"),
    (LocalState::NotListed, "not_listed"),
    (LocalState::CertificateExpired, "certificate_expired"),
    (
        LocalState::CertificateNotYetValid,
        "certificate_not_yet_valid",
    ),
    (LocalState::RosterExpired, "roster_expired"),
];

const FIREWALL_STATES: [(FirewallState, &str); 5] = [
    (FirewallState::Unknown, "unknown"),
    (FirewallState::Enforced, "enforced"),
    (FirewallState::NoPolicy, "no_policy"),
    (FirewallState::NotSupported, "not_supported"),
    (FirewallState::Failed, "failed"),
];

/// The short name of a peer's state (a cut's reason is in
/// `keyd_peer_last_exchange_result` and the log).
pub fn peer_state_label(state: PeerState) -> &'static str {
    match state {
        PeerState::Connecting => "connecting",
        PeerState::Up => "up",
        PeerState::Retrying => "retrying",
        PeerState::Cut(_) => "cut",
    }
}

const PEER_STATES: [&str; 4] = ["connecting", "up", "retrying", "cut"];

/// The text of `/metrics` for `s`, scraped at Unix time `now`.
pub fn render(s: &Status, now: u64) -> String {
    fixed(s) + &clock(s, now)
}

/// Every family that depends on the status alone.
pub fn fixed(s: &Status) -> String {
    let mut e = Exposition::new();
    node(&mut e, s);
    peers(&mut e, s);
    refusals(&mut e, s);
    exchanges(&mut e, s);
    e.finish()
}

/// The families that depend on the time of the scrape, `now`: how old the
/// status is, how long the roster has left, how old each peer's key is.
pub fn clock(s: &Status, now: u64) -> String {
    let mut e = Exposition::new();
    e.single(
        "keyd_status_age_seconds",
        Kind::Gauge,
        "Seconds since keyd last refreshed its status (every second while its driver runs)",
        now.saturating_sub(s.updated_at),
    );
    e.single(
        "keyd_roster_expires_in_seconds",
        Kind::Gauge,
        "Seconds until the roster in use expires (negative: expired)",
        signed(s.roster_not_after) - signed(now),
    );
    let name = "keyd_peer_key_age_seconds";
    e.family(
        name,
        Kind::Gauge,
        "Age of the key a peer holds at the scrape (absent while it holds none)",
    );
    for p in s.peers.values() {
        // `key_age_secs` is there while the peer holds a key; its age now
        // counts from when that key was agreed.
        if let Some(agreed) = p.key_age_secs.and(p.last_exchange) {
            let age = now.saturating_sub(agreed);
            e.sample(name, &[("peer", &p.name), ("node_id", &p.node_id)], age);
        }
    }
    e.finish()
}

fn node(e: &mut Exposition, s: &Status) {
    let name = "keyd_node_info";
    e.family(
        name,
        Kind::Gauge,
        "This node: its certificate's name (escaped), node id and interface; always 1",
    );
    e.sample(
        name,
        &[
            ("node", &s.node),
            ("node_id", &s.node_id),
            ("interface", &s.interface),
        ],
        1u64,
    );
    let name = "keyd_local_state";
    e.family(
        name,
        Kind::Gauge,
        "This node's own standing, one-hot: only member holds peers",
    );
    for (state, label) in LOCAL_STATES {
        e.sample(name, &[("state", label)], s.local_state == state);
    }
    e.single(
        "keyd_roster_serial",
        Kind::Gauge,
        "Serial of the roster in use",
        s.roster_serial,
    );
    e.single(
        "keyd_roster_not_after_timestamp_seconds",
        Kind::Gauge,
        "Unix time at which the roster in use expires",
        s.roster_not_after,
    );
    e.single(
        "keyd_roster_expiry_warning_seconds",
        Kind::Gauge,
        "keyd status --short degrades when the roster expires within this many seconds (PqmeshRosterExpiresSoon uses it)",
        ROSTER_EXPIRY_WARNING.as_secs(),
    );
    e.single(
        "keyd_rotation_interval_seconds",
        Kind::Gauge,
        "Configured rotation_interval: a fresh key with every peer this often",
        s.rotation_interval_secs,
    );
    e.single(
        "keyd_dataplane_reachable",
        Kind::Gauge,
        "Whether the last read of the data plane's userspace API succeeded",
        s.dataplane_reachable,
    );
    e.single(
        "keyd_dataplane_unlisted_peers",
        Kind::Gauge,
        "Peers in the data plane that the roster does not list (being removed)",
        s.unlisted_in_dataplane as u64,
    );
    let name = "keyd_firewall_state";
    e.family(
        name,
        Kind::Gauge,
        "Whether the data plane enforces the roster's firewall policy, one-hot",
    );
    for (state, label) in FIREWALL_STATES {
        e.sample(name, &[("state", label)], s.firewall.state == state);
    }
    if let Some(a) = &s.authority {
        e.single(
            "keyd_authority_subscribed",
            Kind::Gauge,
            "Whether the subscription to the authority is up",
            a.subscribed,
        );
        e.single(
            "keyd_authority_subscription_failures_total",
            Kind::Counter,
            "Subscriptions to the authority that failed or ended",
            a.failures,
        );
    }
}

fn peers(e: &mut Exposition, s: &Status) {
    let name = "keyd_peers";
    e.family(name, Kind::Gauge, "Peers the roster lists, by state");
    for state in PEER_STATES {
        let n = s
            .peers
            .values()
            .filter(|p| peer_state_label(p.state) == state)
            .count();
        e.sample(name, &[("state", state)], n as u64);
    }

    let name = "keyd_peer_state";
    e.family(
        name,
        Kind::Gauge,
        "A peer's state, one-hot: connecting, up (fresh key), retrying (key usable, refresh failing), cut",
    );
    for p in s.peers.values() {
        for state in PEER_STATES {
            let labels = [
                ("peer", &*p.name),
                ("node_id", &p.node_id),
                ("state", state),
            ];
            e.sample(name, &labels, peer_state_label(p.state) == state);
        }
    }

    let name = "keyd_peer_key_epoch";
    e.family(
        name,
        Kind::Gauge,
        "Epoch of the last key agreed with a peer",
    );
    for p in s.peers.values() {
        e.sample(name, &[("peer", &p.name), ("node_id", &p.node_id)], p.epoch);
    }

    let name = "keyd_peer_last_exchange_timestamp_seconds";
    e.family(
        name,
        Kind::Gauge,
        "Unix time of the last key agreed with a peer (time() minus it: seconds since); absent before the first",
    );
    for p in s.peers.values() {
        if let Some(t) = p.last_exchange {
            e.sample(name, &[("peer", &p.name), ("node_id", &p.node_id)], t);
        }
    }

    let name = "keyd_peer_last_exchange_result";
    e.family(
        name,
        Kind::Gauge,
        "The last exchange with a peer: one series per peer at 1, result ok, the failure's reason, or none yet",
    );
    for p in s.peers.values() {
        let result = p.last_result.as_deref().unwrap_or("none");
        e.sample(
            name,
            &[
                ("peer", &p.name),
                ("node_id", &p.node_id),
                ("result", result),
            ],
            1u64,
        );
    }

    let name = "keyd_peer_exchanges_total";
    e.family(
        name,
        Kind::Counter,
        "Exchanges with a peer since keyd started: ok, failed, or unanswered dials",
    );
    for p in s.peers.values() {
        for (result, n) in [
            ("ok", p.exchanges_ok),
            ("failed", p.exchanges_failed),
            ("unanswered", p.dials_unanswered),
        ] {
            e.sample(
                name,
                &[
                    ("peer", &p.name),
                    ("node_id", &p.node_id),
                    ("result", result),
                ],
                n,
            );
        }
    }

    let name = "keyd_peer_path";
    e.family(
        name,
        Kind::Gauge,
        "The rung that carries a peer's WireGuard packets, one-hot: direct, quic, tcp",
    );
    for p in s.peers.values() {
        if let Some(path) = &p.path {
            for rung in Rung::ALL {
                let labels = [
                    ("peer", &*p.name),
                    ("node_id", &p.node_id),
                    ("rung", rung.as_str()),
                ];
                e.sample(name, &labels, path.rung == rung);
            }
        }
    }
    let name = "keyd_peer_path_rtt_seconds";
    e.family(
        name,
        Kind::Gauge,
        "The smoothed round trip of answered probes on each rung of a peer's path (keyd to the peer's data plane on direct, to its keyd on quic and tcp); absent for a rung never heard, kept when one goes silent",
    );
    for p in s.peers.values() {
        if let Some(path) = &p.path {
            for rung in Rung::ALL {
                let ms = path.rtt_ms.get(rung.as_str()).and_then(|v| v.as_f64());
                if let Some(ms) = ms {
                    let labels = [
                        ("peer", &*p.name),
                        ("node_id", &p.node_id),
                        ("rung", rung.as_str()),
                    ];
                    e.sample(name, &labels, ms / 1000.0);
                }
            }
        }
    }
    let name = "keyd_peer_path_changes_total";
    e.family(
        name,
        Kind::Counter,
        "Moves of a peer's path from one rung to another (edge.md, the ladder)",
    );
    for p in s.peers.values() {
        if let Some(path) = &p.path {
            e.sample(
                name,
                &[("peer", &p.name), ("node_id", &p.node_id)],
                path.changes,
            );
        }
    }
    let name = "keyd_peer_path_packets_total";
    e.family(
        name,
        Kind::Counter,
        "WireGuard packets relayed over a fallback rung, by rung and direction (to or from the peer)",
    );
    for p in s.peers.values() {
        if let Some(path) = &p.path {
            for (rung, counts) in [("quic", path.quic_packets), ("tcp", path.tcp_packets)] {
                for (direction, n) in [("to_peer", counts[0]), ("from_peer", counts[1])] {
                    let labels = [
                        ("peer", &*p.name),
                        ("node_id", &p.node_id),
                        ("rung", rung),
                        ("direction", direction),
                    ];
                    e.sample(name, &labels, n);
                }
            }
        }
    }
    let name = "keyd_peer_path_dropped_total";
    e.family(
        name,
        Kind::Counter,
        "Packets and datagrams a peer's relay dropped, by reason: no_carrier, malformed, too_big, dataplane_full, packed_partial (a packet lost with the PACKED datagram it spanned), fragment_partial (a packet that came as fragments and never became whole)",
    );
    for p in s.peers.values() {
        if let Some(path) = &p.path {
            let partials = [
                ("packed_partial", path.packed_partials_lost),
                ("fragment_partial", path.fragments_lost),
            ];
            for (reason, n) in path.dropped.by_reason().into_iter().chain(partials) {
                let labels = [
                    ("peer", &*p.name),
                    ("node_id", &p.node_id),
                    ("reason", reason),
                ];
                e.sample(name, &labels, n);
            }
        }
    }
    let name = "keyd_peer_path_ladder";
    e.family(
        name,
        Kind::Gauge,
        "Whether the fallback ladder runs for a peer (0: a data plane does not answer path probes; it stays direct)",
    );
    for p in s.peers.values() {
        if let Some(path) = &p.path {
            e.sample(
                name,
                &[("peer", &p.name), ("node_id", &p.node_id)],
                path.ladder,
            );
        }
    }
}

fn refusals(e: &mut Exposition, s: &Status) {
    let name = "keyd_refusals_total";
    e.family(
        name,
        Kind::Counter,
        "Connections and exchanges refused or failed, by reason (every reason from keyd's start)",
    );
    // Every known reason at 0, then what was counted (a reason this keyd
    // does not list, from another version's status, shows too).
    let mut all: BTreeMap<&str, u64> = refusals::all().map(|r| (r, 0)).collect();
    for (reason, n) in &s.refusals {
        all.insert(reason, *n);
    }
    for (reason, n) in all {
        e.sample(name, &[("reason", reason)], n);
    }
    let count = |reason: &str| s.refusals.get(reason).copied().unwrap_or(0);
    let name = "keyd_replays_total";
    e.family(
        name,
        Kind::Counter,
        "Replays refused: exchanges offering a key epoch already used (key_epoch), older rosters (roster)",
    );
    e.sample(name, &[("kind", "key_epoch")], count(REPLAYED_EPOCH));
    e.sample(name, &[("kind", "roster")], s.roster_rollbacks_refused);
    let name = "keyd_knocks_total";
    e.family(
        name,
        Kind::Counter,
        "Refused attempts by hosts that are not members: revoked, or unknown (another CA or network, not in the roster, no valid mac1, unlisted address)",
    );
    e.sample(name, &[("kind", "revoked")], count("revoked"));
    let unknown = UNKNOWN_KNOCKS.iter().map(|r| count(r)).sum::<u64>();
    e.sample(name, &[("kind", "unknown")], unknown);
    e.single(
        "keyd_rosters_refused_total",
        Kind::Counter,
        "Roster updates refused (bad signature, expired, rollback, ...)",
        s.rosters_refused,
    );
    let c = &s.counters;
    let name = "keyd_peers_cut_total";
    e.family(
        name,
        Kind::Counter,
        "Peers cut from the data plane, by reason",
    );
    for (reason, n) in [
        ("hard_lifetime", c.peers_cut_at_hard_lifetime),
        ("certificate_expiry", c.peers_cut_at_certificate_expiry),
        ("revoked_or_unlisted", c.peers_cut_revoked_or_unlisted),
    ] {
        e.sample(name, &[("reason", reason)], n);
    }
    let name = "keyd_dataplane_failures_total";
    e.family(name, Kind::Counter, "Data-plane calls that failed, by call");
    for (call, n) in [
        ("read", c.dataplane_reads_failed),
        ("install", c.installs_failed),
        ("remove", c.removals_failed),
    ] {
        e.sample(name, &[("call", call)], n);
    }
    e.single(
        "keyd_dataplane_restarts_healed_total",
        Kind::Counter,
        "Times the data plane had lost its key (restarted) and keyd restored it",
        c.dataplane_restarts_healed,
    );
}

fn exchanges(e: &mut Exposition, s: &Status) {
    let roles = [
        ("initiator", &s.exchanges.initiator),
        ("responder", &s.exchanges.responder),
    ];
    for (name, help, get) in [
        (
            "keyd_handshakes_started_total",
            "Hybrid exchanges begun: dials (initiator), msg1s past mac1 and admission (responder)",
            (|r: &RoleCounters| r.started) as fn(&RoleCounters) -> u64,
        ),
        (
            "keyd_handshakes_completed_total",
            "Hybrid exchanges that agreed a key",
            |r: &RoleCounters| r.completed,
        ),
        (
            "keyd_handshakes_failed_total",
            "Hybrid exchanges begun that agreed no key (refusals_total says why)",
            |r: &RoleCounters| r.failed,
        ),
    ] {
        e.family(name, Kind::Counter, help);
        for (role, r) in roles {
            e.sample(name, &[("role", role)], get(r));
        }
    }
    let name = "keyd_exchange_duration_seconds";
    e.family(
        name,
        Kind::Histogram,
        "Time from an exchange's start to its key, completed exchanges only (initiator: from the dial, a new QUIC connection included)",
    );
    for (role, r) in roles {
        // A status from an older keyd has no buckets: render empty ones.
        let empty = vec![0; DURATION_BOUNDS.len() + 1];
        let counts = if r.duration_buckets.len() == empty.len() {
            &r.duration_buckets
        } else {
            &empty
        };
        e.histogram(
            name,
            &[("role", role)],
            &Histogram {
                bounds: &DURATION_BOUNDS,
                counts,
                sum: r.duration_sum_micros as f64 / 1e6,
            },
        );
    }
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
