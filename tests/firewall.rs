//! The firewall end to end (issue 13): a policy in the signed roster, keyd
//! giving it to mesh-node, mesh-node enforcing it in the data path, in a
//! four-node mesh in network namespaces: node1 `web`, node2 `db`, node3
//! `admin`, node4 in no group. Needs root.

mod common;
#[path = "common/mesh.rs"]
mod mesh;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use mesh::*;

const WEB: usize = 0;
const DB: usize = 1;
const ADMIN: usize = 2;
const NOBODY: usize = 3;

const POLICY: &str = r#"
[[rule]]
name = "web-to-db"
action = "allow"
from = { groups = ["web"] }
to = { groups = ["db"] }
proto = "tcp"
ports = ["5432"]

[[rule]]
name = "admin-anywhere"
action = "allow"
from = { groups = ["admin"] }
to = { any = true }
proto = "any"
"#;

/// The same without the web-to-db rule.
const POLICY_WITHOUT_WEB: &str = r#"
[[rule]]
name = "admin-anywhere"
action = "allow"
from = { groups = ["admin"] }
to = { any = true }
proto = "any"
"#;

/// How long a connection attempt may take before it counts as dropped. Not
/// a performance bound: an allowed one succeeds in milliseconds, a denied
/// one never does.
const GIVE_UP: Duration = Duration::from_secs(2);

fn overlay(mesh: &Mesh, i: usize) -> Ipv4Addr {
    mesh.nodes[i].overlay.parse().unwrap()
}

/// An echo server on node `i`'s overlay address and `port`, inside its
/// namespace (a socket stays in the namespace it was made in).
fn echo_server(mesh: &Mesh, i: usize, port: u16) {
    let addr = SocketAddr::from((overlay(mesh, i), port));
    let listener = mesh.nodes[i]
        .ns
        .enter(move || TcpListener::bind(addr).unwrap());
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// A connection from node `from` to node `to`:`port`, made inside `from`'s
/// namespace; `None` if it does not connect within [`GIVE_UP`].
fn connect(mesh: &Mesh, from: usize, to: usize, port: u16) -> Option<TcpStream> {
    let addr = SocketAddr::from((overlay(mesh, to), port));
    let s = mesh.nodes[from]
        .ns
        .enter(move || TcpStream::connect_timeout(&addr, GIVE_UP).ok())?;
    s.set_read_timeout(Some(GIVE_UP)).ok()?;
    Some(s)
}

/// Whether a round trip through the echo server works on `s`.
fn echoes(s: &mut TcpStream) -> bool {
    let msg = b"pqmesh firewall";
    let mut back = [0u8; 15];
    s.write_all(msg).is_ok() && s.read_exact(&mut back).is_ok() && &back == msg
}

fn reaches(mesh: &Mesh, from: usize, to: usize, port: u16) -> bool {
    connect(mesh, from, to, port).is_some_and(|mut s| echoes(&mut s))
}

fn four_nodes(subnet: u8) -> Mesh {
    let opts = Opts {
        groups: vec![(WEB, "web"), (DB, "db"), (ADMIN, "admin")],
        policy: Some(POLICY),
        ..Default::default()
    };
    let mesh = Mesh::with(subnet, &[Plane::MeshNode; 4], "2m", opts);
    // Keys agreed everywhere and the policy in force on every node (pings
    // between members that the policy keeps apart cannot show it).
    for i in 0..4 {
        mesh.wait_status(i, "keys with every peer and the policy enforced", |s| {
            s["firewall"]["state"] == "enforced"
                && s["peers"]
                    .as_object()
                    .is_some_and(|p| p.len() == 3 && p.values().all(|p| p["state"] == "up"))
        });
    }
    for (i, port) in [(DB, 5432), (DB, 22), (WEB, 80), (WEB, 5432), (NOBODY, 5432)] {
        echo_server(&mesh, i, port);
    }
    mesh
}

#[test]
fn groups_decide_who_reaches_what_and_replies_pass() {
    let mesh = four_nodes(191);
    assert!(reaches(&mesh, WEB, DB, 5432), "web -> db:5432 is allowed");
    assert!(!reaches(&mesh, WEB, DB, 22), "web -> db:22 is not");
    assert!(reaches(&mesh, ADMIN, DB, 22), "admin reaches db:22");
    assert!(reaches(&mesh, ADMIN, WEB, 80), "admin reaches web:80");
    assert!(
        !reaches(&mesh, DB, WEB, 5432),
        "db -> web: the reply direction of web's flows, not a flow of its own"
    );
    assert!(
        !reaches(&mesh, NOBODY, DB, 5432),
        "a member in no group reaches nothing"
    );
    assert!(!reaches(&mesh, DB, NOBODY, 5432), "and nothing reaches it");
    assert_eq!(
        mesh.ping(WEB, DB, 2, "0.2"),
        0,
        "no rule allows icmp web -> db"
    );
    assert_eq!(mesh.ping(ADMIN, DB, 3, "0.2"), 3, "admin pings db");
    // The status says who enforces what.
    let s = mesh.status(DB);
    assert_eq!(s["firewall"]["rules"], 2, "{s}");
    // And mesh-node counts per rule and drops by reason.
    let metrics = metrics_of(&mesh, DB);
    assert!(
        metric_sum(
            &metrics,
            "mesh_node_firewall_rule_hits_total{rule=\"web-to-db\"}"
        ) >= 1,
        "{metrics}"
    );
    assert!(
        metric_sum(&metrics, "mesh_node_firewall_drops_total") >= 1,
        "{metrics}"
    );
    // `keyd policy explain` says which rule decides.
    let ca = mesh.work.path().join("ca/ca.crt");
    let roster = mesh.roster();
    let explain = |src: &str, dst: &str, flow: &str| {
        keyd(&[
            "policy",
            "explain",
            src,
            dst,
            flow,
            "--roster",
            p(&roster),
            "--ca-cert",
            p(&ca),
        ])
    };
    let out = explain("node1", "node2", "tcp/5432");
    assert!(
        out.contains("ALLOWED") && out.contains("web-to-db"),
        "{out}"
    );
    let out = explain("node1", "node2", "tcp/22");
    assert!(
        out.contains("DENIED") && out.contains("default deny"),
        "{out}"
    );
}

#[test]
fn a_policy_update_cuts_a_forbidden_stream_and_keeps_the_others() {
    let mesh = four_nodes(192);
    let mut web = connect(&mesh, WEB, DB, 5432).expect("web -> db:5432 connects");
    let mut admin = connect(&mesh, ADMIN, DB, 22).expect("admin -> db:22 connects");
    assert!(echoes(&mut web) && echoes(&mut admin));
    let serial = mesh.status(DB)["roster_serial"].as_u64().unwrap_or(0);
    mesh.publish_policy(POLICY_WITHOUT_WEB);
    for i in [WEB, DB] {
        mesh.wait_status(i, "the new policy enforced", |s| {
            s["firewall"]["state"] == "enforced"
                && s["firewall"]["generation"].as_u64() > Some(serial)
        });
    }
    let applied = Instant::now();
    assert!(
        !echoes(&mut web),
        "the established web -> db stream is cut by the new policy"
    );
    assert!(admin_still_works(&mut admin), "admin's stream is untouched");
    assert!(
        !reaches(&mesh, WEB, DB, 5432),
        "and no new web -> db flow opens"
    );
    println!(
        "cut within the first round trip after the policy was in force ({:?} of checks)",
        applied.elapsed()
    );
}

fn admin_still_works(s: &mut TcpStream) -> bool {
    echoes(s) && echoes(s)
}

/// mesh-node's Prometheus text for node `i` (served in its namespace).
fn metrics_of(mesh: &Mesh, i: usize) -> String {
    mesh.nodes[i].ns.enter(|| {
        let mut s = TcpStream::connect(common::METRICS_ADDR).expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    })
}

fn metric_sum(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Fail closed: when the data plane's firewall does not take the roster's
/// policy (here it holds a document of a later generation, written behind
/// keyd's back, that filters nothing), keyd says so in its status and
/// installs no key for any peer, so the node's tunnels close as their keys
/// age out instead of carrying traffic without the policy.
#[test]
fn keyd_installs_no_key_where_the_data_plane_refuses_the_policy() {
    use mesh_proto::firewall::document::{Document, socket_path};
    use mesh_proto::firewall::engine::PeerInfo;
    use std::os::unix::net::UnixStream;
    const PING: &str = "[[rule]]\nname = \"ping\"\naction = \"allow\"\n\
        from = { any = true }\nto = { any = true }\nproto = \"icmp\"\n";
    let opts = Opts {
        groups: vec![(WEB, "web"), (DB, "db")],
        policy: Some(PING),
        ..Default::default()
    };
    let mesh = Mesh::with(193, &[Plane::MeshNode; 2], "3s", opts);
    for i in [WEB, DB] {
        mesh.wait_status(i, "the policy enforced and a key with the peer", |s| {
            s["firewall"]["state"] == "enforced"
                && s["peers"]
                    .as_object()
                    .is_some_and(|p| p.values().all(|p| p["state"] == "up"))
        });
    }
    assert_eq!(mesh.ping(WEB, DB, 2, "0.2"), 2, "the policy allows ping");

    // A document from elsewhere, generation far ahead, no policy.
    let rogue = Document::new(1_000_000, None, &PeerInfo::default(), &[]).to_line();
    let mut s = UnixStream::connect(socket_path(&mesh.nodes[DB].ifname)).expect("socket");
    s.write_all(rogue.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("ok 1000000 "), "{answer}");

    // The next roster's document is stale there: keyd sees the refusal.
    mesh.publish_roster(2);
    mesh.wait_status(DB, "the firewall failed, with the reason", |s| {
        s["firewall"]["state"] == "failed"
            && s["firewall"]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("holds generation 1000000"))
    });
    // No new key is installed: the peer's key ages out and is removed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while mesh.ping(WEB, DB, 1, "0.2") == 1 {
        assert!(
            Instant::now() < deadline,
            "traffic still passes 30 s after the refusal\n{}",
            mesh.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        mesh.wg_peers(DB).trim(),
        "",
        "the data plane holds no peer\n{}",
        mesh.status(DB)
    );
}
