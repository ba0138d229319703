//! Rosters as they arrive from the authority or a file: `Roster::from_bytes`
//! against the CA, `Roster::decode_unverified` (`keyd inspect`), the text
//! form, and `Roster::check_update` against the roster in use.
//!
//! The first byte picks the mode: 0, the rest is a roster's bytes; 1, it is
//! a roster *body* that the fuzz CA signs, so that decoding the members and
//! every check behind the signature is reached; 2, armored text. Checked:
//! nothing panics; a roster that verifies re-encodes to the same bytes and
//! lists only certificates the CA signed, each once.

#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use mesh_proto::roster::Roster;
use pqmesh_fuzz::{ROSTER_DOMAIN, WORLD};

fn check(bytes: &[u8]) {
    let w = &*WORLD;
    let _ = Roster::decode_unverified(bytes);
    let Ok(r) = Roster::from_bytes(bytes, &w.ca) else {
        return;
    };
    assert_eq!(r.to_bytes(), bytes, "a roster re-encodes differently");
    assert_eq!(r.network_id(), w.ca.body().network_id);
    let mut ids = HashSet::new();
    for m in r.members() {
        assert!(w.ca.signed(&m.cert), "a member the CA did not sign");
        assert!(ids.insert(m.cert.body().node_id), "a node listed twice");
        assert!(r.member(&m.cert.body().node_id).is_some());
    }
    let _ = r.revoked().count();
    let now = pqmesh_fuzz::T0;
    let _ = Roster::check_update(Some(&w.roster), &r, now, 300);
    let _ = Roster::check_update(Some(&r), &w.roster, now, 300);
    let _ = Roster::check_update(None, &r, now, 300);
}

fuzz_target!(|data: &[u8]| {
    pqmesh_fuzz::write_seeds_if_asked("roster");
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => check(data),
        1 => check(&WORLD.sign(ROSTER_DOMAIN, data)),
        _ => {
            if let Ok(text) = std::str::from_utf8(data) {
                let _ = Roster::from_text(text, &WORLD.ca);
            }
        }
    }
});
