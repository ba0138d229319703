//! The edge ladder end to end (issue 12): real keyd and mesh-node (or
//! wireguard-go) in network namespaces on one bridge, with nftables rules in
//! one node's namespace that drop UDP toward one other node. Each pair must
//! find a working rung (direct UDP, WireGuard in QUIC datagrams, or framed
//! over TLS/TCP) and say so in its status; traffic, TCP transfers and key
//! rotation must keep working on it. Needs root and `nft` (nftables).
//!
//! The rules live in a table of their own in the filtering node's
//! namespace; `Filter` deletes it on drop, and the namespace (deleted when
//! the mesh drops, failed assertions included) takes it with it anyway.
//! Deadlines are generous polling bounds; the one timing assertion is the
//! issue's own (direct UDP blocked → on QUIC within 5 s), read from keyd's
//! own record of the change.

mod common;
#[path = "common/mesh.rs"]
mod mesh;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use mesh::*;
use serde_json::Value;

/// The data planes' WireGuard port: every roster endpoint (`wg=IP:51820`).
const WG_PORT: u16 = 51820;
/// keyd's QUIC port (`quic_listen`), which the TCP rung shares.
const KEYD_PORT: u16 = 51821;

/// An nftables table in one node's namespace; deleted on drop.
struct Filter {
    ns: String,
    table: String,
}

impl Filter {
    /// Installs `table inet NAME { DECLS chain in {..} chain out {..} }`.
    fn install(
        mesh: &Mesh,
        node: usize,
        decls: &str,
        body_in: &[String],
        body_out: &[String],
    ) -> Filter {
        let table = unique("edget");
        let ruleset = format!(
            "table inet {table} {{\n{decls}\n chain in {{\n  type filter hook input priority 0;\n{}\n }}\n \
             chain out {{\n  type filter hook output priority 0;\n{}\n }}\n}}\n",
            body_in.join("\n"),
            body_out.join("\n"),
        );
        let ns = mesh.nodes[node].ns.name.clone();
        nft(&ns, &ruleset);
        Filter { ns, table }
    }

    /// Drops UDP to or from `port` between `node` and `peer`, both ways.
    fn drop_udp_port(mesh: &Mesh, node: usize, peer: usize, port: u16) -> Filter {
        let peer = mesh.underlay(peer);
        Self::install(
            mesh,
            node,
            "",
            &[
                format!("ip saddr {peer} udp dport {port} drop"),
                format!("ip saddr {peer} udp sport {port} drop"),
            ],
            &[
                format!("ip daddr {peer} udp dport {port} drop"),
                format!("ip daddr {peer} udp sport {port} drop"),
            ],
        )
    }

    /// Drops every UDP datagram between `node` and `peer`, both ways.
    fn drop_all_udp(mesh: &Mesh, node: usize, peer: usize) -> Filter {
        let peer = mesh.underlay(peer);
        Self::install(
            mesh,
            node,
            "",
            &[format!("ip saddr {peer} meta l4proto udp drop")],
            &[format!("ip daddr {peer} meta l4proto udp drop")],
        )
    }

    /// Deletes the table now and checks that it is gone.
    fn remove(self) {
        let ns = Netns {
            name: self.ns.clone(),
        };
        ns.ok(&["nft", "delete", "table", "inet", &self.table]);
        let tables = ns.ok(&["nft", "list", "tables"]);
        // The namespace belongs to the mesh: do not delete it here.
        std::mem::forget(ns);
        assert!(
            !tables.contains(&self.table),
            "table {} still there: {tables}",
            self.table
        );
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        // Gone already after `remove`, or with its namespace: errors are fine.
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(["nft", "delete", "table", "inet", &self.table])
            .stderr(Stdio::null())
            .output();
    }
}

/// Loads an nftables ruleset into namespace `ns`.
fn nft(ns: &str, ruleset: &str) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nft (apt-get install nftables)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(ruleset.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft -f failed: {}\n{ruleset}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Packets counted so far by the named counter `name` in `table`.
fn counter(mesh: &Mesh, node: usize, table: &str, name: &str) -> u64 {
    let json = mesh.nodes[node]
        .ns
        .ok(&["nft", "-j", "list", "counter", "inet", table, name]);
    let v: Value = serde_json::from_str(&json).unwrap();
    v["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|i| i["counter"]["packets"].as_u64()))
        .unwrap_or_else(|| panic!("no counter {name} in {json}"))
}

fn peer_name(peer: usize) -> String {
    format!("node{}", peer + 1)
}

/// Node i's `path` object for `peer` from its status.
fn path(mesh: &Mesh, i: usize, peer: usize) -> Value {
    mesh.status(i)["peers"][peer_name(peer)]["path"].clone()
}

fn rung_of(status: &Value, peer: usize) -> Option<&str> {
    status["peers"][peer_name(peer)]["path"]["rung"].as_str()
}

/// Waits (bounded by `bound`) until node `i` shows `peer` on `rung`;
/// returns that `path` object.
fn wait_rung(mesh: &Mesh, i: usize, peer: usize, rung: &str, bound: Duration) -> Value {
    let deadline = Instant::now() + bound;
    loop {
        let status = mesh.status(i);
        if rung_of(&status, peer) == Some(rung) {
            return status["peers"][peer_name(peer)]["path"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "node{}: {} never on rung {rung} within {bound:?}\nstatus: {status}\n{}",
            i + 1,
            peer_name(peer),
            mesh.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Both sides of the pair (a, b) on `rung`.
fn wait_pair(mesh: &Mesh, a: usize, b: usize, rung: &str, bound: Duration) -> (Value, Value) {
    (
        wait_rung(mesh, a, b, rung, bound),
        wait_rung(mesh, b, a, rung, bound),
    )
}

/// How long the data plane's endpoint may lag the rung keyd's status shows:
/// the move is made through the policy's next reconcile, and the status file
/// is written every second.
const ENDPOINT_LAG: Duration = Duration::from_secs(10);

/// Waits (bounded) until node `i`'s data-plane endpoint for `peer` is one
/// `ok` accepts; fails with what it was.
fn wait_endpoint(mesh: &Mesh, i: usize, peer: usize, what: &str, ok: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + ENDPOINT_LAG;
    loop {
        let endpoint = mesh.wg_endpoint_of(i, peer);
        if ok(&endpoint) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node{}: {} endpoint {endpoint:?} is not {what} within {ENDPOINT_LAG:?}\npath: {}\n{}",
            i + 1,
            peer_name(peer),
            path(mesh, i, peer),
            mesh.wg_endpoints(i)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// While a peer is on a relayed rung its data-plane endpoint is keyd's
/// loopback relay socket; on direct, the peer's roster endpoint.
fn assert_relayed(mesh: &Mesh, i: usize, peer: usize) {
    wait_endpoint(mesh, i, peer, "keyd's relay", |e| {
        e.starts_with("127.0.0.1:")
    });
}

fn assert_direct_endpoint(mesh: &Mesh, i: usize, peer: usize) {
    let direct = format!("{}:{WG_PORT}", mesh.underlay(peer));
    wait_endpoint(mesh, i, peer, "the direct one", |e| e == direct);
}

/// The same, now, without waiting: it must not have left it.
fn assert_still_direct(mesh: &Mesh, i: usize, peer: usize) {
    let endpoint = mesh.wg_endpoint_of(i, peer);
    assert_eq!(
        endpoint,
        format!("{}:{WG_PORT}", mesh.underlay(peer)),
        "node{}: {} endpoint left the direct one\n{}",
        i + 1,
        peer_name(peer),
        mesh.wg_endpoints(i)
    );
}

/// Waits until both sides of (a, b) have measured the direct rung (an
/// answered path probe): the ladder runs, so a block that follows tests a
/// move, not start-up. (Blocked before that: `udp_blocked_from_the_start_...`.)
fn wait_probed(mesh: &Mesh, a: usize, b: usize) {
    for (i, peer) in [(a, b), (b, a)] {
        let deadline = Instant::now() + BOUND;
        while !path(mesh, i, peer)["rtt_ms"]["direct"].is_number() {
            assert!(
                Instant::now() < deadline,
                "node{}: no direct RTT for {} within {BOUND:?}: {}\n{}",
                i + 1,
                peer_name(peer),
                path(mesh, i, peer),
                mesh.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

const BOUND: Duration = Duration::from_secs(40);

#[test]
fn direct_udp_blocked_moves_the_pair_to_quic_and_a_transfer_survives() {
    let mesh = Mesh::new(181, &[Plane::MeshNode; 2], "2s");
    mesh.wait_complete(&[0, 1]);
    wait_pair(&mesh, 0, 1, "direct", BOUND);
    wait_probed(&mesh, 0, 1);
    assert_direct_endpoint(&mesh, 0, 1);
    let mut filter = None;
    let (sent, received) = mesh.stream_during(0, 1, || {
        // The transfer is under way on direct UDP.
        std::thread::sleep(Duration::from_secs(1));
        let blocked_at = unix_now();
        filter = Some(Filter::drop_udp_port(&mesh, 0, 1, WG_PORT));
        let (path0, _) = wait_pair(&mesh, 0, 1, "quic", BOUND);
        let change = &path0["last_change"];
        assert_eq!(change["from"], "direct", "{path0}");
        assert_eq!(change["to"], "quic", "{path0}");
        assert_eq!(change["reason"], "silent", "{path0}");
        let at = change["at"].as_u64().unwrap_or(0);
        assert!(
            (blocked_at..=blocked_at + 5).contains(&at),
            "on QUIC within 5 s of the block: blocked at {blocked_at}, changed at {at}\n{path0}"
        );
        assert!(path0["changes"].as_u64().unwrap_or(0) >= 1, "{path0}");
        assert_relayed(&mesh, 0, 1);
        assert_relayed(&mesh, 1, 0);
        // A while on QUIC under the transfer.
        std::thread::sleep(Duration::from_secs(2));
    });
    assert_eq!(
        sent, received,
        "the TCP transfer across the switch arrived intact"
    );
    // Pings after the transfer: a saturating stream may drop datagrams.
    assert_eq!(mesh.ping(0, 1, 5, "0.2"), 5, "ping over the QUIC rung");
    assert_eq!(mesh.ping(1, 0, 5, "0.2"), 5, "both ways");
    let path0 = path(&mesh, 0, 1);
    assert_eq!(
        path0["rung"], "quic",
        "still on QUIC while the filter stands"
    );
    assert!(
        path0["rtt_ms"]["quic"].as_f64().is_some(),
        "the QUIC rung's RTT is shown: {path0}"
    );
    // Both keyds take PACKED datagrams: the transfer went packed.
    assert_eq!(path0["packed"], true, "{path0}");
    assert_eq!(path(&mesh, 1, 0)["packed"], true);
    drop(filter);
}

#[test]
fn all_udp_blocked_moves_the_pair_to_tcp_and_keys_still_rotate() {
    let mesh = Mesh::new(182, &[Plane::MeshNode; 2], "2s");
    mesh.wait_complete(&[0, 1]);
    wait_pair(&mesh, 0, 1, "direct", BOUND);
    wait_probed(&mesh, 0, 1);
    let _filter = Filter::drop_all_udp(&mesh, 0, 1);
    let (path0, path1) = wait_pair(&mesh, 0, 1, "tcp", BOUND);
    assert_eq!(path0["last_change"]["to"], "tcp", "{path0}");
    assert_eq!(path1["last_change"]["to"], "tcp", "{path1}");
    // With this harness's short key lifetimes (rotation 2 s, hard lifetime
    // 6 s) the peer may be cut while the ladder walks down (an exchange on
    // the dead QUIC connection waits for its idle timeout): wait for a key
    // agreed over the TCP rung, the only one left.
    let switched = epoch(&mesh.status(0), "node2");
    mesh.wait_status(0, "agree a key over the TCP rung", |s| {
        epoch(s, "node2") > switched && s["peers"]["node2"]["state"] == "up"
    });
    mesh.wait_complete(&[0, 1]);
    assert_relayed(&mesh, 0, 1);
    assert_relayed(&mesh, 1, 0);
    for (a, b) in [(0, 1), (1, 0)] {
        assert_eq!(
            mesh.ping(a, b, 5, "0.2"),
            5,
            "ping node{} -> node{} over the TCP rung\nstatus: {}\n{}",
            a + 1,
            b + 1,
            mesh.status(a),
            mesh.logs()
        );
    }
    let before = epoch(&mesh.status(0), "node2");
    mesh.wait_status(0, "rotate twice over the TCP rung", |s| {
        epoch(s, "node2") >= before + 2
    });
    for (a, b) in [(0, 1), (1, 0)] {
        assert_eq!(
            rung_of(&mesh.status(a), b),
            Some("tcp"),
            "node{} left the TCP rung while UDP is blocked",
            a + 1
        );
    }
    assert_eq!(
        mesh.ping(0, 1, 5, "0.2"),
        5,
        "the rotated keys work over the TCP rung"
    );
    let s = mesh.status(0);
    assert!(
        s["peers"]["node2"]["path"]["rtt_ms"]["tcp"]
            .as_f64()
            .is_some(),
        "the TCP rung's RTT is shown: {s}"
    );
}

#[test]
fn removing_the_filter_brings_the_pair_back_to_direct_without_interrupting_a_flow() {
    let mesh = Mesh::new(183, &[Plane::MeshNode; 2], "2s");
    mesh.wait_complete(&[0, 1]);
    wait_pair(&mesh, 0, 1, "direct", BOUND);
    wait_probed(&mesh, 0, 1);
    let filter = Filter::drop_udp_port(&mesh, 0, 1, WG_PORT);
    wait_pair(&mesh, 0, 1, "quic", BOUND);
    assert_relayed(&mesh, 0, 1);
    assert_eq!(mesh.ping(0, 1, 3, "0.2"), 3, "ping over the QUIC rung");
    let (sent, received) = mesh.stream_during(0, 1, || {
        std::thread::sleep(Duration::from_secs(1));
        filter.remove();
        // Up-moves are probed in the background (every 5 s, 3 answers).
        let (path0, path1) = wait_pair(&mesh, 0, 1, "direct", Duration::from_secs(60));
        for p in [&path0, &path1] {
            assert_eq!(p["last_change"]["from"], "quic", "{p}");
            assert_eq!(p["last_change"]["to"], "direct", "{p}");
            assert_eq!(p["last_change"]["reason"], "recovered", "{p}");
        }
        assert_direct_endpoint(&mesh, 0, 1);
        assert_direct_endpoint(&mesh, 1, 0);
        std::thread::sleep(Duration::from_secs(2));
    });
    assert_eq!(
        sent, received,
        "the TCP transfer across the move back up arrived intact"
    );
    assert_eq!(mesh.ping(0, 1, 5, "0.2"), 5, "ping on direct UDP again");
    assert_eq!(mesh.ping(1, 0, 5, "0.2"), 5, "both ways");
    // The data planes stay on the direct endpoint (no roaming back to the
    // relay on a late relayed packet).
    std::thread::sleep(Duration::from_secs(2));
    assert_still_direct(&mesh, 0, 1);
    assert_still_direct(&mesh, 1, 0);
}

#[test]
fn in_a_mixed_mesh_only_the_filtered_pair_falls_back() {
    let mesh = Mesh::new(184, &[Plane::MeshNode; 3], "2s");
    mesh.wait_complete(&[0, 1, 2]);
    let pairs = [(0, 1), (0, 2), (1, 2)];
    for (a, b) in pairs {
        wait_pair(&mesh, a, b, "direct", BOUND);
        wait_probed(&mesh, a, b);
    }
    // node1 is behind a filter toward node3 only.
    let _filter = Filter::drop_udp_port(&mesh, 0, 2, WG_PORT);
    wait_pair(&mesh, 0, 2, "quic", BOUND);
    assert_relayed(&mesh, 0, 2);
    assert_relayed(&mesh, 2, 0);
    mesh.wait_complete(&[0, 1, 2]);
    for a in 0..3 {
        for b in 0..3 {
            if a != b {
                assert_eq!(
                    mesh.ping(a, b, 3, "0.2"),
                    3,
                    "node{} -> node{}",
                    a + 1,
                    b + 1
                );
            }
        }
    }
    for (a, b) in [(0, 1), (1, 0), (1, 2), (2, 1)] {
        let p = path(&mesh, a, b);
        assert_eq!(
            p["rung"],
            "direct",
            "node{} -> node{} left direct UDP: {p}",
            a + 1,
            b + 1
        );
        assert_direct_endpoint(&mesh, a, b);
    }
    assert_eq!(rung_of(&mesh.status(0), 2), Some("quic"));
    assert_eq!(rung_of(&mesh.status(2), 0), Some("quic"));
}

#[test]
fn a_wireguard_go_node_stays_on_direct_udp() {
    let mesh = Mesh::new(
        185,
        &[Plane::MeshNode, Plane::WireguardGo, Plane::MeshNode],
        "3s",
    );
    mesh.wait_complete(&[0, 1, 2]);
    // wireguard-go answers no path probes; that silence must not move its
    // pairs off direct UDP. Watch them for longer than a down-move takes.
    let watched = [(0, 1), (2, 1), (1, 0), (1, 2)];
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        for (a, b) in watched {
            let p = path(&mesh, a, b);
            assert_eq!(
                p["rung"],
                "direct",
                "node{} -> node{} (wireguard-go pair) left direct: {p}\n{}",
                a + 1,
                b + 1,
                mesh.logs()
            );
            let reason = &p["last_change"]["reason"];
            assert!(
                reason.is_null() || reason == "start",
                "node{} -> node{} changed rung: {p}",
                a + 1,
                b + 1
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    for (a, b) in watched {
        assert_direct_endpoint(&mesh, a, b);
        assert_eq!(
            mesh.ping(a, b, 3, "0.2"),
            3,
            "node{} -> node{}",
            a + 1,
            b + 1
        );
    }
}

#[test]
fn a_pinned_tcp_rung_carries_traffic_from_the_start() {
    const PIN: &str = "[edge]\npin = \"tcp\"";
    let opts = Opts {
        extra_config: vec![(0, PIN), (1, PIN)],
        ..Default::default()
    };
    let mesh = Mesh::with(186, &[Plane::MeshNode; 2], "2s", opts);
    // No filter: counters only. WireGuard packets sent straight between the
    // data planes (51820 -> 51820), and TCP segments of keyd's rung.
    let peer = mesh.underlay(1);
    let counting = Filter::install(
        &mesh,
        0,
        " counter direct {}\n counter rung {}",
        &[],
        &[
            format!("ip daddr {peer} udp sport {WG_PORT} udp dport {WG_PORT} counter name direct"),
            format!("ip daddr {peer} tcp dport {KEYD_PORT} counter name rung"),
            format!("ip daddr {peer} tcp sport {KEYD_PORT} counter name rung"),
        ],
    );
    mesh.wait_complete(&[0, 1]);
    let (path0, path1) = wait_pair(&mesh, 0, 1, "tcp", BOUND);
    for p in [&path0, &path1] {
        assert_eq!(p["last_change"]["reason"], "pinned", "{p}");
    }
    assert_relayed(&mesh, 0, 1);
    assert_relayed(&mesh, 1, 0);
    let rung_before = counter(&mesh, 0, &counting.table, "rung");
    // keyd's own count of WireGuard packets it carried on each rung (the
    // TCP counter above also sees the ladder's pings and HELLOs).
    let packets = |rung: &str| -> (u64, u64) {
        let p = path(&mesh, 0, 1);
        let n = |i: usize| p[rung][i].as_u64().unwrap_or(0);
        (n(0), n(1))
    };
    let (tcp_out, tcp_in) = packets("tcp_packets");
    assert_eq!(mesh.ping(0, 1, 10, "0.1"), 10, "ping over the pinned rung");
    assert_eq!(mesh.ping(1, 0, 10, "0.1"), 10, "both ways");
    assert!(
        counter(&mesh, 0, &counting.table, "rung") > rung_before,
        "the pings went over keyd's TCP connection"
    );
    let (tcp_out2, tcp_in2) = packets("tcp_packets");
    assert!(
        tcp_out2 >= tcp_out + 20 && tcp_in2 >= tcp_in + 20,
        "20 echo requests and 20 replies each way over the TCP rung: out {tcp_out}->{tcp_out2}, in {tcp_in}->{tcp_in2}"
    );
    assert_eq!(packets("quic_packets"), (0, 0), "nothing on the QUIC rung");
    // Pinned: no move up, though every better rung would answer. Up-moves
    // take 3 answered probes 5 s apart; watch longer than that.
    let until = Instant::now() + Duration::from_secs(16);
    while Instant::now() < until {
        for (a, b) in [(0, 1), (1, 0)] {
            assert_eq!(
                rung_of(&mesh.status(a), b),
                Some("tcp"),
                "node{} left the pinned rung",
                a + 1
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(mesh.ping(0, 1, 5, "0.2"), 5);
    assert_eq!(
        counter(&mesh, 0, &counting.table, "direct"),
        0,
        "a WireGuard packet went straight to the peer while pinned to tcp"
    );
}

/// A node whose UDP toward its peer is blocked before the keyds have said a
/// word (the "only TCP 443" node): the pair comes up on the TCP rung, with
/// keys agreed over it.
#[test]
fn udp_blocked_from_the_start_the_pair_comes_up_on_tcp() {
    let mesh = Mesh::new(187, &[Plane::MeshNode; 2], "2s");
    let _filter = Filter::drop_all_udp(&mesh, 0, 1);
    wait_pair(&mesh, 0, 1, "tcp", BOUND);
    mesh.wait_complete(&[0, 1]);
    assert_relayed(&mesh, 0, 1);
    assert_relayed(&mesh, 1, 0);
    assert_eq!(mesh.ping(0, 1, 5, "0.2"), 5, "ping over the TCP rung");
    let before = epoch(&mesh.status(0), "node2");
    mesh.wait_status(0, "rotate over the TCP rung", |s| {
        epoch(s, "node2") >= before + 2
    });
    assert_eq!(mesh.ping(1, 0, 5, "0.2"), 5, "and after rotations");
}
