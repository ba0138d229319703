//! `keyd status --short`: the daemon's health in one line for scripts and
//! monitoring, and an exit code that says it (docs/operations.md):
//!
//! * `ok` (0): a valid member, every listed peer holds a fresh key, the
//!   data plane answers, the roster is more than a day from expiry.
//! * `degraded` (1): it works, but something needs a look: a peer without a
//!   key or whose refresh fails, the roster expires within a day (or is
//!   past its expiry but kept for `max_clock_skew`), the firewall policy is
//!   not in force, the authority is not connected.
//! * `failed` (2): no protection or no mesh: keyd not running (no status,
//!   or one not refreshed), this node not a valid member, the roster
//!   expired beyond `max_clock_skew` (keyd dropped it), the data plane
//!   unreachable, or no peer keyed at all.
//!
//! A pure function of the status and the time, so every case is a unit test.

use std::fmt;

use mesh_proto::roster::past_expiry;

use crate::daemon::{ROSTER_EXPIRY_WARNING, Status};
use crate::firewall::FirewallState;
use crate::policy::{LocalState, PeerState};

/// keyd rewrites its status every second; older than this, it is not running
/// (or its driver is stuck).
pub const STALE_AFTER_SECS: u64 = 10;

/// Peers named in a line at most; the rest are counted.
const NAMES_MAX: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Degraded,
    Failed,
}

impl Level {
    pub fn exit_code(self) -> u8 {
        match self {
            Level::Ok => 0,
            Level::Degraded => 1,
            Level::Failed => 2,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Ok => "ok",
            Level::Degraded => "degraded",
            Level::Failed => "failed",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub level: Level,
    /// `LEVEL: SUMMARY[; PROBLEM]...`
    pub line: String,
}

/// No status to read: keyd is not running with this configuration (or
/// never wrote one). `why` is the read error, shown as is.
pub fn no_status(why: &str) -> Health {
    Health {
        level: Level::Failed,
        line: format!("failed: no status from keyd ({why})"),
    }
}

/// The health `s` shows at Unix time `now`.
pub fn assess(s: &Status, now: u64) -> Health {
    let mut problems: Vec<(Level, String)> = Vec::new();
    let mut problem = |level, text: String| problems.push((level, text));

    let age = now.saturating_sub(s.updated_at);
    if age > STALE_AFTER_SECS {
        problem(
            Level::Failed,
            format!("status is {} old: keyd is not running", human(age)),
        );
    }
    if s.local_state != LocalState::Member {
        problem(
            Level::Failed,
            format!("this node is not a valid member ({:?})", s.local_state),
        );
    }
    let expired = now >= s.roster_not_after;
    let skew = s.max_clock_skew_secs;
    if past_expiry(s.roster_not_after, now, skew) {
        problem(
            Level::Failed,
            "the roster has expired: keyd holds no peers".into(),
        );
    } else if expired {
        // Still in use: keyd allows for clocks that differ.
        let left = s.roster_not_after.saturating_add(skew) - now;
        problem(
            Level::Degraded,
            format!(
                "the roster is past its expiry: keyd drops it and every peer in {} (max_clock_skew)",
                human(left)
            ),
        );
    } else if s.roster_not_after - now < ROSTER_EXPIRY_WARNING.as_secs() {
        problem(Level::Degraded, "the roster expires within a day".into());
    }
    if !s.dataplane_reachable {
        problem(Level::Failed, "the data plane does not answer".into());
    }

    let total = s.peers.len();
    let unkeyed: Vec<String> = s
        .peers
        .values()
        .filter(|p| !matches!(p.state, PeerState::Up | PeerState::Retrying))
        .map(|p| format!("{} {}", p.name, p.state.label()))
        .collect();
    let retrying: Vec<String> = s
        .peers
        .values()
        .filter(|p| p.state == PeerState::Retrying)
        .map(|p| format!("{} retrying", p.name))
        .collect();
    let keyed = total - unkeyed.len();
    if total > 0 && keyed == 0 {
        problem(Level::Failed, format!("no peer keyed: {}", names(&unkeyed)));
    } else if !unkeyed.is_empty() {
        problem(Level::Degraded, names(&unkeyed));
    }
    if !retrying.is_empty() {
        problem(Level::Degraded, names(&retrying));
    }
    match s.firewall.state {
        FirewallState::Failed => problem(
            Level::Degraded,
            "the firewall policy is not in force".into(),
        ),
        FirewallState::NotSupported => problem(
            Level::Degraded,
            "the data plane has no firewall: the policy is not enforced".into(),
        ),
        _ => {}
    }
    if s.authority.as_ref().is_some_and(|a| !a.subscribed) {
        problem(
            Level::Degraded,
            "not connected to the authority (running on the cached roster)".into(),
        );
    }

    let level = problems.iter().map(|(l, _)| *l).max().unwrap_or(Level::Ok);
    let expiry = if expired {
        format!("expired {} ago", human(now - s.roster_not_after))
    } else {
        format!("expires in {}", human(s.roster_not_after - now))
    };
    let mut line = format!(
        "{level}: {keyed}/{total} peers keyed, roster serial {} {expiry}",
        s.roster_serial
    );
    // The worst first: what a reader must act on leads.
    problems.sort_by_key(|p| std::cmp::Reverse(p.0));
    for (_, text) in problems {
        line.push_str("; ");
        line.push_str(&text);
    }
    Health { level, line }
}

/// `a, b, c and N more`.
fn names(items: &[String]) -> String {
    let mut out = items
        .iter()
        .take(NAMES_MAX)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > NAMES_MAX {
        out.push_str(&format!(" and {} more", items.len() - NAMES_MAX));
    }
    out
}

/// The largest whole unit: `6d`, `23h`, `5m`, `42s`.
pub fn human(secs: u64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s if s >= 3_600 => format!("{}h", s / 3_600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A status to test what reads it (here and in `metrics`).
#[cfg(test)]
pub(crate) mod fixture {
    use crate::daemon::Status;
    use crate::policy::{PeerState, PeerStatus, Role};

    pub const NOW: u64 = 1_700_000_000;
    pub const DAY: u64 = 86_400;

    pub fn peer(name: &str, state: PeerState) -> PeerStatus {
        PeerStatus {
            name: name.into(),
            node_id: format!("{name}-id"),
            state,
            role: Role::Initiator,
            epoch: 3,
            last_exchange: Some(NOW - 10),
            key_age_secs: Some(10),
            in_dataplane: Some(true),
            last_handshake: None,
            last_error: None,
            exchanges_ok: 3,
            exchanges_failed: 0,
            dials_unanswered: 0,
            path: None,
            last_result: Some("ok".into()),
        }
    }

    /// A healthy node with `peers` up (node2, node3, ...), roster serial 12
    /// valid for 6.5 days, status written a second ago.
    pub fn healthy(peers: usize) -> Status {
        let mut s: Status = serde_json::from_value(serde_json::json!({
            "node": "node1", "node_id": "id1", "interface": "pq0",
            "local_state": "member", "roster_serial": 12,
            "roster_not_after": NOW + 6 * DAY + DAY / 2, "updated_at": NOW - 1,
            "dataplane_reachable": true, "unlisted_in_dataplane": 0,
            "peers": {}, "refusals": {}, "roster_rollbacks_refused": 0,
            "rosters_refused": 0,
            "peers_cut_at_hard_lifetime": 0, "peers_cut_at_certificate_expiry": 0,
            "peers_cut_revoked_or_unlisted": 0, "removals_failed": 0,
            "installs_failed": 0, "installs_refused_roster_changed": 0,
            "dataplane_reads_failed": 0, "dataplane_restarts_healed": 0,
            "unknown_peers_removed": 0, "rotation_interval_secs": 120,
            "max_clock_skew_secs": 300
        }))
        .expect("a status as keyd writes it");
        for i in 2..peers + 2 {
            let name = format!("node{i}");
            s.peers.insert(name.clone(), peer(&name, PeerState::Up));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::{DAY, NOW, healthy};
    use super::*;
    use crate::policy::CutReason;

    #[test]
    fn all_peers_keyed_is_ok() {
        let h = assess(&healthy(4), NOW);
        assert_eq!(h.level, Level::Ok);
        assert_eq!(
            h.line,
            "ok: 4/4 peers keyed, roster serial 12 expires in 6d"
        );
        assert_eq!(h.level.exit_code(), 0);
    }

    #[test]
    fn a_node_alone_is_ok() {
        assert_eq!(assess(&healthy(0), NOW).level, Level::Ok);
    }

    #[test]
    fn a_peer_without_a_key_degrades() {
        let mut s = healthy(4);
        s.peers.get_mut("node5").unwrap().state = PeerState::Connecting;
        let h = assess(&s, NOW);
        assert_eq!(h.level, Level::Degraded);
        assert_eq!(h.level.exit_code(), 1);
        assert_eq!(
            h.line,
            "degraded: 3/4 peers keyed, roster serial 12 expires in 6d; node5 connecting"
        );
    }

    #[test]
    fn a_failing_refresh_degrades_but_the_peer_is_keyed() {
        let mut s = healthy(2);
        s.peers.get_mut("node2").unwrap().state = PeerState::Retrying;
        let h = assess(&s, NOW);
        assert_eq!(h.level, Level::Degraded);
        assert!(
            h.line.starts_with("degraded: 2/2 peers keyed"),
            "{}",
            h.line
        );
        assert!(h.line.ends_with("; node2 retrying"), "{}", h.line);
    }

    #[test]
    fn no_peer_keyed_fails() {
        let mut s = healthy(2);
        for p in s.peers.values_mut() {
            p.state = PeerState::Cut(CutReason::HardLifetime);
        }
        let h = assess(&s, NOW);
        assert_eq!(h.level, Level::Failed);
        assert_eq!(h.level.exit_code(), 2);
        assert!(h.line.starts_with("failed: 0/2 peers keyed"), "{}", h.line);
        assert!(h.line.contains("no peer keyed: node2 cut"), "{}", h.line);
    }

    #[test]
    fn roster_expiry_degrades_then_fails() {
        let mut s = healthy(1);
        s.roster_not_after = NOW + 3 * 3600;
        let h = assess(&s, NOW);
        assert_eq!(h.level, Level::Degraded);
        assert!(
            h.line
                .contains("expires in 3h; the roster expires within a day"),
            "{}",
            h.line
        );
        s.roster_not_after = NOW - 2 * DAY;
        let h = assess(&s, NOW);
        assert_eq!(h.level, Level::Failed);
        assert!(
            h.line.contains("roster serial 12 expired 2d ago"),
            "{}",
            h.line
        );
    }

    /// keyd keeps a roster `max_clock_skew` past its expiry (for clocks
    /// that differ): the mesh still works then, so it degrades; past that
    /// keyd drops it, and that fails.
    #[test]
    fn a_roster_is_kept_for_the_clock_skew_past_its_expiry() {
        let mut s = healthy(1);
        assert_eq!(s.max_clock_skew_secs, 300);
        s.roster_not_after = NOW - 60;
        let h = assess(&s, NOW);
        assert_eq!(h.level, Level::Degraded, "{}", h.line);
        assert!(
            h.line.ends_with(
                "expired 1m ago; the roster is past its expiry: keyd drops it and every peer in 4m (max_clock_skew)"
            ),
            "{}",
            h.line
        );
        // As Roster::check_fresh: kept up to and including not_after + skew.
        s.roster_not_after = NOW - 300;
        assert_eq!(assess(&s, NOW).level, Level::Degraded);
        s.roster_not_after = NOW - 301;
        let h = assess(&s, NOW);
        assert_eq!(h.level, Level::Failed);
        assert!(
            h.line
                .contains("; the roster has expired: keyd holds no peers"),
            "{}",
            h.line
        );
    }

    #[test]
    fn a_stale_status_fails() {
        let s = healthy(1);
        assert_eq!(assess(&s, NOW - 1 + STALE_AFTER_SECS).level, Level::Ok);
        let h = assess(&s, NOW + 120);
        assert_eq!(h.level, Level::Failed);
        assert!(
            h.line.contains("status is 2m old: keyd is not running"),
            "{}",
            h.line
        );
    }

    #[test]
    fn an_invalid_member_or_an_unreachable_data_plane_fails() {
        let mut s = healthy(1);
        s.local_state = LocalState::Revoked;
        let h = assess(&s, NOW);
        assert_eq!(h.level, Level::Failed);
        assert!(
            h.line.contains("not a valid member (Revoked)"),
            "{}",
            h.line
        );
        let mut s = healthy(1);
        s.dataplane_reachable = false;
        assert_eq!(assess(&s, NOW).level, Level::Failed);
    }

    #[test]
    fn the_worst_problem_comes_first() {
        let mut s = healthy(2);
        s.peers.get_mut("node2").unwrap().state = PeerState::Connecting;
        s.dataplane_reachable = false;
        let h = assess(&s, NOW);
        assert_eq!(h.level, Level::Failed);
        let problems: Vec<&str> = h.line.split("; ").skip(1).collect();
        assert_eq!(
            problems,
            ["the data plane does not answer", "node2 connecting"]
        );
    }

    #[test]
    fn firewall_and_authority_problems_degrade() {
        let mut s = healthy(1);
        s.firewall.state = FirewallState::Failed;
        assert_eq!(assess(&s, NOW).level, Level::Degraded);
        let mut s = healthy(1);
        s.authority = Some(crate::authority::client::LinkStatus::default());
        let h = assess(&s, NOW);
        assert_eq!(h.level, Level::Degraded);
        assert!(
            h.line.contains("not connected to the authority"),
            "{}",
            h.line
        );
    }

    #[test]
    fn many_peers_are_counted_not_listed() {
        let mut s = healthy(6);
        for p in s.peers.values_mut().skip(1) {
            p.state = PeerState::Connecting;
        }
        let h = assess(&s, NOW);
        assert!(h.line.ends_with(" and 2 more"), "{}", h.line);
    }

    #[test]
    fn no_status_fails() {
        let h = no_status("cannot read /x/status.json");
        assert_eq!(h.level, Level::Failed);
        assert_eq!(
            h.line,
            "failed: no status from keyd (cannot read /x/status.json)"
        );
    }

    #[test]
    fn durations_read_in_their_largest_unit() {
        assert_eq!(human(0), "0s");
        assert_eq!(human(59), "59s");
        assert_eq!(human(60), "1m");
        assert_eq!(human(3_599), "59m");
        assert_eq!(human(3_600), "1h");
        assert_eq!(human(DAY - 1), "23h");
        assert_eq!(human(6 * DAY + 5), "6d");
    }
}
