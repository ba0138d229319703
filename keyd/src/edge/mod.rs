//! The fallback ladder for edge networks (issue 12): per peer pair, direct
//! WireGuard UDP first, then WireGuard packets in QUIC datagrams on the
//! keyds' connection, then the same over TLS on TCP. See docs/edge.md.

pub mod frame;
pub mod ladder;
pub mod prober;
pub mod relay;
pub mod tcp;
