//! Our transports for gotatun's `Device`: an offloaded TUN device (TSO in,
//! GRO-style coalescing out) and UDP with GSO on send. gotatun's own UDP
//! receive path (recvmmsg with UDP GRO) is kept.

pub mod gso;
pub mod tun;
pub mod udp;
