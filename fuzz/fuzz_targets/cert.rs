//! Certificates as they arrive from a peer (inside the exchange) or a file:
//! `NodeCert::from_bytes`, `CaCert::from_bytes`, the armored text forms, and
//! the full zero-trust check `Trust::verify_peer`.
//!
//! The first byte picks the mode. In mode 0 the rest is taken as the bytes
//! of a certificate. In mode 1 it is a certificate *body* that the fuzz
//! CA signs, so the field checks behind the signature are reached. Mode 2
//! feeds text to the armored decoders. Checked: nothing panics; what decodes
//! re-encodes to the same bytes; a certificate the trust check accepts is
//! one of the roster's, presented with its own Noise key.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_proto::cert::{CaCert, NodeCert};
use pqmesh_fuzz::{NODE_DOMAIN, T0, WORLD};

fn check(bytes: &[u8]) {
    let w = &*WORLD;
    if let Ok(cert) = NodeCert::from_bytes(bytes) {
        assert_eq!(
            cert.to_bytes(),
            bytes,
            "a node certificate re-encodes differently"
        );
        assert_eq!(NodeCert::from_text(&cert.to_text()).as_ref(), Ok(&cert));
        let body = cert.body();
        // The check the exchange runs, as both nodes, with the key the
        // certificate names (the one a peer must have proved it holds).
        for me in [&w.a, &w.b] {
            let trust = w.trust(me);
            if let Ok(peer) = trust.verify_peer(bytes, &body.noise_public.0, T0) {
                assert!(w.ca.signed(&cert));
                assert_ne!(peer.node_id(), me.identity.node_id());
                let listed = w.roster.member(&peer.node_id()).expect("listed");
                assert_eq!(
                    listed.cert, cert,
                    "accepted a certificate the roster does not list"
                );
            }
        }
    }
    if let Ok(ca) = CaCert::from_bytes(bytes) {
        assert_eq!(
            ca.to_bytes(),
            bytes,
            "a CA certificate re-encodes differently"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    pqmesh_fuzz::write_seeds_if_asked("cert");
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => check(data),
        1 => check(&WORLD.sign(NODE_DOMAIN, data)),
        _ => {
            if let Ok(text) = std::str::from_utf8(data) {
                let _ = NodeCert::from_text(text);
                let _ = CaCert::from_text(text);
            }
        }
    }
});
