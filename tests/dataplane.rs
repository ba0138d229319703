//! mesh-node end to end: two namespaces joined by veth, a mesh-node in each,
//! configured only with the stock `wg` tool. Needs root.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use common::*;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh-node"))
}

fn pair(subnet: u8) -> Pair {
    Pair::new(subnet, Impl::MeshNode(bin()), Impl::MeshNode(bin()))
}

#[test]
fn ping_and_tcp_transfer_over_two_mesh_nodes() {
    let p = pair(101);
    assert_eq!(p.a.ping(p.b.overlay, 5, "0.2"), 5);
    assert_eq!(p.b.ping(p.a.overlay, 5, "0.2"), 5);
    let (sent, got) = tcp_transfer(&p.a.ns, &p.b.ns, p.b.overlay, 32 << 20);
    assert_eq!(sent, got, "32 MiB arrive intact A -> B");
    let (sent, got) = tcp_transfer(&p.b.ns, &p.a.ns, p.a.overlay, 8 << 20);
    assert_eq!(sent, got, "8 MiB arrive intact B -> A");

    // `wg show` reports the handshake and the bytes.
    let dump = p.a.wg(&["show", &p.a.daemon.ifname, "dump"]);
    let peer_line = dump.lines().nth(1).expect("one peer");
    let fields: Vec<&str> = peer_line.split('\t').collect();
    assert_eq!(fields[0], p.b.pubkey);
    assert_ne!(fields[4], "0", "latest handshake is set: {peer_line}");
    assert!(
        fields[5].parse::<u64>().unwrap() > 8 << 20,
        "rx bytes: {peer_line}"
    );
    assert!(
        fields[6].parse::<u64>().unwrap() > 32 << 20,
        "tx bytes: {peer_line}"
    );
}

/// The data-path thread when busy polling is off (or its CPU budget is
/// spent): every wait sleeps in poll(2). Both directions, both kinds of node.
#[test]
fn a_data_path_that_never_busy_polls_carries_ping_and_tcp() {
    let p = Pair::new(
        112,
        Impl::MeshNodeSleepingDataPath(bin()),
        Impl::MeshNode(bin()),
    );
    ping_and_transfer_both_ways(&p, 16 << 20);
}

/// `--transports default` (gotatun's own TUN and UDP, the benchmark's
/// reference) against ours: same wire format, both directions.
#[test]
fn our_transports_and_gotatuns_default_ones_interoperate() {
    let p = Pair::new(
        111,
        Impl::MeshNode(bin()),
        Impl::MeshNodeDefaultTransports(bin()),
    );
    ping_and_transfer_both_ways(&p, 8 << 20);
    assert!(
        read(&p.b.daemon.log).contains("gotatun's default transports"),
        "the B side really runs gotatun's transports: {}",
        read(&p.b.daemon.log)
    );
}

/// Pings, then a TCP transfer of `bytes` whose checksum must match, A to B
/// and B to A.
fn ping_and_transfer_both_ways(p: &Pair, bytes: usize) {
    assert_eq!(p.a.ping(p.b.overlay, 3, "0.05"), 3, "ping A -> B");
    assert_eq!(p.b.ping(p.a.overlay, 3, "0.05"), 3, "ping B -> A");
    let (sent, got) = tcp_transfer(&p.a.ns, &p.b.ns, p.b.overlay, bytes);
    assert_eq!(sent, got, "{bytes} bytes arrive intact A -> B");
    let (sent, got) = tcp_transfer(&p.b.ns, &p.a.ns, p.a.overlay, bytes);
    assert_eq!(sent, got, "{bytes} bytes arrive intact B -> A");
}

#[test]
fn interface_mtu_defaults_to_1420_and_1500_still_carries_full_size_packets() {
    let p = pair(107);
    let mtu = |s: &Side| {
        s.ns.ok(&["cat", &format!("/sys/class/net/{}/mtu", s.daemon.ifname)])
    };
    assert_eq!(
        mtu(&p.a).trim(),
        "1420",
        "like wireguard-go: fits a 1500-byte underlay"
    );
    // At 1500 the encrypted packets exceed the veth MTU: UDP GSO cannot
    // carry them and the kernel must fragment. Data must still arrive.
    for s in [&p.a, &p.b] {
        s.ns.ok(&["ip", "link", "set", &s.daemon.ifname, "mtu", "1500"]);
    }
    let (sent, got) = tcp_transfer(&p.a.ns, &p.b.ns, p.b.overlay, 16 << 20);
    assert_eq!(sent, got, "full-size packets over a fragmenting underlay");
    let (sent, got) = tcp_transfer(&p.b.ns, &p.a.ns, p.a.overlay, 16 << 20);
    assert_eq!(sent, got);
}

#[test]
fn preshared_key_changes_during_transfer_lose_nothing() {
    let p = pair(102);
    assert_eq!(p.a.ping(p.b.overlay, 2, "0.2"), 2, "tunnel up first");
    let handshake = || p.a.wg(&["show", &p.a.daemon.ifname, "latest-handshakes"]);
    let before = handshake();
    let rotate = |tag: &str| {
        for round in 1..=5 {
            std::thread::sleep(std::time::Duration::from_millis(900));
            let psk = p.keys.psk(&format!("{tag}{round}"));
            p.a.set_psk(&p.b, &psk);
            p.b.set_psk(&p.a, &psk);
        }
    };

    // Phase 1: a continuous ping stream (300 over ~6 s) across 5 key changes.
    // Nothing else loads the tunnel, so any loss would be the key change's.
    let (ns, target) = (p.a.ns.name.clone(), p.b.overlay.to_string());
    let pinger = std::thread::spawn(move || {
        let out = run(std::process::Command::new("ip").args([
            "netns", "exec", &ns, "ping", "-n", "-q", "-c", "300", "-i", "0.02", "-W", "1", &target,
        ]));
        received(&String::from_utf8_lossy(&out.stdout))
    });
    rotate("ping");
    assert_eq!(
        pinger.join().unwrap(),
        300,
        "no ping lost across 5 key changes"
    );
    // As in the kernel: the session in flight is kept (no new handshake);
    // the new key is for the next one.
    assert_eq!(
        handshake(),
        before,
        "key changes did not replace the session"
    );

    // Phase 2: a TCP stream that runs until the 5 key changes are done
    // arrives intact (a stall would trip the transfer's socket timeouts).
    let (sent, got) = stream_during(&p, || rotate("tcp"));
    assert_eq!(sent, got, "the stream arrives intact across key changes");
    assert_eq!(handshake(), before, "still the same session");
}

#[test]
fn new_preshared_key_is_used_at_the_next_handshake_and_a_mismatch_fails_closed() {
    let p = pair(103);
    assert_eq!(p.a.ping(p.b.overlay, 2, "0.2"), 2);
    let ifa = p.a.daemon.ifname.clone();
    // Removing and re-adding the peer on A starts a new session with `psk`.
    let readd = |psk: &std::path::Path| {
        p.a.wg(&["set", &ifa, "peer", &p.b.pubkey, "remove"]);
        p.a.wg(&[
            "set",
            &ifa,
            "peer",
            &p.b.pubkey,
            "preshared-key",
            psk.to_str().unwrap(),
            "endpoint",
            &format!("{}:51820", p.b.underlay),
            "allowed-ips",
            &format!("{}/32", p.b.overlay),
        ]);
    };
    // Both sides move to a new key; the new session's handshake must use it.
    let k2 = p.keys.psk("k2");
    p.a.set_psk(&p.b, &k2);
    p.b.set_psk(&p.a, &k2);
    readd(&k2);
    assert_eq!(
        p.a.ping(p.b.overlay, 3, "0.2"),
        3,
        "new session with the new key"
    );

    // Now A alone takes another key: its next session cannot complete.
    let k3 = p.keys.psk("k3");
    readd(&k3);
    assert_eq!(
        p.a.ping(p.b.overlay, 4, "0.3"),
        0,
        "mismatched keys pass nothing"
    );
    let dump = p.a.wg(&["show", &ifa, "latest-handshakes"]);
    assert!(
        dump.trim_end().ends_with("\t0"),
        "no handshake with mismatched keys: {dump}"
    );
}

#[test]
fn inner_source_outside_allowed_ips_is_dropped() {
    let p = pair(104);
    assert_eq!(p.a.ping(p.b.overlay, 2, "0.2"), 2);
    // A gets a second overlay address that B does not allow for A. A routes
    // the packet to B (the destination is B's), B must drop it.
    let ifa = p.a.daemon.ifname.clone();
    p.a.ns
        .ok(&["ip", "addr", "add", "10.77.0.9/32", "dev", &ifa]);
    let out = p.a.ns.run(&[
        "ping",
        "-n",
        "-q",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "1",
        "-I",
        "10.77.0.9",
        &p.b.overlay.to_string(),
    ]);
    assert_eq!(
        received(&String::from_utf8_lossy(&out.stdout)),
        0,
        "spoofed source dropped"
    );
    assert_eq!(
        p.a.ping(p.b.overlay, 2, "0.2"),
        2,
        "the genuine source still passes"
    );
}

#[test]
fn wg_showconf_setconf_round_trip_and_malformed_uapi_survives() {
    let p = pair(105);
    let ifa = p.a.daemon.ifname.clone();
    let conf = p.a.wg(&["showconf", &ifa]);
    assert!(
        conf.contains(&p.b.pubkey) && conf.contains("PresharedKey"),
        "{conf}"
    );
    let path = p.keys.dir.path().join("a.conf");
    std::fs::write(&path, &conf).unwrap();
    p.a.wg(&["setconf", &ifa, path.to_str().unwrap()]);
    assert_eq!(
        p.a.wg(&["showconf", &ifa]),
        conf,
        "setconf(showconf) is the identity"
    );
    assert_eq!(p.a.ping(p.b.overlay, 2, "0.2"), 2);

    // setconf replaces the peer set: a config without peers removes them ...
    let bare: String = conf.split("[Peer]").next().unwrap().to_string();
    std::fs::write(&path, &bare).unwrap();
    p.a.wg(&["setconf", &ifa, path.to_str().unwrap()]);
    assert_eq!(
        p.a.wg(&["show", &ifa, "peers"]).trim(),
        "",
        "peers replaced by none"
    );
    assert_eq!(p.a.ping(p.b.overlay, 2, "0.2"), 0, "no peer, no traffic");
    // ... and the full config brings the peer back.
    std::fs::write(&path, &conf).unwrap();
    p.a.wg(&["setconf", &ifa, path.to_str().unwrap()]);
    assert_eq!(p.a.ping(p.b.overlay, 3, "0.2"), 3);

    // Garbage on the socket: an errno back, and the daemon keeps serving.
    let sock = format!("/var/run/wireguard/{ifa}.sock");
    for garbage in [
        "hello\n\n",
        "set=1\nlisten_port=banana\n\n",
        "set=1\npublic_key=zz\n\n",
    ] {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(garbage.as_bytes()).unwrap();
        let mut reply = String::new();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        s.read_to_string(&mut reply).unwrap();
        assert!(
            reply.starts_with("errno=") && !reply.starts_with("errno=0"),
            "{garbage:?} -> {reply:?}"
        );
    }
    assert_eq!(p.a.ping(p.b.overlay, 2, "0.2"), 2, "tunnel unaffected");
    assert!(
        p.a.daemon.log().contains("refused request"),
        "refusals are logged"
    );
}

#[test]
fn clean_shutdown_removes_socket_and_interface() {
    let mut p = pair(106);
    let ifa = p.a.daemon.ifname.clone();
    assert!(p.a.daemon.stop(), "exits 0 on SIGTERM");
    assert!(!Path::new(&format!("/var/run/wireguard/{ifa}.sock")).exists());
    let out = p.a.ns.run(&["ip", "link", "show", &ifa]);
    assert!(!out.status.success(), "interface {ifa} removed");
    // The device itself was stopped, not just abandoned at exit.
    let log = read(&p.a.daemon.log);
    assert!(log.contains("shutting down"), "{log}");
    assert!(!log.contains("still in use"), "{log}");
}

/// A flood of handshake initiations from one address, each with a valid
/// MAC1 (anyone who knows the public key can make one): past the rate
/// limit the device answers with cookie replies instead of doing the
/// Diffie-Hellman work, and the established session carries on.
#[test]
fn a_handshake_flood_gets_cookie_replies_and_the_session_carries_on() {
    use base64::Engine;
    use blake2::digest::{FixedOutput, KeyInit, Update};

    const FLOOD: u32 = 1000;
    let p = pair(114);
    assert_eq!(p.a.ping(p.b.overlay, 2, "0.2"), 2, "session up");
    let a_public = base64::engine::general_purpose::STANDARD
        .decode(p.a.pubkey.trim())
        .unwrap();
    // MAC1 key = HASH("mac1----" || responder's public key).
    let mac1_key: [u8; 32] = blake2::Blake2s256::default()
        .chain(b"mac1----")
        .chain(&a_public)
        .finalize_fixed()
        .into();
    let target = std::net::SocketAddr::from((p.a.underlay, 51820));
    let cookie_replies = p.b.ns.enter(move || {
        let socket = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_millis(500)))
            .unwrap();
        for sender in 0..FLOOD {
            // type 1, sender index, ephemeral, static, timestamp: garbage
            // that only a full handshake computation would refuse.
            let mut message = [0u8; 148];
            message[0] = 1;
            message[4..8].copy_from_slice(&sender.to_le_bytes());
            message[8..116].fill(sender as u8 ^ 0x5a);
            let mut mac =
                blake2::Blake2sMac::<blake2::digest::consts::U16>::new_from_slice(&mac1_key)
                    .unwrap();
            mac.update(&message[..116]);
            message[116..132].copy_from_slice(&mac.finalize_fixed());
            socket.send_to(&message, target).unwrap();
        }
        let mut replies = 0;
        let mut buf = [0u8; 256];
        while let Ok((n, _)) = socket.recv_from(&mut buf) {
            let receiver = u32::from_le_bytes(buf[4..8].try_into().unwrap());
            if n == 64 && buf[0] == 3 && receiver < FLOOD {
                replies += 1;
            }
        }
        replies
    });
    // The limit is 100 initiations per second and address; the flood takes
    // milliseconds, so most of it is answered with cookies (901 here).
    assert!(
        cookie_replies >= FLOOD / 2,
        "{cookie_replies} cookie replies to {FLOOD} initiations"
    );
    assert_eq!(p.a.ping(p.b.overlay, 3, "0.2"), 3, "the session carries on");
    assert_eq!(p.b.ping(p.a.overlay, 3, "0.2"), 3);
}

/// `persistent-keepalive` set with `wg`: an idle tunnel still sends a
/// keepalive every interval (what keeps a NAT mapping open). gotatun's
/// timer task sends these from the runtime, off the data-path thread.
#[test]
fn persistent_keepalive_keeps_an_idle_tunnel_talking() {
    let p = pair(113);
    assert_eq!(p.a.ping(p.b.overlay, 2, "0.2"), 2, "session up");
    let ifa = p.a.daemon.ifname.clone();
    let interval = "1";
    p.a.wg(&[
        "set",
        &ifa,
        "peer",
        &p.b.pubkey,
        "persistent-keepalive",
        interval,
    ]);
    assert!(
        p.a.wg(&["show", &ifa, "persistent-keepalive"])
            .contains("\t1"),
        "wg show reports the interval"
    );
    let before = udp_datagrams_in(&p.b.ns);
    std::thread::sleep(std::time::Duration::from_millis(4500));
    let arrived = udp_datagrams_in(&p.b.ns) - before;
    // Without persistent keepalive, at most one passive keepalive.
    assert!(arrived >= 3, "{arrived} datagrams reached B in 4.5 idle s");
}

/// The namespace's UDP `InDatagrams` counter (/proc/net/snmp).
fn udp_datagrams_in(ns: &Netns) -> u64 {
    let snmp = ns.ok(&["cat", "/proc/net/snmp"]);
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let column = names
        .split_whitespace()
        .position(|n| n == "InDatagrams")
        .unwrap();
    values
        .split_whitespace()
        .nth(column)
        .unwrap()
        .parse()
        .unwrap()
}

/// Without `--foreground` it daemonizes like wireguard-go: the command
/// returns once the API answers, the daemon lives on in a session of its
/// own, and SIGTERM still removes socket and interface.
#[test]
fn daemonizes_by_default_and_returns_once_the_api_answers() {
    /// SIGKILLs the daemon if the test fails before stopping it.
    struct KillOnDrop(i32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            // SAFETY: kill(2) on a pid; a stale pid only gets ESRCH.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let ns = Netns::new();
    let ifname = unique("wg");
    let log = std::env::temp_dir().join(format!("{ifname}.log"));
    let mut up = ns
        .cmd(&[
            bin().to_str().unwrap(),
            "up",
            &ifname,
            "--log-file",
            log.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = up.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "`up` returns");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success(), "{}", read(&log));
    let pid = daemon_pid(&ifname).expect("the daemon runs on after `up` returns");
    let _guard = KillOnDrop(pid);
    // The daemon let go of the caller's stderr: reading it ends.
    let mut stderr = up.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        let _ = tx.send(text);
    });
    let stderr_text = rx.recv_timeout(std::time::Duration::from_secs(10));
    assert!(
        stderr_text.is_ok(),
        "the daemon still holds the caller's stderr"
    );
    // The parent waited for the API: it answers at once.
    ns.ok(&["wg", "show", &ifname]);
    // SAFETY: getsid(2) only reads.
    assert_eq!(unsafe { libc::getsid(pid) }, pid, "a session of its own");

    // SAFETY: kill(2) on the daemon's pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while alive(pid) {
        assert!(std::time::Instant::now() < deadline, "exits on SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!Path::new(&format!("/var/run/wireguard/{ifname}.sock")).exists());
    assert!(!ns.run(&["ip", "link", "show", &ifname]).status.success());
}

/// Whether `pid` still runs (a zombie that nobody reaped has exited).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| Some(stat.rsplit_once(") ")?.1.starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// The pid of the process whose command line is `... up IFNAME ...`.
fn daemon_pid(ifname: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let is_up = args
                .windows(2)
                .any(|w| w[0] == b"up" && w[1] == ifname.as_bytes());
            is_up.then_some(pid)
        })
}

/// A new listen port rebinds the socket and restarts the data-path thread;
/// a TCP stream running meanwhile arrives intact, and the peer follows the
/// new port from the authenticated packets that come from it.
#[test]
fn listen_port_changes_under_traffic_lose_nothing() {
    let p = pair(115);
    assert_eq!(p.a.ping(p.b.overlay, 2, "0.2"), 2, "session up");
    let ifa = p.a.daemon.ifname.clone();
    let (sent, got) = stream_during(&p, || {
        for port in ["51900", "51901", "51902"] {
            std::thread::sleep(std::time::Duration::from_millis(500));
            p.a.wg(&["set", &ifa, "listen-port", port]);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    });
    assert_eq!(sent, got, "the stream arrives intact");
    assert_eq!(p.a.wg(&["show", &ifa, "listen-port"]).trim(), "51902");
    let endpoints = p.b.wg(&["show", &p.b.daemon.ifname, "endpoints"]);
    assert!(
        endpoints.contains(&format!("{}:51902", p.a.underlay)),
        "{endpoints}"
    );
}

#[test]
fn endpoint_follows_authenticated_packets_when_a_peer_roams() {
    let p = pair(108);
    assert_eq!(p.b.ping(p.a.overlay, 2, "0.2"), 2);
    let ifa = p.a.daemon.ifname.clone();
    let endpoint = || p.a.wg(&["show", &ifa, "endpoints"]);
    assert!(endpoint().contains(&format!("{}:51820", p.b.underlay)));
    // B moves to another underlay address (a VM migrated, a NAT rebound).
    let dev = device_with_addr(&p.b.ns, &p.b.underlay.to_string());
    // Old address first: deleting a primary IPv4 address also removes the
    // secondaries of its subnet.
    let old = format!("{}/24", p.b.underlay);
    p.b.ns.ok(&["ip", "addr", "del", &old, "dev", &dev]);
    p.b.ns
        .ok(&["ip", "addr", "add", "192.168.108.7/24", "dev", &dev]);
    // B's next packets come from the new address; A learns it from them
    // (they authenticate), and A's answers reach B there.
    assert_eq!(
        p.b.ping(p.a.overlay, 3, "0.2"),
        3,
        "traffic follows the roaming peer"
    );
    assert!(
        endpoint().contains("192.168.108.7:51820"),
        "endpoint updated: {}",
        endpoint()
    );
}

#[test]
fn ipv6_inside_the_tunnel_with_segmentation_and_coalescing() {
    let p = pair(109);
    for (s, me, peer) in [(&p.a, "fd77::1", "fd77::2"), (&p.b, "fd77::2", "fd77::1")] {
        let other = if std::ptr::eq(s, &p.a) { &p.b } else { &p.a };
        s.wg(&[
            "set",
            &s.daemon.ifname,
            "peer",
            &other.pubkey,
            "allowed-ips",
            &format!("{}/32,{peer}/128", other.overlay),
        ]);
        s.ns.ok(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{me}/64"),
            "dev",
            &s.daemon.ifname,
            "nodad",
        ]);
    }
    let out = p.a.ns.run(&[
        "ping", "-6", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", "fd77::2",
    ]);
    assert_eq!(
        received(&String::from_utf8_lossy(&out.stdout)),
        3,
        "IPv6 ping"
    );
    let b6: std::net::Ipv6Addr = "fd77::2".parse().unwrap();
    let a6: std::net::Ipv6Addr = "fd77::1".parse().unwrap();
    let (sent, got) = tcp6_transfer(&p.a.ns, &p.b.ns, b6, 16 << 20);
    assert_eq!(sent, got, "16 MiB over IPv6 A -> B");
    let (sent, got) = tcp6_transfer(&p.b.ns, &p.a.ns, a6, 16 << 20);
    assert_eq!(sent, got, "16 MiB over IPv6 B -> A");
}

/// A mesh-node with metrics, not yet configured: a fresh interface.
fn unconfigured_side(ns: Netns, keys: &WgKeys, underlay: std::net::Ipv4Addr, host: u8) -> Side {
    let ifname = unique("wg");
    let daemon = Daemon::mesh_node_with(&ns, bin(), &ifname, &["--metrics-listen", METRICS_ADDR]);
    let key = keys.private(&format!("{ifname}.key"));
    Side {
        pubkey: WgKeys::public(&key),
        ns,
        daemon,
        key,
        underlay,
        overlay: std::net::Ipv4Addr::new(10, 77, 0, host),
    }
}

/// `wg set IF peer KEY allowed-ips ...` on a fresh interface, before any
/// private key (and a listen port before the key too): the kernel and
/// wireguard-go accept both, and so must we. Once the key is set the peer
/// is an ordinary peer: the tunnel carries pings both ways.
#[test]
fn a_peer_set_before_the_private_key_is_accepted_and_works_once_the_key_is_set() {
    let (na, nb) = (Netns::new(), Netns::new());
    let (ua, ub) = link(&na, &nb, 116);
    let keys = WgKeys::new();
    let (a, b) = (
        unconfigured_side(na, &keys, ua, 1),
        unconfigured_side(nb, &keys, ub, 2),
    );
    let ifa = a.daemon.ifname.clone();
    let allowed = format!("{}/32", b.overlay);
    a.wg(&["set", &ifa, "peer", &b.pubkey, "allowed-ips", &allowed]);
    a.wg(&["set", &ifa, "listen-port", "51820"]);
    assert_eq!(
        a.wg(&["show", &ifa, "allowed-ips"]).trim(),
        format!("{}\t{allowed}", b.pubkey),
        "the keyless interface lists the peer"
    );
    assert_eq!(a.metric("mesh_node_uapi_failed_total"), 0);
    // What this data plane cannot do is refused, logged and counted: an
    // empty key file (all zeros: "remove the key" in the kernel).
    let out = a.ns.run(&["wg", "set", &ifa, "private-key", "/dev/null"]);
    assert!(!out.status.success(), "a zero private key is refused");
    assert_eq!(a.metric("mesh_node_uapi_failed_total"), 1);
    assert!(a.daemon.log().contains("not supported"));

    let psk = keys.psk("psk0");
    a.configure(&b, &psk);
    b.configure(&a, &psk);
    assert_eq!(a.ping(b.overlay, 3, "0.2"), 3, "A -> B once A has its key");
    assert_eq!(b.ping(a.overlay, 3, "0.2"), 3, "B -> A");
    assert_eq!(a.metric("mesh_node_uapi_failed_total"), 1);
    let log = a.daemon.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// The userspace API hands out private keys: its socket is 0600.
#[test]
fn the_api_socket_is_readable_by_root_only() {
    use std::os::unix::fs::PermissionsExt;
    let ns = Netns::new();
    let ifname = unique("wg");
    let _daemon = Daemon::mesh_node(&ns, bin(), &ifname);
    let sock = format!("/var/run/wireguard/{ifname}.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o600, "{sock}: {mode:o}");
}
