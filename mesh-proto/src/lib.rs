//! pqmesh's sans-IO core.
//!
//! Everything here takes bytes and time in and gives bytes, deadlines and
//! events out: no sockets, no async runtime, no file system. The binaries
//! (`keyd`, `mesh-node`) own all I/O. See `docs/architecture.md`.

pub mod armor;
pub mod cert;
pub mod channel;
pub mod cookie;
pub mod delta;
pub mod error;
pub mod exchange;
#[cfg(test)]
mod exchange_tests;
pub mod exposition;
pub mod firewall;
pub mod frame;
pub mod identity;
pub mod kem;
pub mod logformat;
pub mod prefix;
pub mod probe;
pub mod roster;
pub mod schedule;
pub mod signed;
pub mod trust;
pub mod uapi;

pub use error::{CertError, CodecError, ExchangeError, KeyError, RosterError, TrustError};

/// Seconds since the Unix epoch. Certificate validity is judged in wall-clock
/// time, which the caller supplies (sans-IO: this crate never reads a clock).
pub type UnixTime = u64;
