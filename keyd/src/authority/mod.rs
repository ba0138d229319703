//! keyd authority: enrollment with join tokens, the embedded store, and the
//! distribution of signed roster updates to every node.

pub mod keys;
pub mod pool;
pub mod service;
pub mod store;
pub mod token;
pub mod wire;
