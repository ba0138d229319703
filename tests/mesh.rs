//! The whole system: N nodes in network namespaces on one bridge, each with
//! its WireGuard data plane (mesh-node, or wireguard-go) and its keyd. The
//! CA, keys, certificates and roster are made with the real `keyd` CLI.
//! Needs root.

mod common;
#[path = "common/exposition.rs"]
mod exposition;
#[path = "common/mesh.rs"]
mod mesh;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mesh::*;

#[test]
fn four_nodes_build_a_full_mesh_and_rotate_without_loss() {
    let mesh = Mesh::new(141, &[Plane::MeshNode; 4], "2s");
    mesh.wait_complete(&[0, 1, 2, 3]);
    for a in 0..4 {
        for b in 0..4 {
            if a != b {
                assert_eq!(
                    mesh.ping(a, b, 2, "0.2"),
                    2,
                    "node{} -> node{}",
                    a + 1,
                    b + 1
                );
            }
        }
    }
    let before = epoch(&mesh.status(0), "node2");
    // ~12 s of pings at 50/s while keys rotate every ~2 s.
    assert_eq!(
        mesh.ping(0, 1, 600, "0.02"),
        600,
        "no loss across rotations"
    );
    let after = epoch(&mesh.status(0), "node2");
    assert!(
        after >= before + 5,
        "at least 5 rotations happened: epoch {before} -> {after}\n{}",
        mesh.logs()
    );
}

#[test]
fn revoked_node_is_cut_everywhere_within_two_seconds() {
    let mesh = Mesh::new(142, &[Plane::MeshNode; 4], "3s");
    mesh.wait_complete(&[0, 1, 2, 3]);
    let gone = mesh.wg_pub(3);
    keyd(&[
        "roster",
        "revoke",
        "--ca-dir",
        p(&mesh.work.path().join("ca")),
        "--roster",
        p(&mesh.roster()),
        "--cert",
        p(&mesh.nodes[3].dir.join("node.crt")),
    ]);
    // Enforced within 2 s of the roster poll (every second) that sees it,
    // on every node, whatever exchange or install is under way.
    let deadline = Instant::now() + Duration::from_secs(3);
    while (0..3).any(|i| mesh.wg_peers(i).contains(&gone)) {
        assert!(
            Instant::now() < deadline,
            "the revoked peer is still in a data plane 3 s later\n{}",
            mesh.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for i in 0..3 {
        assert_eq!(
            mesh.ping(i, 3, 2, "0.2"),
            0,
            "node{} cannot reach the revoked node",
            i + 1
        );
    }
    mesh.wait_complete(&[0, 1, 2]);
    mesh.wait_status(0, "on roster serial 2", |s| s["roster_serial"] == 2);
    // The revoked node learns it too, says so, and holds no peers.
    mesh.wait_status(3, "know that it is revoked", |s| {
        s["local_state"] == "revoked"
    });
    assert_eq!(
        mesh.wg_peers(3).trim(),
        "",
        "a revoked node drops its peers"
    );
}

/// Zero trust against a hostile underlay: a machine with a certificate from
/// another CA takes over a member's address. It cannot even answer the
/// dialer's msg1 (mac1 is keyed by the real member's Noise key), and it
/// never reaches the dialer's data plane: being at the right address earns
/// nothing. (A stranger that *does* know the key is refused on its
/// certificate in msg2: `a_stranger_is_refused_over_quic` in keyd's quic.rs.)
#[test]
fn node_with_a_certificate_from_another_ca_is_refused() {
    let mut mesh = Mesh::new(143, &[Plane::MeshNode; 2], "2s");
    mesh.wait_complete(&[0, 1]);
    // The lower node id dials; the stranger takes the other one's place.
    let (dialer, victim) = mesh.dialer_and_other();
    let victim_ip = format!("192.168.143.{}", victim + 1);
    mesh.nodes[victim].keyd = None;
    let nic = device_with_addr(&mesh.nodes[victim].ns, &victim_ip);
    mesh.nodes[victim]
        .ns
        .ok(&["ip", "addr", "del", &format!("{victim_ip}/24"), "dev", &nic]);

    // The stranger: its own CA, its own roster, the victim's address.
    let work = tempfile::tempdir().unwrap();
    let (sca, sdir) = (work.path().join("ca"), work.path().join("stranger"));
    keyd(&["ca", "create", "--network", "e2e", "--dir", p(&sca)]);
    keyd(&["key", "generate", "--dir", p(&sdir)]);
    keyd(&[
        "cert",
        "issue",
        "--ca-dir",
        p(&sca),
        "--name",
        "stranger",
        "--address",
        "10.98.143.9/24",
        "--key-dir",
        p(&sdir),
        "--out",
        p(&sdir.join("node.crt")),
    ]);
    keyd(&[
        "roster",
        "build",
        "--ca-dir",
        p(&sca),
        "--out",
        p(&work.path().join("roster")),
        "--member",
        &format!("{},keyd={victim_ip}:51821", p(&sdir.join("node.crt"))),
    ]);
    let ns = Netns::new();
    let (nic, lan_end) = (unique("mn"), unique("ml"));
    ok(Command::new("ip").args([
        "link", "add", &nic, "type", "veth", "peer", "name", &lan_end,
    ]));
    ok(Command::new("ip").args(["link", "set", &nic, "netns", &ns.name]));
    ok(Command::new("ip").args(["link", "set", &lan_end, "netns", &mesh.lan.name]));
    mesh.lan
        .ok(&["ip", "link", "set", &lan_end, "master", "br0", "up"]);
    ns.ok(&["ip", "addr", "add", &format!("{victim_ip}/24"), "dev", &nic]);
    ns.ok(&["ip", "link", "set", &nic, "up"]);
    let ifname = unique("wg");
    let _dp = Daemon::mesh_node(&ns, &mesh_node_bin(), &ifname);
    std::fs::write(
        sdir.join("keyd.toml"),
        format!(
            "interface = \"{ifname}\"\nquic_listen = \"{victim_ip}:51821\"\nca_cert = \"../ca/ca.crt\"\n\
             cert = \"node.crt\"\nwg_key = \"wg.key\"\nnoise_key = \"noise.key\"\nroster = \"../roster\"\n\
             state_dir = \"state\"\nrotation_interval = \"2s\"\naccept_unlisted_sources = true\n"
        ),
    )
    .unwrap();
    let _stranger = Keyd(
        ns.cmd(&[
            p(&keyd_bin()),
            "run",
            "--config",
            p(&sdir.join("keyd.toml")),
        ])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(sdir.join("keyd.log")).unwrap())
        .spawn()
        .unwrap(),
    );
    // What the takeover announces on a real LAN (gratuitous ARP): the
    // dialer's neighbour entry for the stolen address now points at the stranger.
    mesh.nodes[dialer].ns.ok(&["ip", "neigh", "flush", "all"]);
    let stranger_pub = std::fs::read_to_string(sdir.join("wg.pub"))
        .unwrap()
        .trim()
        .to_string();
    // The dialer seals its msg1 with a mac1 keyed by the *victim's* Noise
    // key, from the roster: the stranger cannot answer it, so it never even
    // learns who dialled, and the dialer never learns a key.
    let stranger_status = sdir.join("state/status.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&stranger_status).unwrap_or_default();
        let s: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if s["refusals"]["bad_mac1"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stranger never refused a msg1 on its mac1: {s}\n{}",
            std::fs::read_to_string(sdir.join("keyd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    mesh.wait_status(
        dialer,
        "count failed exchanges with the stolen address",
        |s| {
            s["peers"][format!("node{}", victim + 1)]["exchanges_failed"]
                .as_u64()
                .unwrap_or(0)
                > 0
        },
    );
    assert!(
        !mesh.wg_peers(dialer).contains(&stranger_pub),
        "the stranger reached the data plane"
    );
    assert!(
        std::fs::read_to_string(sdir.join("keyd.log"))
            .unwrap_or_default()
            .contains("bad_mac1"),
        "the refusal is logged with its reason"
    );
}

#[test]
fn restarting_keyd_does_not_interrupt_tunnels() {
    let mut mesh = Mesh::new(144, &[Plane::MeshNode; 2], "2s");
    mesh.wait_complete(&[0, 1]);
    let (ns, to) = (mesh.nodes[0].ns.name.clone(), mesh.nodes[1].overlay.clone());
    let pinger = std::thread::spawn(move || {
        let out = run(Command::new("ip").args([
            "netns", "exec", &ns, "ping", "-n", "-q", "-c", "400", "-i", "0.02", "-W", "1", &to,
        ]));
        received(&String::from_utf8_lossy(&out.stdout))
    });
    std::thread::sleep(Duration::from_secs(1));
    for i in [0, 1] {
        mesh.nodes[i].keyd = None; // killed
        std::thread::sleep(Duration::from_millis(700));
        mesh.start_keyd(i);
    }
    assert_eq!(
        pinger.join().unwrap(),
        400,
        "no ping lost while keyd restarted on both nodes"
    );
    // And the restarted daemons take over rotation again.
    mesh.wait_status(0, "resumed after the restart", |s| {
        s["peers"]["node2"]["state"] == "up"
    });
}

#[test]
fn a_node_on_wireguard_go_joins_the_mesh() {
    let mesh = Mesh::new(
        145,
        &[Plane::MeshNode, Plane::WireguardGo, Plane::MeshNode],
        "3s",
    );
    mesh.wait_complete(&[0, 1, 2]);
    assert_eq!(mesh.ping(1, 0, 3, "0.2"), 3);
    assert_eq!(mesh.ping(2, 1, 3, "0.2"), 3);
}

/// Fail closed, then recover: with the peer's keyd gone, the dialer's key
/// ages past rotation interval + hard lifetime (2 s + 6 s here) and the peer
/// is removed from its data plane; when the peer's keyd returns, exchanges
/// succeed again and the peer comes back.
#[test]
fn a_peer_without_fresh_keys_is_cut_and_comes_back() {
    let mut mesh = Mesh::new(146, &[Plane::MeshNode; 2], "2s");
    mesh.wait_complete(&[0, 1]);
    let (dialer, other) = mesh.dialer_and_other();
    let other_pub = mesh.wg_pub(other);
    mesh.nodes[other].keyd = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while mesh.wg_peers(dialer).contains(&other_pub) {
        assert!(Instant::now() < deadline, "never cut:\n{}", mesh.logs());
        std::thread::sleep(Duration::from_millis(300));
    }
    mesh.wait_status(dialer, "counted the cut", |s| {
        s["peers_cut_at_hard_lifetime"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(
        mesh.status(dialer)["peers"][format!("node{}", other + 1)]["state"]["cut"],
        "hard_lifetime"
    );
    assert_eq!(
        mesh.ping(dialer, other, 2, "0.2"),
        0,
        "fail closed: no key, no traffic"
    );
    mesh.start_keyd(other);
    mesh.wait_complete(&[0, 1]);
    assert!(
        mesh.wg_peers(dialer).contains(&other_pub),
        "the peer is back"
    );
}

#[test]
fn a_member_added_to_the_roster_joins_without_restarts() {
    let opts = Opts {
        listed: Some(2),
        ..Default::default()
    };
    let mesh = Mesh::with(147, &[Plane::MeshNode; 3], "2s", opts);
    mesh.wait_complete(&[0, 1]);
    // node3 runs but is not a member yet: nobody lets it in.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(mesh.ping(2, 0, 2, "0.2"), 0, "not in the roster, no tunnel");
    assert!(!mesh.wg_peers(0).contains(&mesh.wg_pub(2)));
    // The CA publishes serial 2 with node3; every keyd picks it up.
    mesh.publish_roster(3);
    mesh.wait_complete(&[0, 1, 2]);
    mesh.wait_status(0, "on roster serial 2", |s| s["roster_serial"] == 2);
}

/// A certificate ends when it expires (plus the clock skew), not a hard
/// lifetime later: both peers cut the node at its expiry, say why, and the
/// expired node itself says that it is no longer a member.
#[test]
fn an_expired_certificate_is_cut_at_its_expiry() {
    // node3's certificate lives 25 s; clock skew tolerance 1 s.
    let opts = Opts {
        short_lived: Some((2, "25s")),
        skew: "1s",
        ..Default::default()
    };
    let mesh = Mesh::with(148, &[Plane::MeshNode; 3], "2s", opts);
    mesh.wait_complete(&[0, 1, 2]);
    let gone = mesh.wg_pub(2);
    let deadline = Instant::now() + Duration::from_secs(60);
    while (0..2).any(|i| mesh.wg_peers(i).contains(&gone)) {
        assert!(
            Instant::now() < deadline,
            "expired node3 never cut:\n{}",
            mesh.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for i in 0..2 {
        mesh.wait_status(i, "cut node3 for its certificate", |s| {
            s["peers"]["node3"]["state"]["cut"] == "certificate_expired"
                && s["peers_cut_at_certificate_expiry"].as_u64() == Some(1)
                && s["peers_cut_at_hard_lifetime"].as_u64() == Some(0)
        });
    }
    mesh.wait_status(2, "know that it expired", |s| {
        s["local_state"] == "certificate_expired"
    });
    assert_eq!(
        mesh.ping(0, 2, 2, "0.2"),
        0,
        "no traffic with the expired node"
    );
    assert_eq!(mesh.ping(0, 1, 2, "0.2"), 2, "the others are unaffected");
}

/// The data plane restarts under a ping stream (killed, then started again
/// with no key and no peers); keyd notices at its next read and puts the
/// interface key, the port and every peer with its current key back, without
/// being touched.
#[test]
fn a_restarted_mesh_node_is_healed_by_keyd() {
    let mut mesh = Mesh::new(149, &[Plane::MeshNode; 2], "3s");
    mesh.wait_complete(&[0, 1]);
    let ifname = mesh.nodes[1].ifname.clone();
    mesh.nodes[1]
        .ns
        .run(&["pkill", "-KILL", "-f", &format!("up {ifname} ")]);
    mesh.nodes[1].daemon = None;
    std::thread::sleep(Duration::from_millis(500));
    mesh.start_data_plane(1, Plane::MeshNode);
    let deadline = Instant::now() + Duration::from_secs(15);
    while mesh.ping(0, 1, 1, "0.2") != 1 {
        assert!(
            Instant::now() < deadline,
            "tunnel not back after the data plane restarted:\n{}",
            mesh.logs()
        );
    }
    assert_eq!(mesh.ping(1, 0, 5, "0.1"), 5, "both ways");
    assert!(
        mesh.logs().contains("lost its private key"),
        "the heal is logged"
    );
    mesh.wait_status(1, "count the heal", |s| {
        s["dataplane_restarts_healed"].as_u64().unwrap_or(0) >= 1
    });
}

/// Revocation reaches the data plane even when the first removal fails: the
/// data plane's socket is unreachable when the revocation arrives, keyd
/// counts the failure and retries at every read until the peer is gone.
#[test]
fn a_failed_removal_is_retried_until_the_peer_is_gone() {
    let mesh = Mesh::new(150, &[Plane::MeshNode; 3], "30s");
    mesh.wait_complete(&[0, 1, 2]);
    let gone = mesh.wg_pub(2);
    let socket = format!("/var/run/wireguard/{}.sock", mesh.nodes[0].ifname);
    let hidden = format!("{socket}.hidden");
    std::fs::rename(&socket, &hidden).unwrap();
    keyd(&[
        "roster",
        "revoke",
        "--ca-dir",
        p(&mesh.work.path().join("ca")),
        "--roster",
        p(&mesh.roster()),
        "--cert",
        p(&mesh.nodes[2].dir.join("node.crt")),
    ]);
    mesh.wait_status(0, "fail to reach the data plane", |s| {
        s["roster_serial"] == 2 && s["dataplane_reachable"] == false
    });
    std::thread::sleep(Duration::from_secs(2));
    std::fs::rename(&hidden, &socket).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while mesh.wg_peers(0).contains(&gone) {
        assert!(
            Instant::now() < deadline,
            "never removed after the data plane came back:\n{}",
            mesh.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    mesh.wait_status(0, "count failed reads", |s| {
        s["dataplane_reads_failed"].as_u64().unwrap_or(0) > 0
    });
}

/// After a keyd restart, a key already in the data plane is tracked with
/// the age its persisted record gives: with the peer's keyd gone, it is
/// cut at rotation + hard lifetime after it was installed, not never.
#[test]
fn after_a_keyd_restart_a_peer_whose_keyd_is_gone_is_still_cut() {
    let mut mesh = Mesh::new(151, &[Plane::MeshNode; 2], "2s");
    mesh.wait_complete(&[0, 1]);
    let (dialer, other) = mesh.dialer_and_other();
    let other_pub = mesh.wg_pub(other);
    mesh.nodes[other].keyd = None;
    mesh.nodes[dialer].keyd = None;
    std::thread::sleep(Duration::from_millis(500));
    mesh.start_keyd(dialer);
    let deadline = Instant::now() + Duration::from_secs(30);
    while mesh.wg_peers(dialer).contains(&other_pub) {
        assert!(Instant::now() < deadline, "never cut:\n{}", mesh.logs());
        std::thread::sleep(Duration::from_millis(300));
    }
    mesh.wait_status(dialer, "cut at the hard lifetime", |s| {
        s["peers"][format!("node{}", other + 1)]["state"]["cut"] == "hard_lifetime"
    });
}

/// State that keyd cannot trust stops it with a clear error: a corrupt
/// state file, and a roster past its expiry. `--reset-state` is the way
/// past a lost state, and it is explicit.
#[test]
fn corrupt_state_or_an_expired_roster_stop_keyd() {
    let mut mesh = Mesh::new(152, &[Plane::MeshNode; 2], "2s");
    mesh.wait_complete(&[0, 1]);
    mesh.nodes[0].keyd = None;
    let state = mesh.nodes[0].dir.join("state/state.json");
    std::fs::write(&state, "{ not json").unwrap();
    let config = mesh.nodes[0].dir.join("keyd.toml");
    let bin = keyd_bin();
    let run_keyd = |extra: &[&str]| {
        let mut args = vec![p(&bin), "run", "--config", p(&config)];
        args.extend_from_slice(extra);
        mesh.nodes[0].ns.run(&args)
    };
    let out = run_keyd(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on a corrupt state");
    assert!(
        err.contains("state.json") && err.contains("corrupt") && err.contains("--reset-state"),
        "{err}"
    );
    std::fs::remove_file(&state).unwrap();
    let out = run_keyd(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without its state");
    assert!(err.contains("missing"), "{err}");

    // A roster that expired (1 s validity, 1 s skew here).
    let ca = mesh.work.path().join("ca");
    let roster = mesh.roster();
    keyd(&[
        "roster",
        "build",
        "--ca-dir",
        p(&ca),
        "--out",
        p(&roster),
        "--previous",
        p(&roster),
        "--valid",
        "1s",
        "--member",
        &mesh.members[0],
        "--member",
        &mesh.members[1],
    ]);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("max_clock_skew = \"300s\"", "max_clock_skew = \"1s\""),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let out = run_keyd(&["--reset-state"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on an expired roster");
    assert!(err.contains("expired"), "{err}");
}

/// Where each node's keyd serves `/metrics` in this test (in its namespace).
const KEYD_METRICS: &str = "127.0.0.1:9587";

/// GET `path` from node `i`'s keyd metrics endpoint: (status line, body).
fn http_get(mesh: &Mesh, i: usize, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let request = format!("GET {path} HTTP/1.1\r\nHost: keyd\r\n\r\n");
    let response = mesh.nodes[i].ns.enter(move || {
        let mut s = std::net::TcpStream::connect(KEYD_METRICS).expect("keyd's metrics endpoint");
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// Node `i`'s keyd metrics, parsed strictly (a malformed line fails).
fn scrape(mesh: &Mesh, i: usize) -> exposition::Scrape {
    let (status, body) = http_get(mesh, i, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    // An implementation we did not write agrees it is well formed.
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/install-deps installs it)");
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), body.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    exposition::parse(&body).unwrap_or_else(|e| panic!("malformed exposition: {e}\n{body}"))
}

/// keyd's Prometheus endpoint in a running three-node mesh: the text parses
/// strictly, the series agree with `keyd status`, and a connection from a
/// host that is no member shows up in the refusal and knock counters.
#[test]
fn keyd_metrics_show_the_mesh() {
    const METRICS: &str = "[metrics]\nlisten = \"127.0.0.1:9587\"";
    let opts = Opts {
        extra_config: vec![(0, METRICS), (1, METRICS), (2, METRICS)],
        ..Opts::default()
    };
    let mesh = Mesh::with(153, &[Plane::MeshNode; 3], "2s", opts);
    mesh.wait_complete(&[0, 1, 2]);
    // Every node has agreed a key with both peers and answered at least one
    // exchange or dialled one (the lower id of each pair dials).
    for i in 0..3 {
        mesh.wait_status(i, "keyed both peers", |s| {
            s["peers"]
                .as_object()
                .is_some_and(|p| p.len() == 2 && p.values().all(|p| p["epoch"].as_u64() >= Some(1)))
        });
    }

    for i in 0..3 {
        // The status first: the scrape is as new or newer.
        let status = mesh.status(i);
        let m = scrape(&mesh, i);
        let me = format!("node{}", i + 1);
        assert_eq!(m.get("keyd_node_info", &[("node", &me)]), Some(1.0));
        assert_eq!(m.get("keyd_local_state", &[("state", "member")]), Some(1.0));
        assert_eq!(m.sum("keyd_local_state", &[]), 1.0, "one-hot");
        assert_eq!(
            m.get("keyd_roster_serial", &[]),
            status["roster_serial"].as_u64().map(|v| v as f64),
            "the roster serial keyd status shows"
        );
        assert_eq!(
            m.get("keyd_roster_not_after_timestamp_seconds", &[]),
            status["roster_not_after"].as_u64().map(|v| v as f64)
        );
        assert!(m.get("keyd_roster_expires_in_seconds", &[]).unwrap() > 0.0);
        assert_eq!(m.get("keyd_dataplane_reachable", &[]), Some(1.0));
        assert_eq!(m.get("keyd_rotation_interval_seconds", &[]), Some(2.0));
        assert_eq!(m.sum("keyd_peers", &[]), 2.0, "two peers listed");

        for peer in (1..=3).map(|n| format!("node{n}")).filter(|p| *p != me) {
            let id = status["peers"][&peer]["node_id"]
                .as_str()
                .unwrap()
                .to_string();
            let p = [("peer", peer.as_str()), ("node_id", id.as_str())];
            let epoch = m.get("keyd_peer_key_epoch", &p).unwrap();
            assert!(epoch >= 1.0, "{peer}: epoch {epoch}");
            assert!(m.get("keyd_peer_key_age_seconds", &p).unwrap() >= 0.0);
            assert!(
                m.get("keyd_peer_last_exchange_timestamp_seconds", &p)
                    .unwrap()
                    > 0.0
            );
            assert_eq!(m.find("keyd_peer_state", &p).len(), 4);
            assert_eq!(m.sum("keyd_peer_state", &p), 1.0, "{peer}: state one-hot");
            assert_eq!(m.find("keyd_peer_last_exchange_result", &p).len(), 1);
            // mesh-node answers path probes: the ladder runs, on one rung.
            assert_eq!(m.find("keyd_peer_path", &p).len(), 3);
            assert_eq!(m.sum("keyd_peer_path", &p), 1.0, "{peer}: rung one-hot");
            let ok = m.get("keyd_peer_exchanges_total", &[p[0], p[1], ("result", "ok")]);
            assert!(ok.unwrap() >= 1.0, "{peer}: {ok:?}");
        }

        // The exchange counters are the status's, and every completed
        // exchange has its duration in the histogram.
        let mut completed = 0.0;
        for role in ["initiator", "responder"] {
            let r = [("role", role)];
            let from_status = &status["exchanges"][role];
            let c = m.get("keyd_handshakes_completed_total", &r).unwrap();
            assert!(c >= from_status["completed"].as_u64().unwrap() as f64);
            assert!(m.get("keyd_handshakes_started_total", &r).unwrap() >= c);
            let buckets = exposition::histogram(&m, "keyd_exchange_duration_seconds", &r)
                .unwrap_or_else(|e| panic!("node{}: {e}", i + 1));
            assert_eq!(
                buckets.last().unwrap().1,
                c,
                "node{}: one duration per completed exchange ({role})",
                i + 1
            );
            completed += c;
        }
        assert!(completed > 0.0, "node{}: no exchange timed", i + 1);
    }

    // A host that is no member connects to node1's keyd (its TCP rung):
    // refused as an unlisted source, and counted as an unknown knock.
    let before = scrape(&mesh, 0);
    // Every reason is a series from keyd's start (at 0 before the first).
    let unlisted = |m: &exposition::Scrape| {
        m.get("keyd_refusals_total", &[("reason", "unlisted_source")])
            .expect("every refusal reason is a series")
    };
    let knocks =
        |m: &exposition::Scrape| m.get("keyd_knocks_total", &[("kind", "unknown")]).unwrap();
    let stranger = Netns::new();
    let (nic, lan_end) = (unique("mn"), unique("ml"));
    ok(Command::new("ip").args([
        "link", "add", &nic, "type", "veth", "peer", "name", &lan_end,
    ]));
    ok(Command::new("ip").args(["link", "set", &nic, "netns", &stranger.name]));
    ok(Command::new("ip").args(["link", "set", &lan_end, "netns", &mesh.lan.name]));
    mesh.lan
        .ok(&["ip", "link", "set", &lan_end, "master", "br0", "up"]);
    stranger.ok(&["ip", "addr", "add", "192.168.153.77/24", "dev", &nic]);
    stranger.ok(&["ip", "link", "set", &nic, "up"]);
    let target = format!("{}:51821", mesh.underlay(0));
    stranger.enter(move || {
        // Accepted by the kernel, then closed by keyd unanswered.
        let _ = std::net::TcpStream::connect(&target).expect("TCP to keyd's port");
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = scrape(&mesh, 0);
        if unlisted(&now) > unlisted(&before) {
            assert!(
                knocks(&now) > knocks(&before),
                "an unlisted source is an unknown knock"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stranger's connection was never counted"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // Only GET /metrics is served; the rest is counted.
    let refused = |m: &exposition::Scrape| {
        m.get(
            "keyd_metrics_requests_refused_total",
            &[("reason", "not_found")],
        )
        .expect("every reason is a series")
    };
    let before = refused(&scrape(&mesh, 0));
    assert!(http_get(&mesh, 0, "/").0.starts_with("HTTP/1.1 404 "));
    assert_eq!(refused(&scrape(&mesh, 0)), before + 1.0);

    // `keyd status --short`: the same health in one line and its exit status.
    let short = |config: &str| {
        let out = run(Command::new(keyd_bin()).args(["status", "--short", "--config", config]));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    };
    let (code, line) = short(p(&mesh.nodes[0].dir.join("keyd.toml")));
    assert_eq!(code, Some(0), "{line}");
    assert!(
        line.starts_with("ok: 2/2 peers keyed, roster serial 1 expires in 6d"),
        "{line}"
    );
    let (code, line) = short(p(&mesh.work.path().join("no-such.toml")));
    assert_eq!(code, Some(2), "{line}");
    assert!(line.starts_with("failed: no status from keyd"), "{line}");
}

/// Every line of `log` is a JSON object with a timestamp, a level and a
/// message; returns the messages.
fn json_lines(log: &str) -> Vec<String> {
    assert!(!log.is_empty(), "no log");
    log.lines()
        .map(|line| {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(
                v["timestamp"].is_string() && v["level"].is_string(),
                "{line}"
            );
            v["message"]
                .as_str()
                .unwrap_or_else(|| panic!("no message: {line}"))
                .to_string()
        })
        .collect()
}

/// `--log-format json`: keyd and mesh-node write one JSON object per line.
#[test]
fn daemons_log_json_on_request() {
    let mut mesh = Mesh::new(154, &[Plane::MeshNode; 2], "2s");
    mesh.wait_complete(&[0, 1]);
    // keyd restarted with JSON logs keys its peer again.
    mesh.nodes[0].keyd = None;
    let n = &mut mesh.nodes[0];
    let log = n.dir.join("keyd-json.log");
    let keyd =
        n.ns.cmd(&[
            p(&keyd_bin()),
            "run",
            "--config",
            p(&n.dir.join("keyd.toml")),
            "--log-format",
            "json",
        ])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    n.keyd = Some(Keyd(keyd));
    let epoch = epoch(&mesh.status(0), "node2");
    mesh.wait_status(0, "a new key with node2", |s| {
        mesh::epoch(s, "node2") > epoch
    });
    let messages = json_lines(&read(&log));
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("keyd up: node node1")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("installed for node2")),
        "{messages:?}"
    );

    let ns = Netns::new();
    let mut dp = Daemon::mesh_node_with(
        &ns,
        &mesh_node_bin(),
        &unique("wg"),
        &["--log-format", "json"],
    );
    assert!(dp.stop(), "mesh-node stops cleanly");
    let messages = json_lines(&dp.log());
    assert!(
        messages.iter().any(|m| m.starts_with("mesh-node up on ")),
        "{messages:?}"
    );
}
