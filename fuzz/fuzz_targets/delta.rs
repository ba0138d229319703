//! Roster deltas as a node receives them from the authority:
//! `RosterDelta::from_bytes` then `Roster::apply` to the roster in use.
//!
//! Checked: nothing panics; a delta that applies yields the next serial, a
//! roster that verifies from its own bytes, and only CA-signed members. The
//! seeds are real deltas (an endpoint change, a removal with a node
//! revocation), so mutations reach the signature check over the rebuilt body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_proto::delta::RosterDelta;
use mesh_proto::roster::Roster;
use pqmesh_fuzz::WORLD;

fuzz_target!(|data: &[u8]| {
    pqmesh_fuzz::write_seeds_if_asked("delta");
    let w = &*WORLD;
    let Ok(delta) = RosterDelta::from_bytes(data) else {
        return;
    };
    let Ok(next) = w.roster.apply(&delta, &w.ca) else {
        return;
    };
    assert_eq!(next.serial(), w.roster.serial() + 1);
    let again = Roster::from_bytes(&next.to_bytes(), &w.ca).expect("an applied delta verifies");
    assert_eq!(again.fingerprint(), next.fingerprint());
    for m in next.members() {
        assert!(next.issued(&w.ca, &m.cert), "a member no issuer signed");
    }
});
