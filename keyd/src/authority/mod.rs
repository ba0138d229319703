//! keyd authority: enrollment with join tokens, the embedded store, and the
//! distribution of signed roster updates to every node.

pub mod store;
