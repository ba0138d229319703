//! Our transports for gotatun's `Device`: an offloaded TUN device (and the
//! segmentation it needs). gotatun's own UDP transport already batches with
//! sendmmsg/recvmmsg and receives with UDP GRO.

pub mod gso;
pub mod tun;
