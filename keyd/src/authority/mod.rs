//! keyd authority: enrollment with join tokens, the embedded store, and the
//! distribution of signed roster updates to every node.

pub mod admin;
pub mod client;
pub mod keys;
pub mod link;
pub mod pool;
pub mod server;
pub mod service;
pub mod store;
pub mod token;
pub mod wire;
