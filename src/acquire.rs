//! The one way a lock is taken, used alike by [`Locks::try_lock`](crate::Locks::try_lock) and by
//! the layer's response future: [`Core::attempt`], a future that ends with the lock held (its
//! guard owning it, renewal started) or with why not.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tokio::time::Instant;

use crate::backend::{
    Acquire, AcquireOptions, BackendError, BackendFuture, LockBackend, LockName, LockToken,
};
use crate::core::Core;
use crate::deadline::Bounded;
use crate::guard::{AcquireCleanup, LockGuard};
use crate::key::LockKey;
use crate::lease::LockLease;

impl<B: LockBackend> Core<B> {
    /// Starts an acquire of `key`'s lock (named `name`) with a fresh random token, bounded by the
    /// acquire timeout. `runtime` is where renewal and any clean-up release run. `waiting`: the
    /// attempt of a waiter, which the backend may record on a held lock (see
    /// [`AcquireOptions::waiting`]); fail-fast attempts pass `false`.
    pub(crate) fn attempt(
        self: &Arc<Self>,
        key: LockKey,
        name: LockName,
        runtime: Handle,
        waiting: bool,
    ) -> Attempt<B> {
        let token = LockToken::random();
        let settings = &self.settings;
        let started = Instant::now();
        // The timer is armed only if the backend does not answer at once.
        let acquire = Bounded::until(
            self.backend.acquire(
                &name,
                token,
                AcquireOptions::new(settings.ttl())
                    .fencing(settings.fencing())
                    .waiting(waiting),
            ),
            started.checked_add(settings.acquire_timeout()),
        );
        Attempt {
            acquire,
            started,
            key: Some(key),
            // Deletes what the acquire may have taken if it fails, times out, or the attempt is
            // dropped before its outcome is known.
            cleanup: Some(AcquireCleanup::new(self.clone(), name, token, runtime)),
        }
    }
}

pin_project! {
    /// One acquire attempt, from the backend call to a held lock (renewal started) or to a known
    /// failure. Dropped midway, its clean-up deletes whatever the acquire may have taken. Its
    /// events name no lock: the caller polls it inside a span that does.
    pub(crate) struct Attempt<B: LockBackend> {
        #[pin]
        acquire: Bounded<BackendFuture<Acquire>>,
        started: Instant,
        key: Option<LockKey>,
        // `Some` until the outcome is known.
        cleanup: Option<AcquireCleanup<B>>,
    }

    impl<B: LockBackend> PinnedDrop for Attempt<B> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before its outcome was known: the acquire may still land.
            if let Some(cleanup) = this.project().cleanup.take() {
                cleanup.abandon();
            }
        }
    }
}

/// How an [`Attempt`] ended.
pub(crate) enum Attempted<B: LockBackend> {
    /// The lock is held, renewed until its guard releases it.
    Locked(LockGuard<B>),
    /// The lock was taken with less than the minimum validity left (a slow acquire): not
    /// renewed, to be released by the caller.
    TooLittleValidity(LockGuard<B>, Duration),
    /// Another holder has the lock (for this long, when the backend knows).
    Held(Option<Duration>),
    /// The backend failed or timed out; whatever the acquire took is being cleaned up.
    Failed(BackendError),
}

impl<B: LockBackend> Future for Attempt<B> {
    type Output = Attempted<B>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // A timer, if one is needed, goes on the runtime the request was made on (as the clean-up
        // and renewal do), wherever the attempt is polled.
        let runtime = this.cleanup.as_ref().map(AcquireCleanup::runtime);
        let outcome = ready!(this.acquire.poll_on(cx, runtime));
        let (Some(cleanup), Some(key)) = (this.cleanup.take(), this.key.take()) else {
            unreachable!("an attempt is not polled after it completed");
        };
        let started = *this.started;
        Poll::Ready(match outcome {
            Ok(Ok(Acquire::Acquired { fencing_token })) => {
                held(cleanup, key, started, fencing_token)
            }
            Ok(Ok(Acquire::Held { remaining })) => {
                // Someone else's lock: nothing of ours to clean up.
                drop(cleanup);
                tracing::debug!(?remaining, "lock held by another holder");
                crate::telemetry::contended();
                Attempted::Held(remaining)
            }
            // The acquire may have landed although we got no answer: `cleanup` deletes it (if
            // ours).
            Ok(Err(error)) => failed(cleanup, error),
            Err(_) => {
                let timeout = cleanup.core().settings.acquire_timeout();
                failed(cleanup, BackendError::timeout("lock acquire", timeout))
            }
        })
    }
}

/// The lock is ours: a guard owns it from now on; renewal starts unless its validity is too
/// short already.
fn held<B: LockBackend>(
    cleanup: AcquireCleanup<B>,
    key: LockKey,
    started: Instant,
    fencing_token: u64,
) -> Attempted<B> {
    let (core, name, token, runtime) = cleanup.disarm();
    // One clock read for the acquire's latency, the lock's validity and its renewal schedule.
    let now = Instant::now();
    let latency = now.saturating_duration_since(started);
    crate::telemetry::acquired(latency);
    let settings = &core.settings;
    let lease = LockLease::new(
        key,
        name,
        token,
        fencing_token,
        settings.log_keys(),
        started,
        settings.ttl(),
    );
    let validity = settings.ttl().saturating_sub(latency);
    if validity < settings.min_validity() {
        tracing::warn!(
            ?validity,
            "lock acquired with too little validity; releasing"
        );
        return Attempted::TooLittleValidity(LockGuard::new(core, lease, runtime, now), validity);
    }
    tracing::debug!(fencing_token, "lock acquired");
    core.renew(&lease, started, now, &runtime);
    Attempted::Locked(LockGuard::new(core, lease, runtime, now))
}

fn failed<B: LockBackend>(cleanup: AcquireCleanup<B>, error: BackendError) -> Attempted<B> {
    if error.never_sent() {
        // Refused before it was sent: it took nothing. A clean-up would be retried for the
        // whole TTL while the store is down, one task per failed request, and land on the
        // store all at once when it returns.
        drop(cleanup.disarm());
    } else {
        cleanup.abandon();
    }
    crate::telemetry::backend_error("acquire");
    Attempted::Failed(error)
}
