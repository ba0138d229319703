//! The hybrid exchange (`mesh_proto::exchange::Exchange`) fed what a remote
//! peer can send, in each role and stage. The first byte picks the mode:
//!
//! | mode | state machine | fed |
//! |---|---|---|
//! | 0 | responder, fresh | arbitrary msg1 |
//! | 1 | responder after a real msg1 | arbitrary msg3 |
//! | 2 | responder after a real msg1 | a valid msg3 with an arbitrary payload |
//! | 3 | initiator after msg1 | arbitrary msg2 |
//! | 4 | initiator after msg1 | a valid msg2 with an arbitrary payload |
//! | 5 | initiator after msg3 | a valid confirmation with an arbitrary payload |
//! | 6 | initiator after msg3 | arbitrary confirmation |
//! | 7 | responder or initiator, fresh | any sequence of framed messages |
//!
//! "Valid" messages come from a raw Noise peer holding a listed node's keys
//! (the cryptography right, the content chosen by the fuzzer), so the
//! payload decoding and every trust check behind the AEAD are reached.
//! Checked always: nothing panics; an exchange queues exactly one event over
//! its life, when and only when it ends; an established epoch is above both
//! sides' last, and a responder's confirmation is a valid transport message.

#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mesh_proto::exchange::{Event, Exchange, Role};
use mesh_proto::frame::FrameDecoder;
use pqmesh_fuzz::{InitiatorHello, ResponderHello, T0, WORLD, encode, read, write};

struct Run {
    ex: Exchange,
    events: Vec<Event>,
    now: Instant,
}

impl Run {
    fn new(ex: Exchange, now: Instant) -> Self {
        Self {
            ex,
            events: Vec::new(),
            now,
        }
    }

    fn transmit(&mut self) -> Option<Vec<u8>> {
        self.ex.poll_transmit()
    }

    fn receive(&mut self, msg: &[u8]) {
        self.ex.receive(msg, self.now);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(e) = self.ex.poll_event() {
            self.events.push(e);
        }
        assert_eq!(
            self.events.len(),
            usize::from(self.ex.is_ended()),
            "one event, exactly when the exchange ends: {:?}",
            self.events
        );
        assert_eq!(self.ex.poll_timeout().is_none(), self.ex.is_ended());
    }

    fn established(&self) -> Option<&mesh_proto::exchange::Established> {
        match self.events.first() {
            Some(Event::Established(est)) => Some(est),
            _ => None,
        }
    }
}

/// A `u64` from the front of `data` (zero-padded), and the rest.
fn take_u64(data: &[u8]) -> (u64, &[u8]) {
    let n = data.len().min(8);
    let mut b = [0u8; 8];
    b[..n].copy_from_slice(&data[..n]);
    (u64::from_le_bytes(b), &data[n..])
}

fn initiator(last_epoch: u64, now: Instant) -> Run {
    let w = &*WORLD;
    let ex =
        Exchange::initiate(w.params(&w.a, Some(&w.b), last_epoch, 0), now, T0).expect("initiator");
    Run::new(ex, now)
}

/// `peer_epoch`: the responder's last epoch with the initiator `a`.
fn responder(last_epoch: u64, peer_epoch: u64, now: Instant) -> Run {
    let w = &*WORLD;
    let ex = Exchange::respond(w.params(&w.b, None, last_epoch, peer_epoch), now, T0)
        .expect("responder");
    Run::new(ex, now)
}

fuzz_target!(|data: &[u8]| {
    pqmesh_fuzz::write_seeds_if_asked("exchange");
    let w = &*WORLD;
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let now = Instant::now();
    match mode % 8 {
        0 => {
            let mut r = responder(0, 0, now);
            r.receive(data);
            if !r.ex.is_ended() {
                assert!(r.transmit().is_some(), "accepted msg1 without answering");
            }
        }
        1 => {
            let mut i = initiator(0, now);
            let mut r = responder(0, 0, now);
            let msg1 = i.transmit().expect("msg1");
            r.receive(&msg1);
            assert!(
                r.transmit().is_some() && !r.ex.is_ended(),
                "real msg1 refused"
            );
            r.receive(data);
            // Forging msg3 means breaking the AEAD under the ephemeral keys.
            assert!(r.established().is_none(), "arbitrary msg3 accepted");
        }
        2 => {
            let (last_epoch, rest) = take_u64(data);
            let (peer_epoch, payload) = take_u64(rest);
            let mut peer = w.noise(&w.a, true);
            let mut r = responder(last_epoch, peer_epoch, now);
            r.receive(&write(&mut peer, &[]).expect("msg1"));
            let msg2 = r.transmit().expect("msg2");
            let hello = read(&mut peer, &msg2);
            assert!(!hello.is_empty());
            let Some(msg3) = write(&mut peer, payload) else {
                return;
            };
            r.receive(&msg3);
            if let Some(est) = r.established() {
                assert_eq!(est.role, Role::Responder);
                assert!(
                    est.epoch > last_epoch && est.epoch > peer_epoch,
                    "epoch {} not above {last_epoch} and {peer_epoch}",
                    est.epoch
                );
                assert_eq!(est.peer.node_id(), w.a.identity.node_id());
                let confirm = r.transmit().expect("confirmation");
                let mut t = peer.into_transport_mode().expect("transport");
                let mut buf = vec![0u8; confirm.len()];
                t.read_message(&confirm, &mut buf)
                    .expect("confirmation decrypts");
            }
        }
        3 => {
            let mut i = initiator(0, now);
            i.transmit().expect("msg1");
            i.receive(data);
            assert!(i.established().is_none());
        }
        4 => {
            let (last_epoch, payload) = take_u64(data);
            let mut i = initiator(last_epoch, now);
            let mut peer = w.noise(&w.b, false);
            let msg1 = i.transmit().expect("msg1");
            assert!(read(&mut peer, &msg1).is_empty());
            let Some(msg2) = write(&mut peer, payload) else {
                return;
            };
            i.receive(&msg2);
            assert!(i.established().is_none(), "established before confirmation");
            if !i.ex.is_ended() {
                let msg3 = i.transmit().expect("msg3 after an accepted msg2");
                let ident = read(&mut peer, &msg3);
                let ident: InitiatorHello =
                    postcard::from_bytes(&ident).expect("initiator hello decodes");
                assert!(ident.epoch > last_epoch);
            }
        }
        5 | 6 => {
            let (their_last, rest) = take_u64(data);
            let (our_last, payload) = take_u64(rest);
            let mut i = initiator(our_last, now);
            let mut peer = w.noise(&w.b, false);
            read(&mut peer, &i.transmit().expect("msg1"));
            let hello = ResponderHello {
                cert: w.b.identity.cert.to_bytes(),
                last_epoch: their_last,
            };
            i.receive(&write(&mut peer, &encode(&hello)).expect("msg2"));
            if i.ex.is_ended() {
                // Only an epoch overflow may refuse this msg2.
                assert!(our_last.max(their_last) == u64::MAX, "{:?}", i.events);
                return;
            }
            let ident = read(&mut peer, &i.transmit().expect("msg3"));
            let ident: InitiatorHello = postcard::from_bytes(&ident).expect("hello decodes");
            assert!(ident.epoch > our_last && ident.epoch > their_last);
            let confirm = if mode % 8 == 5 {
                let mut t = peer.into_transport_mode().expect("transport");
                let mut buf = vec![0u8; payload.len() + 16];
                let Ok(n) = t.write_message(payload, &mut buf) else {
                    return;
                };
                buf.truncate(n);
                buf
            } else {
                payload.to_vec()
            };
            i.receive(&confirm);
            if let Some(est) = i.established() {
                assert_eq!(est.epoch, ident.epoch);
                assert_eq!(est.role, Role::Initiator);
                assert_eq!(est.peer.node_id(), w.b.identity.node_id());
            }
        }
        _ => {
            // Any sequence of messages, as keyd's driver feeds them: frames
            // off the stream, each after a fuzzer-chosen pause.
            let Some((&role, data)) = data.split_first() else {
                return;
            };
            let mut run = if role & 1 == 0 {
                responder(0, 0, now)
            } else {
                initiator(0, now)
            };
            let mut frames = FrameDecoder::default();
            frames.push(data);
            let mut t = now;
            while let Some(f) = frames.next_frame() {
                let (pause, msg) = f.split_first().map_or((0, &[][..]), |(p, m)| (*p, m));
                t += Duration::from_millis(u64::from(pause) * 50);
                run.now = t;
                run.receive(msg);
                while run.transmit().is_some() {}
            }
            assert!(
                run.established().is_none(),
                "arbitrary messages established a key"
            );
        }
    }
});
