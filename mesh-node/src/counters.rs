//! Counters for refusals and errors, so every bad input is counted as well
//! as logged. Rendered in Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default, Debug)]
pub struct Counters {
    pub uapi_requests: AtomicU64,
    pub uapi_malformed: AtomicU64,
    pub uapi_failed: AtomicU64,
}

impl Counters {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        for (name, help, c) in [
            (
                "mesh_node_uapi_requests_total",
                "UAPI requests received",
                &self.uapi_requests,
            ),
            (
                "mesh_node_uapi_malformed_total",
                "UAPI requests refused as malformed",
                &self.uapi_malformed,
            ),
            (
                "mesh_node_uapi_failed_total",
                "UAPI requests that failed to apply",
                &self.uapi_failed,
            ),
        ] {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
        s
    }
}
