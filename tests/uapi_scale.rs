//! The userspace API at scale (issue 11): a `set` is parsed and applied as
//! it streams in, so a 10,000-peer `wg setconf` applies (requests over
//! 1 MiB were refused and `wg` died of SIGPIPE), a refusal leaves the
//! connection usable, and an over-long line costs no memory. Needs root.
//!
//! `wg setconf` wall times are printed (run with `--nocapture`), never
//! asserted. `MESH_NODE_BIN=target/release/mesh-node` times a release build
//! instead of the test profile's.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use mesh_proto::uapi;

fn bin() -> PathBuf {
    std::env::var_os("MESH_NODE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_mesh-node")))
}

/// A mesh-node in a namespace of its own, with a private key file.
struct Node {
    ns: Netns,
    daemon: Daemon,
    keys: WgKeys,
    key: PathBuf,
}

impl Node {
    fn new() -> Self {
        let ns = Netns::new();
        let ifname = unique("wg");
        let daemon = Daemon::mesh_node(&ns, &bin(), &ifname);
        let keys = WgKeys::new();
        let key = keys.private("if.key");
        Node {
            ns,
            daemon,
            keys,
            key,
        }
    }

    fn ifname(&self) -> &str {
        &self.daemon.ifname
    }

    fn socket(&self) -> String {
        format!("/var/run/wireguard/{}.sock", self.ifname())
    }

    /// `wg setconf` with the peers `peers` (indexes into [`peer_key`]);
    /// returns its wall time.
    fn setconf(&self, peers: impl Iterator<Item = u32>) -> Duration {
        let private = std::fs::read_to_string(&self.key).unwrap();
        let mut conf = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\n\n",
            private.trim()
        );
        for i in peers {
            conf += &format!(
                "[Peer]\nPublicKey = {}\nAllowedIPs = {}\n\n",
                peer_key(i),
                peer_ip(i)
            );
        }
        let path = self.keys.dir.path().join("wg.conf");
        std::fs::write(&path, conf).unwrap();
        let start = Instant::now();
        self.ns
            .ok(&["wg", "setconf", self.ifname(), path.to_str().unwrap()]);
        start.elapsed()
    }

    /// The public keys `wg show IF peers` lists.
    fn peers(&self) -> Vec<String> {
        self.ns
            .ok(&["wg", "show", self.ifname(), "peers"])
            .lines()
            .map(String::from)
            .collect()
    }

    fn pid(&self) -> i32 {
        daemon_pid(self.ifname()).expect("the daemon's pid")
    }
}

/// A distinct public key per index (any 32 bytes are an X25519 key).
fn peer_key(i: u32) -> String {
    let mut key = [0x5a_u8; 32];
    key[..4].copy_from_slice(&i.to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// A distinct /32 per index.
fn peer_ip(i: u32) -> String {
    let [_, b, c, d] = i.to_be_bytes();
    format!("10.{b}.{c}.{d}/32")
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

/// A `VmXxx:` field of /proc/PID/status, in KiB.
fn vm_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

/// One request on an open connection and its answer, up to `errno=N` and
/// the empty line after it.
fn exchange(stream: &mut BufReader<UnixStream>, request: &[u8]) -> String {
    stream.get_mut().write_all(request).unwrap();
    let mut answer = String::new();
    loop {
        let before = answer.len();
        let n = stream.read_line(&mut answer).unwrap();
        assert_ne!(n, 0, "the connection closed mid-answer: {answer:?}");
        if &answer[before..] == "\n"
            && answer[..before]
                .lines()
                .last()
                .is_some_and(|l| l.starts_with("errno="))
        {
            return answer;
        }
    }
}

fn connect(node: &Node) -> BufReader<UnixStream> {
    let stream = UnixStream::connect(node.socket()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    BufReader::new(stream)
}

/// 1,000 and 10,000 peers by `wg setconf` (each on a fresh interface), then
/// a `setconf` (`replace_peers=true`) that lists 9,000 of the 10,000 and
/// 1,000 new ones: the listed stay, the unlisted go.
#[test]
fn ten_thousand_peers_apply_by_wg_setconf_and_replace_peers_keeps_only_the_listed() {
    let which = bin();
    let small = Node::new();
    let t1k = small.setconf(0..1_000);
    assert_eq!(small.peers().len(), 1_000);
    drop(small);

    let node = Node::new();
    let t10k = node.setconf(0..10_000);
    let listed = node.peers();
    assert_eq!(listed.len(), 10_000, "`wg show IF peers | wc -l`");
    let want: BTreeSet<String> = (0..10_000).map(peer_key).collect();
    assert_eq!(listed.into_iter().collect::<BTreeSet<_>>(), want);

    let t_replace = node.setconf(1_000..11_000);
    let got: BTreeSet<String> = node.peers().into_iter().collect();
    let want: BTreeSet<String> = (1_000..11_000).map(peer_key).collect();
    assert_eq!(got.len(), 10_000);
    assert!(got == want, "exactly the listed peers remain");
    // A kept peer is reset to what the request says.
    let allowed = node.ns.ok(&["wg", "show", node.ifname(), "allowed-ips"]);
    let line = format!("{}\t{}", peer_key(5_000), peer_ip(5_000));
    assert!(allowed.lines().any(|l| l == line), "{line} in allowed-ips");

    println!(
        "uapi_scale: wg setconf wall time with {} (cargo profile of the test unless \
         MESH_NODE_BIN): 1,000 peers {:.2} s, 10,000 peers {:.2} s, re-listing 10,000 \
         (9,000 kept, 1,000 new, 1,000 removed) {:.2} s",
        which.display(),
        t1k.as_secs_f64(),
        t10k.as_secs_f64(),
        t_replace.as_secs_f64()
    );
    assert!(!node.daemon.log().contains("panicked"));
}

/// A ~5 MB request with a bad line in its middle: the peers before it are
/// applied, those after it are not, the answer is an errno, and the same
/// connection serves the next request.
#[test]
fn a_bad_line_mid_request_answers_errno_and_the_connection_serves_on() {
    let node = Node::new();
    let mut conn = connect(&node);
    let hex = |i: u32| {
        let key = base64::engine::general_purpose::STANDARD
            .decode(peer_key(i))
            .unwrap();
        key.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let mut request = String::from("set=1\n");
    // Valid filler lines: ~2.5 MB on each side of the bad line.
    let filler = "protocol_version=1\n".repeat(130_000);
    request += &filler;
    for i in 0..3 {
        request += &format!("public_key={}\nallowed_ip={}\n", hex(i), peer_ip(i));
    }
    request += "allowed_ip=10.0.0.300/32\n";
    for i in 3..6 {
        request += &format!("public_key={}\nallowed_ip={}\n", hex(i), peer_ip(i));
    }
    request += &filler.replace("protocol_version", "persistent_keepalive_interval");
    request += "\n";
    assert!(request.len() > 4 << 20, "{} bytes", request.len());

    let answer = exchange(&mut conn, request.as_bytes());
    assert_eq!(answer, uapi::format_errno(uapi::EINVAL), "{answer:?}");

    // The connection is still in step: a get on it answers.
    let answer = exchange(&mut conn, b"get=1\n\n");
    let info = uapi::parse_get_response(&answer)
        .expect("a get answer")
        .expect("errno=0");
    let keys: BTreeSet<[u8; 32]> = info.peers.iter().map(|p| p.public_key.0).collect();
    let key = |i: u32| -> [u8; 32] {
        base64::engine::general_purpose::STANDARD
            .decode(peer_key(i))
            .unwrap()
            .try_into()
            .unwrap()
    };
    // Peers 0 and 1 were complete before the bad line; peer 2 held it.
    assert_eq!(keys, [key(0), key(1)].into_iter().collect());
    // And a set on it applies.
    let set = format!("set=1\npublic_key={}\n\n", hex(9));
    assert_eq!(exchange(&mut conn, set.as_bytes()), uapi::format_errno(0));
    assert_eq!(node.peers().len(), 3);
    assert!(node.daemon.log().contains("refused request"));
}

/// A single 1 MiB line is refused (EPROTO) after reading at most one
/// line's worth of it into memory: the daemon's peak resident set does not
/// grow by the line's size, and the connection serves on.
#[test]
fn a_one_megabyte_line_is_refused_without_growing_memory() {
    let node = Node::new();
    let pid = node.pid();
    let mut conn = connect(&node);
    // Warm the connection's path (task, buffers) before measuring.
    let answer = exchange(&mut conn, b"get=1\n\n");
    assert!(answer.ends_with("errno=0\n\n"), "{answer:?}");

    // Reset the peak (VmHWM) to the current resident set.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let before = vm_kib(pid, "VmRSS:");
    let mut request = b"set=1\nprivate_key=".to_vec();
    request.extend(std::iter::repeat_n(b'a', 1 << 20));
    request.extend_from_slice(b"\nlisten_port=9\n\n");
    let answer = exchange(&mut conn, &request);
    assert_eq!(answer, uapi::format_errno(uapi::EPROTO), "{answer:?}");
    let peak = vm_kib(pid, "VmHWM:");
    println!("uapi_scale: 1 MiB line: VmRSS before {before} KiB, peak while refusing {peak} KiB");
    assert!(
        peak < before + 512,
        "peak {peak} KiB vs {before} KiB before: the line was buffered"
    );

    // Nothing of the refused request was applied; the connection serves on.
    let answer = exchange(&mut conn, b"get=1\n\n");
    let info = uapi::parse_get_response(&answer).unwrap().unwrap();
    assert_ne!(info.listen_port, 9);
    assert!(node.daemon.log().contains("refused request"));
}
