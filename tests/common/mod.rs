//! Harness for end-to-end tests in Linux network namespaces (root only).
//!
//! Everything a test creates is owned by a value whose `Drop` removes it:
//! daemons are stopped, namespaces (and with them their veth ends and
//! WireGuard interfaces) are deleted, even when the test panics. Names carry
//! the process id so parallel test binaries never collide. Traffic only flows
//! between addresses inside the namespaces created here.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process: `<prefix><pid mod 10^5><n>`.
pub fn unique(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs and asserts success.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "end-to-end tests need root (network namespaces, TUN); run scripts/test as root"
    );
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Self {
        require_root();
        let name = unique("pqt");
        ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    pub fn ok(&self, args: &[&str]) -> String {
        ok(&mut self.cmd(args))
    }

    pub fn run(&self, args: &[&str]) -> Output {
        run(&mut self.cmd(args))
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it
    /// creates live in the namespace and may be used from any thread.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Connects two namespaces with a veth pair on 192.168.<subnet>.1 and .2.
pub fn link(a: &Netns, b: &Netns, subnet: u8) -> (Ipv4Addr, Ipv4Addr) {
    let (ia, ib) = (unique("va"), unique("vb"));
    ok(Command::new("ip").args(["link", "add", &ia, "type", "veth", "peer", "name", &ib]));
    ok(Command::new("ip").args(["link", "set", &ia, "netns", &a.name]));
    ok(Command::new("ip").args(["link", "set", &ib, "netns", &b.name]));
    let (aa, ab) = (
        Ipv4Addr::new(192, 168, subnet, 1),
        Ipv4Addr::new(192, 168, subnet, 2),
    );
    for (ns, ifname, addr) in [(a, &ia, aa), (b, &ib, ab)] {
        ns.ok(&["ip", "addr", "add", &format!("{addr}/24"), "dev", ifname]);
        ns.ok(&["ip", "link", "set", ifname, "up"]);
    }
    (aa, ab)
}

/// Where a test's mesh-node serves metrics, inside its own namespace.
pub const METRICS_ADDR: &str = "127.0.0.1:9586";

/// A WireGuard daemon (mesh-node or wireguard-go) in a namespace, stopped on drop.
pub struct Daemon {
    pub ifname: String,
    pub ns_name: String,
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// `mesh-node up IF --foreground`.
    pub fn mesh_node(ns: &Netns, bin: &Path, ifname: &str) -> Self {
        Self::mesh_node_with(ns, bin, ifname, &[])
    }

    /// `mesh-node up IF --foreground EXTRA...`.
    pub fn mesh_node_with(ns: &Netns, bin: &Path, ifname: &str, extra: &[&str]) -> Self {
        let log = std::env::temp_dir().join(format!("{ifname}.log"));
        let mut args = vec![
            bin.to_str().unwrap(),
            "up",
            ifname,
            "--foreground",
            "--log-file",
            log.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let child = ns
            .cmd(&args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn mesh-node");
        Self::ready(ns, ifname, child, log)
    }

    /// Debian's wireguard-go, in the foreground.
    pub fn wireguard_go(ns: &Netns, ifname: &str) -> Self {
        let log = std::env::temp_dir().join(format!("{ifname}.log"));
        let child = ns
            .cmd(&["wireguard-go", "-f", ifname])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .env("LOG_LEVEL", "error")
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn wireguard-go (apt-get install wireguard-go)");
        Self::ready(ns, ifname, child, log)
    }

    fn ready(ns: &Netns, ifname: &str, mut child: Child, log: PathBuf) -> Self {
        let socket = format!("/var/run/wireguard/{ifname}.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{ifname} daemon exited ({status}): {}", read(&log));
            }
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{ifname} not ready: {}",
                read(&log)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            ifname: ifname.to_string(),
            ns_name: ns.name.clone(),
            child,
            log,
        }
    }

    /// Sends SIGTERM and waits; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    pub fn log(&self) -> String {
        read(&self.log)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// A file's text, or "" when it cannot be read (a log that is not there yet).
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A key from `wg genkey` / `wg genpsk`, written 0600 in a temp dir.
pub struct WgKeys {
    pub dir: tempfile::TempDir,
}

impl WgKeys {
    pub fn new() -> Self {
        WgKeys {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, name: &str, gen_cmd: &str) -> PathBuf {
        use std::os::unix::fs::OpenOptionsExt;
        let key = ok(Command::new("wg").arg(gen_cmd));
        let path = self.dir.path().join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        f.write_all(key.as_bytes()).unwrap();
        path
    }

    pub fn private(&self, name: &str) -> PathBuf {
        self.write(name, "genkey")
    }

    pub fn psk(&self, name: &str) -> PathBuf {
        self.write(name, "genpsk")
    }

    pub fn public(private: &Path) -> String {
        let mut child = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(std::fs::read(private).unwrap().as_slice())
            .unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string()
    }
}

/// One side of a two-node WireGuard test: its namespace, daemon and keys.
pub struct Side {
    pub ns: Netns,
    pub daemon: Daemon,
    pub key: PathBuf,
    pub pubkey: String,
    pub underlay: Ipv4Addr,
    pub overlay: Ipv4Addr,
}

impl Side {
    pub fn wg(&self, args: &[&str]) -> String {
        let mut full = vec!["wg"];
        full.extend_from_slice(args);
        self.ns.ok(&full)
    }

    /// Configures the interface key and port, one peer, address and link.
    pub fn configure(&self, peer: &Side, psk: &Path) {
        let ifname = &self.daemon.ifname;
        self.wg(&[
            "set",
            ifname,
            "private-key",
            self.key.to_str().unwrap(),
            "listen-port",
            "51820",
            "peer",
            &peer.pubkey,
            "preshared-key",
            psk.to_str().unwrap(),
            "endpoint",
            &format!("{}:51820", peer.underlay),
            "allowed-ips",
            &format!("{}/32", peer.overlay),
        ]);
        self.ns.ok(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", self.overlay),
            "dev",
            ifname,
        ]);
        self.ns.ok(&["ip", "link", "set", ifname, "up"]);
    }

    /// The value of a Prometheus counter from this side's mesh-node.
    pub fn metric(&self, name: &str) -> u64 {
        let body = self.ns.enter(|| {
            let mut s = TcpStream::connect(METRICS_ADDR).expect("metrics endpoint");
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            body
        });
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in {body}"))
    }

    pub fn set_psk(&self, peer: &Side, psk: &Path) {
        self.wg(&[
            "set",
            &self.daemon.ifname,
            "peer",
            &peer.pubkey,
            "preshared-key",
            psk.to_str().unwrap(),
        ]);
    }

    /// Pings `to` `count` times at `interval_s`; returns packets received.
    pub fn ping(&self, to: Ipv4Addr, count: u32, interval_s: &str) -> u32 {
        let out = self.ns.run(&[
            "ping",
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            interval_s,
            "-W",
            "1",
            &to.to_string(),
        ]);
        received(&String::from_utf8_lossy(&out.stdout))
    }
}

/// Parses `N received` from ping's summary.
pub fn received(ping_output: &str) -> u32 {
    ping_output
        .split(',')
        .find_map(|part| part.trim().strip_suffix(" received")?.parse().ok())
        .unwrap_or(0)
}

/// [`tcp_transfer`] to an IPv6 address.
pub fn tcp6_transfer(
    from: &Netns,
    to: &Netns,
    to_addr: std::net::Ipv6Addr,
    len: usize,
) -> ([u8; 32], [u8; 32]) {
    transfer_to(from, to, std::net::IpAddr::V6(to_addr), move |sent| {
        sent < len
    })
}

/// Sends `len` pseudo-random bytes from `from` to `to` over TCP and returns
/// (sent digest, received digest).
pub fn tcp_transfer(
    from: &Netns,
    to: &Netns,
    to_addr: Ipv4Addr,
    len: usize,
) -> ([u8; 32], [u8; 32]) {
    tcp_transfer_while(from, to, to_addr, move |sent| sent < len)
}

/// Streams pseudo-random bytes while `more(bytes_sent_so_far)` holds.
/// Returns (sent digest, received digest).
pub fn tcp_transfer_while(
    from: &Netns,
    to: &Netns,
    to_addr: Ipv4Addr,
    more: impl Fn(usize) -> bool,
) -> ([u8; 32], [u8; 32]) {
    transfer_to(from, to, std::net::IpAddr::V4(to_addr), more)
}

fn transfer_to(
    from: &Netns,
    to: &Netns,
    to_addr: std::net::IpAddr,
    more: impl Fn(usize) -> bool,
) -> ([u8; 32], [u8; 32]) {
    let listener = to.enter(move || TcpListener::bind((to_addr, 0)).expect("bind in namespace"));
    let addr: SocketAddr = listener.local_addr().unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => h.update(&buf[..n]),
                Err(e) => panic!("receive: {e}"),
            }
        }
        <[u8; 32]>::from(h.finalize())
    });
    let stream = from.enter(move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect")
    });
    let sent = send_pattern(stream, more);
    (sent, receiver.join().expect("receiver"))
}

fn send_pattern(mut s: TcpStream, more: impl Fn(usize) -> bool) -> [u8; 32] {
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut h = Sha256::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0;
    while more(sent) {
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        s.write_all(&buf).expect("send");
        h.update(&buf);
        sent += buf.len();
    }
    drop(s);
    h.finalize().into()
}

/// Which WireGuard implementation runs on a side.
#[derive(Clone, Copy)]
pub enum Impl<'a> {
    MeshNode(&'a Path),
    /// mesh-node on gotatun's own transports (`--transports default`).
    MeshNodeDefaultTransports(&'a Path),
    /// mesh-node whose data-path thread never busy-polls (`--busy-poll-us 0`).
    MeshNodeSleepingDataPath(&'a Path),
    WireguardGo,
}

/// Two namespaces joined by veth, a WireGuard daemon in each, configured
/// with `wg set` and a shared preshared key; overlay 10.77.0.1 and .2.
pub struct Pair {
    pub a: Side,
    pub b: Side,
    pub keys: WgKeys,
}

impl Pair {
    pub fn new(subnet: u8, impl_a: Impl, impl_b: Impl) -> Self {
        let (na, nb) = (Netns::new(), Netns::new());
        let (ua, ub) = link(&na, &nb, subnet);
        let keys = WgKeys::new();
        let side = |ns: Netns, which: Impl, underlay, host| {
            let ifname = unique("wg");
            let daemon = match which {
                Impl::MeshNode(bin) => Daemon::mesh_node(&ns, bin, &ifname),
                Impl::MeshNodeDefaultTransports(bin) => {
                    Daemon::mesh_node_with(&ns, bin, &ifname, &["--transports", "default"])
                }
                Impl::MeshNodeSleepingDataPath(bin) => {
                    Daemon::mesh_node_with(&ns, bin, &ifname, &["--busy-poll-us", "0"])
                }
                Impl::WireguardGo => Daemon::wireguard_go(&ns, &ifname),
            };
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
        let (a, b) = (side(na, impl_a, ua, 1), side(nb, impl_b, ub, 2));
        let psk = keys.psk("psk0");
        a.configure(&b, &psk);
        b.configure(&a, &psk);
        Pair { a, b, keys }
    }
}

/// The interface in `ns` that holds the IPv4 address `addr`.
pub fn device_with_addr(ns: &Netns, addr: &str) -> String {
    let addrs = ns.ok(&["ip", "-o", "-4", "addr", "show"]);
    let line = addrs
        .lines()
        .find(|l| l.contains(&format!(" {addr}/")))
        .unwrap_or_else(|| panic!("no interface holds {addr}: {addrs}"));
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .split('@')
        .next()
        .unwrap()
        .to_string()
}

/// A TCP stream from A to B that runs exactly as long as `during` does;
/// returns (sent digest, received digest).
pub fn stream_during(p: &Pair, during: impl FnOnce()) -> ([u8; 32], [u8; 32]) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let done = Arc::new(AtomicBool::new(false));
    let (na, nb, to, flag) = (
        p.a.ns.name.clone(),
        p.b.ns.name.clone(),
        p.b.overlay,
        done.clone(),
    );
    let transfer = std::thread::spawn(move || {
        let (a, b) = (Netns { name: na }, Netns { name: nb });
        let result = tcp_transfer_while(&a, &b, to, |_| !flag.load(Ordering::Relaxed));
        // The namespaces belong to `p`: do not delete them here.
        std::mem::forget((a, b));
        result
    });
    during();
    done.store(true, Ordering::Relaxed);
    transfer.join().expect("transfer thread")
}
