//! The guard that owns a held lock and releases it on every way a request can end.

use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::time::{Instant, Timeout};

use crate::backend::{BackendError, BackendFuture, LockBackend, LockName, LockToken, Release};
use crate::layer::Core;
use crate::lease::LockLease;

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
    pub(crate) fn new(core: Arc<Core<B>>, lease: LockLease, runtime: Handle) -> Self {
        Self {
            core,
            lease,
            runtime,
            acquired_at: Instant::now(),
            armed: true,
        }
    }

    pub(crate) fn lease(&self) -> &LockLease {
        &self.lease
    }

    /// The compare-and-delete call, bounded by the release timeout. Stops renewal.
    pub(crate) fn release(&self) -> Timeout<BackendFuture<Release>> {
        self.end();
        tokio::time::timeout(
            self.core.config.release_timeout,
            self.core
                .backend
                .release(self.lease.name(), self.lease.token()),
        )
    }

    fn end(&self) {
        if !self.lease.has_ended() {
            self.lease.end();
            crate::telemetry::held(self.acquired_at.elapsed());
        }
    }

    /// The release has completed: nothing left to do on drop.
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl<B: LockBackend> Drop for LockGuard<B> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.end();
        spawn_release(
            &self.core,
            &self.runtime,
            self.lease.name(),
            self.lease.token(),
            Some(self.lease.clone()),
        );
    }
}

/// Deletes a lock this request may have taken without ever holding it: an acquire that was
/// dropped mid-flight (client gone), timed out or failed may still have landed on the server.
/// Disarmed once the acquire's outcome is known to need no clean-up.
pub(crate) struct AcquireCleanup<B: LockBackend> {
    core: Arc<Core<B>>,
    name: LockName,
    token: LockToken,
    runtime: Handle,
    armed: bool,
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
            armed: true,
        }
    }

    /// The acquire's outcome needs no clean-up; hands back what the lock is called, its token,
    /// and the runtime to release it on.
    pub(crate) fn disarm(mut self) -> (LockName, LockToken, Handle) {
        self.armed = false;
        (self.name.clone(), self.token, self.runtime.clone())
    }
}

impl<B: LockBackend> Drop for AcquireCleanup<B> {
    fn drop(&mut self) {
        if self.armed {
            spawn_release(&self.core, &self.runtime, &self.name, self.token, None);
        }
    }
}

/// Spawns a compare-and-delete on `runtime`. The backend call is made here (no timer: this may
/// run in a `Drop` outside the runtime) and awaited with the release timeout on the runtime. If
/// the runtime is shutting down, the lock expires with its TTL.
fn spawn_release<B: LockBackend>(
    core: &Core<B>,
    runtime: &Handle,
    name: &LockName,
    token: LockToken,
    lease: Option<LockLease>,
) {
    let release = core.backend.release(name, token);
    let timeout = core.config.release_timeout;
    runtime.spawn(async move {
        let outcome = tokio::time::timeout(timeout, release).await;
        if let Some(lease) = lease {
            report_release(&lease, outcome.map_err(|_| timeout));
        }
    });
}

/// Traces what a release did.
pub(crate) fn report_release(
    lease: &LockLease,
    outcome: Result<Result<Release, BackendError>, std::time::Duration>,
) {
    let lock = lease.label();
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
            tracing::warn!(%lock, %error, "lock release failed; it will expire with its TTL")
        }
        Err(after) => {
            crate::telemetry::backend_error("release");
            tracing::warn!(%lock, ?after, "lock release timed out; it will expire with its TTL")
        }
    }
}
