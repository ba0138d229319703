//! Relay payloads between two keyds (docs/edge.md): WireGuard packets, their
//! fragments and keepalive pings in QUIC datagrams, and the same (plus
//! exchange messages, minus fragments) as records on the TLS/TCP rung.
//!
//! QUIC datagram payload = kind u8 ++ body:
//!   0 PACKET   one whole WireGuard packet
//!   1 FRAGMENT id u16 BE ++ index u8 ++ count u8 ++ bytes (count 2..=4, index < count)
//!   2 PING     nonce u64 BE
//!   3 PONG     nonce u64 BE
//!   5 HELLO    flags u8
//!   6 PACKED   seq u16 BE ++ carry u16 BE ++ body (pack.rs; only to a peer
//!              whose HELLO has HELLO_TAKES_PACKED)
//! TCP record = kind u8 ++ len u16 BE ++ body; kinds 0, 2, 3, 5 and
//! 4 EXCHANGE (one exchange message). A FRAGMENT, an unknown kind or a
//! malformed body ends the TCP link.
//!
//! Everything here is sans-IO: bytes and `Instant`s in, bytes and events out.
//! Nothing an unauthenticated or broken peer sends can make it panic or hold
//! more than a fixed amount of memory.

use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

pub const KIND_PACKET: u8 = 0;
pub const KIND_FRAGMENT: u8 = 1;
pub const KIND_PING: u8 = 2;
pub const KIND_PONG: u8 = 3;
pub const KIND_EXCHANGE: u8 = 4;
/// kind 5 HELLO: body = flags u8, on both carriers; tells the peer keyd
/// what this side's data plane can do (the ladder runs only when both data
/// planes answer path probes).
pub const KIND_HELLO: u8 = 5;
/// HELLO flag: this node's data plane answers path probes (mesh-node).
pub const HELLO_ANSWERS_PROBES: u8 = 1;
/// HELLO flag: this keyd takes PACKED datagrams (a keyd that does not say
/// so is sent one packet, or its fragments, per datagram).
pub const HELLO_TAKES_PACKED: u8 = 2;
/// kind 6 PACKED: WireGuard packets back to back across datagrams (pack.rs).
pub const KIND_PACKED: u8 = 6;

/// kind u8 ++ id u16 ++ index u8 ++ count u8.
pub const FRAGMENT_HEADER: usize = 5;
/// kind u8.
pub const PACKET_HEADER: usize = 1;
/// kind u8 ++ len u16.
pub const RECORD_HEADER: usize = 3;
/// The longest record body the length field can say, and the longest packet
/// we relay (a UDP payload cannot be longer either).
pub const MAX_BODY: usize = u16::MAX as usize;
/// More fragments than this means the path's datagram size is far below any
/// usable MTU; such packets are refused rather than spread thin.
pub const MAX_FRAGMENTS: u8 = 4;
const NONCE_LEN: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("empty payload")]
    Empty,
    #[error("unknown payload kind {0}")]
    UnknownKind(u8),
    #[error("a fragment arrived on the TCP rung, which never fragments")]
    FragmentOnTcp,
    #[error("payload kind {kind}: body is {found} bytes, expected {expected}")]
    BodyLength {
        kind: u8,
        expected: usize,
        found: usize,
    },
    #[error("fragment header truncated ({found} bytes)")]
    FragmentHeader { found: usize },
    #[error("fragment count {count} outside 2..={MAX_FRAGMENTS}")]
    FragmentCount { count: u8 },
    #[error("fragment index {index} not below count {count}")]
    FragmentIndex { index: u8, count: u8 },
    #[error("empty fragment")]
    EmptyFragment,
    #[error("PACKED header truncated ({found} bytes)")]
    PackedHeader { found: usize },
    #[error("PACKED datagram carries {carry} bytes in a body of {body}")]
    CarryBeyondBody { carry: usize, body: usize },
    #[error("body of {len} bytes exceeds {MAX_BODY}")]
    TooLong { len: usize },
    #[error(
        "a packet of {len} bytes needs more than {MAX_FRAGMENTS} fragments of at most {max_datagram} bytes"
    )]
    TooManyFragments { len: usize, max_datagram: usize },
    #[error("record buffer full: {pending} bytes pending, {pushed} more pushed, limit {limit}")]
    BufferFull {
        pending: usize,
        pushed: usize,
        limit: usize,
    },
}

/// One decoded QUIC datagram payload, borrowing from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload<'a> {
    Packet(&'a [u8]),
    Fragment {
        id: u16,
        index: u8,
        count: u8,
        bytes: &'a [u8],
    },
    Ping(u64),
    Pong(u64),
    Hello(u8),
    /// `carry <= body.len()` (checked by the decoder).
    Packed {
        seq: u16,
        carry: usize,
        body: &'a [u8],
    },
}

/// A fragment as the reassembler takes it (the fields of `Payload::Fragment`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment<'a> {
    pub id: u16,
    pub index: u8,
    pub count: u8,
    pub bytes: &'a [u8],
}

impl<'a> Payload<'a> {
    /// The fragment inside, if this is one.
    pub fn fragment(&self) -> Option<Fragment<'a>> {
        match *self {
            Payload::Fragment {
                id,
                index,
                count,
                bytes,
            } => Some(Fragment {
                id,
                index,
                count,
                bytes,
            }),
            _ => None,
        }
    }

    /// Appends the encoded payload to `out` (clear `out` first for a fresh
    /// datagram; its capacity is reused).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Payload::Packet(p) => encode_packet(p, out),
            Payload::Fragment {
                id,
                index,
                count,
                bytes,
            } => {
                out.reserve(FRAGMENT_HEADER + bytes.len());
                out.push(KIND_FRAGMENT);
                out.extend_from_slice(&id.to_be_bytes());
                out.push(index);
                out.push(count);
                out.extend_from_slice(bytes);
            }
            Payload::Ping(n) => encode_ping(n, out),
            Payload::Pong(n) => encode_pong(n, out),
            Payload::Hello(f) => encode_hello(f, out),
            Payload::Packed { seq, carry, body } => {
                out.push(KIND_PACKED);
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&(carry as u16).to_be_bytes());
                out.extend_from_slice(body);
            }
        }
    }

    /// Bytes `encode` appends.
    pub fn encoded_len(&self) -> usize {
        match self {
            Payload::Packet(p) => PACKET_HEADER + p.len(),
            Payload::Fragment { bytes, .. } => FRAGMENT_HEADER + bytes.len(),
            Payload::Ping(_) | Payload::Pong(_) => 1 + NONCE_LEN,
            Payload::Hello(_) => 2,
            Payload::Packed { body, .. } => super::pack::PACKED_HEADER + body.len(),
        }
    }
}

/// Appends a PACKET datagram payload to `out`.
pub fn encode_packet(packet: &[u8], out: &mut Vec<u8>) {
    out.reserve(PACKET_HEADER + packet.len());
    out.push(KIND_PACKET);
    out.extend_from_slice(packet);
}

/// Appends a PING datagram payload to `out`.
pub fn encode_ping(nonce: u64, out: &mut Vec<u8>) {
    out.push(KIND_PING);
    out.extend_from_slice(&nonce.to_be_bytes());
}

/// Appends a PONG datagram payload to `out`.
pub fn encode_pong(nonce: u64, out: &mut Vec<u8>) {
    out.push(KIND_PONG);
    out.extend_from_slice(&nonce.to_be_bytes());
}

/// Appends a HELLO datagram payload to `out`.
pub fn encode_hello(flags: u8, out: &mut Vec<u8>) {
    out.push(KIND_HELLO);
    out.push(flags);
}

/// Appends `payload` to `out`; see `Payload::encode`.
pub fn encode_datagram(payload: &Payload<'_>, out: &mut Vec<u8>) {
    payload.encode(out);
}

fn nonce(kind: u8, body: &[u8]) -> Result<u64, FrameError> {
    let bytes: [u8; NONCE_LEN] = body.try_into().map_err(|_| FrameError::BodyLength {
        kind,
        expected: NONCE_LEN,
        found: body.len(),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Decodes one QUIC datagram payload. Fragment headers are checked here
/// (count 2..=4, index < count, non-empty), so the reassembler only sees
/// well-formed fragments.
pub fn decode_datagram(datagram: &[u8]) -> Result<Payload<'_>, FrameError> {
    let (&kind, body) = datagram.split_first().ok_or(FrameError::Empty)?;
    match kind {
        KIND_PACKET => Ok(Payload::Packet(body)),
        KIND_FRAGMENT => {
            let [i0, i1, index, count, bytes @ ..] = body else {
                return Err(FrameError::FragmentHeader { found: body.len() });
            };
            let f = Fragment {
                id: u16::from_be_bytes([*i0, *i1]),
                index: *index,
                count: *count,
                bytes,
            };
            check_fragment(&f)?;
            Ok(Payload::Fragment {
                id: f.id,
                index: f.index,
                count: f.count,
                bytes: f.bytes,
            })
        }
        KIND_PING => Ok(Payload::Ping(nonce(kind, body)?)),
        KIND_PONG => Ok(Payload::Pong(nonce(kind, body)?)),
        KIND_HELLO => match body {
            [flags] => Ok(Payload::Hello(*flags)),
            _ => Err(FrameError::BodyLength {
                kind,
                expected: 1,
                found: body.len(),
            }),
        },
        KIND_PACKED => {
            let [s0, s1, c0, c1, body @ ..] = body else {
                return Err(FrameError::PackedHeader { found: body.len() });
            };
            let carry = usize::from(u16::from_be_bytes([*c0, *c1]));
            if carry > body.len() {
                return Err(FrameError::CarryBeyondBody {
                    carry,
                    body: body.len(),
                });
            }
            Ok(Payload::Packed {
                seq: u16::from_be_bytes([*s0, *s1]),
                carry,
                body,
            })
        }
        other => Err(FrameError::UnknownKind(other)),
    }
}

fn check_fragment(f: &Fragment<'_>) -> Result<(), FrameError> {
    if !(2..=MAX_FRAGMENTS).contains(&f.count) {
        return Err(FrameError::FragmentCount { count: f.count });
    }
    if f.index >= f.count {
        return Err(FrameError::FragmentIndex {
            index: f.index,
            count: f.count,
        });
    }
    if f.bytes.is_empty() {
        return Err(FrameError::EmptyFragment);
    }
    Ok(())
}

/// Splits WireGuard packets to fit the connection's current datagram size.
/// Fragment ids count up per fragmented packet and wrap.
#[derive(Debug, Default, Clone)]
pub struct Fragmenter {
    next_id: u16,
}

impl Fragmenter {
    pub fn new() -> Self {
        Self::default()
    }

    /// The datagrams for `packet` given `max_datagram` (QUIC's
    /// `max_datagram_size()` now): one PACKET if it fits, else 2..=4
    /// FRAGMENTs whose sizes differ by at most one byte. Encode each with
    /// `Payload::encode`.
    pub fn split<'p>(
        &mut self,
        packet: &'p [u8],
        max_datagram: usize,
    ) -> Result<Fragments<'p>, FrameError> {
        let len = packet.len();
        if len > MAX_BODY {
            return Err(FrameError::TooLong { len });
        }
        if PACKET_HEADER + len <= max_datagram {
            return Ok(Fragments {
                packet,
                id: 0,
                count: 1,
                next: 0,
                offset: 0,
            });
        }
        let cap = max_datagram.saturating_sub(FRAGMENT_HEADER);
        let too_many = FrameError::TooManyFragments { len, max_datagram };
        if cap == 0 {
            return Err(too_many);
        }
        // len >= max_datagram > cap, so this is at least 2.
        let count = len.div_ceil(cap);
        let count = u8::try_from(count)
            .ok()
            .filter(|c| *c <= MAX_FRAGMENTS)
            .ok_or(too_many)?;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        Ok(Fragments {
            packet,
            id,
            count,
            next: 0,
            offset: 0,
        })
    }
}

/// The datagrams of one packet, in order; see `Fragmenter::split`.
#[derive(Debug, Clone)]
pub struct Fragments<'p> {
    packet: &'p [u8],
    id: u16,
    /// 1 for a whole PACKET.
    count: u8,
    next: u8,
    offset: usize,
}

impl<'p> Fragments<'p> {
    /// How many datagrams in all (1 for an unfragmented packet).
    pub fn datagrams(&self) -> usize {
        usize::from(self.count)
    }
}

impl<'p> Iterator for Fragments<'p> {
    type Item = Payload<'p>;

    fn next(&mut self) -> Option<Payload<'p>> {
        if self.next >= self.count {
            return None;
        }
        if self.count == 1 {
            self.next = 1;
            return Some(Payload::Packet(self.packet));
        }
        let count = usize::from(self.count);
        let index = usize::from(self.next);
        // Near-equal sizes: the first `len % count` fragments take one more byte.
        let size = self.packet.len() / count + usize::from(index < self.packet.len() % count);
        let bytes = self.packet.get(self.offset..self.offset + size)?;
        let item = Payload::Fragment {
            id: self.id,
            index: self.next,
            count: self.count,
            bytes,
        };
        self.offset += size;
        self.next += 1;
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = usize::from(self.count - self.next.min(self.count));
        (left, Some(left))
    }
}

impl ExactSizeIterator for Fragments<'_> {}

/// Why the reassembler refused a fragment.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReassemblyError {
    #[error(transparent)]
    Malformed(#[from] FrameError),
    #[error("fragment {index} of packet {id} arrived twice")]
    Duplicate { id: u16, index: u8 },
    #[error("packet {id}: fragment says {found} fragments, earlier ones said {expected}")]
    InconsistentCount { id: u16, expected: u8, found: u8 },
    #[error("packet {id}: fragments add up to {total} bytes, more than {MAX_BODY}")]
    Overlong { id: u16, total: usize },
}

#[derive(Debug, Clone)]
pub struct ReassemblerConfig {
    /// Partial packets held at once; a new one beyond this evicts the oldest.
    pub max_partial: usize,
    /// A partial packet older than this is dropped: its other fragments are
    /// lost or so late that WireGuard would not care.
    pub deadline: Duration,
}

impl Default for ReassemblerConfig {
    fn default() -> Self {
        Self {
            max_partial: 64,
            deadline: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReassemblyCounters {
    pub reassembled: u64,
    pub evicted: u64,
    pub expired: u64,
    pub refused_malformed: u64,
    pub refused_duplicate: u64,
    pub refused_inconsistent: u64,
    pub refused_overlong: u64,
}

#[derive(Debug, Default)]
struct Partial {
    id: u16,
    count: u8,
    /// Bit i set: fragment i is in `parts[i]`.
    have: u8,
    total: usize,
    started: Option<Instant>,
    parts: [Vec<u8>; MAX_FRAGMENTS as usize],
}

impl Partial {
    fn reset(&mut self, id: u16, count: u8, now: Instant) {
        self.id = id;
        self.count = count;
        self.have = 0;
        self.total = 0;
        self.started = Some(now);
        for p in &mut self.parts {
            p.clear();
        }
    }

    fn complete(&self) -> bool {
        u32::from(self.have) == (1u32 << self.count) - 1
    }
}

/// Puts fragmented packets back together, within fixed bounds: at most
/// `max_partial` partial packets of at most `MAX_BODY` bytes each, each for
/// at most `deadline`. Buffers of finished partials are kept for reuse, so a
/// steady stream of fragments allocates nothing.
#[derive(Debug)]
pub struct Reassembler {
    config: ReassemblerConfig,
    /// Oldest first.
    partials: Vec<Partial>,
    spare: Vec<Partial>,
    counters: ReassemblyCounters,
}

impl Default for Reassembler {
    fn default() -> Self {
        Self::new(ReassemblerConfig::default())
    }
}

impl Reassembler {
    pub fn new(config: ReassemblerConfig) -> Self {
        Self {
            config,
            partials: Vec::new(),
            spare: Vec::new(),
            counters: ReassemblyCounters::default(),
        }
    }

    pub fn counters(&self) -> ReassemblyCounters {
        self.counters
    }

    /// Partial packets held now.
    pub fn pending(&self) -> usize {
        self.partials.len()
    }

    /// When the oldest partial expires, if any is held.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.partials
            .iter()
            .filter_map(|p| p.started)
            .min()
            .map(|t| t + self.config.deadline)
    }

    /// Drops partials whose deadline has passed.
    pub fn expire(&mut self, now: Instant) {
        let deadline = self.config.deadline;
        let mut i = 0;
        while i < self.partials.len() {
            let expired = self.partials[i]
                .started
                .is_none_or(|t| now.saturating_duration_since(t) >= deadline);
            if expired {
                let p = self.partials.remove(i);
                self.recycle(p);
                self.counters.expired += 1;
            } else {
                i += 1;
            }
        }
    }

    /// Takes one fragment; the whole packet once its last fragment arrived.
    pub fn push(
        &mut self,
        fragment: Fragment<'_>,
        now: Instant,
    ) -> Result<Option<Vec<u8>>, ReassemblyError> {
        let mut out = Vec::new();
        Ok(self.push_into(fragment, now, &mut out)?.then_some(out))
    }

    /// Like `push`, but writes a finished packet into `out` (cleared first)
    /// and says whether it did, so the caller can reuse one buffer.
    pub fn push_into(
        &mut self,
        fragment: Fragment<'_>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Result<bool, ReassemblyError> {
        let result = self.accept(fragment, now, out);
        if let Err(e) = &result {
            let c = &mut self.counters;
            match e {
                ReassemblyError::Malformed(_) => c.refused_malformed += 1,
                ReassemblyError::Duplicate { .. } => c.refused_duplicate += 1,
                ReassemblyError::InconsistentCount { .. } => c.refused_inconsistent += 1,
                ReassemblyError::Overlong { .. } => c.refused_overlong += 1,
            }
        }
        result
    }

    fn accept(
        &mut self,
        f: Fragment<'_>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Result<bool, ReassemblyError> {
        check_fragment(&f)?;
        self.expire(now);
        let at = match self.partials.iter().position(|p| p.id == f.id) {
            Some(at) => at,
            None => {
                if self.partials.len() >= self.config.max_partial.max(1) {
                    let oldest = self.partials.remove(0);
                    self.recycle(oldest);
                    self.counters.evicted += 1;
                }
                let mut p = self.spare.pop().unwrap_or_default();
                p.reset(f.id, f.count, now);
                self.partials.push(p);
                self.partials.len() - 1
            }
        };
        let p = &mut self.partials[at];
        if p.count != f.count {
            return Err(ReassemblyError::InconsistentCount {
                id: f.id,
                expected: p.count,
                found: f.count,
            });
        }
        let bit = 1u8 << f.index;
        if p.have & bit != 0 {
            return Err(ReassemblyError::Duplicate {
                id: f.id,
                index: f.index,
            });
        }
        let total = p.total + f.bytes.len();
        if total > MAX_BODY {
            // It can never become a valid packet: drop what we have.
            let p = self.partials.remove(at);
            self.recycle(p);
            return Err(ReassemblyError::Overlong { id: f.id, total });
        }
        p.total = total;
        p.have |= bit;
        let slot = &mut p.parts[usize::from(f.index)];
        slot.clear();
        slot.extend_from_slice(f.bytes);
        if !p.complete() {
            return Ok(false);
        }
        let p = self.partials.remove(at);
        out.clear();
        out.reserve(p.total);
        for part in &p.parts[..usize::from(p.count)] {
            out.extend_from_slice(part);
        }
        self.recycle(p);
        self.counters.reassembled += 1;
        Ok(true)
    }

    fn recycle(&mut self, p: Partial) {
        if self.spare.len() < self.config.max_partial {
            self.spare.push(p);
        }
    }
}

/// The kinds a TCP record may carry (never FRAGMENT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Packet,
    Ping,
    Pong,
    Exchange,
    Hello,
}

impl RecordKind {
    pub fn byte(self) -> u8 {
        match self {
            RecordKind::Packet => KIND_PACKET,
            RecordKind::Ping => KIND_PING,
            RecordKind::Pong => KIND_PONG,
            RecordKind::Exchange => KIND_EXCHANGE,
            RecordKind::Hello => KIND_HELLO,
        }
    }
}

/// One decoded TCP record, borrowing from the decoder's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    Packet(&'a [u8]),
    Ping(u64),
    Pong(u64),
    /// One exchange message (a `mesh_proto::frame` payload).
    Exchange(&'a [u8]),
    Hello(u8),
}

impl Record<'_> {
    /// Appends the encoded record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        match *self {
            Record::Packet(b) => encode_record(RecordKind::Packet, b, out),
            Record::Exchange(b) => encode_record(RecordKind::Exchange, b, out),
            Record::Ping(n) => encode_record(RecordKind::Ping, &n.to_be_bytes(), out),
            Record::Pong(n) => encode_record(RecordKind::Pong, &n.to_be_bytes(), out),
            Record::Hello(f) => encode_record(RecordKind::Hello, &[f], out),
        }
    }
}

/// Appends kind ++ len u16 BE ++ body to `out`. Refuses a body the length
/// field cannot say.
pub fn encode_record(kind: RecordKind, body: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    let len = u16::try_from(body.len()).map_err(|_| FrameError::TooLong { len: body.len() })?;
    out.reserve(RECORD_HEADER + body.len());
    out.push(kind.byte());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// Default for the most bytes one `push` may bring (one socket read).
pub const DEFAULT_READ_SIZE: usize = 64 * 1024;

/// Collects bytes from the TLS stream and yields whole records. Its buffer
/// never holds more than one maximal record plus one read; a kind it does
/// not know, a FRAGMENT or a malformed PING/PONG ends the link (the error is
/// sticky: every later `next` returns it again).
#[derive(Debug)]
pub struct RecordDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out; dropped at the next `push`.
    start: usize,
    limit: usize,
    failed: Option<FrameError>,
}

impl Default for RecordDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_READ_SIZE)
    }
}

impl RecordDecoder {
    /// `read_size`: the most bytes the caller pushes at once.
    pub fn new(read_size: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            limit: RECORD_HEADER + MAX_BODY + read_size,
            failed: None,
        }
    }

    /// Adds bytes read from the stream. Call `next` until it returns `None`
    /// before pushing again; if the caller does not, the buffer bound is
    /// kept by refusing the bytes.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.buf.drain(..self.start);
        self.start = 0;
        if self.buf.len() + bytes.len() > self.limit {
            return Err(FrameError::BufferFull {
                pending: self.buf.len(),
                pushed: bytes.len(),
                limit: self.limit,
            });
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// Bytes received that do not yet make a whole record.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next whole record, if one has arrived. Not an `Iterator`: the
    /// record borrows from the decoder's buffer.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Result<Record<'_>, FrameError>> {
        if let Some(e) = &self.failed {
            return Some(Err(e.clone()));
        }
        let rest = self.buf.get(self.start..)?;
        let [kind, l0, l1, ..] = *rest else {
            return None;
        };
        let len = usize::from(u16::from_be_bytes([l0, l1]));
        // Refuse a bad kind as soon as its header is here, not after
        // buffering its body.
        let err = match kind {
            KIND_PACKET | KIND_EXCHANGE | KIND_PING | KIND_PONG => None,
            KIND_HELLO if len != 1 => Some(FrameError::BodyLength {
                kind,
                expected: 1,
                found: len,
            }),
            KIND_HELLO => None,
            KIND_FRAGMENT => Some(FrameError::FragmentOnTcp),
            other => Some(FrameError::UnknownKind(other)),
        };
        let err = err.or_else(|| {
            ((kind == KIND_PING || kind == KIND_PONG) && len != NONCE_LEN).then_some(
                FrameError::BodyLength {
                    kind,
                    expected: NONCE_LEN,
                    found: len,
                },
            )
        });
        if let Some(e) = err {
            self.failed = Some(e.clone());
            return Some(Err(e));
        }
        let end = self.start + RECORD_HEADER + len;
        let body = self.buf.get(self.start + RECORD_HEADER..end)?;
        self.start = end;
        let record = match kind {
            KIND_PACKET => Record::Packet(body),
            KIND_EXCHANGE => Record::Exchange(body),
            KIND_HELLO => match body {
                [flags] => Record::Hello(*flags),
                _ => return None,
            },
            // The length was checked above; `nonce` checks again rather than index.
            KIND_PING => match nonce(kind, body) {
                Ok(n) => Record::Ping(n),
                Err(e) => return Some(Err(e)),
            },
            _ => match nonce(kind, body) {
                Ok(n) => Record::Pong(n),
                Err(e) => return Some(Err(e)),
            },
        };
        Some(Ok(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn datagrams(f: &mut Fragmenter, packet: &[u8], max: usize) -> Vec<Vec<u8>> {
        f.split(packet, max)
            .unwrap()
            .map(|p| {
                let mut out = Vec::new();
                p.encode(&mut out);
                out
            })
            .collect()
    }

    #[test]
    fn datagram_wire_format() {
        let mut out = Vec::new();
        encode_packet(&[9, 8, 7], &mut out);
        assert_eq!(out, [0, 9, 8, 7]);
        out.clear();
        encode_ping(0x0102030405060708, &mut out);
        assert_eq!(out, [2, 1, 2, 3, 4, 5, 6, 7, 8]);
        out.clear();
        encode_pong(1, &mut out);
        assert_eq!(out, [3, 0, 0, 0, 0, 0, 0, 0, 1]);
        out.clear();
        Payload::Fragment {
            id: 0x0102,
            index: 1,
            count: 3,
            bytes: &[0xaa],
        }
        .encode(&mut out);
        assert_eq!(out, [1, 1, 2, 1, 3, 0xaa]);
        assert_eq!(
            decode_datagram(&out),
            Ok(Payload::Fragment {
                id: 0x0102,
                index: 1,
                count: 3,
                bytes: &[0xaa]
            })
        );
        assert_eq!(decode_datagram(&[0]), Ok(Payload::Packet(&[])));
        assert_eq!(
            decode_datagram(&[2, 0, 0, 0, 0, 0, 0, 0, 7]),
            Ok(Payload::Ping(7))
        );
        assert_eq!(
            decode_datagram(&[3, 0, 0, 0, 0, 0, 0, 0, 7]),
            Ok(Payload::Pong(7))
        );
    }

    #[test]
    fn datagram_refusals() {
        assert_eq!(decode_datagram(&[]), Err(FrameError::Empty));
        assert_eq!(decode_datagram(&[4, 1]), Err(FrameError::UnknownKind(4)));
        assert_eq!(decode_datagram(&[0xff]), Err(FrameError::UnknownKind(0xff)));
        assert_eq!(
            decode_datagram(&[2, 0, 0]),
            Err(FrameError::BodyLength {
                kind: 2,
                expected: 8,
                found: 2
            })
        );
        assert_eq!(
            decode_datagram(&[3; 10]),
            Err(FrameError::BodyLength {
                kind: 3,
                expected: 8,
                found: 9
            })
        );
        assert_eq!(
            decode_datagram(&[1, 0, 0, 0]),
            Err(FrameError::FragmentHeader { found: 3 })
        );
        assert_eq!(
            decode_datagram(&[1, 0, 0, 0, 1, 5]),
            Err(FrameError::FragmentCount { count: 1 })
        );
        assert_eq!(
            decode_datagram(&[1, 0, 0, 0, 5, 5]),
            Err(FrameError::FragmentCount { count: 5 })
        );
        assert_eq!(
            decode_datagram(&[1, 0, 0, 2, 2, 5]),
            Err(FrameError::FragmentIndex { index: 2, count: 2 })
        );
        assert_eq!(
            decode_datagram(&[1, 0, 0, 1, 2]),
            Err(FrameError::EmptyFragment)
        );
    }

    #[test]
    fn whole_packet_when_it_fits() {
        let mut f = Fragmenter::new();
        let p = vec![7u8; 1199];
        let d = datagrams(&mut f, &p, 1200);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].len(), 1200);
        assert_eq!(decode_datagram(&d[0]), Ok(Payload::Packet(&p[..])));
        // An unfragmented packet takes no id.
        let s = f.split(&p[..10], 1200).unwrap();
        assert_eq!(s.datagrams(), 1);
        assert_eq!(f.next_id, 0);
    }

    #[test]
    fn fragments_near_equal_and_fit() {
        let mut f = Fragmenter::new();
        // 1452: a 1420-byte MTU's WireGuard packet (plus 32 bytes).
        let p: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
        let d = datagrams(&mut f, &p[..1452], 1200);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].len(), FRAGMENT_HEADER + 726);
        assert_eq!(d[1].len(), FRAGMENT_HEADER + 726);
        let d = datagrams(&mut f, &p[..1453 - 2], 500);
        assert_eq!(d.len(), 3);
        let sizes: Vec<usize> = d.iter().map(Vec::len).collect();
        assert_eq!(sizes, [5 + 484, 5 + 484, 5 + 483]);
        assert!(d.iter().all(|x| x.len() <= 500));
        // Ids count up per fragmented packet.
        assert_eq!(d[0][1..3], [0, 1]);
        // Exactly four fit; five do not.
        assert_eq!(f.split(&p[..4 * 495], 500).unwrap().datagrams(), 4);
        assert_eq!(
            f.split(&p[..4 * 495 + 1], 500).err(),
            Some(FrameError::TooManyFragments {
                len: 1981,
                max_datagram: 500
            })
        );
        assert!(f.split(&p, 5).is_err());
        assert!(f.split(&p, 0).is_err());
        assert_eq!(
            f.split(&vec![0; MAX_BODY + 1], usize::MAX).err(),
            Some(FrameError::TooLong { len: MAX_BODY + 1 })
        );
    }

    #[test]
    fn fragment_ids_wrap() {
        let mut f = Fragmenter { next_id: u16::MAX };
        let p = [1u8; 100];
        let a: Vec<_> = f.split(&p, 60).unwrap().collect();
        let b: Vec<_> = f.split(&p, 60).unwrap().collect();
        assert!(matches!(a[0], Payload::Fragment { id: u16::MAX, .. }));
        assert!(matches!(b[0], Payload::Fragment { id: 0, .. }));
    }

    fn frag(id: u16, index: u8, count: u8, bytes: &[u8]) -> Fragment<'_> {
        Fragment {
            id,
            index,
            count,
            bytes,
        }
    }

    #[test]
    fn reassembles_out_of_order() {
        let t0 = Instant::now();
        let mut r = Reassembler::default();
        assert_eq!(r.push(frag(5, 2, 3, b"ef"), t0), Ok(None));
        assert_eq!(r.push(frag(5, 0, 3, b"ab"), t0), Ok(None));
        assert_eq!(r.pending(), 1);
        assert_eq!(
            r.push(frag(5, 1, 3, b"cd"), t0),
            Ok(Some(b"abcdef".to_vec()))
        );
        assert_eq!(r.pending(), 0);
        assert_eq!(r.counters().reassembled, 1);
        // The same id again later is a new packet.
        assert_eq!(r.push(frag(5, 1, 2, b"y"), t0), Ok(None));
        let mut out = vec![1, 2, 3];
        assert_eq!(r.push_into(frag(5, 0, 2, b"x"), t0, &mut out), Ok(true));
        assert_eq!(out, b"xy");
    }

    #[test]
    fn refuses_duplicates_and_inconsistent_counts() {
        let t0 = Instant::now();
        let mut r = Reassembler::default();
        assert_eq!(r.push(frag(1, 0, 3, b"a"), t0), Ok(None));
        assert_eq!(
            r.push(frag(1, 0, 3, b"Z"), t0),
            Err(ReassemblyError::Duplicate { id: 1, index: 0 })
        );
        assert_eq!(
            r.push(frag(1, 1, 2, b"b"), t0),
            Err(ReassemblyError::InconsistentCount {
                id: 1,
                expected: 3,
                found: 2
            })
        );
        assert_eq!(
            r.push(frag(1, 7, 3, b"b"), t0),
            Err(ReassemblyError::Malformed(FrameError::FragmentIndex {
                index: 7,
                count: 3
            }))
        );
        // The refused fragments did not spoil the packet.
        assert_eq!(r.push(frag(1, 1, 3, b"b"), t0), Ok(None));
        assert_eq!(r.push(frag(1, 2, 3, b"c"), t0), Ok(Some(b"abc".to_vec())));
        let c = r.counters();
        assert_eq!(
            (
                c.refused_duplicate,
                c.refused_inconsistent,
                c.refused_malformed
            ),
            (1, 1, 1)
        );
    }

    #[test]
    fn refuses_overlong_totals() {
        let t0 = Instant::now();
        let mut r = Reassembler::default();
        let big = vec![0u8; 30_000];
        assert_eq!(r.push(frag(9, 0, 3, &big), t0), Ok(None));
        assert_eq!(r.push(frag(9, 1, 3, &big), t0), Ok(None));
        assert_eq!(
            r.push(frag(9, 2, 3, &big), t0),
            Err(ReassemblyError::Overlong {
                id: 9,
                total: 90_000
            })
        );
        // The partial is gone; it could never have been valid.
        assert_eq!(r.pending(), 0);
        assert_eq!(r.counters().refused_overlong, 1);
        // Exactly MAX_BODY is fine.
        let a = vec![1u8; 32_768];
        let b = vec![2u8; MAX_BODY - 32_768];
        assert_eq!(r.push(frag(10, 0, 2, &a), t0), Ok(None));
        let whole = r.push(frag(10, 1, 2, &b), t0).unwrap().unwrap();
        assert_eq!(whole.len(), MAX_BODY);
    }

    #[test]
    fn evicts_oldest_when_full() {
        let t0 = Instant::now();
        let mut r = Reassembler::new(ReassemblerConfig {
            max_partial: 3,
            deadline: Duration::from_secs(1),
        });
        for id in 0..3u16 {
            r.push(frag(id, 0, 2, b"a"), t0).unwrap();
        }
        r.push(frag(3, 0, 2, b"a"), t0).unwrap();
        assert_eq!(r.pending(), 3);
        assert_eq!(r.counters().evicted, 1);
        // Packet 0 was the oldest and is gone: its second half starts anew
        // (evicting 1), packets 2 and 3 still complete.
        assert_eq!(r.push(frag(0, 1, 2, b"b"), t0), Ok(None));
        assert_eq!(r.counters().evicted, 2);
        assert_eq!(r.push(frag(2, 1, 2, b"b"), t0), Ok(Some(b"ab".to_vec())));
        assert_eq!(r.push(frag(3, 1, 2, b"b"), t0), Ok(Some(b"ab".to_vec())));
    }

    #[test]
    fn expires_after_deadline() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut r = Reassembler::default();
        assert_eq!(r.poll_timeout(), None);
        r.push(frag(1, 0, 2, b"a"), t0).unwrap();
        r.push(frag(2, 0, 2, b"a"), t0 + ms(50)).unwrap();
        assert_eq!(r.poll_timeout(), Some(t0 + ms(100)));
        r.expire(t0 + ms(99));
        assert_eq!(r.pending(), 2);
        r.expire(t0 + ms(100));
        assert_eq!(r.pending(), 1);
        assert_eq!(r.counters().expired, 1);
        // A late second half of packet 1 does not complete anything.
        assert_eq!(r.push(frag(1, 1, 2, b"b"), t0 + ms(120)), Ok(None));
        // Packet 2 completes within its deadline.
        assert_eq!(
            r.push(frag(2, 1, 2, b"b"), t0 + ms(149)),
            Ok(Some(b"ab".to_vec()))
        );
        // push expires lazily too.
        assert_eq!(r.push(frag(7, 0, 2, b"x"), t0 + ms(400)), Ok(None));
        assert_eq!(r.counters().expired, 2);
        assert_eq!(r.pending(), 1);
    }

    #[test]
    fn packed_datagrams_decode_and_their_headers_are_checked() {
        let p = Payload::Packed {
            seq: 0xfffe,
            carry: 2,
            body: &[9, 9, 0, 1, 7],
        };
        let mut out = Vec::new();
        p.encode(&mut out);
        assert_eq!(out, [KIND_PACKED, 0xff, 0xfe, 0, 2, 9, 9, 0, 1, 7]);
        assert_eq!(out.len(), p.encoded_len());
        assert_eq!(decode_datagram(&out), Ok(p));
        assert_eq!(
            decode_datagram(&[KIND_PACKED, 0, 1, 0]),
            Err(FrameError::PackedHeader { found: 3 })
        );
        assert_eq!(
            decode_datagram(&[KIND_PACKED, 0, 1, 0, 3, 1, 2]),
            Err(FrameError::CarryBeyondBody { carry: 3, body: 2 })
        );
        // An older keyd sees only the flag it knows.
        assert_eq!(HELLO_TAKES_PACKED & HELLO_ANSWERS_PROBES, 0);
    }

    #[test]
    fn hello_on_both_carriers() {
        let mut out = Vec::new();
        encode_hello(HELLO_ANSWERS_PROBES, &mut out);
        assert_eq!(out, [KIND_HELLO, 1]);
        assert_eq!(decode_datagram(&out), Ok(Payload::Hello(1)));
        assert!(decode_datagram(&[KIND_HELLO]).is_err());
        assert!(decode_datagram(&[KIND_HELLO, 1, 0]).is_err());
        let mut out = Vec::new();
        Record::Hello(1).encode(&mut out).unwrap();
        assert_eq!(out, [KIND_HELLO, 0, 1, 1]);
        let mut d = RecordDecoder::default();
        d.push(&out).unwrap();
        assert_eq!(d.next(), Some(Ok(Record::Hello(1))));
        let mut d = RecordDecoder::default();
        d.push(&[KIND_HELLO, 0, 2, 1, 1]).unwrap();
        assert!(matches!(d.next(), Some(Err(FrameError::BodyLength { .. }))));
    }

    #[test]
    fn record_wire_format() {
        let mut out = Vec::new();
        encode_record(RecordKind::Packet, b"abc", &mut out).unwrap();
        Record::Ping(0x0102).encode(&mut out).unwrap();
        Record::Pong(3).encode(&mut out).unwrap();
        Record::Exchange(b"xy").encode(&mut out).unwrap();
        assert_eq!(
            out,
            [
                0, 0, 3, b'a', b'b', b'c', //
                2, 0, 8, 0, 0, 0, 0, 0, 0, 1, 2, //
                3, 0, 8, 0, 0, 0, 0, 0, 0, 0, 3, //
                4, 0, 2, b'x', b'y'
            ]
        );
        let mut d = RecordDecoder::default();
        d.push(&out).unwrap();
        assert_eq!(d.next(), Some(Ok(Record::Packet(b"abc"))));
        assert_eq!(d.next(), Some(Ok(Record::Ping(0x0102))));
        assert_eq!(d.next(), Some(Ok(Record::Pong(3))));
        assert_eq!(d.next(), Some(Ok(Record::Exchange(b"xy"))));
        assert_eq!(d.next(), None);
        assert_eq!(d.pending(), 0);
        assert_eq!(
            encode_record(RecordKind::Packet, &vec![0; MAX_BODY + 1], &mut out),
            Err(FrameError::TooLong { len: MAX_BODY + 1 })
        );
        assert!(encode_record(RecordKind::Packet, &vec![0; MAX_BODY], &mut out).is_ok());
    }

    #[test]
    fn record_refusals_end_the_link() {
        for (bytes, err) in [
            (&[1u8, 0, 5][..], FrameError::FragmentOnTcp),
            (&[9, 0, 0], FrameError::UnknownKind(9)),
            (
                &[2, 0, 7],
                FrameError::BodyLength {
                    kind: 2,
                    expected: 8,
                    found: 7,
                },
            ),
        ] {
            let mut d = RecordDecoder::default();
            d.push(&[0, 0, 1, 42]).unwrap();
            d.push(bytes).unwrap();
            assert_eq!(d.next(), Some(Ok(Record::Packet(&[42]))));
            // Refused on the header alone, before any body arrives.
            assert_eq!(d.next(), Some(Err(err.clone())));
            assert_eq!(d.next(), Some(Err(err.clone())));
            assert_eq!(d.push(&[0, 0, 0]), Err(err));
        }
    }

    #[test]
    fn record_buffer_is_bounded() {
        let chunk = [0u8; 1000];
        // A caller that drains after every read never hits the bound, even
        // across a maximal record.
        let mut d = RecordDecoder::new(1000);
        d.push(&[0, 0xff, 0xff]).unwrap();
        let mut records = 0;
        for _ in 0..200 {
            d.push(&chunk).unwrap();
            while let Some(r) = d.next() {
                r.unwrap();
                records += 1;
            }
        }
        assert!(records > 1);
        // One that does not drain is refused rather than grown: 3 + 65535
        // bytes of a record plus one read of 1000, no more.
        let mut d = RecordDecoder::new(1000);
        d.push(&[0, 0xff, 0xff]).unwrap();
        let mut accepted = 3;
        while d.push(&chunk).is_ok() {
            accepted += 1000;
        }
        assert_eq!(accepted, 3 + 66_000);
        assert!(d.pending() <= RECORD_HEADER + MAX_BODY + 1000);
    }

    proptest! {
        #[test]
        fn fragment_reassemble_round_trip(
            len in 1usize..=MAX_BODY,
            max in 6usize..70_000,
            order in Just(()).prop_perturb(|_, mut rng| {
                let mut o = [0u8, 1, 2, 3];
                for i in (1..4).rev() {
                    let j = (rng.next_u32() as usize) % (i + 1);
                    o.swap(i, j);
                }
                o
            }),
            seed in any::<u8>(),
        ) {
            let packet: Vec<u8> = (0..len).map(|i| (i as u8) ^ seed).collect();
            let mut f = Fragmenter::new();
            let Ok(split) = f.split(&packet, max) else {
                // Refused only when more than four fragments would be needed.
                prop_assert!(len.div_ceil(max - FRAGMENT_HEADER) > 4);
                return Ok(());
            };
            let encoded: Vec<Vec<u8>> = split.map(|p| { let mut o = Vec::new(); p.encode(&mut o); o }).collect();
            prop_assert!(encoded.iter().all(|d| d.len() <= max));
            let sizes: Vec<usize> = encoded.iter().map(Vec::len).collect();
            prop_assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            let t0 = Instant::now();
            let mut r = Reassembler::default();
            let mut whole = None;
            let n = encoded.len();
            for &i in order.iter().filter(|&&i| usize::from(i) < n) {
                match decode_datagram(&encoded[usize::from(i)]).unwrap() {
                    Payload::Packet(p) => whole = Some(p.to_vec()),
                    p => {
                        prop_assert!(whole.is_none());
                        whole = r.push(p.fragment().unwrap(), t0).unwrap();
                    }
                }
            }
            prop_assert_eq!(whole, Some(packet));
            prop_assert_eq!(r.pending(), 0);
        }

        #[test]
        fn fragments_at_path_sizes_round_trip_interleaved(
            // WireGuard packets up to a 1420-byte MTU and beyond, QUIC
            // datagram sizes of real paths.
            lens in proptest::collection::vec(1usize..4_000, 1..8),
            max in 1_100usize..1_500,
            keys in proptest::collection::vec(any::<u32>(), 32),
        ) {
            let packets: Vec<Vec<u8>> = lens.iter().enumerate()
                .map(|(n, &len)| (0..len).map(|i| (i * 7 + n) as u8).collect())
                .collect();
            let mut f = Fragmenter::new();
            let mut datagrams = Vec::new();
            for p in &packets {
                for d in f.split(p, max).unwrap() {
                    let mut out = Vec::new();
                    d.encode(&mut out);
                    prop_assert!(out.len() <= max);
                    datagrams.push(out);
                }
            }
            // Any interleaving of all packets' datagrams.
            let mut order: Vec<usize> = (0..datagrams.len()).collect();
            order.sort_by_key(|&i| keys[i % keys.len()].rotate_left(i as u32));
            let t0 = Instant::now();
            let mut r = Reassembler::default();
            let mut got = Vec::new();
            for i in order {
                match decode_datagram(&datagrams[i]).unwrap() {
                    Payload::Packet(p) => got.push(p.to_vec()),
                    p => if let Some(w) = r.push(p.fragment().unwrap(), t0).unwrap() {
                        got.push(w);
                    },
                }
            }
            let mut want = packets.clone();
            want.sort();
            got.sort();
            prop_assert_eq!(got, want);
            prop_assert_eq!(r.pending(), 0);
            prop_assert_eq!(r.counters().reassembled as usize, lens.iter().filter(|&&l| l + 1 > max).count());
        }

        #[test]
        fn datagram_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let t0 = Instant::now();
            let mut r = Reassembler::new(ReassemblerConfig { max_partial: 2, deadline: Duration::from_millis(1) });
            if let Some(f) = decode_datagram(&bytes).ok().and_then(|p| p.fragment()) {
                let _ = r.push(f, t0);
            }
        }

        #[test]
        fn reassembler_never_panics(
            frags in proptest::collection::vec((0u16..4, any::<u8>(), any::<u8>(), 0usize..40_000, 0u64..300), 0..40),
        ) {
            let t0 = Instant::now();
            let mut r = Reassembler::new(ReassemblerConfig { max_partial: 3, deadline: Duration::from_millis(100) });
            let big = vec![0u8; 40_000];
            let mut t = t0;
            for (id, index, count, len, dt) in frags {
                t += Duration::from_millis(dt);
                if let Ok(Some(p)) = r.push(frag(id, index, count, &big[..len]), t) {
                    prop_assert!(p.len() <= MAX_BODY);
                }
                prop_assert!(r.pending() <= 3);
            }
        }

        #[test]
        fn record_decoder_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            cut in any::<prop::sample::Index>(),
        ) {
            let at = cut.index(bytes.len() + 1);
            let mut d = RecordDecoder::new(600);
            for part in [&bytes[..at], &bytes[at..]] {
                if d.push(part).is_err() { break; }
                while let Some(r) = d.next() {
                    if r.is_err() { break; }
                }
            }
        }

        #[test]
        fn records_round_trip_across_any_split(
            bodies in proptest::collection::vec((0u8..4, proptest::collection::vec(any::<u8>(), 0..300), any::<u64>()), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let records: Vec<Record<'_>> = bodies.iter().map(|(k, b, n)| match k {
                0 => Record::Packet(b),
                1 => Record::Ping(*n),
                2 => Record::Pong(*n),
                _ => Record::Exchange(b),
            }).collect();
            let mut stream = Vec::new();
            for r in &records { r.encode(&mut stream).unwrap(); }
            let at = cut.index(stream.len() + 1);
            let mut d = RecordDecoder::default();
            let mut got = 0;
            for part in [&stream[..at], &stream[at..]] {
                d.push(part).unwrap();
                while let Some(r) = d.next() {
                    prop_assert_eq!(r.unwrap(), records[got]);
                    got += 1;
                }
            }
            prop_assert_eq!(got, records.len());
            prop_assert_eq!(d.pending(), 0);
        }
    }
}
