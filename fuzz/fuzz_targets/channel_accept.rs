//! The node↔authority channel (`mesh_proto::channel`) fed what a remote
//! client or authority can send. `mode % 4` picks:
//!
//! | mode | state | fed |
//! |---|---|---|
//! | 0 | authority, fresh | arbitrary msg1 |
//! | 1 | authority after a real msg1 | arbitrary msg3 |
//! | 2 | client after msg1 | arbitrary msg2 |
//! | 3 | authority's channel after a real handshake | chunk plaintexts of the fuzzer's choosing, encrypted by a raw Noise client |
//!
//! Mode 3 reaches the chunk parser and reassembly behind the AEAD. Checked:
//! nothing panics; random handshake bytes never complete a handshake; a
//! reassembled message is within the limit; after an error the channel
//! stays closed.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mesh_proto::channel::{
    self, ChannelError, ClientHandshake, MAX_MESSAGE_LEN, NOISE_PARAMS, ServerHandshake,
};
use mesh_proto::identity::{NoisePrivateKey, X25519Secret};
use mesh_proto::kem;

const NET: &str = "fuzz-net";
/// Small, so that the over-limit path is reached too.
const LIMIT: usize = 4096;

#[derive(Arbitrary, Debug)]
struct Input {
    mode: u8,
    bytes: Vec<u8>,
    chunks: Vec<Vec<u8>>,
}

fn key(b: u8) -> NoisePrivateKey {
    NoisePrivateKey(X25519Secret::from_bytes([b; 32]))
}

fn raw_message(hs: &mut snow::HandshakeState, payload: &[u8], read: Option<&[u8]>) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    if let Some(msg) = read {
        hs.read_message(msg, &mut buf).expect("a real msg2");
    }
    let n = hs.write_message(payload, &mut buf).expect("write");
    buf.truncate(n);
    buf
}

fn chunks(input: &Input) {
    let (client, authority) = (key(1), key(2));
    let (pinned, prologue) = (authority.public_key(), channel::prologue(NET));
    let mut hs =
        snow::Builder::with_resolver(NOISE_PARAMS.parse().expect("params"), kem::resolver())
            .local_private_key(client.0.as_bytes())
            .and_then(|b| b.remote_public_key(&pinned.0))
            .and_then(|b| b.prologue(&prologue))
            .and_then(|b| b.build_initiator())
            .expect("raw client");
    let msg1 = raw_message(&mut hs, &[], None);
    let (server, msg2) = ServerHandshake::accept(NET, &authority, &msg1).expect("real msg1");
    let msg3 = raw_message(&mut hs, b"hello", Some(&msg2));
    let (mut ch, peer, _) = server.finish(&msg3).expect("real msg3");
    assert_eq!(peer, client.public_key());
    ch.set_max_message(LIMIT);
    let mut raw = hs.into_transport_mode().expect("transport");
    let mut closed = false;
    for plain in input.chunks.iter().take(64) {
        let plain = &plain[..plain.len().min(MAX_MESSAGE_LEN - 16)];
        let mut msg = vec![0u8; plain.len() + 16];
        let n = raw.write_message(plain, &mut msg).expect("encrypt");
        match ch.open(&msg[..n]) {
            Ok(Some(m)) => {
                assert!(!closed);
                assert!(m.len() <= LIMIT);
            }
            Ok(None) => assert!(!closed),
            Err(ChannelError::Closed) => assert!(closed),
            Err(_) => {
                assert!(!closed);
                closed = true;
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let authority = key(2);
    match input.mode % 4 {
        0 => {
            let _ = ServerHandshake::accept(NET, &authority, &input.bytes);
        }
        1 => {
            let (_, msg1) =
                ClientHandshake::start(NET, &key(1), &authority.public_key()).expect("start");
            let (server, _) = ServerHandshake::accept(NET, &authority, &msg1).expect("accept");
            assert!(server.finish(&input.bytes).is_err());
        }
        2 => {
            let (client, _) =
                ClientHandshake::start(NET, &key(1), &authority.public_key()).expect("start");
            assert!(client.finish(&input.bytes, b"hello").is_err());
        }
        _ => chunks(&input),
    }
});
