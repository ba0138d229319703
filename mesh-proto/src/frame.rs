//! Framing for handshake messages on a byte stream (a QUIC stream): a 2-byte
//! big-endian length, then the message. Noise caps messages at 65535 bytes,
//! which is exactly what the length field can say, so no frame is ever too
//! long to describe and the decoder never buffers more than one frame.

use crate::CodecError;

/// Prefixes `msg` with its length. Refuses what Noise itself would refuse.
pub fn encode(msg: &[u8]) -> Result<Vec<u8>, CodecError> {
    let len = u16::try_from(msg.len()).map_err(|_| CodecError::Length {
        expected: usize::from(u16::MAX),
        found: msg.len(),
    })?;
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    Ok(out)
}

/// Collects bytes as they arrive and yields whole frames.
#[derive(Default, Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Option<Vec<u8>> {
        let len = usize::from(u16::from_be_bytes([*self.buf.first()?, *self.buf.get(1)?]));
        if self.buf.len() < 2 + len {
            return None;
        }
        let frame = self.buf[2..2 + len].to_vec();
        self.buf.drain(..2 + len);
        Some(frame)
    }

    /// Bytes received that do not yet make a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refuses_oversized() {
        assert!(encode(&vec![0; 65535]).is_ok());
        assert!(encode(&vec![0; 65536]).is_err());
    }

    proptest! {
        #[test]
        fn frames_round_trip_across_any_split(
            msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..5),
            cut in any::<prop::sample::Index>(),
        ) {
            let stream: Vec<u8> = msgs.iter().flat_map(|m| encode(m).unwrap()).collect();
            let at = cut.index(stream.len() + 1);
            let mut d = FrameDecoder::default();
            let mut got = Vec::new();
            for part in [&stream[..at], &stream[at..]] {
                d.push(part);
                while let Some(f) = d.next_frame() {
                    got.push(f);
                }
            }
            prop_assert_eq!(got, msgs);
            prop_assert_eq!(d.pending(), 0);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..500)) {
            let mut d = FrameDecoder::default();
            d.push(&bytes);
            while d.next_frame().is_some() {}
        }
    }
}
