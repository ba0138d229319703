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
        render_counters(
            &mut s,
            [
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
            ],
        );
        s
    }
}

/// Path probes (mesh_proto::probe) that reached our UDP socket. Process-wide:
/// the socket's receiver counts here without a handle on [`Counters`].
#[derive(Default, Debug)]
pub struct ProbeCounters {
    /// Requests granted an answer (within the rate limit).
    pub answered: AtomicU64,
    /// Responses that arrived here (we never send requests): dropped.
    pub responses_dropped: AtomicU64,
    /// Requests dropped unanswered because the answer budget was spent.
    pub rate_limited: AtomicU64,
    /// Of those, answers the socket would not take (send buffer full, error).
    pub answer_failed: AtomicU64,
}

/// The counters of this process's probe responder.
pub static PROBES: ProbeCounters = ProbeCounters::new();

impl ProbeCounters {
    pub const fn new() -> Self {
        Self {
            answered: AtomicU64::new(0),
            responses_dropped: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            answer_failed: AtomicU64::new(0),
        }
    }

    pub fn render_into(&self, s: &mut String) {
        render_counters(
            s,
            [
                (
                    "mesh_node_probes_answered_total",
                    "Path probe requests granted an answer",
                    &self.answered,
                ),
                (
                    "mesh_node_probe_responses_dropped_total",
                    "Path probe responses received and dropped",
                    &self.responses_dropped,
                ),
                (
                    "mesh_node_probes_rate_limited_total",
                    "Path probe requests dropped over the answer rate limit",
                    &self.rate_limited,
                ),
                (
                    "mesh_node_probe_answers_failed_total",
                    "Path probe answers granted that the UDP socket did not take",
                    &self.answer_failed,
                ),
            ],
        );
    }
}

fn render_counters<'a>(
    s: &mut String,
    counters: impl IntoIterator<Item = (&'a str, &'a str, &'a AtomicU64)>,
) {
    for (name, help, c) in counters {
        let _ = writeln!(
            s,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            c.load(Ordering::Relaxed)
        );
    }
}
