//! WireGuard packets packed back to back into QUIC datagrams (kind 6
//! PACKED, docs/edge.md "MTU").
//!
//! A full-size WireGuard packet (1,452 bytes at the default interface MTU)
//! does not fit one datagram on a 1500-byte path (about 1,434 bytes).
//! Fragmenting it costs two datagrams per packet, and every datagram is a
//! QUIC packet to seal, send, receive and open. Packed, a packet that does
//! not fit the rest of a datagram continues at the start of the next one:
//! a burst of full-size packets costs about 1.02 datagrams each, and small
//! packets (the TCP ACKs of the other direction) share datagrams.
//!
//! PACKED datagram payload = 6 ++ seq u16 BE ++ carry u16 BE ++ body, where
//! body = the `carry` bytes that end the previous datagram's last packet,
//! then records `len u16 BE ++ bytes`, the last of which may continue in the
//! next datagram (its `carry`). A datagram is sent when full and at the end
//! of every burst the relay read: packing never holds a packet back.
//!
//! Losses: a lost datagram loses its packets and the one that continued
//! into it; a late one (reordered) still gives its whole packets and leaves
//! the packet in progress alone. Both are counted. The receiver holds at
//! most one partial packet (64 KiB).

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

use super::frame::{KIND_PACKED, MAX_BODY};

/// kind u8 ++ seq u16 ++ carry u16.
pub const PACKED_HEADER: usize = 5;
/// A record's length field.
const LEN_FIELD: usize = 2;
/// A datagram at most this far behind the next expected sequence number
/// is late (reordered on the way), not a sign that the ones between were
/// lost.
/// Small: a real gap of more than 65,536 - 64 datagrams (seconds of a
/// black hole at full rate) must rarely pass for a late one.
const LATE_WINDOW: u16 = 64;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PackError {
    #[error("a packet of {len} bytes cannot be relayed (1..={MAX_BODY})")]
    PacketSize { len: usize },
    #[error("datagrams of {max} bytes are too small to pack into")]
    DatagramTooSmall { max: usize },
    #[error("a record's length field is cut off")]
    TruncatedLength,
    #[error("a record of length zero")]
    EmptyRecord,
    #[error("{carry} bytes carried into a packet that needed {needed}")]
    CarryTooLong { carry: usize, needed: usize },
    #[error("a packet of {want} bytes ended after {have} with records behind it")]
    PacketCutShort { want: usize, have: usize },
}

/// The sending side: one per path, owned by the relay task.
#[derive(Debug, Default)]
pub struct Packer {
    next_seq: u16,
    /// The open datagram, header included; empty when none is open.
    open: BytesMut,
    /// The datagram size the open one was started with.
    max: usize,
}

impl Packer {
    /// Adds `packet`; each datagram that fills up goes to `emit`. `max` is
    /// the connection's datagram size now (a change closes the open one).
    pub fn push(
        &mut self,
        packet: &[u8],
        max: usize,
        emit: &mut impl FnMut(Bytes),
    ) -> Result<(), PackError> {
        if packet.is_empty() || packet.len() > MAX_BODY {
            return Err(PackError::PacketSize { len: packet.len() });
        }
        if max <= PACKED_HEADER + LEN_FIELD {
            return Err(PackError::DatagramTooSmall { max });
        }
        if !self.open.is_empty() && (max != self.max || self.room() <= LEN_FIELD) {
            self.flush(emit);
        }
        if self.open.is_empty() {
            self.start(max, 0);
        }
        self.open.put_u16(packet.len() as u16);
        let mut rest = packet;
        loop {
            let n = rest.len().min(self.room());
            self.open.put_slice(&rest[..n]);
            rest = &rest[n..];
            if rest.is_empty() {
                break;
            }
            self.flush(emit);
            let carry = rest.len().min(max - PACKED_HEADER);
            self.start(max, carry);
        }
        if self.room() <= LEN_FIELD {
            self.flush(emit);
        }
        Ok(())
    }

    /// Sends the open datagram, if any (the end of a burst).
    pub fn flush(&mut self, emit: &mut impl FnMut(Bytes)) {
        if !self.open.is_empty() {
            emit(self.open.split().freeze());
        }
    }

    fn start(&mut self, max: usize, carry: usize) {
        if self.open.capacity() < max {
            // One allocation per 64 KiB of datagrams, not one per datagram.
            self.open = BytesMut::with_capacity(max.max(64 * 1024));
        }
        self.max = max;
        self.open.put_u8(KIND_PACKED);
        self.open.put_u16(self.next_seq);
        self.open.put_u16(carry as u16);
        self.next_seq = self.next_seq.wrapping_add(1);
    }

    fn room(&self) -> usize {
        self.max.saturating_sub(self.open.len())
    }
}

/// What the receiving side counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackCounters {
    /// Packets lost because a datagram they spanned was lost or came out
    /// of sequence.
    pub partials_lost: u64,
    /// Datagrams that came after later ones (their whole packets are
    /// still delivered).
    pub late: u64,
    /// Datagrams whose body broke the format (the rest of it is dropped).
    pub malformed: u64,
}

/// The receiving side: one per path.
#[derive(Debug, Default)]
pub struct Unpacker {
    next_seq: Option<u16>,
    partial: Vec<u8>,
    /// The length of the packet in `partial`; zero when none is.
    want: usize,
    counters: UnpackCounters,
}

impl Unpacker {
    pub fn counters(&self) -> UnpackCounters {
        self.counters
    }

    /// Forgets the sequence and the packet in progress (a new connection
    /// starts its own), keeping the counters.
    pub fn restart(&mut self) {
        *self = Self {
            counters: self.counters,
            ..Self::default()
        };
    }

    /// Takes one PACKED datagram (its fields as `frame::decode_datagram`
    /// checked them: `carry <= body.len()`); each whole packet goes to
    /// `emit`.
    pub fn push(
        &mut self,
        seq: u16,
        carry: usize,
        body: &[u8],
        emit: &mut impl FnMut(&[u8]),
    ) -> Result<(), PackError> {
        let (carried, rest) = body.split_at(carry.min(body.len()));
        let behind = self.next_seq.map(|next| next.wrapping_sub(seq));
        if behind.is_some_and(|b| b != 0 && b <= LATE_WINDOW) {
            // Reordered: the packets it ends or begins were given up when
            // the later datagram came, but its whole ones are good, and the
            // packet in progress (from a later datagram) stays.
            self.counters.late += 1;
            return self.records(rest, emit, false);
        }
        let in_sequence = behind == Some(0);
        self.next_seq = Some(seq.wrapping_add(1));
        if self.want > 0 && in_sequence && !carried.is_empty() {
            let needed = self.want - self.partial.len();
            if carried.len() > needed {
                self.drop_partial();
                return self.malformed(PackError::CarryTooLong {
                    carry: carried.len(),
                    needed,
                });
            }
            self.partial.extend_from_slice(carried);
            if self.partial.len() == self.want {
                emit(&self.partial);
                self.partial.clear();
                self.want = 0;
            } else if !rest.is_empty() {
                let (want, have) = (self.want, self.partial.len());
                self.drop_partial();
                return self.malformed(PackError::PacketCutShort { want, have });
            }
        } else if self.want > 0 || !carried.is_empty() {
            // The packet in progress, or the start of the one carried
            // here, was in a datagram that did not arrive (in order).
            self.drop_partial();
            self.counters.partials_lost += 1;
        }
        self.records(rest, emit, true)
    }

    /// The records after the carried bytes; the last one, if unfinished,
    /// becomes the packet in progress (`keep`) or is dropped (a late
    /// datagram's: the datagram that continues it came before).
    fn records(
        &mut self,
        mut rest: &[u8],
        emit: &mut impl FnMut(&[u8]),
        keep: bool,
    ) -> Result<(), PackError> {
        while !rest.is_empty() {
            let [l0, l1, tail @ ..] = rest else {
                return self.malformed(PackError::TruncatedLength);
            };
            let len = usize::from(u16::from_be_bytes([*l0, *l1]));
            if len == 0 {
                return self.malformed(PackError::EmptyRecord);
            }
            if tail.len() >= len {
                emit(&tail[..len]);
                rest = &tail[len..];
            } else if keep {
                self.partial.clear();
                self.partial.extend_from_slice(tail);
                self.want = len;
                return Ok(());
            } else {
                return Ok(());
            }
        }
        Ok(())
    }

    fn drop_partial(&mut self) {
        self.partial.clear();
        self.want = 0;
    }

    fn malformed(&mut self, e: PackError) -> Result<(), PackError> {
        self.counters.malformed += 1;
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::frame::{Payload, decode_datagram};

    /// Packs `packets` (flushing after each group of `burst`) into
    /// datagrams of at most `max` bytes.
    fn pack(packets: &[Vec<u8>], max: usize, burst: usize) -> Vec<Bytes> {
        let mut p = Packer::default();
        let mut out = Vec::new();
        for group in packets.chunks(burst) {
            for packet in group {
                p.push(packet, max, &mut |d| out.push(d)).unwrap();
            }
            p.flush(&mut |d| out.push(d));
        }
        out
    }

    /// Unpacks datagrams as the relay does (through the frame decoder).
    fn unpack(u: &mut Unpacker, datagrams: &[Bytes]) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        for d in datagrams {
            let Ok(Payload::Packed { seq, carry, body }) = decode_datagram(d) else {
                panic!("not a PACKED datagram: {d:?}");
            };
            let _ = u.push(seq, carry, body, &mut |p| got.push(p.to_vec()));
        }
        got
    }

    fn packet(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 31 + j) as u8).collect()
    }

    #[test]
    fn full_size_packets_cost_little_more_than_one_datagram_each() {
        let packets: Vec<_> = (0..64).map(|i| packet(i, 1452)).collect();
        let datagrams = pack(&packets, 1434, 64);
        assert!(datagrams.iter().all(|d| d.len() <= 1434));
        // 64 x (1452 + 2) bytes in datagrams of 1429 bytes of body: 66.
        assert_eq!(datagrams.len(), 66, "not two per packet, as fragments were");
        assert_eq!(unpack(&mut Unpacker::default(), &datagrams), packets);
    }

    #[test]
    fn small_packets_share_a_datagram_and_a_burst_is_never_held_back() {
        let packets: Vec<_> = (0..10).map(|i| packet(i, 92)).collect();
        let datagrams = pack(&packets, 1434, 10);
        assert_eq!(datagrams.len(), 1);
        // One packet alone is sent at the end of its burst.
        let one = pack(&packets[..1], 1434, 1);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].len(), PACKED_HEADER + 2 + 92);
        let mut u = Unpacker::default();
        assert_eq!(unpack(&mut u, &datagrams), packets);
    }

    #[test]
    fn every_size_and_datagram_size_round_trips() {
        for max in [PACKED_HEADER + LEN_FIELD + 1, 40, 1162, 1200, 1434] {
            let packets: Vec<_> = (0..200).map(|i| packet(i, 1 + (i * 97) % 3000)).collect();
            for burst in [1, 7, 64] {
                let datagrams = pack(&packets, max, burst);
                assert!(datagrams.iter().all(|d| d.len() <= max), "max {max}");
                let mut u = Unpacker::default();
                assert_eq!(
                    unpack(&mut u, &datagrams),
                    packets,
                    "max {max} burst {burst}"
                );
                assert_eq!(u.counters(), UnpackCounters::default());
            }
        }
    }

    #[test]
    fn a_lost_datagram_loses_only_the_packets_it_carried() {
        // 1452-byte packets in 1434-byte datagrams: datagram 1 ends packet
        // 0 and starts packet 1.
        let packets: Vec<_> = (0..6).map(|i| packet(i, 1452)).collect();
        let mut datagrams = pack(&packets, 1434, 6);
        datagrams.remove(1);
        let mut u = Unpacker::default();
        let got = unpack(&mut u, &datagrams);
        assert_eq!(
            got,
            [&packets[2..]].concat(),
            "0 and 1 lost, the rest whole"
        );
        assert_eq!(u.counters().partials_lost, 1);
        assert_eq!(u.counters().malformed, 0);
    }

    #[test]
    fn out_of_sequence_drops_the_packet_in_progress_not_the_next() {
        let packets: Vec<_> = (0..4).map(|i| packet(i, 1000)).collect();
        let datagrams = pack(&packets, 1434, 4);
        assert_eq!(datagrams.len(), 3);
        let swapped = [
            datagrams[0].clone(),
            datagrams[2].clone(),
            datagrams[1].clone(),
        ];
        let mut u = Unpacker::default();
        let got = unpack(&mut u, &swapped);
        // Packet 0 whole in datagram 0; 1 and 2 span datagrams that came in
        // the wrong order; 3 starts and ends in datagram 2.
        assert!(
            got.contains(&packets[0]) && got.contains(&packets[3]),
            "{}",
            got.len()
        );
        assert!(!got.contains(&packets[1]));
        assert!(u.counters().partials_lost >= 1);
    }

    #[test]
    fn a_late_datagram_gives_its_whole_packets_and_leaves_the_packet_in_progress() {
        // 300-byte packets: each datagram holds four whole ones and parts
        // of two more.
        let packets: Vec<_> = (0..40).map(|i| packet(i, 300)).collect();
        let datagrams = pack(&packets, 1434, 40);
        assert!(datagrams.len() >= 6);
        let mut order = datagrams.clone();
        order.swap(1, 2);
        let mut u = Unpacker::default();
        let got = unpack(&mut u, &order);
        // Lost: only the packets that span 0|1 and 1|2, whose datagram
        // boundary was crossed out of order; 2|3 continues in sequence
        // after the late datagram 1.
        assert_eq!(
            got.len(),
            packets.len() - 2,
            "{} of {}",
            got.len(),
            packets.len()
        );
        assert_eq!(u.counters().late, 1);
        assert_eq!(u.counters().malformed, 0);
        // Duplicate-free, and every one of them a packet that was sent.
        let mut sorted = got.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), got.len());
        assert!(got.iter().all(|p| packets.contains(p)));
    }

    #[test]
    fn a_restart_forgets_the_sequence_and_keeps_the_counts() {
        let packets: Vec<_> = (0..3).map(|i| packet(i, 1452)).collect();
        let datagrams = pack(&packets, 1434, 3);
        let mut u = Unpacker::default();
        unpack(&mut u, &datagrams[1..2]);
        assert_eq!(u.counters().partials_lost, 1);
        u.restart();
        assert_eq!(u.counters().partials_lost, 1);
        // A new connection's first datagram (sequence 0 again) is not late.
        assert_eq!(unpack(&mut u, &datagrams), packets);
    }

    #[test]
    fn a_first_datagram_that_carries_a_tail_is_counted_and_skipped() {
        let packets: Vec<_> = (0..3).map(|i| packet(i, 1452)).collect();
        let datagrams = pack(&packets, 1434, 3);
        let mut u = Unpacker::default();
        let got = unpack(&mut u, &datagrams[1..]);
        assert_eq!(got, packets[1..].to_vec());
        assert_eq!(u.counters().partials_lost, 1);
    }

    #[test]
    fn malformed_bodies_are_refused_and_bounded() {
        let mut u = Unpacker::default();
        let mut sink = |_: &[u8]| panic!("nothing may come out");
        assert_eq!(
            u.push(0, 0, &[0], &mut sink),
            Err(PackError::TruncatedLength)
        );
        assert_eq!(
            u.push(1, 0, &[0, 0, 1], &mut sink),
            Err(PackError::EmptyRecord)
        );
        // A record announcing 65535 bytes holds one partial of at most that.
        assert_eq!(u.push(2, 0, &[0xff, 0xff, 1, 2, 3], &mut sink), Ok(()));
        assert!(u.partial.capacity() <= MAX_BODY);
        // More carried than the packet needs.
        let mut u = Unpacker::default();
        u.push(0, 0, &[0, 4, 1, 2], &mut sink).unwrap();
        assert_eq!(
            u.push(1, 5, &[1, 2, 3, 4, 5], &mut sink),
            Err(PackError::CarryTooLong {
                carry: 5,
                needed: 2
            })
        );
        // A packet left unfinished with records behind it.
        let mut u = Unpacker::default();
        u.push(0, 0, &[0, 9, 1, 2], &mut sink).unwrap();
        assert_eq!(
            u.push(1, 2, &[1, 2, 0, 1, 7], &mut sink),
            Err(PackError::PacketCutShort { want: 9, have: 4 })
        );
        assert_eq!(u.counters().malformed, 1);
    }

    #[test]
    fn the_packer_refuses_what_it_cannot_carry() {
        let mut p = Packer::default();
        let mut sink = |_: Bytes| {};
        assert_eq!(
            p.push(&[], 1434, &mut sink),
            Err(PackError::PacketSize { len: 0 })
        );
        let big = vec![0u8; MAX_BODY + 1];
        assert!(matches!(
            p.push(&big, 1434, &mut sink),
            Err(PackError::PacketSize { .. })
        ));
        assert_eq!(
            p.push(&[1], PACKED_HEADER + LEN_FIELD, &mut sink),
            Err(PackError::DatagramTooSmall { max: 7 })
        );
    }

    #[test]
    fn a_smaller_datagram_size_closes_the_open_datagram() {
        let mut p = Packer::default();
        let mut out = Vec::new();
        p.push(&packet(0, 100), 1434, &mut |d| out.push(d)).unwrap();
        p.push(&packet(1, 100), 1200, &mut |d| out.push(d)).unwrap();
        p.flush(&mut |d| out.push(d));
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|d| d.len() <= 1200));
    }
}
