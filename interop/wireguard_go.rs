//! mesh-node against Debian's wireguard-go, an implementation this project
//! did not write: two namespaces, both directions, with a preshared key.
//! Needs root and `apt-get install wireguard-go wireguard-tools`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;

use common::*;

fn mesh_node() -> Impl<'static> {
    Impl::MeshNode(Path::new(env!("CARGO_BIN_EXE_mesh-node")))
}

/// Checks one pair in both directions, then rotates the key mid-transfer.
fn exercise(p: &Pair) {
    assert_eq!(p.a.ping(p.b.overlay, 5, "0.2"), 5, "A -> B");
    assert_eq!(p.b.ping(p.a.overlay, 5, "0.2"), 5, "B -> A");
    let (sent, got) = tcp_transfer(&p.a.ns, &p.b.ns, p.b.overlay, 16 << 20);
    assert_eq!(sent, got, "16 MiB A -> B intact");
    let (sent, got) = tcp_transfer(&p.b.ns, &p.a.ns, p.a.overlay, 16 << 20);
    assert_eq!(sent, got, "16 MiB B -> A intact");

    // A stream that runs until the key has changed on both sides three
    // times arrives intact.
    let (sent, got) = stream_during(p, || {
        for round in 1..=3 {
            std::thread::sleep(std::time::Duration::from_millis(800));
            let psk = p.keys.psk(&format!("rot{round}"));
            p.a.set_psk(&p.b, &psk);
            p.b.set_psk(&p.a, &psk);
        }
    });
    assert_eq!(sent, got, "stream intact across key changes");
    assert_eq!(
        p.a.ping(p.b.overlay, 3, "0.2"),
        3,
        "still up after the changes"
    );
}

#[test]
fn mesh_node_initiates_to_wireguard_go() {
    let p = Pair::new(121, mesh_node(), Impl::WireguardGo);
    exercise(&p);
}

#[test]
fn wireguard_go_initiates_to_mesh_node() {
    let p = Pair::new(122, Impl::WireguardGo, mesh_node());
    exercise(&p);
}

#[test]
fn mismatched_preshared_key_with_wireguard_go_passes_nothing() {
    let p = Pair::new(123, mesh_node(), Impl::WireguardGo);
    let other = p.keys.psk("other");
    p.b.set_psk(&p.a, &other);
    assert_eq!(p.a.ping(p.b.overlay, 4, "0.3"), 0);
    let hs = p.a.wg(&["show", &p.a.daemon.ifname, "latest-handshakes"]);
    assert!(hs.trim_end().ends_with("\t0"), "no handshake: {hs}");
}
