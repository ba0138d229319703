//! `gso::split`: what the TUN device hands us (virtio-net header and a
//! super-packet). Local, but a malformed header must be an error, never a
//! panic, and nothing it emits is longer than what it was given.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_node::transports::gso;

fuzz_target!(|data: &[u8]| {
    pqmesh_fuzz::write_seeds_if_asked("gso_split");
    let mut scratch = Vec::new();
    let _ = gso::split(data, &mut scratch, |p| {
        assert!(
            p.len() + gso::VIRTIO_NET_HDR_LEN <= data.len(),
            "a packet longer than the read"
        );
    });
    if let Some((&mss, pkt)) = data.split_first() {
        let _ = gso::segment_tcp(pkt, usize::from(mss), &mut scratch, |s| {
            assert!(
                s.len() <= pkt.len(),
                "a segment longer than its super-packet"
            );
        });
    }
});
