//! `gso::coalesce`: the one path that handles decrypted remote bytes (a peer
//! chooses every byte of the IP packets it tunnels to us).
//!
//! Batches mix raw bytes with TCP segments built from a few fuzzer-chosen
//! fields, so that runs of one flow that may coalesce are common. Checked on
//! every batch: each input packet is written exactly once, in order; a
//! single write is the packet untouched with `F_DATA_VALID`; a coalesced
//! write joins two or more packets' payloads behind the first one's headers,
//! fits in 64 KB, carries a virtio header that matches it, and `gso::split`
//! cuts it back into the same payloads at the same sequence numbers.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mesh_node::transports::gso::{self, VirtioNetHdr};

#[derive(Arbitrary, Debug)]
enum Spec {
    Raw(Vec<u8>),
    Tcp {
        v6: bool,
        /// Selects one of two flows (source port), so flows interleave.
        flow: bool,
        /// `None`: continues the flow's sequence; else an absolute value.
        seq: Option<u32>,
        flags: u8,
        payload_len: u16,
        /// Extra TCP header words (options), 0..=10.
        option_words: u8,
        /// IPv4 header words beyond 5 (IP options), usually 0.
        ip_option_words: u8,
        /// Arbitrary byte overwrites, applied last.
        pokes: Vec<(u16, u8)>,
    },
}

fn tcp(
    v6: bool,
    src_port: u16,
    seq: u32,
    flags: u8,
    payload_len: usize,
    option_words: usize,
    ip_option_words: usize,
) -> Vec<u8> {
    let ip_len = if v6 { 40 } else { 20 + 4 * ip_option_words };
    let tcp_hlen = 20 + 4 * option_words;
    let mut p = vec![0u8; ip_len + tcp_hlen + payload_len];
    if v6 {
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((tcp_hlen + payload_len) as u16).to_be_bytes());
        p[6] = 6;
        p[7] = 64;
        p[8] = 0xfd;
        p[23] = 1;
        p[24] = 0xfd;
        p[39] = 2;
    } else {
        p[0] = 0x40 | (ip_len / 4) as u8;
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 77, 0, 1]);
        p[16..20].copy_from_slice(&[10, 77, 0, 2]);
    }
    let t = ip_len;
    p[t..t + 2].copy_from_slice(&src_port.to_be_bytes());
    p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
    p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    p[t + 12] = ((tcp_hlen / 4) as u8) << 4;
    p[t + 13] = flags;
    for (i, b) in p[t + tcp_hlen..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

fn build(specs: Vec<Spec>) -> Vec<Vec<u8>> {
    let mut next_seq = [1000u32, 5000u32];
    specs
        .into_iter()
        .take(64)
        .map(|s| match s {
            Spec::Raw(b) => b,
            Spec::Tcp {
                v6,
                flow,
                seq,
                flags,
                payload_len,
                option_words,
                ip_option_words,
                pokes,
            } => {
                let f = usize::from(flow);
                let seq = seq.unwrap_or(next_seq[f]);
                // Up to 9000 bytes, so that 64 KB is reached in a batch.
                let len = usize::from(payload_len) % 9001;
                next_seq[f] = seq.wrapping_add(len as u32);
                let mut p = tcp(
                    v6,
                    40000 + u16::from(flow),
                    seq,
                    flags,
                    len,
                    usize::from(option_words % 11),
                    if ip_option_words >= 240 {
                        usize::from(ip_option_words % 11)
                    } else {
                        0
                    },
                );
                for (at, v) in pokes.into_iter().take(8) {
                    let n = p.len();
                    if n > 0 {
                        p[usize::from(at) % n] = v;
                    }
                }
                p
            }
        })
        .collect()
}

fn checksums_ok(p: &[u8], ip_len: usize, v6: bool) -> bool {
    let ip_ok = v6 || gso::finish(gso::sum(&p[..ip_len], 0)) == 0;
    let tcp_len = p.len() - ip_len;
    let addrs = if v6 { &p[8..40] } else { &p[12..20] };
    let pseudo = gso::sum(addrs, 0) + 6 + (tcp_len as u32 >> 16) + (tcp_len as u32 & 0xffff);
    ip_ok && gso::finish(gso::sum(&p[ip_len..], pseudo)) == 0
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fuzz_target!(|specs: Vec<Spec>| {
    let packets = build(specs);
    let mut writes: Vec<(VirtioNetHdr, Vec<u8>)> = Vec::new();
    let mut scratch = Vec::new();
    gso::coalesce(&packets, &mut scratch, |h, p| writes.push((*h, p.to_vec())));

    let single = VirtioNetHdr {
        flags: gso::F_DATA_VALID,
        ..Default::default()
    };
    let mut next = 0;
    for (hdr, pkt) in &writes {
        assert!(next < packets.len(), "more writes than packets");
        if *hdr == single {
            assert_eq!(
                pkt, &packets[next],
                "a single write must be the packet as it came"
            );
            next += 1;
            continue;
        }
        let v6 = hdr.gso_type == gso::GSO_TCPV6;
        assert!(v6 || hdr.gso_type == gso::GSO_TCPV4, "header {hdr:?}");
        assert_eq!(hdr.flags, gso::F_NEEDS_CSUM);
        assert!(
            pkt.len() <= 65535,
            "coalesced packet of {} bytes",
            pkt.len()
        );
        let ip_len = usize::from(hdr.csum_start);
        let hdr_len = usize::from(hdr.hdr_len);
        let seg = usize::from(hdr.gso_size);
        assert_eq!(ip_len, if v6 { 40 } else { 20 });
        assert_eq!(hdr.csum_offset, 16);
        assert!(seg > 0 && hdr_len >= ip_len + 20 && hdr_len < pkt.len());
        assert_eq!(pkt[0] >> 4, if v6 { 6 } else { 4 });
        let len_field = usize::from(u16::from_be_bytes([
            pkt[if v6 { 4 } else { 2 }],
            pkt[if v6 { 5 } else { 3 }],
        ]));
        assert_eq!(len_field, if v6 { pkt.len() - 40 } else { pkt.len() });

        // Which inputs it joined: consecutive packets whose payloads make its payload.
        let first = &packets[next];
        let addrs = if v6 { 8..40 } else { 12..20 };
        assert_eq!(
            pkt[addrs.clone()],
            first[addrs],
            "addresses of the first packet"
        );
        assert_eq!(
            pkt[ip_len..ip_len + 13],
            first[ip_len..ip_len + 13],
            "ports, sequence, ack and offset of the first packet"
        );
        let mut joined = Vec::new();
        let mut parts = Vec::new();
        while joined.len() < pkt.len() - hdr_len {
            assert!(
                next < packets.len(),
                "coalesced payload longer than its inputs"
            );
            let p = &packets[next];
            parts.push(p);
            joined.extend_from_slice(&p[hdr_len..]);
            next += 1;
        }
        assert!(
            parts.len() >= 2,
            "a coalesced write joins two packets or more"
        );
        assert_eq!(&pkt[hdr_len..], &joined[..], "payloads joined in order");
        for (i, p) in parts.iter().enumerate() {
            let len = p.len() - hdr_len;
            assert!(len == seg || (i + 1 == parts.len() && len <= seg && len > 0));
        }

        // Undone by split: the same payloads at the same sequence numbers.
        let mut read = hdr.encode().to_vec();
        read.extend_from_slice(pkt);
        let mut again = Vec::new();
        gso::split(&read, &mut Vec::new(), |s| again.push(s.to_vec()))
            .expect("split refused a coalesced packet");
        assert_eq!(again.len(), parts.len());
        for (s, p) in again.iter().zip(&parts) {
            assert_eq!(s[hdr_len..], p[hdr_len..]);
            assert_eq!(be32(s, ip_len + 4), be32(p, ip_len + 4), "sequence number");
            assert!(
                checksums_ok(s, ip_len, v6),
                "split segment with a bad checksum"
            );
        }
    }
    assert_eq!(next, packets.len(), "every packet written exactly once");
});
