//! mesh-node's firewall end to end: two namespaces, a mesh-node in each
//! configured with `wg`, and firewall documents written to the control
//! socket the way keyd writes them. Needs root.
//!
//! A is `web1` (group web), B is `db1` (group db). The policy lets web reach
//! db on TCP 5432 and anyone ping anyone. Only one side enforces at a time
//! (the other carries `policy: null`), so each check exercises one
//! direction of one node's data path.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use mesh_proto::firewall::document::Document;
use mesh_proto::firewall::engine::PeerInfo;
use mesh_proto::firewall::policy::Policy;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh-node"))
}

const WEB_TO_DB_AND_PING: &str = r#"
[[rule]]
name = "web-to-db"
action = "allow"
from = { groups = ["web"] }
to = { groups = ["db"] }
proto = "tcp"
ports = ["5432"]

[[rule]]
name = "ping"
action = "allow"
from = { any = true }
to = { any = true }
proto = "icmp"
"#;

const WEB_TO_DB_TCP_AND_UDP: &str = r#"
[[rule]]
name = "web-to-db"
action = "allow"
from = { groups = ["web"] }
to = { groups = ["db"] }
proto = "tcp"
ports = ["5432"]

[[rule]]
name = "web-to-db-udp"
action = "allow"
from = { groups = ["web"] }
to = { groups = ["db"] }
proto = "udp"
"#;

const PING_ONLY: &str = r#"
[[rule]]
name = "ping"
action = "allow"
from = { any = true }
to = { any = true }
proto = "icmp"
"#;

/// Two mesh-nodes as [`Pair::new`] makes them, both serving metrics, A with
/// a data-path thread per direction (both threads share its flow table).
fn pair(subnet: u8) -> Pair {
    pair_with(subnet, &[])
}

/// [`pair`], with more arguments for A's `mesh-node up`.
fn pair_with(subnet: u8, a_extra: &[&str]) -> Pair {
    let (na, nb) = (Netns::new(), Netns::new());
    let (ua, ub) = link(&na, &nb, subnet);
    let keys = WgKeys::new();
    let side = |ns: Netns, extra: &[&str], underlay, host| {
        let ifname = unique("wg");
        let mut args = vec!["--metrics-listen", METRICS_ADDR];
        args.extend_from_slice(extra);
        let daemon = Daemon::mesh_node_with(&ns, bin(), &ifname, &args);
        let key = keys.private(&format!("{ifname}.key"));
        Side {
            pubkey: WgKeys::public(&key),
            ns,
            daemon,
            key,
            underlay,
            overlay: Ipv4Addr::new(10, 77, 0, host),
        }
    };
    let mut a_args = vec!["--data-path-threads", "2"];
    a_args.extend_from_slice(a_extra);
    let a = side(na, &a_args, ua, 1);
    let b = side(nb, &[], ub, 2);
    let psk = keys.psk("psk0");
    a.configure(&b, &psk);
    b.configure(&a, &psk);
    Pair { a, b, keys }
}

fn member(name: &str, group: &str, addr: Ipv4Addr) -> PeerInfo {
    PeerInfo {
        name: name.into(),
        groups: vec![group.into()],
        addresses: vec![format!("{addr}/32").parse().expect("prefix")],
        ..PeerInfo::default()
    }
}

/// The firewall document for `side` (web1 is A, db1 is B): `policy` is
/// TOML, or `None` for no firewall.
fn document(p: &Pair, side: &Side, generation: u64, policy: Option<&str>) -> String {
    let (web, db) = (
        member("web1", "web", p.a.overlay),
        member("db1", "db", p.b.overlay),
    );
    let (local, peer) = if std::ptr::eq(side, &p.a) {
        (web, db)
    } else {
        (db, web)
    };
    let policy = policy.map(|toml| Policy::from_toml(toml).expect("test policy builds"));
    Document::new(generation, policy.as_ref(), &local, &[peer]).to_line()
}

/// Writes `text` to `side`'s firewall socket; returns the answer line.
fn send(side: &Side, text: &[u8]) -> String {
    let path = format!("/var/run/wireguard/{}.firewall", side.daemon.ifname);
    let mut s = UnixStream::connect(&path).unwrap_or_else(|e| panic!("connect {path}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(text).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

fn install(p: &Pair, side: &Side, generation: u64, policy: Option<&str>) {
    let answer = send(side, document(p, side, generation, policy).as_bytes());
    assert!(
        answer.starts_with(&format!("ok {generation} ")),
        "document {generation} refused: {answer}"
    );
}

/// A TCP echo server on `port` of `side`'s overlay address, for the rest of
/// the test (the namespace's removal ends it).
fn echo_server(side: &Side, port: u16) {
    let addr = side.overlay;
    let listener = side
        .ns
        .enter(move || TcpListener::bind((addr, port)).expect("bind in namespace"));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// Connects from `from` to `to:port` and has a line echoed back. A SYN the
/// firewall drops times out (an unfiltered closed port would be refused).
fn echo(from: &Side, to: Ipv4Addr, port: u16) -> std::io::Result<()> {
    let addr = SocketAddr::from((to, port));
    from.ns.enter(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"hello\n")?;
        let mut got = [0u8; 6];
        s.read_exact(&mut got)?;
        assert_eq!(&got, b"hello\n");
        Ok(())
    })
}

fn assert_filtered(result: std::io::Result<()>, what: &str) {
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!("{what}: expected the SYN to be dropped (timeout), got {other:?}"),
    }
}

#[test]
fn policy_allows_denies_tracks_replies_and_reloads() {
    let p = pair(121);
    let (a, b) = (&p.a, &p.b);
    for port in [5432, 22] {
        echo_server(b, port);
        echo_server(a, port);
    }
    assert_eq!(
        a.ping(b.overlay, 2, "0.2"),
        2,
        "tunnel up, nothing filtered"
    );
    echo(a, b.overlay, 22).expect("no document yet: everything passes");

    // A enforces (outbound before encryption, replies inbound), B does not.
    install(&p, a, 1, Some(WEB_TO_DB_AND_PING));
    install(&p, b, 1, None);
    echo(a, b.overlay, 5432).expect("web -> db:5432 is allowed and its replies pass");
    assert_filtered(echo(a, b.overlay, 22), "web -> db:22 (A outbound)");
    assert_filtered(
        echo(b, a.overlay, 5432),
        "db -> web, unsolicited (A inbound)",
    );
    assert_eq!(a.ping(b.overlay, 2, "0.2"), 2, "icmp allowed");
    assert!(a.metric("mesh_node_firewall_rule_hits_total{rule=\"web-to-db\"}") >= 1);
    assert!(a.metric("mesh_node_firewall_drops_total{reason=\"policy\"}") >= 2);
    assert_eq!(a.metric("mesh_node_firewall_generation"), 1);
    assert_eq!(a.metric("mesh_node_firewall_rules"), 2);
    assert!(a.metric("mesh_node_firewall_flows") >= 1);
    assert_eq!(b.metric("mesh_node_firewall_rules"), 0, "B filters nothing");
    let log = a.daemon.log();
    assert!(
        log.contains("firewall: dropped outbound tcp 10.77.0.1:")
            && log.contains("-> 10.77.0.2:22 peer \"db1\": default deny"),
        "drops are logged with direction, 5-tuple, peer and reason: {log}"
    );

    // B enforces instead: the same rule seen from the other end.
    install(&p, b, 2, Some(WEB_TO_DB_AND_PING));
    install(&p, a, 2, None);
    echo(a, b.overlay, 5432).expect("db accepts web on 5432 (B inbound)");
    assert_filtered(echo(a, b.overlay, 22), "web -> db:22 (B inbound)");
    assert_filtered(echo(b, a.overlay, 22), "db -> web (B outbound)");
    assert!(b.metric("mesh_node_firewall_drops_total{reason=\"policy\"}") >= 2);

    // Refusals change nothing: the same generation, garbage, a truncated
    // document, a misspelt key that would otherwise read as "no policy".
    let refused = b.metric("mesh_node_firewall_documents_refused_total");
    assert_eq!(send(b, document(&p, b, 2, None).as_bytes()), "stale 2\n");
    assert_eq!(send(b, document(&p, b, 1, None).as_bytes()), "stale 2\n");
    for garbage in [
        &b"not json at all\n"[..],
        b"{\"generation\": 9}\n",
        b"\xff\xfe\x00\n",
        b"{\"generation\": 9, \"polcy\": null, \"local\": {\"name\": \"x\", \"addresses\": []}, \"peers\": []}\n",
    ] {
        let answer = send(b, garbage);
        assert!(
            answer.starts_with("error ") && answer.ends_with('\n') && answer.lines().count() == 1,
            "{garbage:?} -> {answer:?}"
        );
    }
    assert_eq!(
        b.metric("mesh_node_firewall_documents_refused_total"),
        refused + 6
    );
    assert_eq!(b.metric("mesh_node_firewall_generation"), 2);
    assert_filtered(echo(a, b.overlay, 22), "still filtered after refusals");

    // `policy: null` lets everything through again.
    install(&p, b, 3, None);
    echo(a, b.overlay, 22).expect("no policy: everything passes");
    echo(b, a.overlay, 22).expect("no policy: everything passes");
}

#[test]
fn a_new_document_without_the_rule_cuts_an_established_stream_and_keeps_others() {
    let p = pair(122);
    let (a, b) = (&p.a, &p.b);
    install(&p, a, 1, Some(WEB_TO_DB_AND_PING));
    install(&p, b, 1, None);

    // A streams to B:5432; B counts what arrives.
    let addr = b.overlay;
    let listener =
        b.ns.enter(move || TcpListener::bind((addr, 5432)).expect("bind in namespace"));
    let (received, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let (r, st) = (received.clone(), stop.clone());
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = vec![0u8; 64 << 10];
        while !st.load(Ordering::Relaxed) {
            match s.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    r.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(_) => {}
            }
        }
    });
    let target = SocketAddr::from((b.overlay, 5432));
    let stream =
        a.ns.enter(move || TcpStream::connect_timeout(&target, Duration::from_secs(5)))
            .expect("web -> db:5432 connects");
    let st = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut s = stream;
        s.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let chunk = vec![0x5au8; 16 << 10];
        while !st.load(Ordering::Relaxed) {
            let _ = s.write(&chunk);
        }
    });
    let wait_for = |what: &str, cond: &dyn Fn() -> bool| {
        for _ in 0..200 {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{what}");
    };
    wait_for("the stream carries data", &|| {
        received.load(Ordering::Relaxed) > 1 << 20
    });
    let rechecked = a.metric("mesh_node_firewall_flows_rechecked_dropped_total");

    // The rule goes: the stream's next packets are dropped at A.
    install(&p, a, 2, Some(PING_ONLY));
    wait_for("the flow is re-checked and dropped", &|| {
        a.metric("mesh_node_firewall_flows_rechecked_dropped_total") > rechecked
    });
    // What was in flight has landed after a round trip or two; from then on
    // nothing more arrives.
    std::thread::sleep(Duration::from_millis(500));
    let cut_at = received.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        received.load(Ordering::Relaxed),
        cut_at,
        "no byte of the stream arrives once the policy forbids it"
    );
    assert_eq!(
        a.ping(b.overlay, 3, "0.2"),
        3,
        "ICMP, still allowed, passes"
    );
    assert!(a.metric("mesh_node_firewall_rule_hits_total{rule=\"web-to-db\"}") >= 1);
    assert!(a.metric("mesh_node_firewall_rule_hits_total{rule=\"ping\"}") >= 1);

    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    reader.join().expect("reader");
}

/// A flood of new flows fills A's table to its bound (the oldest unanswered
/// flows make room) while an established TCP connection keeps working; the
/// ICMP error about an allowed flow (port unreachable) reaches its sender.
#[test]
fn a_flood_of_flows_stays_bounded_and_icmp_errors_about_allowed_flows_pass() {
    const MAX_FLOWS: u64 = 32;
    let p = pair_with(123, &["--firewall-max-flows", &MAX_FLOWS.to_string()]);
    let (a, b) = (&p.a, &p.b);
    echo_server(b, 5432);
    install(&p, a, 1, Some(WEB_TO_DB_TCP_AND_UDP));
    install(&p, b, 1, None);

    // B answers a datagram to a closed port with an ICMP port unreachable:
    // it passes A's firewall as an error about a flow A opened, and the
    // connected socket reports it.
    let to = b.overlay;
    let refused = a.ns.enter(move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.connect((to, 9)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sock.send(b"anyone?").unwrap();
        let mut buf = [0u8; 16];
        sock.recv(&mut buf)
    });
    match refused {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => panic!("expected the port unreachable to arrive, got {other:?}"),
    }

    // An established connection, used before and after the flood.
    let target = SocketAddr::from((b.overlay, 5432));
    let mut conn =
        a.ns.enter(move || TcpStream::connect_timeout(&target, Duration::from_secs(5)))
            .expect("web -> db:5432 connects");
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut round_trip = |what: &str| {
        conn.write_all(b"hello\n").unwrap();
        let mut got = [0u8; 6];
        conn.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(&got, b"hello\n");
    };
    round_trip("before the flood");

    // 400 new UDP flows, each to its own port of B, none answered (fewer
    // than the TUN queue's 500 packets: the kernel queues them all; the
    // round trip after them, queued behind, shows they were all seen).
    const FLOOD: u64 = 400;
    let to = b.overlay;
    a.ns.enter(move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for port in 20_000..20_000 + FLOOD as u16 {
            let _ = sock.send_to(b"flood", (to, port));
        }
    });
    round_trip("after the flood");
    assert_eq!(a.metric("mesh_node_firewall_flows"), MAX_FLOWS);
    let (new, evicted) = (
        a.metric("mesh_node_firewall_flows_new_total"),
        a.metric("mesh_node_firewall_flows_evicted_total"),
    );
    assert!(
        evicted >= FLOOD - MAX_FLOWS,
        "the flood recycled the table: {new} new, {evicted} evicted"
    );
}

/// A connection opened while nothing was filtered goes on when the first
/// policy arrives and allows it (it was never tracked: it is picked up
/// mid-stream), while new flows the policy forbids are dropped from then
/// on; `mesh-node status` shows it all.
#[test]
fn a_connection_from_before_the_first_policy_survives_it_and_status_shows_it() {
    let p = pair(124);
    let (a, b) = (&p.a, &p.b);
    echo_server(b, 5432);
    echo_server(b, 22);
    install(&p, a, 1, None);
    install(&p, b, 1, None);
    let target = SocketAddr::from((b.overlay, 5432));
    let mut stream =
        a.ns.enter(move || TcpStream::connect_timeout(&target, Duration::from_secs(5)))
            .expect("web -> db:5432 connects, unfiltered");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut roundtrip = |line: &[u8; 6]| -> std::io::Result<()> {
        stream.write_all(line)?;
        let mut got = [0u8; 6];
        stream.read_exact(&mut got)?;
        assert_eq!(&got, line);
        Ok(())
    };
    roundtrip(b"before").expect("echo before the policy");

    install(&p, a, 2, Some(WEB_TO_DB_AND_PING));
    roundtrip(b"after\n").expect("the connection the policy allows goes on");
    assert_filtered(echo(a, b.overlay, 22), "web -> db:22, new under the policy");

    let out = Command::new(bin())
        .args(["status", &a.daemon.ifname, "--json"])
        .output()
        .expect("mesh-node status runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON status");
    assert_eq!(status["generation"], 2, "{status}");
    assert_eq!(status["filtering"], true, "{status}");
    assert_eq!(status["flows_picked_up"], 1, "{status}");
    assert!(status["drops"]["policy"].as_u64() >= Some(1), "{status}");
    let rules = status["rules"].as_array().expect("rules");
    let hits = |name: &str| {
        rules
            .iter()
            .find(|r| r["name"] == name)
            .and_then(|r| r["hits"].as_u64())
    };
    assert_eq!(hits("web-to-db"), Some(1), "{status}");
    assert_eq!(hits("ping"), Some(0), "{status}");
    let text = Command::new(bin())
        .args(["status", &a.daemon.ifname])
        .output()
        .expect("mesh-node status runs");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.starts_with("firewall: generation 2, 2 rules, default deny, 1 peers\n"),
        "{text}"
    );
    assert!(text.contains("1 picked up"), "{text}");

    let missing = Command::new(bin())
        .args(["status", "pqnosuchif0"])
        .output()
        .expect("mesh-node status runs");
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("is mesh-node running on this interface"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}
