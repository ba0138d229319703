//! What a packaged mesh-node does for itself at start-up, so that a unit
//! needs no root helper around it: hand its sockets to keyd's group
//! (`--socket-group`) and give the interface the overlay addresses of the
//! node's certificate (`--address-from-cert`).

pub mod address;
pub mod group;
mod netlink;
