//! [`Locks`]: the lock engine, for code outside HTTP (background jobs, queue consumers, CLIs),
//! sharing its locks, settings and renewal with the layers built from it.
//!
//! A [`LockLayer`](crate::LockLayer) takes a lock per request; a [`Locks`] engine takes one when your code asks.
//! Both acquire, renew and release the same way (one random token per acquisition, the acquire
//! timeout, the clean-up of an acquire whose outcome is unknown, the minimum validity, one
//! renewal task, release on drop), and a key built with [`LockKey::literal`] names the lock a
//! [key template](crate::key::KeyTemplate) names, so a job and a route exclude each other:
//!
//! ```
//! use std::time::Duration;
//! use tower_lock::key::LockKey;
//! use tower_lock::{Locks, LockPolicy, MemoryBackend, TryLockError};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let locks = Locks::new(MemoryBackend::new()).ttl(Duration::from_secs(30));
//!
//! // The route `POST /accounts/{id}/deposit` locks `account:{path.id}` with the same engine…
//! let _layer = LockPolicy::template("account:{path.id}")?.layer_with(&locks);
//!
//! // …and so does the nightly job, for account 42.
//! let key = LockKey::literal("account:").part("42").build()?;
//! match locks.try_lock(&key).await {
//!     Ok(lock) => {
//!         // Pass `lock.fencing_token()` to the storage you write to.
//!         lock.release().await?;
//!     }
//!     Err(TryLockError::Held { remaining }) => println!("busy for {remaining:?}"),
//!     Err(error) => return Err(error.into()),
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tracing::Instrument;

use crate::acquire::Attempted;
use crate::backend::{BackendError, BackendErrorKind, Inspect, LockBackend, LockName, Release};
use crate::core::Core;
use crate::guard::LockGuard;
use crate::key::LockKey;
use crate::lease::LockLease;
use crate::settings::{MAX_DURATION, Settings, engine_setters};

/// The lock engine: a backend and the settings that are not about HTTP. See the
/// [module docs](self).
///
/// Cheap to clone: clones share settings and the renewal task. A layer made with
/// [`Locks::layer`] (or [`LockLayer::from_locks`], [`LockPolicy::layer_with`]) shares them too,
/// so routes and jobs lock alike.
///
/// [`LockLayer::from_locks`]: crate::LockLayer::from_locks
/// [`LockPolicy::layer_with`]: crate::LockPolicy::layer_with
#[must_use = "an engine does nothing until it takes a lock or makes a layer"]
pub struct Locks<B> {
    core: Arc<Core<B>>,
}

impl<B> Clone for Locks<B> {
    fn clone(&self) -> Self {
        Self {
            core: self.core.clone(),
        }
    }
}

impl<B> fmt::Debug for Locks<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Locks");
        self.core.settings.debug_fields(&mut debug);
        debug.finish_non_exhaustive()
    }
}

impl<B: LockBackend> Locks<B> {
    /// Locks in `backend`, with the defaults: TTL 10 s renewed every 3.3 s, acquire and release
    /// timeouts 500 ms, namespace `tower-lock:`, fencing on.
    pub fn new(backend: B) -> Self {
        Self {
            core: Arc::new(Core::new(backend)),
        }
    }

    fn settings(
        self,
        _name: &'static str,
        _value: String,
        change: impl Fn(&mut Settings) + Send + Sync + 'static,
    ) -> Self {
        Self {
            core: Arc::new(self.core.with_settings(change)),
        }
    }

    engine_setters!();

    pub(crate) fn core(&self) -> &Arc<Core<B>> {
        &self.core
    }

    /// The backend name of the lock for `key` (namespace, hash tag, digest of long keys): the
    /// name a layer of this engine gives the same key.
    pub fn name(&self, key: &LockKey) -> LockName {
        self.core.settings.lock_name(key)
    }

    /// Takes the lock on `key` if nobody holds it, without waiting.
    ///
    /// Three outcomes, never confused: the lock ([`Lock`], renewed until released or dropped),
    /// [`TryLockError::Held`] when another holder has it, [`TryLockError::Backend`] when the
    /// backend failed or did not answer within the acquire timeout (and
    /// [`TryLockError::InsufficientValidity`] when the acquire was so slow that the lock, taken,
    /// had less than the minimum validity left: it is released before this returns). An acquire
    /// that failed, timed out or was dropped midway is cleaned up in the background, as a
    /// layer's is.
    ///
    /// Must run on a Tokio runtime (renewal and release on drop run there); elsewhere it answers
    /// a [`BackendErrorKind::Unavailable`] error.
    pub async fn try_lock(&self, key: &LockKey) -> Result<Lock<B>, TryLockError> {
        let Ok(runtime) = Handle::try_current() else {
            return Err(TryLockError::Backend(BackendError::new(
                BackendErrorKind::Unavailable,
                "no Tokio runtime to run the lock backend on",
            )));
        };
        let name = self.name(key);
        let span =
            tracing::debug_span!("tower_lock", lock = %name.label(self.core.settings.log_keys()));
        let attempt = self.core.attempt(key.clone(), name, runtime, false);
        let attempted = attempt.instrument(span.clone()).await;
        self.answer(attempted, &span).await
    }

    /// Takes the lock on `key`, waiting up to `max_wait` for its holder to release it.
    ///
    /// The outcomes are [`try_lock`](Self::try_lock)'s; [`TryLockError::Held`] means the lock
    /// was still held when `max_wait` had passed (or that `max_waiters` callers of this process
    /// were already waiting for it: see [`Locks::max_waiters`]). Waiters of one process queue
    /// per key, first come first served, and only the first of them contends in the backend; a
    /// release wakes it at once where the backend pushes wake-ups (Redis, memory), and it never
    /// sleeps past the holder's lease, so a crashed holder's expiry is noticed. Dropping the
    /// future leaves the queue at once; an acquire in flight then is cleaned up. A zero
    /// `max_wait` is [`try_lock`](Self::try_lock).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_lock::key::LockKey;
    /// use tower_lock::{Locks, MemoryBackend};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let locks = Locks::new(MemoryBackend::new());
    /// let key = LockKey::new("nightly-report");
    /// let first = locks.try_lock(&key).await?;
    /// let second = tokio::spawn({
    ///     let (locks, key) = (locks.clone(), key.clone());
    ///     async move { locks.lock(&key, Duration::from_secs(5)).await.map(|lock| lock.fencing_token()) }
    /// });
    /// tokio::time::sleep(Duration::from_millis(20)).await;
    /// let token = first.fencing_token();
    /// first.release().await?; // wakes the waiter at once
    /// assert!(second.await?? > token);
    /// # Ok(()) }
    /// ```
    pub async fn lock(&self, key: &LockKey, max_wait: Duration) -> Result<Lock<B>, TryLockError> {
        let Ok(runtime) = Handle::try_current() else {
            return Err(TryLockError::Backend(BackendError::new(
                BackendErrorKind::Unavailable,
                "no Tokio runtime to run the lock backend on",
            )));
        };
        let Some(until) = tokio::time::Instant::now().checked_add(max_wait.min(MAX_DURATION))
        else {
            return self.try_lock(key).await;
        };
        if max_wait.is_zero() {
            return self.try_lock(key).await;
        }
        let name = self.name(key);
        let span =
            tracing::debug_span!("tower_lock", lock = %name.label(self.core.settings.log_keys()));
        let core = &self.core;
        let attempted = async {
            if !core.has_waiters(&name) {
                match core
                    .attempt(key.clone(), name.clone(), runtime.clone(), false)
                    .await
                {
                    Attempted::Held(remaining) => {
                        core.wait(key.clone(), name, runtime, until, remaining)
                            .await
                    }
                    other => other,
                }
            } else {
                core.wait(key.clone(), name, runtime, until, None).await
            }
        };
        let attempted = attempted.instrument(span.clone()).await;
        self.answer(attempted, &span).await
    }

    /// What [`try_lock`](Self::try_lock) and [`lock`](Self::lock) answer for `attempted`.
    async fn answer(
        &self,
        attempted: Attempted<B>,
        span: &tracing::Span,
    ) -> Result<Lock<B>, TryLockError> {
        match attempted {
            Attempted::Locked(guard) => Ok(Lock { guard }),
            Attempted::TooLittleValidity(guard, validity) => {
                // Its outcome is traced; the caller learns why it has no lock.
                let _ = Lock { guard }.release().await;
                Err(TryLockError::InsufficientValidity { validity })
            }
            Attempted::Held(remaining) => Err(TryLockError::Held { remaining }),
            Attempted::Failed(error) => {
                span.in_scope(|| tracing::warn!(%error, "lock backend failed"));
                Err(TryLockError::Backend(error))
            }
        }
    }

    /// Whether someone holds the lock on `key` now, and for how long their lease lasts. One
    /// read, bounded by the acquire timeout; takes nothing.
    ///
    /// The answer may be stale by the time you act on it: to do something only while nobody
    /// holds the lock, take it with [`try_lock`](Self::try_lock).
    pub async fn inspect(&self, key: &LockKey) -> Result<Inspect, BackendError> {
        let timeout = self.core.settings.acquire_timeout();
        tokio::time::timeout(timeout, self.core.backend.inspect(&self.name(key)))
            .await
            .unwrap_or_else(|_| Err(BackendError::timeout("lock inspect", timeout)))
    }

    /// Whether someone holds the lock on `key` now. See [`inspect`](Self::inspect).
    pub async fn is_locked(&self, key: &LockKey) -> Result<bool, BackendError> {
        Ok(matches!(self.inspect(key).await?, Inspect::Held { .. }))
    }

    /// Deletes the lock on `key` whoever holds it; `true` if a held lock was deleted.
    ///
    /// **An operator's tool, which breaks mutual exclusion**: the current holder (a request or a
    /// job, in this process or another) is not stopped. It keeps running, and learns of the loss
    /// only at its next renewal (its lease's [`is_lost`](LockLease::is_lost) and
    /// [`lost`](LockLease::lost)), while the next taker already holds the lock. Use it for a lock
    /// left by a holder known to be dead and whose TTL is long; the fencing counter is kept (and
    /// tokens come from the clock once it expires), so tokens handed out afterwards stay larger
    /// than the dead holder's. Bounded by the release
    /// timeout.
    pub async fn force_unlock(&self, key: &LockKey) -> Result<bool, BackendError> {
        let timeout = self.core.settings.release_timeout();
        let name = self.name(key);
        let deleted = tokio::time::timeout(timeout, self.core.backend.force_release(&name))
            .await
            .unwrap_or_else(|_| Err(BackendError::timeout("forced unlock", timeout)))?;
        tracing::warn!(lock = %name.label(self.core.settings.log_keys()), deleted, "lock force-unlocked");
        Ok(deleted)
    }

    /// How many leases the engine's renewal schedule holds, and how many it has room for. For
    /// tests; not part of the API.
    #[doc(hidden)]
    pub fn renewal_entries(&self) -> (usize, usize) {
        self.core.renewal_entries()
    }
}

/// Why [`Locks::try_lock`] returned no lock.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum TryLockError {
    /// Another holder has the lock.
    Held {
        /// How long the holder's lease has left, when the backend knows: on Redis with fencing,
        /// the lock's `PTTL` (`None` for a lock stored without expiry by someone else); without
        /// fencing, the deadline the holder last recorded in the lock's value (by its clock, so
        /// a hint), even if someone has since changed the key's expiry behind its back.
        remaining: Option<Duration>,
    },
    /// The lock was taken, but with less validity left than the engine's minimum (a slow
    /// acquire); it has been released.
    InsufficientValidity {
        /// The validity that was left.
        validity: Duration,
    },
    /// The backend failed, or did not answer within the acquire timeout: whether anyone holds
    /// the lock is unknown.
    Backend(BackendError),
}

impl fmt::Display for TryLockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Held {
                remaining: Some(remaining),
            } => write!(f, "the lock is held by another holder for {remaining:?}"),
            Self::Held { remaining: None } => {
                f.write_str("the lock is held by another holder, without expiry")
            }
            Self::InsufficientValidity { validity } => write!(
                f,
                "the lock was acquired with only {validity:?} of validity left, and released"
            ),
            Self::Backend(error) => write!(f, "lock backend failed: {error}"),
        }
    }
}

impl std::error::Error for TryLockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Backend(error) => Some(error),
            _ => None,
        }
    }
}

/// A held lock, taken with [`Locks::try_lock`].
///
/// Renewed by the engine's renewal task until it is released: [`release`](Self::release) awaits
/// the release and reports what it found; dropping the lock releases it in the background on
/// the runtime it was taken on (never blocking), as a layer does when a request ends.
#[must_use = "dropping the lock releases it at once"]
pub struct Lock<B: LockBackend> {
    guard: LockGuard<B>,
}

impl<B: LockBackend> fmt::Debug for Lock<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("lease", self.guard.lease())
            .finish()
    }
}

impl<B: LockBackend> Lock<B> {
    /// The lease: fencing token, [`is_lost`](LockLease::is_lost), [`lost`](LockLease::lost).
    /// Clones of it outlive the lock (and report it lost once it has been released).
    pub fn lease(&self) -> &LockLease {
        self.guard.lease()
    }

    /// The fencing token of this acquisition (0 with fencing off). See
    /// [`LockLease::fencing_token`].
    pub fn fencing_token(&self) -> u64 {
        self.lease().fencing_token()
    }

    /// Whether the lease is known to be lost. See [`LockLease::is_lost`].
    pub fn is_lost(&self) -> bool {
        self.lease().is_lost()
    }

    /// The lock's backend name.
    pub fn name(&self) -> &LockName {
        self.lease().name()
    }

    /// Stops renewal and releases the lock (compare-and-delete, bounded by the release timeout),
    /// reporting what the backend found: [`Release::Released`], [`Release::Expired`] (the lease
    /// ran out first) or [`Release::HeldByOther`] (it ran out and someone else took the lock,
    /// which is left alone). On an error (or no answer within the release timeout) the release
    /// is sent again in the background until it lands or the lock's TTL has run out.
    pub async fn release(self) -> Result<Release, BackendError> {
        let guard = self.guard;
        let release_timeout = guard.release_timeout();
        // If this future is dropped midway, the guard (still armed) releases in the background.
        let outcome = guard.release().await.map_err(|_| release_timeout);
        guard.finish(outcome.clone());
        outcome.unwrap_or_else(|after| Err(BackendError::timeout("lock release", after)))
    }
}
