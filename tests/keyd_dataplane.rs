//! keyd's data-plane client against real WireGuard daemons: mesh-node on one
//! side, Debian's wireguard-go on the other, configured only by keyd's client
//! through the userspace API. Needs root.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use keyd::dataplane::{DataPlane, PeerConfig};
use mesh_proto::firewall::document::DEFAULT_SOCKET_DIR;
use mesh_proto::identity::{NodeId, WgPrivateKey};
use mesh_proto::schedule::derive_psk;

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

fn psk(epoch: u64) -> mesh_proto::schedule::Psk {
    derive_psk(
        (&[1; 32], &[2; 32]),
        &[3; 32],
        epoch,
        &NodeId([1; 16]),
        &NodeId([2; 16]),
    )
}

#[test]
fn keyd_configures_mesh_node_and_wireguard_go_and_rotates_keys() {
    let (na, nb) = (Netns::new(), Netns::new());
    let (ua, ub) = link(&na, &nb, 131);
    let bin = mesh_node_bin();
    let (ia, ib) = (unique("wg"), unique("wg"));
    let _da = Daemon::mesh_node(&na, &bin, &ia);
    let _db = Daemon::wireguard_go(&nb, &ib);
    let dir = Path::new(DEFAULT_SOCKET_DIR);
    let (dpa, dpb) = (
        DataPlane::for_interface(dir, &ia),
        DataPlane::for_interface(dir, &ib),
    );
    let (ka, kb) = (
        WgPrivateKey::generate().unwrap(),
        WgPrivateKey::generate().unwrap(),
    );
    dpa.configure_interface(&ka, 51820).unwrap();
    dpb.configure_interface(&kb, 51820).unwrap();
    let peer = |key: &WgPrivateKey, ep, ip: &str, epoch| PeerConfig {
        public_key: key.public_key(),
        preshared_key: psk(epoch),
        endpoint: Some(std::net::SocketAddr::new(ep, 51820)),
        allowed_ips: vec![ip.parse().unwrap()],
        persistent_keepalive: None,
    };
    dpa.upsert_peer(&peer(&kb, ub.into(), "10.78.0.2/32", 1))
        .unwrap();
    dpb.upsert_peer(&peer(&ka, ua.into(), "10.78.0.1/32", 1))
        .unwrap();
    for (ns, ifname, addr) in [(&na, &ia, "10.78.0.1/24"), (&nb, &ib, "10.78.0.2/24")] {
        ns.ok(&["ip", "addr", "add", addr, "dev", ifname]);
        ns.ok(&["ip", "link", "set", ifname, "up"]);
    }
    let ping = |n: u32| {
        let out = na.run(&[
            "ping",
            "-n",
            "-q",
            "-c",
            &n.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
            "10.78.0.2",
        ]);
        received(&String::from_utf8_lossy(&out.stdout))
    };
    assert_eq!(ping(3), 3, "keyd's configuration carries traffic");

    // Both data planes report what keyd set.
    for (dp, other) in [(&dpa, &kb), (&dpb, &ka)] {
        let info = dp.get().unwrap();
        assert_eq!(info.listen_port, 51820);
        assert_eq!(info.peers.len(), 1);
        assert_eq!(info.peers[0].public_key.0, other.public_key().0);
        assert_eq!(
            info.peers[0].preshared_key.as_ref().map(|k| k.0),
            Some(*psk(1).as_bytes())
        );
    }

    // A rotation: the new key on both sides, the tunnel keeps working.
    dpa.upsert_peer(&peer(&kb, ub.into(), "10.78.0.2/32", 2))
        .unwrap();
    dpb.upsert_peer(&peer(&ka, ua.into(), "10.78.0.1/32", 2))
        .unwrap();
    assert_eq!(ping(3), 3, "rotation loses nothing");
    assert_eq!(
        dpa.get().unwrap().peers[0]
            .preshared_key
            .as_ref()
            .map(|k| k.0),
        Some(*psk(2).as_bytes())
    );

    // Removing the peer cuts it off (fail closed).
    dpa.remove_peer(&kb.public_key()).unwrap();
    assert!(dpa.get().unwrap().peers.is_empty());
    assert_eq!(ping(2), 0, "no peer, no traffic");
}

#[test]
fn an_unreachable_data_plane_is_a_clear_error() {
    let dp = DataPlane::at("/nonexistent/wg-missing.sock".into());
    let err = format!("{:#}", dp.get().unwrap_err());
    assert!(err.contains("/nonexistent/wg-missing.sock"), "{err}");
}
