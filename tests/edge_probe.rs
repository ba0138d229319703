//! Path probes against a real mesh-node (issue 12, the direct rung): keyd's
//! prober gets answers from a data plane's WireGuard port, what is not a
//! well-formed request gets none, a flood is answered only up to the token
//! bucket, and WireGuard traffic through the same socket keeps flowing.
//! Root only: network namespaces, TUN.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use keyd::edge::prober::{ProbeError, Prober};
use mesh_proto::probe::{LEN, Probe};

/// mesh-node's answer budget (mesh-node/src/transports/probe.rs).
const BURST: u64 = 200;
const RATE_PER_S: u64 = 2_000;
/// Long enough never to fire where an answer is due.
const PATIENT: Duration = Duration::from_secs(10);

const ANSWERED: &str = "mesh_node_probes_answered_total";
const RESPONSES_DROPPED: &str = "mesh_node_probe_responses_dropped_total";
const RATE_LIMITED: &str = "mesh_node_probes_rate_limited_total";
const ANSWER_FAILED: &str = "mesh_node_probe_answers_failed_total";

/// mesh-node sits next to keyd in cargo's target directory.
fn mesh_node_bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_keyd")).with_file_name("mesh-node");
    assert!(
        bin.exists(),
        "build mesh-node first: cargo build -p mesh-node ({})",
        bin.display()
    );
    bin
}

/// Two namespaces on veth, a mesh-node with metrics in each, configured as
/// WireGuard peers on port 51820 (overlay 10.77.0.1 and .2).
fn pair(subnet: u8) -> (Side, Side, WgKeys) {
    require_root();
    let bin = mesh_node_bin();
    let (na, nb) = (Netns::new(), Netns::new());
    let (ua, ub) = link(&na, &nb, subnet);
    let keys = WgKeys::new();
    let side = |ns: Netns, underlay, host| {
        let ifname = unique("wg");
        let daemon =
            Daemon::mesh_node_with(&ns, &bin, &ifname, &["--metrics-listen", METRICS_ADDR]);
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
    let (a, b) = (side(na, ua, 1), side(nb, ub, 2));
    let psk = keys.psk("psk0");
    a.configure(&b, &psk);
    b.configure(&a, &psk);
    (a, b, keys)
}

fn wg_port(side: &Side) -> SocketAddr {
    SocketAddr::from((side.underlay, 51820))
}

/// Runs `f` on a tokio runtime in `ns` (sockets it makes live there).
fn in_ns<T: Send + 'static>(ns: &Netns, f: impl AsyncFnOnce() -> T + Send + 'static) -> T {
    ns.enter(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(f())
    })
}

#[test]
fn a_keyd_prober_gets_answers_from_mesh_node_and_malformed_probes_get_none() {
    let (a, b, _keys) = pair(141);
    let (from, target) = (SocketAddr::from((a.underlay, 0)), wg_port(&b));
    let silent = SocketAddr::from((b.underlay, 51821));
    let (rtt, nothing_there, stats) = in_ns(&a.ns, async move || {
        let prober = Prober::bind(from).await.expect("bind the prober");
        let rtt = prober.probe(target, PATIENT).await;
        // Nothing listens on the port next to it: no answer.
        let nothing = prober.probe(silent, Duration::from_millis(300)).await;
        (rtt, nothing, prober.stats())
    });
    let rtt = rtt.expect("mesh-node answers the probe");
    assert!(rtt > Duration::ZERO && rtt < PATIENT, "{rtt:?}");
    assert!(
        matches!(nothing_there, Err(ProbeError::Timeout)),
        "{nothing_there:?}"
    );
    assert_eq!((stats.answered, stats.ignored), (1, 0), "{stats:?}");
    assert_eq!(b.metric(ANSWERED), 1);

    // Not requests: too short, too long, non-zero padding, a broken magic,
    // and a response (dropped and counted). Then one good request; since
    // mesh-node handles datagrams in order, the first thing to come back
    // must be its answer.
    let good = Probe::request([0x5a; 16]);
    let mut bad: Vec<Vec<u8>> = vec![good[..LEN - 1].to_vec(), [&good[..], &[0]].concat()];
    for i in [4, 7, 0, 3] {
        let mut p = good;
        p[i] ^= 0x01;
        bad.push(p.to_vec());
    }
    bad.push(Probe::response([0x5a; 16]).to_vec());
    let first = a.ns.enter(move || {
        let s = UdpSocket::bind(from).unwrap();
        s.set_read_timeout(Some(PATIENT)).unwrap();
        for p in &bad {
            s.send_to(p, target).unwrap();
        }
        s.send_to(&good, target).unwrap();
        let mut buf = [0u8; 64];
        let (n, src) = s.recv_from(&mut buf).expect("the good request is answered");
        (buf[..n].to_vec(), src)
    });
    assert_eq!(first, (Probe::response([0x5a; 16]).to_vec(), target));
    assert_eq!(b.metric(ANSWERED), 2, "only the good request is answered");
    assert_eq!(b.metric(RESPONSES_DROPPED), 1);
    assert_eq!(b.metric(RATE_LIMITED), 0);
    // Nothing of it upset the tunnel.
    assert_eq!(a.ping(b.overlay, 3, "0.2"), 3);
}

#[test]
fn a_flood_is_answered_only_up_to_the_bucket_while_wireguard_keeps_working() {
    let (a, b, _keys) = pair(142);
    assert_eq!(a.ping(b.overlay, 3, "0.2"), 3, "the tunnel is up");
    let before: Vec<u64> = [ANSWERED, RATE_LIMITED, ANSWER_FAILED]
        .iter()
        .map(|m| b.metric(m))
        .collect();
    assert_eq!(before, [0, 0, 0]);

    // Requests at ~20,000/s (ten times the answer rate) to B's WireGuard
    // port from A while A pings B through the tunnel on that same port.
    let (from, target) = (SocketAddr::from((a.underlay, 0)), wg_port(&b));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let (sent, pings) = std::thread::scope(|scope| {
        let flag = stop.clone();
        let flood = scope.spawn(|| {
            a.ns.enter(move || {
                let s = UdpSocket::bind(from).unwrap();
                let mut sent = 0u64;
                let mut nonce = [0u8; 16];
                // Bounded even if the ping never ends.
                while !flag.load(Ordering::Relaxed) && sent < 2_000_000 {
                    for _ in 0..200 {
                        nonce[..8].copy_from_slice(&sent.to_be_bytes());
                        if s.send_to(&Probe::request(nonce), target).is_ok() {
                            sent += 1;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                sent
            })
        });
        let pings = a.ping(b.overlay, 20, "0.05");
        stop.store(true, Ordering::Relaxed);
        (flood.join().expect("flood thread"), pings)
    });
    assert_eq!(pings, 20, "every ping crosses the tunnel during the flood");
    // A ping after the flood reaches B behind every flood datagram (one
    // veth, one socket, in order): B has judged them all once it returns.
    assert_eq!(a.ping(b.overlay, 1, "0.2"), 1);
    let answered = b.metric(ANSWERED);
    let limited = b.metric(RATE_LIMITED);
    let failed = b.metric(ANSWER_FAILED);
    let elapsed = start.elapsed();
    eprintln!(
        "flood: {sent} requests in {elapsed:?}: {answered} answered ({failed} refused by the socket), {limited} rate limited"
    );

    // The bucket starts full: the burst is answered. Past it, at most the
    // rate over the time the flood lasted, and the rest is dropped and
    // counted. (Answers the socket refused count among the answered.)
    let budget = BURST + (RATE_PER_S * elapsed.as_millis() as u64).div_ceil(1_000) + 1;
    assert!(answered >= BURST, "answered {answered} of {sent}");
    assert!(
        answered <= budget,
        "answered {answered} > {budget} in {elapsed:?}"
    );
    assert!(failed <= answered, "{failed} failed of {answered}");
    assert!(limited > 0, "{sent} requests, none rate limited");
    assert!(
        answered + limited <= sent,
        "{answered} + {limited} > {sent} sent"
    );
    // One warning per watcher period, not one per probe.
    let log = b.daemon.log();
    let lines = log.matches("over the answer rate limit").count();
    assert!(lines <= 1 + elapsed.as_secs() as usize / 10, "{log}");
}
