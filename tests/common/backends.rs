//! [`Wrapped`]: a real backend behind slow, held or failing calls, which counts its extends.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tower_lock::LockBackend;
use tower_lock::backend::{
    Acquire, AcquireOptions, BackendError, BackendErrorKind, BackendFuture, Extend, LockName,
    LockToken, Release,
};

/// What [`Wrapped`] does with an acquire.
#[derive(Clone)]
pub enum Acquires {
    /// Passes it on.
    Pass,
    /// Sends it to the real backend at once, answers this much later.
    AnsweredAfter(Duration),
    /// Sends it to the real backend at once, tells `called`, and answers once `finish` is told.
    Held {
        called: Arc<Notify>,
        finish: Arc<Notify>,
    },
    /// Never sends it: an `Unavailable` error.
    Fail,
    /// Lets it land, then answers an `Unavailable` error (a connection reset after the acquire
    /// was sent).
    FailAfterLanding,
}

/// What [`Wrapped`] does with a release (and the clean-up of an abandoned acquire).
#[derive(Clone)]
pub enum Releases {
    /// Passes it on.
    Pass,
    /// Makes the call only once it takes a permit of the semaphore (the memory backend
    /// releases when called). The clean-up of an abandoned acquire is such a release too.
    Gated(Arc<Semaphore>),
    /// Never sends it: an `Unavailable` error.
    Fail,
}

/// What [`Wrapped`] does with an extend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Passes the call on.
    None,
    /// Panics while making the call.
    PanicNow,
    /// Returns a future that panics when polled.
    PanicLater,
    /// Returns a future that never completes.
    Hang,
    /// Passes the call on, in a future that panics when it is dropped: past the renewal task's
    /// `catch_unwind` of the call, so the task itself dies.
    PanicOnDrop,
}

type AcquiresFn = Arc<dyn Fn(&LockName) -> Acquires + Send + Sync>;
type FaultFn = Arc<dyn Fn(&LockName, usize) -> Fault + Send + Sync>;

/// A real backend behind acquires, releases and extends that do as told (by default: pass them
/// on), which records its extends. It implements only what the trait requires and the clean-up
/// of abandoned acquires (which Redis needs), so `inspect` and `force_release` are the trait's
/// defaults: a foreign backend's.
#[derive(Clone)]
pub struct Wrapped<B> {
    inner: B,
    acquires: AcquiresFn,
    releases: Releases,
    fault: FaultFn,
    extends: Arc<AtomicUsize>,
    /// The tokio tasks extend calls were made from.
    callers: Arc<Mutex<HashSet<tokio::task::Id>>>,
}

impl<B> Wrapped<B> {
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            acquires: Arc::new(|_| Acquires::Pass),
            releases: Releases::Pass,
            fault: Arc::new(|_, _| Fault::None),
            extends: Arc::default(),
            callers: Arc::default(),
        }
    }

    /// Acquires do as `acquires` says, given the lock.
    pub fn acquires(
        mut self,
        acquires: impl Fn(&LockName) -> Acquires + Send + Sync + 'static,
    ) -> Self {
        self.acquires = Arc::new(acquires);
        self
    }

    pub fn releases(mut self, releases: Releases) -> Self {
        self.releases = releases;
        self
    }

    /// Extends do as `fault` says, given the lock and the number of extend calls before this one.
    pub fn fault(
        mut self,
        fault: impl Fn(&LockName, usize) -> Fault + Send + Sync + 'static,
    ) -> Self {
        self.fault = Arc::new(fault);
        self
    }

    /// How many extend calls were made.
    pub fn extends(&self) -> usize {
        self.extends.load(Ordering::SeqCst)
    }

    /// How many tokio tasks extend calls were made from.
    pub fn extend_callers(&self) -> usize {
        self.callers.lock().unwrap().len()
    }
}

fn unavailable<T: Send + 'static>(message: &'static str) -> BackendFuture<T> {
    Box::pin(std::future::ready(Err(BackendError::new(
        BackendErrorKind::Unavailable,
        message,
    ))))
}

impl<B: LockBackend> LockBackend for Wrapped<B> {
    fn acquire(
        &self,
        name: &LockName,
        token: LockToken,
        options: AcquireOptions,
    ) -> BackendFuture<Acquire> {
        match (self.acquires)(name) {
            Acquires::Pass => self.inner.acquire(name, token, options),
            Acquires::AnsweredAfter(delay) => {
                let landed = tokio::spawn(self.inner.acquire(name, token, options));
                Box::pin(async move {
                    let outcome = landed.await.expect("acquire task");
                    tokio::time::sleep(delay).await;
                    outcome
                })
            }
            Acquires::Held { called, finish } => {
                let acquire = self.inner.acquire(name, token, options);
                Box::pin(async move {
                    called.notify_one();
                    finish.notified().await;
                    acquire.await
                })
            }
            Acquires::Fail => unavailable("connection refused"),
            Acquires::FailAfterLanding => {
                let acquire = self.inner.acquire(name, token, options);
                Box::pin(async move {
                    acquire.await?;
                    unavailable("connection reset after the acquire was sent").await
                })
            }
        }
    }

    fn release(&self, name: &LockName, token: LockToken) -> BackendFuture<Release> {
        match &self.releases {
            Releases::Pass => self.inner.release(name, token),
            Releases::Gated(gate) => {
                let (gate, inner, name) = (gate.clone(), self.inner.clone(), name.clone());
                Box::pin(async move {
                    gate.acquire().await.unwrap().forget();
                    inner.release(&name, token).await
                })
            }
            Releases::Fail => unavailable("connection refused"),
        }
    }

    fn release_abandoned(
        &self,
        name: &LockName,
        token: LockToken,
        ttl: Duration,
    ) -> BackendFuture<Release> {
        match self.releases {
            Releases::Pass => self.inner.release_abandoned(name, token, ttl),
            Releases::Gated(_) | Releases::Fail => self.release(name, token),
        }
    }

    fn extend(&self, name: &LockName, token: LockToken, ttl: Duration) -> BackendFuture<Extend> {
        let before = self.extends.fetch_add(1, Ordering::SeqCst);
        if let Some(id) = tokio::task::try_id() {
            self.callers.lock().unwrap().insert(id);
        }
        match (self.fault)(name, before) {
            Fault::None => self.inner.extend(name, token, ttl),
            Fault::PanicNow => panic!("extend panicked (injected)"),
            Fault::PanicLater => Box::pin(async { panic!("extend future panicked (injected)") }),
            Fault::Hang => Box::pin(std::future::pending()),
            Fault::PanicOnDrop => Box::pin(PanicOnDrop(self.inner.extend(name, token, ttl))),
        }
    }
}

/// A future that panics when dropped.
struct PanicOnDrop(BackendFuture<Extend>);

impl Future for PanicOnDrop {
    type Output = Result<Extend, BackendError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("extend future panicked when dropped (injected)");
        }
    }
}
