//! keyd's Prometheus endpoint (`[metrics] listen` in keyd.toml): exchange
//! counters and their latency histogram, the renderer of `/metrics`, and
//! the bounded HTTP server that serves it.

pub mod exchanges;
pub mod page;
pub mod render;
pub mod server;

#[cfg(test)]
mod render_tests;
