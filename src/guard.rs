//! The guard that owns a held lock and releases it on every way a request can end.

use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::{BackendError, BackendFuture, LockBackend, LockName, LockToken, Release};
use crate::core::Core;
use crate::deadline::Bounded;
use crate::lease::LockLease;

/// A held lock, type-erased so that what carries it (a response body held through) does not
/// name the backend.
pub(crate) trait HeldLock: Send + Sync {
    /// Starts the compare-and-delete (bounded by the release timeout) on the lock's runtime; the
    /// handle completes once it has finished (or failed, or timed out), after it was reported.
    fn release(self: Box<Self>) -> JoinHandle<()>;
}

/// Owns one held lock. Dropping it without [`LockGuard::disarm`] spawns the release on the
/// runtime captured at acquisition (never `block_on`): that covers panics, dropped response
/// futures (client disconnects, outer timeouts) and dropped response bodies.
pub(crate) struct LockGuard<B: LockBackend> {
    core: Arc<Core<B>>,
    lease: LockLease,
    runtime: Handle,
    acquired_at: Instant,
    armed: bool,
}

impl<B: LockBackend> LockGuard<B> {
    /// The guard of `lease`, whose acquire returned at `acquired_at`.
    pub(crate) fn new(
        core: Arc<Core<B>>,
        lease: LockLease,
        runtime: Handle,
        acquired_at: Instant,
    ) -> Self {
        Self {
            core,
            lease,
            runtime,
            acquired_at,
            armed: true,
        }
    }

    pub(crate) fn lease(&self) -> &LockLease {
        &self.lease
    }

    /// How long a release may take.
    pub(crate) fn release_timeout(&self) -> std::time::Duration {
        self.core.settings.release_timeout()
    }

    /// The compare-and-delete call, bounded by the release timeout. Stops renewal.
    pub(crate) fn release(&self) -> Bounded<BackendFuture<Release>> {
        self.end();
        Bounded::after(
            self.core
                .backend
                .release(self.lease.name(), self.lease.token()),
            self.core.settings.release_timeout(),
        )
    }

    fn end(&self) {
        if !self.lease.has_ended() {
            self.lease.end();
            crate::telemetry::held(self.acquired_at);
        }
    }

    /// Reports what [`release`](Self::release) came to. A failed or timed-out release is sent
    /// again in the background until it lands or the lock expires (see [`retried`]); its
    /// outcome is reported then.
    pub(crate) fn finish(mut self, outcome: ReleaseOutcome) {
        self.armed = false;
        let of = ReleaseOf::Lease(self.lease.clone());
        of.report(outcome.clone());
        if !settled(&outcome) {
            let (core, name, token) = (
                self.core.clone(),
                self.lease.name().clone(),
                self.lease.token(),
            );
            self.runtime
                .spawn(async move { retry_and_report(&core, &name, token, &of, outcome).await });
        }
    }
}

impl<B: LockBackend> LockGuard<B> {
    /// Ends the lease and spawns the release on the lock's runtime; disarmed.
    fn spawn_release(&mut self) -> JoinHandle<()> {
        self.armed = false;
        self.end();
        spawn_release(
            &self.core,
            &self.runtime,
            self.lease.name(),
            self.lease.token(),
            ReleaseOf::Lease(self.lease.clone()),
        )
    }
}

impl<B: LockBackend> HeldLock for LockGuard<B> {
    fn release(mut self: Box<Self>) -> JoinHandle<()> {
        self.spawn_release()
    }
}

impl<B: LockBackend> Drop for LockGuard<B> {
    fn drop(&mut self) {
        if self.armed {
            drop(self.spawn_release());
        }
    }
}

/// What an acquire whose outcome is not known yet may have taken, and where to delete it: an
/// acquire that was dropped mid-flight (client gone), timed out or failed may still have landed
/// on the server. Its owner (an `Attempt`) [`abandon`](Self::abandon)s it then, and takes it
/// apart with [`disarm`](Self::disarm) once the outcome needs no clean-up (no clones: it has no
/// `Drop` of its own).
#[must_use = "an acquire whose outcome is unknown is abandoned (cleaned up) or disarmed"]
pub(crate) struct AcquireCleanup<B: LockBackend> {
    core: Arc<Core<B>>,
    name: LockName,
    token: LockToken,
    runtime: Handle,
}

impl<B: LockBackend> AcquireCleanup<B> {
    pub(crate) fn new(
        core: Arc<Core<B>>,
        name: LockName,
        token: LockToken,
        runtime: Handle,
    ) -> Self {
        Self {
            core,
            name,
            token,
            runtime,
        }
    }

    /// The acquire's outcome needs no clean-up; hands back the engine, what the lock is called,
    /// its token, and the runtime to release it on.
    pub(crate) fn disarm(self) -> (Arc<Core<B>>, LockName, LockToken, Handle) {
        (self.core, self.name, self.token, self.runtime)
    }

    /// The acquire's outcome is unknown: deletes what it may have taken, in the background.
    pub(crate) fn abandon(self) {
        let of = ReleaseOf::AbandonedAcquire(self.name.clone(), self.core.settings.log_keys());
        spawn_release(&self.core, &self.runtime, &self.name, self.token, of);
    }

    pub(crate) fn core(&self) -> &Core<B> {
        &self.core
    }

    /// The runtime the lock was requested on.
    pub(crate) fn runtime(&self) -> &Handle {
        &self.runtime
    }
}

/// What a spawned release deletes, for its report.
enum ReleaseOf {
    /// A held lock.
    Lease(LockLease),
    /// Whatever an acquire whose outcome is unknown may have taken (and whether traces show keys).
    AbandonedAcquire(LockName, bool),
}

impl ReleaseOf {
    fn abandoned(&self) -> bool {
        matches!(self, Self::AbandonedAcquire(..))
    }

    /// Traces (and counts the failure of) a release's first outcome.
    fn report(&self, outcome: ReleaseOutcome) {
        match self {
            Self::Lease(lease) => report_release(&lease.label(), outcome),
            Self::AbandonedAcquire(name, log_keys) => {
                report_cleanup(&name.label(*log_keys), outcome)
            }
        }
    }

    /// Traces how a release that failed at first ended after its retries.
    fn report_retried(&self, outcome: &ReleaseOutcome) {
        match self {
            Self::Lease(lease) => report_retried(&lease.label(), outcome),
            Self::AbandonedAcquire(name, log_keys) => {
                report_retried(&name.label(*log_keys), outcome)
            }
        }
    }
}

/// Spawns a compare-and-delete on `runtime` and reports its outcome. The backend call is made
/// here (no timer: this may run in a `Drop` outside the runtime) and awaited with the release
/// timeout on the runtime. If the runtime is shutting down, the lock expires with its TTL (the
/// handle then reports a cancelled task).
fn spawn_release<B: LockBackend>(
    core: &Arc<Core<B>>,
    runtime: &Handle,
    name: &LockName,
    token: LockToken,
    of: ReleaseOf,
) -> JoinHandle<()> {
    let timeout = core.settings.release_timeout();
    let release = release_call(core, name, token, of.abandoned());
    let core = core.clone();
    let name = name.clone();
    runtime.spawn(async move {
        let first = Bounded::after(release, timeout).await.map_err(|_| timeout);
        of.report(first.clone());
        if !settled(&first) {
            retry_and_report(&core, &name, token, &of, first).await;
        }
    })
}

/// Retries a release whose first outcome (`first`, reported already) failed ([`retried`]) and
/// reports how it ended.
async fn retry_and_report<B: LockBackend>(
    core: &Core<B>,
    name: &LockName,
    token: LockToken,
    of: &ReleaseOf,
    first: ReleaseOutcome,
) {
    let last = retried(core, name, token, of.abandoned(), first).await;
    of.report_retried(&last);
}

/// The compare-and-delete of `token`'s lock `name`: of a held lock, or of whatever an acquire
/// whose outcome is unknown may have taken (`abandoned`).
fn release_call<B: LockBackend>(
    core: &Core<B>,
    name: &LockName,
    token: LockToken,
    abandoned: bool,
) -> BackendFuture<Release> {
    if abandoned {
        core.backend
            .release_abandoned(name, token, core.settings.ttl())
    } else {
        core.backend.release(name, token)
    }
}

/// The first pause before a failed release is sent again; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest pause between two attempts of a failed release.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Whether a release's outcome is final: the backend answered (released, expired, held by
/// another). An error or a timeout (a connection that broke or queued the call behind many
/// others, a store restarting) is not.
fn settled(outcome: &ReleaseOutcome) -> bool {
    matches!(outcome, Ok(Ok(_)))
}

/// What a release came to: the backend's answer, or how long it waited for none.
pub(crate) type ReleaseOutcome = Result<Result<Release, BackendError>, Duration>;

/// Sends a release that failed (`outcome`) again, with pauses from [`RETRY_FIRST`] doubling up
/// to [`RETRY_MAX`], until the backend answers or the lock's TTL has run out since the first
/// failure (the lease has ended, so nothing renews it: by then it has expired on its own).
/// Retrying is safe: every attempt is the same compare-and-delete of the same token. Without it,
/// a release lost to a broken connection or an overloaded one left the lock held until its TTL
/// (with a 30 s lease, 30 s of 409s), as the verification soak's disconnect storms showed.
async fn retried<B: LockBackend>(
    core: &Core<B>,
    name: &LockName,
    token: LockToken,
    abandoned: bool,
    mut outcome: ReleaseOutcome,
) -> ReleaseOutcome {
    let give_up = Instant::now() + core.settings.ttl();
    let timeout = core.settings.release_timeout();
    let mut pause = RETRY_FIRST;
    while !settled(&outcome) && Instant::now() + pause < give_up {
        tokio::time::sleep(pause).await;
        pause = pause.saturating_mul(2).min(RETRY_MAX);
        let call = release_call(core, name, token, abandoned);
        outcome = Bounded::after(call, timeout).await.map_err(|_| timeout);
    }
    outcome
}

/// Traces how a release that failed at first and was retried ([`retried`]) ended (its first
/// failure was reported and counted).
fn report_retried(lock: &dyn std::fmt::Display, outcome: &ReleaseOutcome) {
    match outcome {
        Ok(Ok(release)) => tracing::info!(%lock, ?release, "lock release landed on a retry"),
        Ok(Err(error)) => tracing::warn!(
            %lock,
            %error,
            "lock release retried until the lock's TTL ran out; it expires with its TTL"
        ),
        Err(after) => tracing::warn!(
            %lock,
            ?after,
            "lock release retried until the lock's TTL ran out; it expires with its TTL"
        ),
    }
}

/// Traces (and counts the failures of) the clean-up of an acquire whose outcome is unknown.
fn report_cleanup(
    lock: &dyn std::fmt::Display,
    outcome: Result<Result<Release, BackendError>, std::time::Duration>,
) {
    match outcome {
        Ok(Ok(Release::Released)) => {
            tracing::debug!(%lock, "lock taken by an abandoned acquire released")
        }
        Ok(Ok(_)) => tracing::debug!(%lock, "abandoned acquire had taken no lock"),
        Ok(Err(error)) => {
            crate::telemetry::backend_error("release");
            tracing::warn!(
                %lock,
                %error,
                "clean-up release after an abandoned acquire failed; retrying until it lands or the lock expires"
            )
        }
        Err(after) => {
            crate::telemetry::backend_error("release");
            tracing::warn!(
                %lock,
                ?after,
                "clean-up release after an abandoned acquire timed out; retrying until it lands or the lock expires"
            )
        }
    }
}

/// Traces what a release did (and counts its failures).
pub(crate) fn report_release(
    lock: &dyn std::fmt::Display,
    outcome: Result<Result<Release, BackendError>, std::time::Duration>,
) {
    match outcome {
        Ok(Ok(Release::Released)) => tracing::debug!(%lock, "lock released"),
        Ok(Ok(Release::Expired)) => {
            tracing::warn!(%lock, "lock had already expired when released")
        }
        Ok(Ok(Release::HeldByOther)) => tracing::warn!(
            %lock,
            "lock had expired and was taken by another request; left it alone"
        ),
        Ok(Err(error)) => {
            crate::telemetry::backend_error("release");
            tracing::warn!(%lock, %error, "lock release failed; retrying until it lands or the lock expires")
        }
        Err(after) => {
            crate::telemetry::backend_error("release");
            tracing::warn!(%lock, ?after, "lock release timed out; retrying until it lands or the lock expires")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Counts how often it is written.
    struct Counted(AtomicUsize);

    impl std::fmt::Display for Counted {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            self.0.fetch_add(1, Ordering::SeqCst);
            f.write_str("lock")
        }
    }

    /// The lock's label (a SHA-256 and its hex) is worth computing only for a trace that is on:
    /// a release reported under an `info` filter never writes it, under `debug` it does.
    #[test]
    fn a_release_writes_the_lock_label_only_when_its_trace_is_on() {
        let counted = Counted(AtomicUsize::new(0));
        let info = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_writer(std::io::sink)
            .finish();
        tracing::subscriber::with_default(info, || {
            report_release(&counted, Ok(Ok(Release::Released)));
        });
        assert_eq!(counted.0.load(Ordering::SeqCst), 0);
        let debug = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(std::io::sink)
            .finish();
        tracing::subscriber::with_default(debug, || {
            report_release(&counted, Ok(Ok(Release::Released)));
        });
        assert_eq!(counted.0.load(Ordering::SeqCst), 1);
    }
}
