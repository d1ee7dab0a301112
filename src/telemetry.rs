//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`); without
//! the feature every function here is empty and compiles away.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `tower_lock_acquired_total` | counter | |
//! | `tower_lock_contended_total` | counter | |
//! | `tower_lock_rejected_total` | counter | `reason`: `conflict`, `invalid_key`, `misconfigured_key`, `backend_unavailable`, `insufficient_validity`, `lease_lost` |
//! | `tower_lock_backend_errors_total` | counter | `operation`: `acquire`, `release`, `extend` |
//! | `tower_lock_lease_lost_total` | counter | |
//! | `tower_lock_acquire_seconds` | histogram | |
//! | `tower_lock_hold_seconds` | histogram | |

use std::time::Duration;

pub(crate) fn acquired(_latency: Duration) {
    #[cfg(feature = "metrics")]
    {
        metrics::counter!("tower_lock_acquired_total").increment(1);
        metrics::histogram!("tower_lock_acquire_seconds").record(_latency.as_secs_f64());
    }
}

pub(crate) fn contended() {
    #[cfg(feature = "metrics")]
    metrics::counter!("tower_lock_contended_total").increment(1);
}

/// A request was answered with a rejection; `reason` is its label (see the table above).
pub(crate) fn rejected(_reason: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("tower_lock_rejected_total", "reason" => _reason).increment(1);
}

pub(crate) fn backend_error(_operation: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("tower_lock_backend_errors_total", "operation" => _operation).increment(1);
}

pub(crate) fn lease_lost() {
    #[cfg(feature = "metrics")]
    metrics::counter!("tower_lock_lease_lost_total").increment(1);
}

/// A lock acquired at `_since` is released (the clock is read only with the feature on).
pub(crate) fn held(_since: tokio::time::Instant) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("tower_lock_hold_seconds").record(_since.elapsed().as_secs_f64());
}
