//! The reasons of `keyd_refusals_total` (status.json's `refusals`) in one
//! list, so that `/metrics` shows every reason at 0 from keyd's start: a
//! counter that only appears when first counted hides its first burst from
//! Prometheus' `increase()` and `rate()`.

use mesh_proto::cookie::CookieError;
use mesh_proto::{ExchangeError, TrustError};

use crate::admission::Refusal;

/// A dial nobody answered (no exchange began).
pub const NO_ANSWER: &str = "no_answer";
/// A connection or stream failed beneath the exchange (QUIC, TLS, TCP).
pub const TRANSPORT: &str = "transport";

/// Every reason keyd counts a refusal or failure under: admission control,
/// mac1 and cookies, the exchange and its zero-trust checks, and dials.
pub fn all() -> impl Iterator<Item = &'static str> {
    Refusal::ALL
        .iter()
        .map(|r| r.label())
        .chain(CookieError::LABELS)
        .chain(TrustError::LABELS)
        .chain(ExchangeError::LABELS)
        .chain([NO_ANSWER, TRANSPORT])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::render::{REPLAYED_EPOCH, UNKNOWN_KNOCKS};

    #[test]
    fn reasons_are_distinct() {
        let mut v: Vec<_> = all().collect();
        let n = v.len();
        v.sort_unstable();
        v.dedup();
        assert_eq!(v.len(), n);
    }

    #[test]
    fn the_reasons_alerts_and_families_name_are_listed() {
        let v: Vec<_> = all().collect();
        for r in UNKNOWN_KNOCKS.iter().chain(&[REPLAYED_EPOCH, "revoked"]) {
            assert!(v.contains(r), "{r}");
        }
    }
}
