//! The mesh harness shared by the end-to-end tests (tests/mesh.rs,
//! tests/edge.rs): N nodes in network namespaces on one bridge, each with its
//! WireGuard data plane (mesh-node or wireguard-go) and its keyd, the CA, keys,
//! certificates and roster made with the real `keyd` CLI. Needs root.
//!
//! Included with `#[path = "common/mesh.rs"] mod mesh;` next to `mod common;`
//! by keyd's test binaries only: it needs `CARGO_BIN_EXE_keyd` and serde_json,
//! which mesh-node's test binaries (they also include tests/common) lack.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

pub fn keyd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keyd"))
}

pub fn mesh_node_bin() -> PathBuf {
    let bin = keyd_bin().with_file_name("mesh-node");
    assert!(
        bin.exists(),
        "build mesh-node first: cargo build -p mesh-node ({})",
        bin.display()
    );
    bin
}

pub fn keyd(args: &[&str]) -> String {
    ok(Command::new(keyd_bin()).args(args))
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A keyd process in a namespace, killed on drop.
pub struct Keyd(pub Child);

impl Drop for Keyd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Node {
    pub ns: Netns,
    pub dir: PathBuf,
    pub ifname: String,
    pub overlay: String,
    pub daemon: Option<Daemon>,
    pub keyd: Option<Keyd>,
}

pub struct Mesh {
    pub nodes: Vec<Node>,
    pub lan: Netns,
    pub work: tempfile::TempDir,
    pub rotation: &'static str,
    /// `CERT,wg=..,keyd=..` per node, for `keyd roster build`.
    pub members: Vec<String>,
    pub skew: &'static str,
    /// Appended to node i's keyd.toml: (node index, TOML).
    pub extra_config: Vec<(usize, &'static str)>,
}

#[derive(Default)]
pub struct Opts {
    /// How many nodes the first roster lists (default: all).
    pub listed: Option<usize>,
    /// (node index, --valid) for a certificate that expires soon.
    pub short_lived: Option<(usize, &'static str)>,
    /// keyd's max_clock_skew (default 300s).
    pub skew: &'static str,
    /// TOML appended to a node's keyd.toml (after every top-level key, so
    /// it may open sections such as `[edge]`): (node index, TOML).
    pub extra_config: Vec<(usize, &'static str)>,
    /// Certificate groups: (node index, group), repeatable.
    pub groups: Vec<(usize, &'static str)>,
    /// A firewall policy (TOML source) for the first roster.
    pub policy: Option<&'static str>,
}

#[derive(Clone, Copy, PartialEq)]
pub enum Plane {
    MeshNode,
    WireguardGo,
}

impl Mesh {
    /// `planes[i]` is node i+1's data plane. Underlay 192.168.<subnet>.i.
    pub fn new(subnet: u8, planes: &[Plane], rotation: &'static str) -> Self {
        Self::with(subnet, planes, rotation, Opts::default())
    }

    pub fn with(subnet: u8, planes: &[Plane], rotation: &'static str, opts: Opts) -> Self {
        let lan = Netns::new();
        lan.ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        lan.ok(&["ip", "link", "set", "br0", "up"]);
        let work = tempfile::tempdir().unwrap();
        let ca = work.path().join("ca");
        keyd(&["ca", "create", "--network", "e2e", "--dir", p(&ca)]);
        let mut nodes = Vec::new();
        let mut members = Vec::new();
        for (i, _) in planes.iter().enumerate() {
            let i = i + 1;
            let ns = Netns::new();
            let (nic, lan_end) = (unique("mn"), unique("ml"));
            ok(Command::new("ip").args([
                "link", "add", &nic, "type", "veth", "peer", "name", &lan_end,
            ]));
            ok(Command::new("ip").args(["link", "set", &nic, "netns", &ns.name]));
            ok(Command::new("ip").args(["link", "set", &lan_end, "netns", &lan.name]));
            lan.ok(&["ip", "link", "set", &lan_end, "master", "br0", "up"]);
            ns.ok(&[
                "ip",
                "addr",
                "add",
                &format!("192.168.{subnet}.{i}/24"),
                "dev",
                &nic,
            ]);
            ns.ok(&["ip", "link", "set", &nic, "up"]);
            let dir = work.path().join(format!("node{i}"));
            keyd(&["key", "generate", "--dir", p(&dir)]);
            let overlay = format!("10.98.{subnet}.{i}");
            let name = format!("node{i}");
            let address = format!("{overlay}/24");
            let crt = dir.join("node.crt");
            let mut args = vec![
                "cert",
                "issue",
                "--ca-dir",
                p(&ca),
                "--name",
                &name,
                "--address",
                &address,
                "--key-dir",
                p(&dir),
                "--out",
                p(&crt),
                "--valid",
                opts.short_lived
                    .filter(|(n, _)| *n == i - 1)
                    .map_or("1d", |(_, v)| v),
            ];
            for (_, g) in opts.groups.iter().filter(|(n, _)| *n == i - 1) {
                args.extend(["--group", g]);
            }
            keyd(&args);
            members.push(format!(
                "{},wg=192.168.{subnet}.{i}:51820,keyd=192.168.{subnet}.{i}:51821",
                p(&dir.join("node.crt"))
            ));
            nodes.push(Node {
                ns,
                dir,
                ifname: unique("wg"),
                overlay,
                daemon: None,
                keyd: None,
            });
        }
        let mut mesh = Mesh {
            nodes,
            lan,
            work,
            rotation,
            members,
            skew: opts.skew,
            extra_config: opts.extra_config,
        };
        if let Some(policy) = opts.policy {
            std::fs::write(mesh.policy_file(), policy).unwrap();
        }
        mesh.publish_roster(opts.listed.unwrap_or(planes.len()));
        for (i, plane) in planes.iter().enumerate() {
            mesh.start_data_plane(i, *plane);
            mesh.start_keyd(i);
        }
        mesh
    }

    pub fn start_data_plane(&mut self, i: usize, plane: Plane) {
        let n = &mut self.nodes[i];
        n.daemon = Some(match plane {
            Plane::MeshNode => Daemon::mesh_node_with(
                &n.ns,
                &mesh_node_bin(),
                &n.ifname,
                &["--metrics-listen", METRICS_ADDR],
            ),
            Plane::WireguardGo => Daemon::wireguard_go(&n.ns, &n.ifname),
        });
        n.ns.ok(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", n.overlay),
            "dev",
            &n.ifname,
        ]);
        n.ns.ok(&["ip", "link", "set", &n.ifname, "up"]);
        let subnet = n.overlay.split('.').nth(2).unwrap().to_string();
        let mut config = format!(
            "interface = \"{}\"\nquic_listen = \"192.168.{subnet}.{}:51821\"\nca_cert = \"../ca/ca.crt\"\n\
             cert = \"node.crt\"\nwg_key = \"wg.key\"\nnoise_key = \"noise.key\"\nroster = \"../roster\"\n\
             state_dir = \"state\"\nrotation_interval = \"{}\"\nhard_lifetime = \"6s\"\n\
             max_clock_skew = \"{}\"\n",
            n.ifname,
            i + 1,
            self.rotation,
            if self.skew.is_empty() {
                "300s"
            } else {
                self.skew
            }
        );
        for (_, extra) in self.extra_config.iter().filter(|(node, _)| *node == i) {
            config.push('\n');
            config.push_str(extra);
            config.push('\n');
        }
        std::fs::write(n.dir.join("keyd.toml"), config).unwrap();
    }

    pub fn start_keyd(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let log = std::fs::File::create(n.dir.join("keyd.log")).unwrap();
        let child =
            n.ns.cmd(&[
                p(&keyd_bin()),
                "run",
                "--config",
                p(&n.dir.join("keyd.toml")),
            ])
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn keyd");
        n.keyd = Some(Keyd(child));
    }

    pub fn ping(&self, from: usize, to: usize, count: u32, interval: &str) -> u32 {
        let out = self.nodes[from].ns.run(&[
            "ping",
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            interval,
            "-W",
            "1",
            &self.nodes[to].overlay,
        ]);
        received(&String::from_utf8_lossy(&out.stdout))
    }

    /// Waits (bounded) until every pair among `nodes` passes a ping.
    pub fn wait_complete(&self, nodes: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(40);
        'outer: loop {
            for &a in nodes {
                for &b in nodes {
                    if a != b && self.ping(a, b, 1, "0.2") != 1 {
                        assert!(
                            Instant::now() < deadline,
                            "mesh incomplete: node{} -> node{}\n{}",
                            a + 1,
                            b + 1,
                            self.logs()
                        );
                        std::thread::sleep(Duration::from_millis(300));
                        continue 'outer;
                    }
                }
            }
            return;
        }
    }

    pub fn wg_peers(&self, i: usize) -> String {
        self.nodes[i]
            .ns
            .ok(&["wg", "show", &self.nodes[i].ifname, "peers"])
    }

    pub fn wg_pub(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].dir.join("wg.pub"))
            .unwrap()
            .trim()
            .to_string()
    }

    pub fn status(&self, i: usize) -> serde_json::Value {
        let text = std::fs::read_to_string(self.nodes[i].dir.join("state/status.json"))
            .unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    /// Waits until node `i`'s status.json (rewritten every second) shows
    /// `what`; fails with the logs after 30 s.
    pub fn wait_status(&self, i: usize, what: &str, shows: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.status(i);
            if shows(&status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node{}: never {what}\nstatus: {status}\n{}",
                i + 1,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| std::fs::read_to_string(n.dir.join("keyd.log")).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    /// Signs a roster listing the first `listed` nodes (serial 1, or the
    /// previous serial + 1 when a roster exists) where every keyd reads it.
    pub fn publish_roster(&self, listed: usize) {
        let roster = self.roster();
        let ca = self.work.path().join("ca");
        let mut args = vec!["roster", "build", "--ca-dir", p(&ca), "--out", p(&roster)];
        if roster.exists() {
            args.extend(["--previous", p(&roster)]);
        }
        for m in &self.members[..listed] {
            args.extend(["--member", m.as_str()]);
        }
        let policy = self.policy_file();
        if policy.exists() {
            args.extend(["--policy", p(&policy)]);
        }
        keyd(&args);
    }

    /// Where the firewall policy source lives (taken by `publish_roster`
    /// when it exists).
    pub fn policy_file(&self) -> PathBuf {
        self.work.path().join("policy.toml")
    }

    /// Publishes a roster (serial + 1, all nodes) carrying `policy`.
    pub fn publish_policy(&self, policy: &str) {
        std::fs::write(self.policy_file(), policy).unwrap();
        self.publish_roster(self.nodes.len());
    }

    /// In a 2-node mesh: (the node that dials, the other). The lower node id dials.
    pub fn dialer_and_other(&self) -> (usize, usize) {
        let id = |i: usize| {
            self.status(i)["node_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        if id(0) < id(1) { (0, 1) } else { (1, 0) }
    }

    pub fn roster(&self) -> PathBuf {
        self.work.path().join("roster")
    }

    /// Node i's underlay address (192.168.<subnet>.<i+1>), from its overlay.
    pub fn underlay(&self, i: usize) -> String {
        let subnet = self.nodes[i].overlay.split('.').nth(2).unwrap();
        format!("192.168.{subnet}.{}", i + 1)
    }

    /// `wg show IF endpoints` on node i: one `PUBKEY\tIP:PORT` line per peer.
    pub fn wg_endpoints(&self, i: usize) -> String {
        self.nodes[i]
            .ns
            .ok(&["wg", "show", &self.nodes[i].ifname, "endpoints"])
    }

    /// The endpoint node `i`'s data plane holds for node `peer` ("" if none).
    pub fn wg_endpoint_of(&self, i: usize, peer: usize) -> String {
        let key = self.wg_pub(peer);
        self.wg_endpoints(i)
            .lines()
            .find_map(|l| {
                let (k, e) = l.split_once('\t')?;
                (k == key).then(|| e.trim().to_string())
            })
            .unwrap_or_default()
    }

    /// A TCP stream over the overlay from node `from` to node `to` that runs
    /// exactly as long as `during` does; returns (sent digest, received digest).
    pub fn stream_during(
        &self,
        from: usize,
        to: usize,
        during: impl FnOnce(),
    ) -> ([u8; 32], [u8; 32]) {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let done = Arc::new(AtomicBool::new(false));
        let to_addr: std::net::Ipv4Addr = self.nodes[to].overlay.parse().unwrap();
        let (na, nb, flag) = (
            self.nodes[from].ns.name.clone(),
            self.nodes[to].ns.name.clone(),
            done.clone(),
        );
        let transfer = std::thread::spawn(move || {
            let (a, b) = (Netns { name: na }, Netns { name: nb });
            let result = tcp_transfer_while(&a, &b, to_addr, |_| !flag.load(Ordering::Relaxed));
            // The namespaces belong to the mesh: do not delete them here.
            std::mem::forget((a, b));
            result
        });
        // Stop the stream even when `during` panics, so that the panic
        // surfaces instead of a transfer that never ends.
        struct Stop(Arc<AtomicBool>);
        impl Drop for Stop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let stop = Stop(done);
        during();
        drop(stop);
        transfer.join().expect("transfer thread")
    }
}

pub fn epoch(status: &serde_json::Value, peer: &str) -> u64 {
    status["peers"][peer]["epoch"].as_u64().unwrap_or(0)
}
