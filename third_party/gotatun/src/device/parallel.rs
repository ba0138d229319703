// This Source Code Form is subject to the terms of the Mozilla Public
// License, v. 2.0. If a copy of the MPL was not distributed with this
// file, You can obtain one at https://mozilla.org/MPL/2.0/.

//! Parallel crypto for one peer's batch (pqmesh patch 6).
//!
//! A batch (one TUN read's segments for one peer, or one peer's run of data
//! packets from one `recvmmsg`) becomes a [`Job`]: its packets in chunks of
//! [`CHUNK`]. The data-path thread assigns the sending counters in order
//! before the job exists (`Session::reserve_counters`), then asks the
//! [`CryptoPool`] for help and works on the job itself: every thread claims
//! whole chunks with one atomic increment, so no chunk is done twice and
//! the job never waits for a worker that is slow to wake (a late worker
//! finds nothing left). The data-path thread waits only for chunks already
//! being sealed or opened, then takes the packets back in their original
//! order: order on the wire and into the TUN device is the batch's order.
//! Opened packets are not yet accepted: the caller marks each counter in
//! the replay window, in order, after decryption (as wireguard-go does), so
//! a replayed packet that raced through decryption is still refused.
//!
//! Everything a worker touches is owned by the job (`Arc`): the packets
//! and the session's keys. Stopping the device or removing the peer while
//! a job is in flight leaves nothing dangling.
//!
//! With the `daita` feature the data path does not use the pool (DAITA's
//! hooks see each packet on its own).
#![cfg_attr(feature = "daita", allow(dead_code))]

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::noise::errors::WireGuardError;
use crate::noise::session::Session;
use crate::packet::{Packet, WgData};

/// Packets per chunk: about 23 KB at MTU 1420, some 15 µs of ChaCha20-Poly1305.
/// A batch of at most one chunk is sealed or opened inline: handing it to
/// another thread would cost more than it saves (and every ping is one).
pub const CHUNK: usize = 16;
/// Jobs waiting for help at most; past it the data-path thread does the
/// work itself.
const QUEUE_LIMIT: usize = 64;
/// How long an idle worker keeps looking for work before it sleeps: under
/// bulk traffic jobs come every few tens of µs, and waking a sleeping
/// thread costs more than that on a VM whose idle vCPUs halt.
const SPIN: Duration = Duration::from_micros(50);

/// One packet of a job, before and after its crypto.
pub(crate) enum Item {
    Plain(Packet),
    Sealed(Packet<WgData>),
    Cipher(Packet<WgData>),
    Opened(u64, Packet),
    Failed(WireGuardError),
    /// Taken (never seen by the caller).
    Empty,
}

enum Work {
    /// Packet `i` of the job is sealed with counter `base + i`.
    Seal {
        session: Arc<Session>,
        base: u64,
    },
    Open {
        session: Arc<Session>,
    },
}

pub(crate) struct Job {
    work: Work,
    chunks: Box<[Mutex<Vec<Item>>]>,
    /// The next chunk to claim; at or past `chunks.len()` nothing is left.
    next: AtomicUsize,
    /// Chunks not finished yet.
    remaining: AtomicUsize,
}

impl Job {
    fn new(work: Work, items: Vec<Item>) -> Arc<Self> {
        let mut chunks = Vec::with_capacity(items.len().div_ceil(CHUNK));
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            chunks.push(Mutex::new(items.by_ref().take(CHUNK).collect()));
        }
        let n = chunks.len();
        Arc::new(Self {
            work,
            chunks: chunks.into_boxed_slice(),
            next: AtomicUsize::new(0),
            remaining: AtomicUsize::new(n),
        })
    }

    /// Seals `packets` (already padded) with counters `base..`.
    pub(crate) fn seal(session: Arc<Session>, base: u64, packets: Vec<Packet>) -> Arc<Self> {
        Self::new(
            Work::Seal { session, base },
            packets.into_iter().map(Item::Plain).collect(),
        )
    }

    /// Opens `packets`, all for `session`.
    pub(crate) fn open(session: Arc<Session>, packets: Vec<Packet<WgData>>) -> Arc<Self> {
        Self::new(
            Work::Open { session },
            packets.into_iter().map(Item::Cipher).collect(),
        )
    }

    fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// Claims and processes chunks until none is left to claim.
    fn help(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(chunk) = self.chunks.get(i) else {
                return;
            };
            let mut items = chunk.lock();
            for (j, item) in items.iter_mut().enumerate() {
                let taken = std::mem::replace(item, Item::Empty);
                *item = match (&self.work, taken) {
                    (Work::Seal { session, base }, Item::Plain(p)) => {
                        Item::Sealed(session.seal(base + (i * CHUNK + j) as u64, p))
                    }
                    (Work::Open { session }, Item::Cipher(p)) => match session.open(p) {
                        Ok((counter, p)) => Item::Opened(counter, p),
                        Err(e) => Item::Failed(e),
                    },
                    (_, other) => other,
                };
            }
            drop(items);
            self.remaining.fetch_sub(1, Ordering::Release);
        }
    }

    fn is_done(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }

    /// The packets in their original order. Only after the job is done.
    fn take_items(&self) -> Vec<Item> {
        let mut out = Vec::with_capacity(self.chunks.len() * CHUNK);
        for chunk in self.chunks.iter() {
            out.append(&mut chunk.lock());
        }
        out
    }
}

struct Shared {
    queue: Mutex<VecDeque<Arc<Job>>>,
    wake: Condvar,
    stop: AtomicBool,
    sleeping: AtomicUsize,
}

/// Worker threads that help the data path with jobs. Dropping the pool
/// stops and joins them; a job in flight is finished by the data path.
pub struct CryptoPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for CryptoPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptoPool")
            .field("workers", &self.threads.len())
            .finish()
    }
}

impl CryptoPool {
    /// Starts `workers` threads (at least one).
    pub fn new(workers: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::with_capacity(QUEUE_LIMIT)),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            sleeping: AtomicUsize::new(0),
        });
        let threads = (0..workers.max(1))
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("crypto-{i}"))
                    // Workers never recurse or allocate much.
                    .stack_size(256 * 1024)
                    .spawn(move || worker(&shared))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self { shared, threads })
    }

    pub fn workers(&self) -> usize {
        self.threads.len()
    }

    /// Runs `job` to its end: workers are asked to help, this thread works
    /// too, then waits for chunks still in other hands (microseconds).
    pub(crate) fn run(&self, job: &Arc<Job>) -> Vec<Item> {
        let helpers = (job.chunks() - 1).min(self.threads.len());
        if helpers > 0 {
            let mut queue = self.shared.queue.lock();
            for _ in 0..helpers {
                if queue.len() >= QUEUE_LIMIT {
                    break;
                }
                queue.push_back(Arc::clone(job));
            }
            drop(queue);
            // Only a sleeping worker needs the (system) call.
            let sleeping = self.shared.sleeping.load(Ordering::Relaxed);
            for _ in 0..helpers.min(sleeping) {
                self.shared.wake.notify_one();
            }
        }
        job.help();
        let mut spins = 0u32;
        while !job.is_done() {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        job.take_items()
    }
}

impl Drop for CryptoPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        {
            let _queue = self.shared.queue.lock();
            self.shared.wake.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn worker(shared: &Shared) {
    let mut last_work = Instant::now();
    loop {
        let job = {
            let mut queue = shared.queue.lock();
            loop {
                if shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(job) = queue.pop_front() {
                    break Some(job);
                }
                if last_work.elapsed() < SPIN {
                    break None;
                }
                shared.sleeping.fetch_add(1, Ordering::Relaxed);
                shared.wake.wait(&mut queue);
                shared.sleeping.fetch_sub(1, Ordering::Relaxed);
            }
        };
        match job {
            Some(job) => {
                job.help();
                last_work = Instant::now();
            }
            None => std::thread::yield_now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::index_table::IndexTable;
    use zerocopy::IntoBytes;

    /// `a` sends to `b`.
    fn session_pair() -> (Arc<Session>, Arc<Session>) {
        let table = IndexTable::from_os_rng();
        let (k_ab, k_ba) = ([1u8; 32], [2u8; 32]);
        let b = Session::new(table.new_index(), 0, k_ab, k_ba);
        let a = Session::new(table.new_index(), b.receiving_index.value(), k_ba, k_ab);
        (Arc::new(a), Arc::new(b))
    }

    fn packet(i: usize) -> Packet {
        let mut p = Packet::from_bytes(bytes::BytesMut::from(&vec![0u8; 64][..]));
        p.buf_mut()[..8].copy_from_slice(&(i as u64).to_le_bytes());
        p
    }

    fn id(p: &Packet) -> u64 {
        u64::from_le_bytes(p.as_bytes()[..8].try_into().unwrap())
    }

    #[test]
    fn a_batch_sealed_and_opened_in_parallel_keeps_its_order_and_counters() {
        let pool = CryptoPool::new(4).unwrap();
        let (a, b) = session_pair();
        let n = 100;
        let (base, granted) = a.reserve_counters(n as u64).unwrap();
        assert_eq!((base, granted), (0, n as u64));
        let sealed = pool.run(&Job::seal(a.clone(), base, (0..n).map(packet).collect()));
        let wire: Vec<Packet<WgData>> = sealed
            .into_iter()
            .map(|item| match item {
                Item::Sealed(p) => p,
                _ => panic!("not sealed"),
            })
            .collect();
        for (i, p) in wire.iter().enumerate() {
            assert_eq!(
                p.header.counter.get(),
                i as u64,
                "counter order = batch order"
            );
        }
        let opened = pool.run(&Job::open(b.clone(), wire));
        for (i, item) in opened.into_iter().enumerate() {
            let Item::Opened(counter, p) = item else {
                panic!("packet {i} did not open");
            };
            assert_eq!(counter, i as u64);
            assert_eq!(id(&p), i as u64, "delivered in order");
            b.mark(counter).unwrap();
        }
        // The next single packet continues the counter.
        assert_eq!(a.reserve_counters(1), Some((n as u64, 1)));
    }

    #[test]
    fn a_replay_that_opens_in_parallel_is_refused_when_marked() {
        let pool = CryptoPool::new(2).unwrap();
        let (a, b) = session_pair();
        let (base, _) = a.reserve_counters(20).unwrap();
        let sealed = pool.run(&Job::seal(a, base, (0..20).map(packet).collect()));
        let mut wire: Vec<Packet<WgData>> = sealed
            .into_iter()
            .map(|item| match item {
                Item::Sealed(p) => p,
                _ => panic!("not sealed"),
            })
            .collect();
        // The same packet twice in one batch: both open (neither is marked
        // yet); the first mark wins, the second is a replay.
        let copy = Packet::from_bytes(bytes::BytesMut::from(wire[3].as_bytes()))
            .try_into_wg()
            .unwrap();
        let crate::packet::WgKind::Data(copy) = copy else {
            panic!("not data")
        };
        wire.push(copy);
        let opened = pool.run(&Job::open(b.clone(), wire));
        let marks: Vec<bool> = opened
            .into_iter()
            .map(|item| match item {
                Item::Opened(counter, _) => b.mark(counter).is_ok(),
                _ => false,
            })
            .collect();
        assert_eq!(marks.iter().filter(|m| **m).count(), 20);
        assert!(!marks[20], "the replayed copy is refused");
    }

    #[test]
    fn a_tampered_packet_fails_alone_and_the_pool_stops_cleanly() {
        let pool = CryptoPool::new(3).unwrap();
        let (a, b) = session_pair();
        let (base, _) = a.reserve_counters(40).unwrap();
        let sealed = pool.run(&Job::seal(a, base, (0..40).map(packet).collect()));
        let mut wire: Vec<Packet<WgData>> = sealed
            .into_iter()
            .map(|item| match item {
                Item::Sealed(p) => p,
                _ => panic!("not sealed"),
            })
            .collect();
        let last = wire[17].encrypted_encapsulated_packet_and_tag.len() - 1;
        wire[17].encrypted_encapsulated_packet_and_tag[last] ^= 1;
        let opened = pool.run(&Job::open(b, wire));
        for (i, item) in opened.iter().enumerate() {
            match item {
                Item::Failed(WireGuardError::InvalidAeadTag) => assert_eq!(i, 17),
                Item::Opened(..) => assert_ne!(i, 17),
                _ => panic!("unexpected item at {i}"),
            }
        }
        drop(pool); // joins every worker; a hang here fails the test by timeout
    }
}
