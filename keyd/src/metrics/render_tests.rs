//! The renderer of `/metrics`, on statuses built by hand.

use std::collections::BTreeMap;
use std::time::Duration;

use super::exchanges::{DURATION_BOUNDS, ExchangeStats};
use super::render::render;
use crate::edge::PathStatus;
use crate::edge::ladder::Rung;
use crate::health::fixture::{NOW, healthy, peer};
use crate::policy::{CutReason, PeerState, Role};

/// Samples of `name` (exactly that family member): labels text -> value.
fn samples(text: &str, name: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let labels = series.strip_prefix(name)?;
            (labels.is_empty() || labels.starts_with('{'))
                .then(|| (labels.to_string(), value.to_string()))
        })
        .collect()
}

fn value(text: &str, series: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .to_string()
}

#[test]
fn every_family_has_help_and_type_once_before_its_samples() {
    let mut s = healthy(2);
    s.refusals.insert("bad_mac1".into(), 2);
    let text = render(&s, NOW);
    let mut typed = std::collections::HashSet::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap().to_string();
            assert!(typed.insert(name.clone()), "{name} typed twice");
            current = Some(name);
        } else if !line.starts_with("# HELP ") {
            let family = current.as_deref().expect("a sample before any TYPE");
            assert!(
                line.starts_with(family),
                "{line} outside its family {family}"
            );
        }
    }
    assert!(text.ends_with('\n'));
}

#[test]
fn peer_names_are_escaped_in_labels() {
    let mut s = healthy(0);
    // As the status holds it: already sanitized (quotes and backslashes
    // escaped once), then escaped again for the exposition.
    let name = crate::text::name("evil\"}\nx 1\\");
    s.peers.insert(name.clone(), peer(&name, PeerState::Up));
    let text = render(&s, NOW);
    let line = text
        .lines()
        .find(|l| l.starts_with("keyd_peer_key_epoch{"))
        .unwrap();
    assert_eq!(
        line,
        "keyd_peer_key_epoch{peer=\"evil\\\\\\\"}\\\\nx 1\\\\\\\\\",node_id=\"evil\\\\\\\"}\\\\nx 1\\\\\\\\-id\"} 3"
    );
    // No sample line was forged by the name.
    assert!(!text.lines().any(|l| l.starts_with("x 1")));
}

#[test]
fn peer_state_and_path_are_one_hot() {
    let mut s = healthy(2);
    s.peers.get_mut("node3").unwrap().state = PeerState::Cut(CutReason::HardLifetime);
    s.peers.get_mut("node2").unwrap().path = Some(PathStatus {
        rung: Rung::Quic,
        ladder: true,
        rtt_ms: serde_json::Value::Null,
        changes: 1,
        last_change: serde_json::Value::Null,
        relayed_out: 0,
        relayed_in: 0,
        quic_packets: [0, 0],
        tcp_packets: [0, 0],
        packed: true,
        packed_partials_lost: 0,
        packed_late: 0,
        fragments_lost: 0,
        dropped: Default::default(),
    });
    let text = render(&s, NOW);
    let state = samples(&text, "keyd_peer_state");
    for p in ["node2", "node3"] {
        let mine: Vec<_> = state
            .iter()
            .filter(|(l, _)| l.contains(&format!("peer=\"{p}\"")))
            .collect();
        assert_eq!(mine.len(), 4, "{mine:?}");
        assert_eq!(
            mine.iter().filter(|(_, v)| *v == "1").count(),
            1,
            "{mine:?}"
        );
    }
    assert_eq!(
        value(
            &text,
            "keyd_peer_state{peer=\"node3\",node_id=\"node3-id\",state=\"cut\"}"
        ),
        "1"
    );
    let path = samples(&text, "keyd_peer_path");
    assert_eq!(path.len(), 3, "only node2 has a path: {path:?}");
    assert_eq!(
        value(
            &text,
            "keyd_peer_path{peer=\"node2\",node_id=\"node2-id\",rung=\"quic\"}"
        ),
        "1"
    );
    assert_eq!(path.values().filter(|v| *v == "1").count(), 1);
    assert_eq!(value(&text, "keyd_peers{state=\"up\"}"), "1");
    assert_eq!(value(&text, "keyd_peers{state=\"cut\"}"), "1");
}

#[test]
fn local_and_firewall_state_are_one_hot() {
    let text = render(&healthy(0), NOW);
    for family in ["keyd_local_state", "keyd_firewall_state"] {
        let all = samples(&text, family);
        assert!(all.len() > 1);
        assert_eq!(all.values().filter(|v| *v == "1").count(), 1, "{all:?}");
    }
    assert_eq!(value(&text, "keyd_local_state{state=\"member\"}"), "1");
}

#[test]
fn one_last_result_per_peer() {
    let mut s = healthy(3);
    s.peers.get_mut("node3").unwrap().last_result = Some("revoked".into());
    s.peers.get_mut("node4").unwrap().last_result = None;
    let text = render(&s, NOW);
    let all = samples(&text, "keyd_peer_last_exchange_result");
    assert_eq!(
        all.keys().cloned().collect::<Vec<_>>(),
        [
            "{peer=\"node2\",node_id=\"node2-id\",result=\"ok\"}",
            "{peer=\"node3\",node_id=\"node3-id\",result=\"revoked\"}",
            "{peer=\"node4\",node_id=\"node4-id\",result=\"none\"}",
        ]
    );
}

#[test]
fn roster_and_ages_are_taken_at_the_scrape() {
    let mut s = healthy(2);
    // Written at NOW - 1 (the fixture): node2's key agreed at NOW - 10, so
    // 9 s old then; 15 s old at a scrape at NOW + 5.
    s.peers.get_mut("node2").unwrap().key_age_secs = Some(9);
    s.peers.get_mut("node3").unwrap().key_age_secs = None;
    let text = render(&s, NOW + 5);
    assert_eq!(
        samples(&text, "keyd_peer_key_age_seconds"),
        BTreeMap::from([(
            "{peer=\"node2\",node_id=\"node2-id\"}".to_string(),
            "15".to_string()
        )]),
        "node2's age at the scrape; node3 holds no key, no key age"
    );
    assert_eq!(value(&text, "keyd_roster_serial"), "12");
    assert_eq!(value(&text, "keyd_rotation_interval_seconds"), "120");
    assert_eq!(
        value(&text, "keyd_roster_not_after_timestamp_seconds"),
        s.roster_not_after.to_string()
    );
    assert_eq!(
        value(&text, "keyd_roster_expires_in_seconds"),
        (s.roster_not_after - NOW - 5).to_string()
    );
    assert_eq!(value(&text, "keyd_status_age_seconds"), "6");
    let expired = render(&s, s.roster_not_after + 7);
    assert_eq!(value(&expired, "keyd_roster_expires_in_seconds"), "-7");
}

#[test]
fn refusals_feed_replays_and_knocks() {
    let mut s = healthy(0);
    for (reason, n) in [
        ("stale_epoch", 2),
        ("revoked", 3),
        ("unknown_ca", 1),
        ("bad_mac1", 4),
        ("timeout", 9),
    ] {
        s.refusals.insert(reason.into(), n);
    }
    s.roster_rollbacks_refused = 5;
    let text = render(&s, NOW);
    assert_eq!(value(&text, "keyd_refusals_total{reason=\"timeout\"}"), "9");
    assert_eq!(value(&text, "keyd_replays_total{kind=\"key_epoch\"}"), "2");
    assert_eq!(value(&text, "keyd_replays_total{kind=\"roster\"}"), "5");
    assert_eq!(value(&text, "keyd_knocks_total{kind=\"revoked\"}"), "3");
    assert_eq!(value(&text, "keyd_knocks_total{kind=\"unknown\"}"), "5");
}

#[test]
fn the_exchange_histogram_is_cumulative_and_matches_its_count() {
    let stats = ExchangeStats::default();
    for ms in [1, 3, 3, 40, 700, 30_000] {
        stats.started(Role::Initiator);
        stats.completed(Role::Initiator, Duration::from_millis(ms));
    }
    stats.started(Role::Responder);
    stats.failed(Role::Responder);
    let mut s = healthy(0);
    s.exchanges = stats.snapshot();
    let text = render(&s, NOW);
    let buckets: Vec<(f64, u64)> = text
        .lines()
        .filter(|l| l.starts_with("keyd_exchange_duration_seconds_bucket{role=\"initiator\""))
        .map(|l| {
            let le = l.split(",le=\"").nth(1).unwrap().split('"').next().unwrap();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (le, l.rsplit_once(' ').unwrap().1.parse().unwrap())
        })
        .collect();
    assert_eq!(buckets.len(), DURATION_BOUNDS.len() + 1);
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "{buckets:?}"
    );
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 6));
    assert_eq!(buckets[0], (0.002, 1), "1 ms");
    assert_eq!(buckets[1], (0.005, 3), "and twice 3 ms");
    assert_eq!(
        buckets[DURATION_BOUNDS.len() - 1].1,
        5,
        "30 s is above 10 s"
    );
    assert_eq!(
        value(
            &text,
            "keyd_exchange_duration_seconds_count{role=\"initiator\"}"
        ),
        "6"
    );
    assert_eq!(
        value(
            &text,
            "keyd_exchange_duration_seconds_sum{role=\"initiator\"}"
        ),
        "30.747"
    );
    assert_eq!(
        value(&text, "keyd_handshakes_started_total{role=\"initiator\"}"),
        "6"
    );
    assert_eq!(
        value(&text, "keyd_handshakes_failed_total{role=\"responder\"}"),
        "1"
    );
    assert_eq!(
        value(
            &text,
            "keyd_exchange_duration_seconds_count{role=\"responder\"}"
        ),
        "0"
    );
}

#[test]
fn a_status_without_exchange_counters_renders_empty_histograms() {
    // A status.json from before the counters existed reads as zeros.
    let s = healthy(0);
    assert!(s.exchanges.initiator.duration_buckets.is_empty());
    let text = render(&s, NOW);
    assert_eq!(
        value(
            &text,
            "keyd_exchange_duration_seconds_bucket{role=\"initiator\",le=\"+Inf\"}"
        ),
        "0"
    );
}

/// Every reason is a series from keyd's start: a counter that appeared only
/// when first counted would hide its first burst from `increase()`.
#[test]
fn every_refusal_reason_is_rendered_from_the_start() {
    let text = render(&healthy(0), NOW);
    let all = samples(&text, "keyd_refusals_total");
    for reason in crate::refusals::all() {
        assert_eq!(
            all.get(&format!("{{reason=\"{reason}\"}}"))
                .map(String::as_str),
            Some("0"),
            "{reason} in {all:?}"
        );
    }
    assert_eq!(all.len(), crate::refusals::all().count());
    // A reason the list does not know (a newer keyd's status) still shows.
    let mut s = healthy(0);
    s.refusals.insert("bad_mac1".into(), 4);
    s.refusals.insert("from_the_future".into(), 1);
    let text = render(&s, NOW);
    assert_eq!(
        value(&text, "keyd_refusals_total{reason=\"bad_mac1\"}"),
        "4"
    );
    assert_eq!(
        value(&text, "keyd_refusals_total{reason=\"from_the_future\"}"),
        "1"
    );
}

/// The warning threshold is one fact: keyd's constant, exported, and the
/// alert compares with the exported value rather than a number of its own.
#[test]
fn the_roster_expiry_warning_is_exported_and_the_alert_uses_it() {
    let text = render(&healthy(0), NOW);
    assert_eq!(
        value(&text, "keyd_roster_expiry_warning_seconds"),
        crate::daemon::ROSTER_EXPIRY_WARNING.as_secs().to_string()
    );
    let rules = include_str!("../../../deploy/prometheus/pqmesh-alerts.yml");
    let rule = rules
        .split("- alert: ")
        .find(|r| r.starts_with("PqmeshRosterExpiresSoon\n"))
        .expect("the alert PqmeshRosterExpiresSoon");
    let expr = rule
        .lines()
        .find_map(|l| l.trim().strip_prefix("expr: "))
        .expect("its expr");
    assert!(
        expr.contains("< on (job, instance) keyd_roster_expiry_warning_seconds"),
        "{expr}"
    );
    assert!(!expr.contains("86400"), "{expr}");
}

/// The path's round trips, moves, relayed packets and drops (issue 12:
/// "its RTT and its changes are visible in keyd status and the metrics"),
/// each from its own field of the status.
#[test]
fn path_rtt_changes_packets_and_drops_are_exported() {
    let mut s = healthy(1);
    s.peers.get_mut("node2").unwrap().path = Some(PathStatus {
        rung: Rung::Tcp,
        ladder: true,
        rtt_ms: serde_json::json!({"direct": null, "quic": 1.5, "tcp": 0.25}),
        changes: 4,
        last_change: serde_json::Value::Null,
        relayed_out: 17,
        relayed_in: 29,
        quic_packets: [10, 20],
        tcp_packets: [7, 9],
        packed: true,
        packed_partials_lost: 6,
        packed_late: 8,
        fragments_lost: 7,
        dropped: crate::edge::PathDrops {
            no_carrier: 1,
            malformed: 2,
            too_big: 3,
            dataplane_full: 5,
        },
    });
    let text = render(&s, NOW);
    let l = "peer=\"node2\",node_id=\"node2-id\"";
    let rtt = samples(&text, "keyd_peer_path_rtt_seconds");
    assert_eq!(rtt.len(), 2, "no sample for a rung not heard: {rtt:?}");
    assert_eq!(
        value(
            &text,
            &format!("keyd_peer_path_rtt_seconds{{{l},rung=\"quic\"}}")
        ),
        "0.0015"
    );
    assert_eq!(
        value(
            &text,
            &format!("keyd_peer_path_rtt_seconds{{{l},rung=\"tcp\"}}")
        ),
        "0.00025"
    );
    assert_eq!(
        value(&text, &format!("keyd_peer_path_changes_total{{{l}}}")),
        "4"
    );
    for (rung, direction, n) in [
        ("quic", "to_peer", "10"),
        ("quic", "from_peer", "20"),
        ("tcp", "to_peer", "7"),
        ("tcp", "from_peer", "9"),
    ] {
        assert_eq!(
            value(
                &text,
                &format!(
                    "keyd_peer_path_packets_total{{{l},rung=\"{rung}\",direction=\"{direction}\"}}"
                )
            ),
            n
        );
    }
    for (reason, n) in [
        ("no_carrier", "1"),
        ("malformed", "2"),
        ("too_big", "3"),
        ("dataplane_full", "5"),
        ("packed_partial", "6"),
        ("fragment_partial", "7"),
    ] {
        assert_eq!(
            value(
                &text,
                &format!("keyd_peer_path_dropped_total{{{l},reason=\"{reason}\"}}")
            ),
            n
        );
    }
}
