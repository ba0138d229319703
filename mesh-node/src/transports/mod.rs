//! Our transports for gotatun's `Device`: an offloaded TUN device (TSO in,
//! GRO-style coalescing out), UDP with GSO on send, and `recvmmsg` with UDP
//! GRO into reused buffers on receive.

pub mod gso;
pub mod tun;
pub mod udp;
pub mod udp_recv;
