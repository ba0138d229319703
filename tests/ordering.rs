//! Parallel crypto (`mesh-node up --crypto-threads N`, gotatun patch 6):
//! each peer's packets keep their order through the crypto pool, data
//! arrives intact over a lossy and a reordering underlay, and a removed
//! peer is cut off at once. Real nodes in network namespaces; needs root.
//!
//! The lossy underlay is a UDP relay in a namespace of its own (this
//! kernel has no `netem`; a relay also needs no package): it drops a
//! pseudo-random 1 in 100 of the WireGuard data datagrams, and in the
//! reordering case also holds back 1 in 50 until the next one has passed.
//! The relay forwards each direction in the order it receives.
//!
//! What the order check can see: the TCP sender's `TcpExtTCPSACKReorder`
//! (in A's namespace) counts segments cumulatively acknowledged below one
//! already SACKed although they were never retransmitted: reordering
//! somewhere between the two TCP stacks, which loss alone never produces
//! (measured 0 with and without crypto threads, over veth and the lossy
//! relay; the reordering relay makes it count, so it does see reordering).
//! The receiver's out-of-order queue counter (`TcpExtTCPOFOQueue`, B) is
//! reported but only asserted non-zero on the lossy path: every loss fills
//! it. What the check cannot see: reordering that TCP never notices (none
//! without a hole that the receiver SACKs), and reordering within one
//! coalesced TUN write (mesh-node coalesces only in-order segments).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh-node"))
}

/// How the relay mistreats WireGuard data datagrams (handshakes and
/// keepalives always pass, so sessions come up at once).
#[derive(Clone, Copy)]
struct Impair {
    drop_one_in: u64,
    /// Holds one in this many back until the next one has been sent; 0: never.
    delay_one_in: u64,
}

/// A UDP relay in namespace `ns` between `a` (seen on `a_side`) and `b`
/// (seen on `b_side`); stops on drop.
struct Relay {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    fn new(
        ns: &Netns,
        a_side: SocketAddr,
        a: SocketAddr,
        b_side: SocketAddr,
        b: SocketAddr,
        impair: Impair,
    ) -> Self {
        let bind = |addr: SocketAddr| {
            ns.enter(move || {
                let s = UdpSocket::bind(addr).expect("relay bind");
                // Room for bursts of GSO-sent datagrams: relay drops would
                // only add loss, but keep the loss the test's own.
                let _ = socket2::SockRef::from(&s).set_recv_buffer_size(8 << 20);
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                s
            })
        };
        let (sa, sb) = (bind(a_side), bind(b_side));
        let stop = Arc::new(AtomicBool::new(false));
        let forward = |from: UdpSocket, to_sock: UdpSocket, to: SocketAddr, seed: u64| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rng = seed;
                let mut held: Option<Vec<u8>> = None;
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, _)) = from.recv_from(&mut buf) else {
                        continue;
                    };
                    let datagram = &buf[..n];
                    // WireGuard data with a payload (not a keepalive).
                    if n > 32 && datagram[0] == 4 {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        if rng.is_multiple_of(impair.drop_one_in) {
                            continue;
                        }
                        if held.is_none()
                            && impair.delay_one_in > 0
                            && (rng >> 20).is_multiple_of(impair.delay_one_in)
                        {
                            held = Some(datagram.to_vec());
                            continue;
                        }
                    }
                    let _ = to_sock.send_to(datagram, to);
                    if let Some(late) = held.take() {
                        let _ = to_sock.send_to(&late, to);
                    }
                }
            })
        };
        let threads = vec![
            forward(
                sa.try_clone().unwrap(),
                sb.try_clone().unwrap(),
                b,
                0x9e37_79b9,
            ),
            forward(sb, sa, a, 0x7f4a_7c15),
        ];
        Relay { stop, threads }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One node: namespace, daemon, key.
struct Node {
    ns: Netns,
    daemon: Daemon,
    key: std::path::PathBuf,
    pubkey: String,
    overlay: Ipv4Addr,
    crypto_threads: u16,
}

impl Node {
    fn new(ns: Netns, keys: &WgKeys, crypto_threads: u16, host: u8) -> Self {
        let ifname = unique("wg");
        let threads = crypto_threads.to_string();
        // With crypto threads, also a data-path thread per direction: the
        // layout of a host with more than 4 CPUs.
        let layout = if crypto_threads > 0 { "2" } else { "1" };
        let daemon = Daemon::mesh_node_with(
            &ns,
            bin(),
            &ifname,
            &["--crypto-threads", &threads, "--data-path-threads", layout],
        );
        let key = keys.private(&format!("{ifname}.key"));
        Node {
            pubkey: WgKeys::public(&key),
            ns,
            daemon,
            key,
            overlay: Ipv4Addr::new(10, 78, 0, host),
            crypto_threads,
        }
    }

    fn wg(&self, args: &[&str]) -> String {
        let mut full = vec!["wg"];
        full.extend_from_slice(args);
        self.ns.ok(&full)
    }

    /// Key, port 51820, `peer` reached at `endpoint`, address, link up.
    fn configure(&self, peer: &Node, endpoint: SocketAddr, psk: &Path) {
        let ifname = &self.daemon.ifname;
        self.add_peer(peer, endpoint, psk);
        self.wg(&[
            "set",
            ifname,
            "private-key",
            self.key.to_str().unwrap(),
            "listen-port",
            "51820",
        ]);
        let own = format!("{}/24", self.overlay);
        self.ns.ok(&["ip", "addr", "add", &own, "dev", ifname]);
        self.ns.ok(&["ip", "link", "set", ifname, "up"]);
    }

    fn add_peer(&self, peer: &Node, endpoint: SocketAddr, psk: &Path) {
        self.wg(&[
            "set",
            &self.daemon.ifname,
            "peer",
            &peer.pubkey,
            "preshared-key",
            psk.to_str().unwrap(),
            "endpoint",
            &endpoint.to_string(),
            "allowed-ips",
            &format!("{}/32", peer.overlay),
        ]);
    }

    /// Packets the daemon has written into its TUN interface so far (the
    /// kernel counts them as received on it).
    fn tun_rx_packets(&self) -> u64 {
        let path = format!(
            "/sys/class/net/{}/statistics/rx_packets",
            self.daemon.ifname
        );
        self.ns.ok(&["cat", &path]).trim().parse().unwrap()
    }

    /// Stops the daemon (asserting a clean exit without a panic) and
    /// returns (packets sealed, packets opened) on its crypto pool.
    fn stop(&mut self) -> (u64, u64) {
        assert!(self.daemon.stop(), "clean exit: {}", self.daemon.log());
        let log = self.daemon.log();
        assert!(!log.contains("panicked"), "{log}");
        assert!(
            log.contains(&format!("{} crypto threads", self.crypto_threads)),
            "the daemon ran with the threads asked for: {log}"
        );
        let line = log
            .lines()
            .find_map(|l| Some(l.split_once("crypto pool: ")?.1))
            .unwrap_or_else(|| panic!("no crypto pool line in {log}"));
        // "<sealed> packets sealed, <opened> opened"
        let numbers: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .collect();
        assert_eq!(numbers.len(), 2, "{line}");
        (numbers[0], numbers[1])
    }
}

/// A kernel counter from /proc/net/netstat or /proc/net/snmp in `ns`
/// (`TcpExt`+`TCPOFOQueue` style names, as nstat prints them).
fn kernel_counter(ns: &Netns, name: &str) -> u64 {
    for file in ["/proc/net/netstat", "/proc/net/snmp"] {
        let text = ns.ok(&["cat", file]);
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [head, values] = pair else { continue };
            let (Some((group, names)), Some((_, values))) =
                (head.split_once(':'), values.split_once(':'))
            else {
                continue;
            };
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
                if format!("{group}{n}") == name {
                    return v.parse().unwrap();
                }
            }
        }
    }
    panic!("no kernel counter {name}")
}

/// What one transfer over the relay showed.
#[derive(Debug)]
struct Run {
    intact: bool,
    /// Reordering the TCP sender detected by SACK.
    reordered: u64,
    /// Segments the receiver queued out of order (loss fills this too).
    ofo_queued: u64,
    retransmitted: u64,
    sealed_by_pool: u64,
    opened_by_pool: u64,
}

/// A and B joined by veth, or through a relay namespace that mistreats
/// their packets; `bytes` sent A -> B over TCP.
fn transfer(crypto_threads: u16, relay: Option<Impair>, bytes: usize, subnet: u8) -> Run {
    let port = 51820;
    let sock = |ip: Ipv4Addr| SocketAddr::from((ip, port));
    let (na, nb) = (Netns::new(), Netns::new());
    // Where each side sends to reach the other, and what keeps the path up.
    let (to_b, to_a, _path) = match relay {
        None => {
            let (a_ul, b_ul) = link(&na, &nb, subnet);
            (sock(b_ul), sock(a_ul), None)
        }
        Some(impair) => {
            let nr = Netns::new();
            let (a_ul, ra) = link(&na, &nr, subnet);
            let (rb, b_ul) = link(&nr, &nb, subnet + 1);
            let relay = Relay::new(&nr, sock(ra), sock(a_ul), sock(rb), sock(b_ul), impair);
            (sock(ra), sock(rb), Some((relay, nr)))
        }
    };
    let keys = WgKeys::new();
    let mut a = Node::new(na, &keys, crypto_threads, 1);
    let mut b = Node::new(nb, &keys, crypto_threads, 2);
    let psk = keys.psk("psk");
    a.configure(&b, to_b, &psk);
    b.configure(&a, to_a, &psk);

    // Only SACK's: it counts a segment cumulatively acknowledged below
    // one already SACKed without having been retransmitted, which loss
    // alone never produces. (TCPTSReorder counts spurious retransmissions,
    // which a late ACK on a busy 2-core machine can cause too.)
    let reorder = |ns: &Netns| kernel_counter(ns, "TcpExtTCPSACKReorder");
    let spurious = |ns: &Netns| {
        kernel_counter(ns, "TcpExtTCPTSReorder") + kernel_counter(ns, "TcpExtTCPRenoReorder")
    };
    let spurious0 = spurious(&a.ns);
    let (reorder0, ofo0, retrans0) = (
        reorder(&a.ns),
        kernel_counter(&b.ns, "TcpExtTCPOFOQueue"),
        kernel_counter(&a.ns, "TcpRetransSegs"),
    );
    let (sent, got) = tcp_transfer(&a.ns, &b.ns, b.overlay, bytes);
    let reordered = reorder(&a.ns) - reorder0;
    let spurious = spurious(&a.ns) - spurious0;
    let ofo_queued = kernel_counter(&b.ns, "TcpExtTCPOFOQueue") - ofo0;
    let retransmitted = kernel_counter(&a.ns, "TcpRetransSegs") - retrans0;
    let (sealed_by_pool, _) = a.stop();
    let (_, opened_by_pool) = b.stop();
    let run = Run {
        intact: sent == got,
        reordered,
        ofo_queued,
        retransmitted,
        sealed_by_pool,
        opened_by_pool,
    };
    let underlay = if relay.is_some() { "relay" } else { "veth" };
    eprintln!(
        "{underlay}, crypto threads {crypto_threads}: {run:?}, \
         spurious retransmissions {spurious}"
    );
    run
}

/// 1 in 100 data datagrams lost, in order.
const LOSSY: Impair = Impair {
    drop_one_in: 100,
    delay_one_in: 0,
};

/// With 4 crypto threads, the sender's TSO reads (up to ~45 segments for
/// one peer) are sealed on the pool; over plain veth the receiver gets
/// them as GRO batches of as many and opens them on its pool too (through
/// the relay, which forwards datagram by datagram, it does not). The TCP
/// sender must see no more reordering than with 0 threads.
#[test]
fn crypto_threads_deliver_intact_and_reorder_nothing_over_veth_and_a_lossy_underlay() {
    let bytes = 24 << 20;
    for (relay, subnet) in [(None, 121), (Some(LOSSY), 123)] {
        let inline = transfer(0, relay, bytes, subnet);
        let pooled = transfer(4, relay, bytes, subnet + 2);
        assert!(inline.intact && pooled.intact, "{inline:?} {pooled:?}");
        // The paths really ran: nothing through the pool with 0 threads.
        assert_eq!((inline.sealed_by_pool, inline.opened_by_pool), (0, 0));
        assert!(pooled.sealed_by_pool > 0, "{pooled:?}");
        if relay.is_none() {
            assert!(pooled.opened_by_pool > 0, "{pooled:?}");
        } else {
            assert!(
                pooled.retransmitted > 0 && pooled.ofo_queued > 0,
                "the underlay really lost packets: {pooled:?}"
            );
        }
        assert!(
            pooled.reordered <= inline.reordered,
            "crypto threads reordered packets: {pooled:?}, with 0 threads {inline:?}"
        );
    }
}

#[test]
fn over_a_reordering_lossy_underlay_crypto_threads_deliver_intact() {
    let run = transfer(
        4,
        Some(Impair {
            drop_one_in: 100,
            delay_one_in: 50,
        }),
        16 << 20,
        131,
    );
    assert!(run.intact, "{run:?}");
    assert!(run.sealed_by_pool > 0, "{run:?}");
    // The check above can see reordering: here the relay's is counted.
    assert!(run.reordered > 0, "the underlay really reordered: {run:?}");
}

/// A TCP stream of zeros from `from` to `to_addr` in `to` until stopped;
/// counts the bytes received.
struct Stream {
    received: Arc<AtomicU64>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Stream {
    fn start(from: &Netns, to: &Netns, to_addr: Ipv4Addr) -> Self {
        let listener =
            to.enter(move || TcpListener::bind((to_addr, 0)).expect("bind in namespace"));
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(AtomicU64::new(0));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let (count, held) = (received.clone(), sockets.clone());
        let receiver = std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            held.lock().unwrap().push(s.try_clone().unwrap());
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = s.read(&mut buf) {
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
        let mut out = from.enter(move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect")
        });
        sockets.lock().unwrap().push(out.try_clone().unwrap());
        let sender = std::thread::spawn(move || {
            let buf = vec![0u8; 64 * 1024];
            while out.write_all(&buf).is_ok() {}
        });
        Stream {
            received,
            sockets,
            threads: vec![receiver, sender],
        }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Waits until `bytes` more have arrived (panics after 60 s).
    fn wait_for(&self, bytes: u64) {
        let target = self.received() + bytes;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.received() < target {
            assert!(Instant::now() < deadline, "the stream stalled");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(mut self) {
        for s in self.sockets.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn a_peer_removed_during_a_transfer_is_cut_off_at_once_and_stop_is_clean() {
    let (na, nb) = (Netns::new(), Netns::new());
    let (a_ul, b_ul) = link(&na, &nb, 133);
    let keys = WgKeys::new();
    let mut a = Node::new(na, &keys, 4, 1);
    let mut b = Node::new(nb, &keys, 4, 2);
    let psk = keys.psk("psk");
    let (to_a, to_b) = (
        SocketAddr::from((a_ul, 51820)),
        SocketAddr::from((b_ul, 51820)),
    );
    a.configure(&b, to_b, &psk);
    b.configure(&a, to_a, &psk);

    // A streams to B; B removes A mid-stream.
    let stream = Stream::start(&a.ns, &b.ns, b.overlay);
    stream.wait_for(16 << 20);
    b.wg(&["set", &b.daemon.ifname, "peer", &a.pubkey, "remove"]);
    // A batch accepted before the removal may still be in mesh-node's TUN
    // write (it coalesces a batch, then writes): let that one land.
    std::thread::sleep(Duration::from_millis(200));
    let (tun_after, bytes_after) = (b.tun_rx_packets(), stream.received());
    // A keeps sending (TCP retransmits into the tunnel) for a second.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        b.tun_rx_packets(),
        tun_after,
        "no packet of the removed peer reached B's TUN device"
    );
    assert_eq!(stream.received(), bytes_after, "the stream is cut off");
    assert_eq!(
        a.ns.run(&[
            "ping",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "1",
            &b.overlay.to_string()
        ])
        .status
        .code(),
        Some(1),
        "ping A -> B fails"
    );
    assert!(
        b.wg(&["show", &b.daemon.ifname, "peers"]).trim().is_empty(),
        "B's daemon is up and has no peer"
    );
    stream.stop();

    // A back in; B streams to A (B seals on its pool) and is stopped mid-stream.
    b.add_peer(&a, to_a, &psk);
    let stream = Stream::start(&b.ns, &a.ns, a.overlay);
    stream.wait_for(16 << 20);
    let (sealed, _) = b.stop();
    assert!(sealed > 0, "B sealed on its pool before it stopped");
    stream.stop();
    let (_, opened) = a.stop();
    eprintln!("B sealed {sealed} on its pool, A opened {opened}");
}
