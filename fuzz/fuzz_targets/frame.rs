//! The keyd stream framing (`mesh_proto::frame`): a peer chooses every byte
//! and where the stream is cut into reads. The decoder yields exactly the
//! frames a plain reading of the whole stream finds, whatever the cuts, and
//! keeps only the incomplete tail buffered.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mesh_proto::frame::{self, FrameDecoder};

#[derive(Arbitrary, Debug)]
struct Input {
    /// Sizes of the reads the stream arrives in (0 allowed); the rest of the
    /// stream arrives in one last read.
    cuts: Vec<u16>,
    stream: Vec<u8>,
}

/// The frames in `stream` read in one go, and the length of the leftover tail.
fn reference(mut stream: &[u8]) -> (Vec<Vec<u8>>, usize) {
    let mut frames = Vec::new();
    while let [hi, lo, rest @ ..] = stream {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        if rest.len() < len {
            break;
        }
        frames.push(rest[..len].to_vec());
        stream = &rest[len..];
    }
    (frames, stream.len())
}

fuzz_target!(|input: Input| {
    let mut d = FrameDecoder::default();
    let mut got = Vec::new();
    let mut rest = &input.stream[..];
    for cut in input.cuts.iter().take(256) {
        let (now, later) = rest.split_at(usize::from(*cut).min(rest.len()));
        d.push(now);
        while let Some(f) = d.next_frame() {
            got.push(f);
        }
        rest = later;
    }
    d.push(rest);
    while let Some(f) = d.next_frame() {
        got.push(f);
    }
    let (want, tail) = reference(&input.stream);
    assert_eq!(got, want);
    assert_eq!(d.pending(), tail);
    // Every frame it yields re-encodes to the bytes it came from.
    let encoded: Vec<u8> = got
        .iter()
        .flat_map(|f| frame::encode(f).expect("a decoded frame is never too long"))
        .collect();
    assert_eq!(encoded, input.stream[..input.stream.len() - tail]);
});
