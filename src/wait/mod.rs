//! Bounded waiting for a held lock: the policy shared by [`Locks::lock`](crate::Locks::lock)
//! and by the layers and policies configured with `wait(max)`.
//!
//! A contended acquire joins its key's local queue ([`queue`]): waiters of one process line up
//! per key, first come first served, and only the head contends in the backend, so a release
//! costs O(1) backend commands per process whatever the number of waiters. The head tries, and
//! if the lock is still held sleeps until whichever comes first:
//!
//! - a wake-up pushed by the backend ([`Wakeups`](crate::backend::Wakeups)): on Redis each
//!   attempt of the head marks the held lock as waited for (in the acquire script itself, so
//!   atomically with finding it held), the release script of a marked lock publishes on the
//!   lock's channel, and one shared subscriber connection per backend wakes the local waiters
//!   (on Cluster `SPUBLISH` and one sharded subscriber per backend); in memory the release wakes
//!   them directly;
//! - the holder's remaining lease (`PTTL`), so a crashed holder's expiry is noticed without
//!   any publish; without fencing, Redis reads the remaining lease from the holder's deadline
//!   in the lock value (the holder's clock, not `PTTL`), so a nap is also kept between
//!   [`POLL_MIN`] and [`UNFENCED_NAP_MAX`]: a holder's clock running ahead (or behind) delays
//!   noticing its expiry by at most that much (and never spins);
//! - while the wake-ups are not confirmed (the subscriber is connecting or reconnecting) or the
//!   backend has none (Redlock), a poll of 10 to 50 ms with jitter;
//! - [`CONFIRMED_RECHECK`] (2 s) even while the wake-ups are confirmed: a confirmed watch can
//!   still miss a release (on a Redis Cluster just after a failover, the new primary publishes
//!   to the replicas it knows of, and until the shard's gossip has settled that may not include
//!   the old primary the subscriber is still on), so a lost wake-up costs a waiter at most 2 s,
//!   not the holder's whole lease;
//! - the end of the wait (then the caller answers as if it had not waited: 409 or
//!   [`TryLockError::Held`](crate::TryLockError::Held)).
//!
//! Dropping a waiter leaves the queue at once; an acquire in flight is cleaned up (its lock
//! released) as any abandoned acquire is.

pub(crate) mod estimate;
pub(crate) mod queue;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::Instant;

use crate::acquire::Attempted;
use crate::backend::{LockBackend, LockName};
use crate::core::Core;
use crate::key::LockKey;

/// A waiting acquire: boxed, as only contended requests of waiting routes take this path.
pub(crate) type Waiting<B> = Pin<Box<dyn Future<Output = Attempted<B>> + Send>>;

/// The shortest and longest poll while wake-ups are not confirmed (or absent).
const POLL_MIN: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(50);

/// The longest nap while the wake-ups are confirmed: a wake-up lost all the same (see the
/// module docs) delays a waiter by at most this much.
const CONFIRMED_RECHECK: Duration = Duration::from_secs(2);

/// The longest nap without fencing, when the holder's remaining lease may come from its own
/// clock (the deadline in the lock value) rather than from the key's `PTTL`.
const UNFENCED_NAP_MAX: Duration = Duration::from_millis(250);

/// A waiter wakes this long after the holder's lease would have run out (Redis expires a key
/// at its deadline, not before).
const AFTER_EXPIRY: Duration = Duration::from_millis(1);

impl<B: LockBackend> Core<B> {
    /// Whether an acquire of `name` must queue behind local waiters rather than contend.
    pub(crate) fn has_waiters(&self, name: &LockName) -> bool {
        self.queues.waiters(name) > 0
    }

    /// How many local waiters `name` has.
    pub(crate) fn waiters(&self, name: &LockName) -> usize {
        self.queues.waiters(name)
    }

    /// Waits in `name`'s local queue until the lock is taken or `until`. `remaining` is the
    /// holder's remaining lease as last seen (what a give-up reports).
    pub(crate) fn wait(
        self: &Arc<Self>,
        key: LockKey,
        name: LockName,
        runtime: Handle,
        until: Instant,
        remaining: Option<Duration>,
    ) -> Waiting<B> {
        Box::pin(wait(self.clone(), key, name, runtime, until, remaining))
    }
}

async fn wait<B: LockBackend>(
    core: Arc<Core<B>>,
    key: LockKey,
    name: LockName,
    runtime: Handle,
    until: Instant,
    mut remaining: Option<Duration>,
) -> Attempted<B> {
    let wakeups = core.backend.wakeups();
    let Some(place) = core
        .queues
        .join(&name, core.settings.max_waiters(), wakeups.as_ref())
    else {
        tracing::debug!("too many local waiters for this lock; not waiting");
        crate::telemetry::contended();
        return Attempted::Held(remaining);
    };
    // Only the head of the local queue contends.
    let Ok(Some(_turn)) = tokio::time::timeout_at(until, place.turn()).await else {
        crate::telemetry::contended();
        return Attempted::Held(remaining);
    };
    let watch = place.watch();
    loop {
        // Listen before the attempt, so that a release after it is not missed.
        let seen = watch.map(|w| w.seen());
        let notified = watch.map(|w| w.notified());
        let mut notified = std::pin::pin!(notified);
        if let Some(notified) = notified.as_mut().as_pin_mut() {
            notified.enable();
        }
        match core
            .attempt(key.clone(), name.clone(), runtime.clone(), true)
            .await
        {
            Attempted::Held(now) => remaining = now,
            other => return other,
        }
        let now = Instant::now();
        if now >= until {
            return Attempted::Held(remaining);
        }
        if let (Some(watch), Some(seen)) = (watch, seen)
            && watch.woken_since(seen)
        {
            continue;
        }
        // The holder's expiry bounds every nap; so does a poll while wake-ups may be missed.
        let mut nap = remaining.map_or(POLL_MAX, |r| r.saturating_add(AFTER_EXPIRY));
        if !core.settings.fencing() {
            // The remaining lease may be the holder's clock's: trust it only so far.
            nap = nap.clamp(POLL_MIN, UNFENCED_NAP_MAX);
        }
        if seen.is_some_and(|s| s.confirmed) {
            nap = nap.min(CONFIRMED_RECHECK);
        } else {
            nap = nap.min(jittered_poll());
        }
        let wake_at = now.checked_add(nap).map_or(until, |at| at.min(until));
        match notified.as_mut().as_pin_mut() {
            Some(notified) => {
                tokio::select! {
                    () = notified => {}
                    () = tokio::time::sleep_until(wake_at) => {}
                }
            }
            None => tokio::time::sleep_until(wake_at).await,
        }
    }
}

/// A poll interval between [`POLL_MIN`] and [`POLL_MAX`], so that the waiters of several
/// processes do not poll in step.
fn jittered_poll() -> Duration {
    let spread = POLL_MAX.saturating_sub(POLL_MIN).as_micros() as u64;
    POLL_MIN.saturating_add(Duration::from_micros(rand::random_range(0..=spread)))
}
