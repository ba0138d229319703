//! Path probes: the 24-byte datagrams keyd sends to a peer's data-plane
//! port to learn whether direct UDP passes (the edge ladder's direct rung).
//!
//! ```text
//! request : b"pqmP" ++ 4 zero bytes ++ 16-byte nonce
//! response: b"pqmR" ++ 4 zero bytes ++ the same 16-byte nonce
//! ```
//!
//! Request and response are the same size, so a responder never sends more
//! than it was sent (no amplification). WireGuard's messages start with
//! their type as a u32 little endian, 1 to 4, so a WireGuard packet's first
//! byte is 1..=4 and never [`FIRST_BYTE`]: a data plane tells the two apart
//! with one byte compare.

/// Every probe is exactly this long; any other length is not a probe.
pub const LEN: usize = 24;
/// The first byte of both kinds (`p`). Not a WireGuard message type.
pub const FIRST_BYTE: u8 = 0x70;
/// Magic of a request.
pub const REQUEST_MAGIC: [u8; 4] = *b"pqmP";
/// Magic of a response.
pub const RESPONSE_MAGIC: [u8; 4] = *b"pqmR";

/// A probe's 16-byte nonce, chosen at random by the sender.
pub type Nonce = [u8; 16];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Request,
    Response,
}

/// A parsed probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub kind: ProbeKind,
    pub nonce: Nonce,
}

impl Probe {
    /// The request datagram for `nonce`.
    pub fn request(nonce: Nonce) -> [u8; LEN] {
        encode(REQUEST_MAGIC, nonce)
    }

    /// The response datagram for `nonce` (the request's nonce, echoed).
    pub fn response(nonce: Nonce) -> [u8; LEN] {
        encode(RESPONSE_MAGIC, nonce)
    }

    /// The datagram of this probe.
    pub fn encode(&self) -> [u8; LEN] {
        match self.kind {
            ProbeKind::Request => Self::request(self.nonce),
            ProbeKind::Response => Self::response(self.nonce),
        }
    }

    /// The answer a responder sends to this probe: a response with the same
    /// nonce for a request, nothing for a response (answering those would
    /// let two responders bounce one datagram between them forever).
    pub fn answer(&self) -> Option<[u8; LEN]> {
        match self.kind {
            ProbeKind::Request => Some(Self::response(self.nonce)),
            ProbeKind::Response => None,
        }
    }
}

fn encode(magic: [u8; 4], nonce: Nonce) -> [u8; LEN] {
    let mut out = [0u8; LEN];
    out[..4].copy_from_slice(&magic);
    out[8..].copy_from_slice(&nonce);
    out
}

/// Parses a datagram as a probe: exactly [`LEN`] bytes, a known magic and
/// four zero bytes after it. Anything else is `None`.
pub fn parse(datagram: &[u8]) -> Option<Probe> {
    let bytes: &[u8; LEN] = datagram.try_into().ok()?;
    let (magic, rest) = bytes.split_at(4);
    let (pad, nonce) = rest.split_at(4);
    let kind = if magic == REQUEST_MAGIC {
        ProbeKind::Request
    } else if magic == RESPONSE_MAGIC {
        ProbeKind::Response
    } else {
        return None;
    };
    if pad != [0u8; 4] {
        return None;
    }
    Some(Probe {
        kind,
        nonce: nonce.try_into().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: Nonce = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];

    #[test]
    fn wire_format_is_exact() {
        let req = Probe::request(NONCE);
        assert_eq!(&req[..8], &[0x70, 0x71, 0x6d, 0x50, 0, 0, 0, 0]);
        assert_eq!(&req[8..], &NONCE);
        let resp = Probe::response(NONCE);
        assert_eq!(&resp[..8], &[0x70, 0x71, 0x6d, 0x52, 0, 0, 0, 0]);
        assert_eq!(&resp[8..], &NONCE);
        assert_eq!(req[0], FIRST_BYTE);
        assert_eq!(resp[0], FIRST_BYTE);
    }

    #[test]
    fn round_trips_and_answers_only_requests() {
        let req = parse(&Probe::request(NONCE)).unwrap();
        assert_eq!(
            req,
            Probe {
                kind: ProbeKind::Request,
                nonce: NONCE
            }
        );
        assert_eq!(req.encode(), Probe::request(NONCE));
        assert_eq!(req.answer(), Some(Probe::response(NONCE)));
        let resp = parse(&Probe::response(NONCE)).unwrap();
        assert_eq!(resp.kind, ProbeKind::Response);
        assert_eq!(resp.nonce, NONCE);
        assert_eq!(resp.encode(), Probe::response(NONCE));
        assert_eq!(resp.answer(), None);
        // Same size both ways: no amplification.
        assert_eq!(req.answer().unwrap().len(), Probe::request(NONCE).len());
    }

    #[test]
    fn wrong_length_is_not_a_probe() {
        let req = Probe::request(NONCE);
        assert_eq!(parse(&req[..LEN - 1]), None);
        let mut long = req.to_vec();
        long.push(0);
        assert_eq!(parse(&long), None);
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&req[..8]), None);
    }

    #[test]
    fn non_zero_padding_or_unknown_magic_is_not_a_probe() {
        for i in 4..8 {
            let mut req = Probe::request(NONCE);
            req[i] = 1;
            assert_eq!(parse(&req), None, "padding byte {i}");
        }
        for i in 0..4 {
            for flip in [0x01u8, 0x80] {
                let mut req = Probe::request(NONCE);
                req[i] ^= flip;
                assert_eq!(parse(&req), None, "magic byte {i} ^ {flip:#x}");
            }
        }
        let mut other = Probe::request(NONCE);
        other[3] = b'Q';
        assert_eq!(parse(&other), None);
    }

    #[test]
    fn a_wireguard_message_never_parses_as_a_probe() {
        // Types 1-4 as u32 LE, every size up to a jumbo datagram, with the
        // rest of the message shaped like a probe to make it as close as
        // possible to one.
        for ty in 1u32..=4 {
            for len in 0..=1600usize {
                let mut msg = vec![0u8; len];
                let mut tail = Probe::request(NONCE).to_vec();
                tail.resize(len.max(LEN), 0);
                msg.copy_from_slice(&tail[..len]);
                let head = ty.to_le_bytes();
                let n = len.min(4);
                msg[..n].copy_from_slice(&head[..n]);
                assert_eq!(parse(&msg), None, "type {ty}, {len} bytes");
                if let Some(&b) = msg.first() {
                    assert_ne!(b, FIRST_BYTE, "type {ty}");
                }
            }
        }
    }

    #[test]
    fn every_nonce_round_trips() {
        for b in 0..=255u8 {
            let nonce = [b; 16];
            assert_eq!(parse(&Probe::request(nonce)).unwrap().nonce, nonce);
            assert_eq!(parse(&Probe::response(nonce)).unwrap().nonce, nonce);
        }
    }
}
