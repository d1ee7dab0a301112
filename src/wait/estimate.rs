//! When a held lock will be free, as told to a refused client (`Retry-After`): estimated from
//! the hold times a layer observes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::guard::HeldLock;

/// The weight of the newest observation in the moving average (1/8).
const SHIFT: u32 = 3;

/// An exponentially weighted moving average of the hold times of one layer's locks, in
/// microseconds (0: nothing observed yet). Lock-free: one atomic per layer.
#[derive(Debug, Default)]
pub(crate) struct HoldTimes {
    average_us: AtomicU64,
}

impl HoldTimes {
    /// Records that a lock was held for `held`.
    pub(crate) fn observe(&self, held: Duration) {
        let sample = u64::try_from(held.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .average_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |average| {
                Some(if average == 0 {
                    sample
                } else {
                    // average + (sample - average) / 8, in signed arithmetic without overflow.
                    let average = i128::from(average);
                    let next = average + ((i128::from(sample) - average) >> SHIFT);
                    u64::try_from(next.max(1)).unwrap_or(u64::MAX)
                })
            });
    }

    /// The average hold time, if any was observed.
    pub(crate) fn average(&self) -> Option<Duration> {
        match self.average_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// When the lock is likely free for a client refused now: the average hold time for the
    /// holder and for each of `queued` local waiters ahead; when leases are not `renewed`, the
    /// holder's turn ends with its `remaining` lease at the latest. Never below 1 ms. Without
    /// observations, the holder's remaining lease (`None` if unknown).
    pub(crate) fn estimate(
        &self,
        remaining: Option<Duration>,
        queued: usize,
        renewed: bool,
    ) -> Option<Duration> {
        let Some(average) = self.average() else {
            return remaining;
        };
        let turns = u32::try_from(queued.saturating_add(1)).unwrap_or(u32::MAX);
        let mut estimate = average.saturating_mul(turns);
        if !renewed && let Some(remaining) = remaining {
            // An unrenewed lease ends the holder's turn at the latest.
            estimate = estimate.min(remaining.saturating_add(average.saturating_mul(turns - 1)));
        }
        Some(estimate.max(Duration::from_millis(1)))
    }
}

/// A held lock whose hold time is recorded in `times` when it is released, or dropped (which
/// releases it in the background): for a lock held past the handler's response (hold-through-
/// body), whose hold ends with the body.
pub(crate) struct TimedHold {
    held: Box<dyn HeldLock>,
    clock: HoldClock,
}

impl TimedHold {
    /// `held`, taken at `since`, recorded in `times` when released.
    pub(crate) fn new(held: Box<dyn HeldLock>, times: Arc<HoldTimes>, since: Instant) -> Self {
        Self {
            held,
            clock: HoldClock { times, since },
        }
    }
}

impl HeldLock for TimedHold {
    fn release(self: Box<Self>) -> JoinHandle<()> {
        let Self { held, clock } = *self;
        drop(clock); // records the hold
        held.release()
    }
}

/// Records the time since `since` in `times` when dropped.
struct HoldClock {
    times: Arc<HoldTimes>,
    since: Instant,
}

impl Drop for HoldClock {
    fn drop(&mut self) {
        self.times.observe(self.since.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_average_follows_the_observed_hold_times() {
        let times = HoldTimes::default();
        assert_eq!(times.average(), None);
        times.observe(Duration::from_millis(800));
        assert_eq!(times.average(), Some(Duration::from_millis(800)));
        for _ in 0..60 {
            times.observe(Duration::from_millis(100));
        }
        let average = times.average().unwrap();
        assert!(average < Duration::from_millis(101), "{average:?}");
        assert!(average >= Duration::from_millis(100), "{average:?}");
    }

    #[test]
    fn the_estimate_counts_the_waiters_ahead_and_falls_back_to_the_lease() {
        let times = HoldTimes::default();
        let lease = Some(Duration::from_secs(10));
        assert_eq!(times.estimate(lease, 3, true), lease);
        times.observe(Duration::from_millis(200));
        assert_eq!(
            times.estimate(lease, 0, true),
            Some(Duration::from_millis(200))
        );
        assert_eq!(
            times.estimate(lease, 2, true),
            Some(Duration::from_millis(600))
        );
        // An unrenewed lease with 50 ms left frees the lock in 50 ms at the latest.
        assert_eq!(
            times.estimate(Some(Duration::from_millis(50)), 0, false),
            Some(Duration::from_millis(50))
        );
        times.observe(Duration::MAX);
        assert!(times.estimate(None, usize::MAX, true).is_some());
    }
}
