//! Our transports for gotatun's `Device`: an offloaded TUN device (TSO in,
//! GRO-style coalescing out), UDP with GSO on send, and `recvmmsg` with UDP
//! GRO into reused buffers on receive.
//!
//! They run on gotatun's data-path thread (our patch 4): their descriptors
//! are not registered with tokio, and a read or write that would block
//! waits in that thread's `poll(2)` reactor
//! ([`gotatun::data_path_thread::ready`]). Off that thread (gotatun's timer
//! task sending a keepalive into a full socket buffer) such a wait fails
//! with `WouldBlock` and the packet is dropped, as a full NIC queue drops it.

pub mod gso;
pub mod probe;
pub mod tun;
pub mod udp;
pub mod udp_recv;
pub mod udp_socket;

pub use gotatun::data_path_thread::ready as wait_ready;
