//! Virtio-net headers and TCP segmentation, for a TUN device opened with
//! `IFF_VNET_HDR` and TSO offloads.
//!
//! With offloads on, one read from the TUN device returns a virtio-net header
//! and up to 64 KB of TCP: the kernel's TCP stack did its work once per 64 KB
//! instead of once per packet. WireGuard encrypts packets, not streams, so
//! the super-packet is cut back into MSS-sized packets here, each with its
//! own sequence number, IP id, lengths and checksums, exactly as the kernel's
//! own GSO would have cut it. Pure functions over byte slices: no I/O.

pub const VIRTIO_NET_HDR_LEN: usize = 10;
pub const F_NEEDS_CSUM: u8 = 1;
pub const F_DATA_VALID: u8 = 2;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_ECN: u8 = 0x80;

const PROTO_TCP: u8 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// Native byte order, as the TUN driver uses by default.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b: &[u8; VIRTIO_NET_HDR_LEN] = b.get(..VIRTIO_NET_HDR_LEN)?.try_into().ok()?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    pub fn encode(&self) -> [u8; VIRTIO_NET_HDR_LEN] {
        let mut b = [0u8; VIRTIO_NET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// Why a packet from the TUN device could not be split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    #[error("packet shorter than its headers")]
    Truncated,
    #[error("unsupported GSO type {0:#x}")]
    UnsupportedType(u8),
    #[error("GSO packet is not TCP over IPv4/IPv6 without extension headers")]
    NotTcp,
    #[error("GSO segment size 0")]
    ZeroSegment,
    #[error("checksum offsets outside the packet")]
    BadChecksumOffsets,
}

/// Ones-complement sum of `data`, folded into `initial`.
pub fn sum(data: &[u8], initial: u32) -> u32 {
    let mut acc = u64::from(initial);
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        acc += (v >> 32) + (v & 0xffff_ffff);
    }
    let rest = chunks.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(*last) << 8;
    }
    while acc >> 32 != 0 {
        acc = (acc & 0xffff_ffff) + (acc >> 32);
    }
    acc as u32
}

/// Folds a sum to 16 bits and complements it: the value a checksum field holds.
pub fn finish(sum: u32) -> u16 {
    let mut s = sum;
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Completes a checksum the kernel left partial (`F_NEEDS_CSUM`): the field at
/// `csum_start + csum_offset` holds the pseudo-header sum; fold in the rest.
pub fn complete_checksum(
    pkt: &mut [u8],
    csum_start: usize,
    csum_offset: usize,
) -> Result<(), GsoError> {
    let field = csum_start + csum_offset;
    if field + 2 > pkt.len() || csum_start > pkt.len() {
        return Err(GsoError::BadChecksumOffsets);
    }
    let c = finish(sum(&pkt[csum_start..], 0));
    pkt[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// TCP pseudo-header sum for IPv4 or IPv6 (`ip` starts at the IP header).
fn pseudo_header_sum(ip: &[u8], v6: bool, tcp_len: usize) -> u32 {
    let (addrs, len_word) = if v6 {
        (&ip[8..40], tcp_len as u32)
    } else {
        (&ip[12..20], tcp_len as u32)
    };
    // The small terms go in as `sum`'s initial value: the addresses' sum
    // alone can reach 0xffff_ffff, and adding to it here would drop a carry.
    sum(
        addrs,
        u32::from(PROTO_TCP) + (len_word >> 16) + (len_word & 0xffff),
    )
}

/// Cuts a TCP super-packet into segments of at most `gso_size` payload bytes
/// and hands each finished packet to `emit`.
/// `scratch` is reused between calls, so splitting allocates nothing once warm.
pub fn segment_tcp(
    pkt: &[u8],
    gso_size: usize,
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<(), GsoError> {
    if gso_size == 0 {
        return Err(GsoError::ZeroSegment);
    }
    let first = *pkt.first().ok_or(GsoError::Truncated)?;
    let v6 = match first >> 4 {
        4 => false,
        6 => true,
        _ => return Err(GsoError::NotTcp),
    };
    let ip_len = if v6 {
        40
    } else {
        usize::from(first & 0x0f) * 4
    };
    let proto = if v6 {
        *pkt.get(6).ok_or(GsoError::Truncated)?
    } else {
        *pkt.get(9).ok_or(GsoError::Truncated)?
    };
    if proto != PROTO_TCP || ip_len < 20 {
        return Err(GsoError::NotTcp);
    }
    let tcp_hlen = usize::from(pkt.get(ip_len + 12).ok_or(GsoError::Truncated)? >> 4) * 4;
    let hdr_len = ip_len + tcp_hlen;
    if tcp_hlen < 20 || pkt.len() < hdr_len {
        return Err(GsoError::Truncated);
    }
    let seq0 = u32::from_be_bytes(
        pkt[ip_len + 4..ip_len + 8]
            .try_into()
            .map_err(|_| GsoError::Truncated)?,
    );
    let id0 = u16::from_be_bytes([pkt[4], pkt[5]]);
    let flags0 = pkt[ip_len + 13];
    let payload = &pkt[hdr_len..];
    let count = payload.len().div_ceil(gso_size).max(1);
    for (i, chunk) in payload
        .chunks(gso_size)
        .chain(std::iter::repeat_n(
            &[][..],
            usize::from(payload.is_empty()),
        ))
        .enumerate()
    {
        scratch.clear();
        scratch.resize(hdr_len + chunk.len(), 0);
        let out = scratch.as_mut_slice();
        out[..hdr_len].copy_from_slice(&pkt[..hdr_len]);
        out[hdr_len..].copy_from_slice(chunk);
        let last = i + 1 == count;
        if v6 {
            let plen = (tcp_hlen + chunk.len()) as u16;
            out[4..6].copy_from_slice(&plen.to_be_bytes());
        } else {
            out[2..4].copy_from_slice(&((hdr_len + chunk.len()) as u16).to_be_bytes());
            out[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            out[10..12].copy_from_slice(&[0, 0]);
            let c = finish(sum(&out[..ip_len], 0));
            out[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let tcp = ip_len;
        let seq = seq0.wrapping_add((i * gso_size) as u32);
        out[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
        // FIN and PSH belong to the last segment only, CWR to the first.
        let mut flags = flags0;
        if !last {
            flags &= !(0x01 | 0x08);
        }
        if i > 0 {
            flags &= !0x80;
        }
        out[tcp + 13] = flags;
        out[tcp + 16..tcp + 18].copy_from_slice(&[0, 0]);
        let tcp_len = tcp_hlen + chunk.len();
        let c = finish(sum(&out[tcp..], pseudo_header_sum(out, v6, tcp_len)));
        out[tcp + 16..tcp + 18].copy_from_slice(&c.to_be_bytes());
        emit(out);
    }
    Ok(())
}

/// Turns one read from an offloaded TUN device into plain IP packets.
pub fn split(
    read: &[u8],
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<(), GsoError> {
    let hdr = VirtioNetHdr::decode(read).ok_or(GsoError::Truncated)?;
    let pkt = &read[VIRTIO_NET_HDR_LEN..];
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE => {
            if hdr.flags & F_NEEDS_CSUM != 0 {
                scratch.clear();
                scratch.extend_from_slice(pkt);
                complete_checksum(
                    scratch,
                    usize::from(hdr.csum_start),
                    usize::from(hdr.csum_offset),
                )?;
                emit(scratch);
            } else {
                emit(pkt);
            }
            Ok(())
        }
        GSO_TCPV4 | GSO_TCPV6 => segment_tcp(pkt, usize::from(hdr.gso_size), scratch, emit),
        other => Err(GsoError::UnsupportedType(other)),
    }
}

/// Where a TCP packet's headers end, if it can join a coalesced group:
/// IPv4 without options or IPv6 without extension headers, carrying TCP
/// with a payload and only ACK (and PSH) set. Returns (ip_len, hdr_len, v6).
fn coalescible(p: &[u8]) -> Option<(usize, usize, bool)> {
    let v6 = match p.first()? >> 4 {
        4 => false,
        6 => true,
        _ => return None,
    };
    let (ip_len, proto) = if v6 {
        (40, *p.get(6)?)
    } else {
        (usize::from(p[0] & 0x0f) * 4, *p.get(9)?)
    };
    if proto != PROTO_TCP || (!v6 && ip_len != 20) {
        return None;
    }
    // IPv4: no fragments (MF or offset).
    if !v6 && (u16::from_be_bytes([p[6], p[7]]) & 0x3fff) != 0 {
        return None;
    }
    let hdr_len = ip_len + usize::from(*p.get(ip_len + 12)? >> 4) * 4;
    let flags = *p.get(ip_len + 13)?;
    let ok_flags = flags & !(0x10 | 0x08) == 0 && flags & 0x10 != 0;
    (ok_flags && p.len() > hdr_len && hdr_len >= ip_len + 20).then_some((ip_len, hdr_len, v6))
}

/// True if `next` continues the flow of `first` right where `prev_end` ends:
/// same addresses, ports, header options and ack, contiguous sequence number.
fn continues(
    first: &[u8],
    next: &[u8],
    ip_len: usize,
    hdr_len: usize,
    v6: bool,
    next_seq: u32,
) -> bool {
    let (addr_start, addr_end) = if v6 { (8, 40) } else { (12, 20) };
    next.len() > hdr_len
        && first[addr_start..addr_end] == next[addr_start..addr_end]
        && first[ip_len..ip_len + 4] == next[ip_len..ip_len + 4]
        && first[ip_len + 8..ip_len + 12] == next[ip_len + 8..ip_len + 12]
        && first[ip_len + 12] == next[ip_len + 12]
        && first[ip_len + 20..hdr_len] == next[ip_len + 20..hdr_len]
        && (v6 || first[1] == next[1] && first[8] == next[8])
        && u32::from_be_bytes([
            next[ip_len + 4],
            next[ip_len + 5],
            next[ip_len + 6],
            next[ip_len + 7],
        ]) == next_seq
}

/// Coalesces a batch of received IP packets the way Linux GRO would, so the
/// receiving TCP stack handles one 64 KB packet instead of ~45. Consecutive
/// in-order segments of one TCP flow (equal sizes, the last may be shorter,
/// PSH only on the last) become one write with a GSO virtio-net header; every
/// other packet is written alone, marked `F_DATA_VALID` (WireGuard's AEAD
/// already authenticated it). Order within a flow is kept. `write` receives
/// the virtio-net header and the packet.
pub fn coalesce<P: std::ops::Deref<Target = [u8]>>(
    packets: &[P],
    scratch: &mut Vec<u8>,
    mut write: impl FnMut(&VirtioNetHdr, &[u8]),
) {
    let single = VirtioNetHdr {
        flags: F_DATA_VALID,
        ..Default::default()
    };
    let mut i = 0;
    while i < packets.len() {
        let first: &[u8] = &packets[i];
        let Some((ip_len, hdr_len, v6)) = coalescible(first) else {
            write(&single, first);
            i += 1;
            continue;
        };
        let seg = first.len() - hdr_len;
        let seq0 = u32::from_be_bytes([
            first[ip_len + 4],
            first[ip_len + 5],
            first[ip_len + 6],
            first[ip_len + 7],
        ]);
        let mut next_seq = seq0.wrapping_add(seg as u32);
        let mut total = first.len();
        let mut j = i + 1;
        // PSH ends a group; so does a short segment.
        let mut open = first[ip_len + 13] & 0x08 == 0;
        while open && j < packets.len() {
            let p: &[u8] = &packets[j];
            let len = p.len().saturating_sub(hdr_len);
            if coalescible(p) != Some((ip_len, hdr_len, v6))
                || len > seg
                || total + len > 65535
                || !continues(first, p, ip_len, hdr_len, v6, next_seq)
            {
                break;
            }
            total += len;
            next_seq = next_seq.wrapping_add(len as u32);
            open = len == seg && p[ip_len + 13] & 0x08 == 0;
            j += 1;
        }
        if j == i + 1 {
            write(&single, first);
            i += 1;
            continue;
        }
        scratch.clear();
        scratch.extend_from_slice(first);
        for p in &packets[i + 1..j] {
            scratch.extend_from_slice(&p[hdr_len..]);
        }
        // PSH of the last segment carries over.
        scratch[ip_len + 13] |= packets[j - 1][ip_len + 13] & 0x08;
        let tcp_len = total - ip_len;
        if v6 {
            scratch[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        } else {
            scratch[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            scratch[10..12].copy_from_slice(&[0, 0]);
            let c = finish(sum(&scratch[..ip_len], 0));
            scratch[10..12].copy_from_slice(&c.to_be_bytes());
        }
        // CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum.
        let mut partial = pseudo_header_sum(scratch, v6, tcp_len);
        while partial >> 16 != 0 {
            partial = (partial & 0xffff) + (partial >> 16);
        }
        scratch[ip_len + 16..ip_len + 18].copy_from_slice(&(partial as u16).to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: hdr_len as u16,
            gso_size: seg as u16,
            csum_start: ip_len as u16,
            csum_offset: 16,
        };
        write(&hdr, scratch);
        i = j;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A valid IPv4 or IPv6 TCP packet with `payload`, checksums filled.
    fn tcp_packet(v6: bool, payload: &[u8], seq: u32, flags: u8) -> Vec<u8> {
        let ip_len = if v6 { 40 } else { 20 };
        let mut p = vec![0u8; ip_len + 20 + payload.len()];
        if v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
            p[6] = PROTO_TCP;
            p[7] = 64;
            p[8..24].copy_from_slice(&[0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            p[24..40].copy_from_slice(&[0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            p[0] = 0x45;
            let total = p.len() as u16;
            p[2..4].copy_from_slice(&total.to_be_bytes());
            p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
            p[8] = 64;
            p[9] = PROTO_TCP;
            p[12..16].copy_from_slice(&[10, 77, 0, 1]);
            p[16..20].copy_from_slice(&[10, 77, 0, 2]);
            let c = finish(sum(&p[..20], 0));
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let t = ip_len;
        p[t..t + 2].copy_from_slice(&40000u16.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        p[t + 12] = 5 << 4;
        p[t + 13] = flags;
        p[t + 40 - 20..].copy_from_slice(payload);
        let c = finish(sum(&p[t..], pseudo_header_sum(&p, v6, 20 + payload.len())));
        p[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn checksums_ok(p: &[u8]) -> bool {
        let v6 = p[0] >> 4 == 6;
        let ip_len = if v6 { 40 } else { 20 };
        let ip_ok = v6 || finish(sum(&p[..20], 0)) == 0;
        ip_ok
            && finish(sum(
                &p[ip_len..],
                pseudo_header_sum(p, v6, p.len() - ip_len),
            )) == 0
    }

    /// The pseudo-header sum by the book: every 16-bit word in a u64, folded
    /// once at the end, independent of `sum`'s 32-bit carries.
    fn reference_pseudo(ip: &[u8], v6: bool, tcp_len: usize) -> u16 {
        let addrs = if v6 { &ip[8..40] } else { &ip[12..20] };
        let mut acc: u64 = addrs
            .chunks(2)
            .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        acc += u64::from(PROTO_TCP) + tcp_len as u64;
        while acc >> 16 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    /// Found by fuzz/fuzz_targets/gso_split.rs: addresses whose words sum
    /// near 2^32 (all-ones) overflowed the pseudo-header sum, a panic in
    /// debug builds and a checksum off by one in release. A peer chooses the
    /// addresses of the packets `coalesce` sums.
    #[test]
    fn pseudo_header_sum_keeps_every_carry() {
        for v6 in [false, true] {
            let mut p = tcp_packet(v6, &[0xff; 1000], 1, 0x10);
            let addrs = if v6 { 8..40 } else { 12..20 };
            p[addrs].fill(0xff);
            let tcp_len = p.len() - if v6 { 40 } else { 20 };
            assert_eq!(
                finish(pseudo_header_sum(&p, v6, tcp_len)),
                !reference_pseudo(&p, v6, tcp_len),
                "v6={v6}"
            );
        }
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: the folded sum of 0001 f203 f4f5 f6f7 is ddf2.
        assert_eq!(
            finish(sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0)),
            !0xddf2
        );
    }

    #[test]
    fn splits_a_super_packet_like_the_kernel() {
        for v6 in [false, true] {
            let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
            // FIN|PSH|ACK|CWR on the super-packet.
            let big = tcp_packet(v6, &payload, 1000, 0x01 | 0x08 | 0x10 | 0x80);
            let mut segs = Vec::new();
            segment_tcp(&big, 1400, &mut Vec::new(), |s| segs.push(s.to_vec())).unwrap();
            assert_eq!(segs.len(), 4);
            let mut joined = Vec::new();
            let ip_len = if v6 { 40 } else { 20 };
            for (i, s) in segs.iter().enumerate() {
                assert!(checksums_ok(s), "segment {i} v6={v6}");
                let seq = u32::from_be_bytes(s[ip_len + 4..ip_len + 8].try_into().unwrap());
                assert_eq!(seq, 1000 + 1400 * i as u32);
                let flags = s[ip_len + 13];
                assert_eq!(flags & 0x01 != 0, i == 3, "FIN only on the last");
                assert_eq!(flags & 0x08 != 0, i == 3, "PSH only on the last");
                assert_eq!(flags & 0x80 != 0, i == 0, "CWR only on the first");
                assert!(flags & 0x10 != 0, "ACK on all");
                if !v6 {
                    assert_eq!(u16::from_be_bytes([s[2], s[3]]) as usize, s.len());
                    assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1234 + i as u16);
                } else {
                    assert_eq!(u16::from_be_bytes([s[4], s[5]]) as usize, s.len() - 40);
                }
                joined.extend_from_slice(&s[ip_len + 20..]);
            }
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn completes_a_partial_checksum() {
        let mut p = tcp_packet(false, b"hello world", 7, 0x18);
        // What the kernel leaves with NEEDS_CSUM: the pseudo-header sum, not complemented.
        let pseudo = pseudo_header_sum(&p, false, 20 + 11);
        let mut folded = pseudo;
        while folded >> 16 != 0 {
            folded = (folded & 0xffff) + (folded >> 16);
        }
        p[36..38].copy_from_slice(&(folded as u16).to_be_bytes());
        assert!(!checksums_ok(&p));
        complete_checksum(&mut p, 20, 16).unwrap();
        assert!(checksums_ok(&p));
    }

    #[test]
    fn refuses_what_it_cannot_split() {
        let udp = {
            let mut p = tcp_packet(false, b"x", 0, 0);
            p[9] = 17;
            p
        };
        assert_eq!(
            segment_tcp(&udp, 100, &mut Vec::new(), |_| {}),
            Err(GsoError::NotTcp)
        );
        assert_eq!(
            segment_tcp(&[0x45, 0, 0], 100, &mut Vec::new(), |_| {}),
            Err(GsoError::Truncated)
        );
        assert_eq!(
            segment_tcp(&udp, 0, &mut Vec::new(), |_| {}),
            Err(GsoError::ZeroSegment)
        );
        let mut read = VirtioNetHdr {
            gso_type: 3,
            ..Default::default()
        }
        .encode()
        .to_vec();
        read.extend_from_slice(&udp);
        assert_eq!(
            split(&read, &mut Vec::new(), |_| {}),
            Err(GsoError::UnsupportedType(3))
        );
        let bad = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 9000,
            ..Default::default()
        };
        let mut read = bad.encode().to_vec();
        read.extend_from_slice(&udp);
        assert_eq!(
            split(&read, &mut Vec::new(), |_| {}),
            Err(GsoError::BadChecksumOffsets)
        );
    }

    /// Coalescing then splitting gives back the original segments exactly.
    #[test]
    fn coalesce_is_undone_by_split() {
        for v6 in [false, true] {
            let payload: Vec<u8> = (0..7000u32).map(|i| (i * 3) as u8).collect();
            let big = tcp_packet(v6, &payload, 5000, 0x10 | 0x08);
            let mut segs = Vec::new();
            segment_tcp(&big, 1380, &mut Vec::new(), |s| segs.push(s.to_vec())).unwrap();
            let refs: Vec<&[u8]> = segs.iter().map(Vec::as_slice).collect();
            let mut writes = Vec::new();
            coalesce(&refs, &mut Vec::new(), |h, p| writes.push((*h, p.to_vec())));
            assert_eq!(writes.len(), 1, "one flow, in order: one write");
            let (hdr, pkt) = &writes[0];
            assert_eq!(hdr.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
            assert_eq!(hdr.gso_size, 1380);
            let mut read = hdr.encode().to_vec();
            read.extend_from_slice(pkt);
            let mut again = Vec::new();
            split(&read, &mut Vec::new(), |s| again.push(s.to_vec())).unwrap();
            assert_eq!(again, segs);
        }
    }

    #[test]
    fn coalesce_keeps_apart_what_linux_would() {
        let a = tcp_packet(false, &[1; 100], 0, 0x10);
        let b = tcp_packet(false, &[2; 100], 100, 0x10);
        let gap = tcp_packet(false, &[3; 100], 300, 0x10);
        let syn = tcp_packet(false, &[4; 100], 400, 0x02);
        let bigger = tcp_packet(false, &[5; 200], 200, 0x10);
        let mut other_flow = tcp_packet(false, &[6; 100], 200, 0x10);
        other_flow[20] ^= 1; // another source port
        let udp = {
            let mut p = tcp_packet(false, &[7; 10], 0, 0x10);
            p[9] = 17;
            p
        };
        let batch: Vec<&[u8]> = vec![&a, &b, &gap, &syn, &bigger, &other_flow, &udp];
        let mut writes = Vec::new();
        coalesce(&batch, &mut Vec::new(), |h, p| writes.push((*h, p.len())));
        assert_eq!(writes[0].0.gso_type, GSO_TCPV4, "a and b merge");
        assert_eq!(writes[0].1, 20 + 20 + 200);
        assert!(
            writes[1..]
                .iter()
                .all(|(h, _)| h.gso_type == GSO_NONE && h.flags == F_DATA_VALID)
        );
        assert_eq!(
            writes.len(),
            6,
            "gap, syn, bigger, other flow and udp stay single"
        );
    }

    proptest! {
        #[test]
        fn any_split_reassembles_with_valid_checksums(len in 0usize..9000, mss in 1usize..2000, v6 in any::<bool>()) {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let big = tcp_packet(v6, &payload, u32::MAX - 3, 0x10);
            let mut joined = Vec::new();
            let ip_len = if v6 { 40 } else { 20 };
            segment_tcp(&big, mss, &mut Vec::new(), |s| {
                assert!(checksums_ok(s));
                joined.extend_from_slice(&s[ip_len + 20..]);
            }).unwrap();
            prop_assert_eq!(joined, payload);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = split(&bytes, &mut Vec::new(), |_| {});
            let _ = segment_tcp(&bytes, 1 + bytes.len() % 1500, &mut Vec::new(), |_| {});
        }
    }
}
