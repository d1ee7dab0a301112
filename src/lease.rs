//! The lease a request holds: what the handler sees ([`LockLease`]), and the renewal task that
//! keeps it alive.
//!
//! One renewal task per layer, started on the first lock, drives every in-flight lease of that
//! layer from one timer wheel ([`DelayQueue`]); no task is spawned per request, and a request
//! registers its lease without waking the task (see `Inbox`). The task ends when the layer and
//! every service and response made from it are dropped.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::time::DelayQueue;

use crate::backend::{Extend, LockBackend, LockName, LockToken};

/// The lock a request holds, inserted into the request's extensions before the inner service is
/// called.
///
/// ```
/// use tower_lock::LockLease;
///
/// async fn handler(req: http::Request<String>) -> Result<http::Response<String>, std::convert::Infallible> {
///     let lease = req.extensions().get::<LockLease>().cloned();
///     if let Some(lease) = lease {
///         // Pass the fencing token to the storage you write to; it refuses stale tokens.
///         let _token = lease.fencing_token();
///         tokio::select! {
///             _ = lease.lost() => return Ok(http::Response::new("lease lost, gave up".into())),
///             _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
///         }
///     }
///     Ok(http::Response::new("done".into()))
/// }
/// ```
#[derive(Clone)]
pub struct LockLease(Arc<Shared>);

struct Shared {
    name: LockName,
    token: LockToken,
    fencing_token: u64,
    lost: CancellationToken,
    ended: AtomicBool,
    log_keys: bool,
}

impl LockLease {
    pub(crate) fn new(
        name: LockName,
        token: LockToken,
        fencing_token: u64,
        log_keys: bool,
    ) -> Self {
        Self(Arc::new(Shared {
            name,
            token,
            fencing_token,
            lost: CancellationToken::new(),
            ended: AtomicBool::new(false),
            log_keys,
        }))
    }

    /// How the lock is named in traces (a short hash unless the layer logs keys).
    pub(crate) fn label(&self) -> String {
        self.0.name.label(self.0.log_keys)
    }

    /// The backend name of the lock (namespace and escaped key; it contains request material).
    pub fn key(&self) -> &str {
        self.0.name.lock_key()
    }

    /// The lock's name.
    pub fn name(&self) -> &LockName {
        &self.0.name
    }

    /// The fencing token of this acquisition: larger than every token handed out before it for the
    /// same key. Pass it to the resource you write to and let the resource refuse smaller ones.
    pub fn fencing_token(&self) -> u64 {
        self.0.fencing_token
    }

    /// Whether the lease is known to be lost: a renewal found the lock gone or taken, or renewals
    /// failed until the lease's validity ran out.
    pub fn is_lost(&self) -> bool {
        self.0.lost.is_cancelled()
    }

    /// Completes when the lease is lost (immediately if it already is). Use it in `select!`.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        self.0.lost.clone().cancelled_owned()
    }

    pub(crate) fn lost_owned(&self) -> WaitForCancellationFutureOwned {
        self.0.lost.clone().cancelled_owned()
    }

    pub(crate) fn token(&self) -> LockToken {
        self.0.token
    }

    /// Marks the request over: renewal stops at its next tick.
    pub(crate) fn end(&self) {
        self.0.ended.store(true, Ordering::Release);
    }

    pub(crate) fn has_ended(&self) -> bool {
        self.0.ended.load(Ordering::Acquire)
    }

    fn mark_lost(&self, why: &'static str) {
        if !self.has_ended() && !self.is_lost() {
            tracing::warn!(lock = %self.label(), why, "lock lease lost");
            crate::telemetry::lease_lost();
        }
        self.0.lost.cancel();
    }
}

impl std::fmt::Debug for LockLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockLease")
            .field("name", &self.0.name)
            .field("fencing_token", &self.0.fencing_token)
            .field("lost", &self.is_lost())
            .finish()
    }
}

/// How a lease is to be kept alive.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub(crate) ttl: Duration,
    /// Renew every this long; `None`: never renew (the lease is only watched for expiry).
    pub(crate) every: Option<Duration>,
    /// Stop renewing after this instant.
    pub(crate) renew_until: Option<Instant>,
    /// When the lease expires on the server, at the latest, unless renewed.
    pub(crate) valid_until: Instant,
    /// Timeout of one extend call.
    pub(crate) timeout: Duration,
}

struct Entry {
    lease: LockLease,
    plan: Plan,
    /// When the entry is first due: one renewal interval after registration.
    first_due: Instant,
}

impl Entry {
    /// How often the renewal task must look at its inbox for this entry to be on time.
    fn cadence(&self) -> Duration {
        let every = self.plan.every.unwrap_or(self.plan.ttl).min(self.plan.ttl);
        (every / 2).max(Duration::from_millis(1))
    }
}

/// Where requests leave their leases for the renewal task.
///
/// Registering must not wake another thread on every request (that alone costs more than the
/// layer's own work), so requests only push to a queue; the task drains it on its own schedule,
/// at least twice per renewal interval, which is before any new entry is first due. Only a task
/// with nothing to watch parks, and only then does a registration wake it.
struct Inbox {
    queue: Mutex<Vec<Entry>>,
    /// The task is parked until the next registration.
    idle: AtomicBool,
    wake: Notify,
    /// The renewer is gone: the task should end.
    closed: AtomicBool,
    /// The task is running (false once its runtime has dropped it).
    alive: AtomicBool,
}

/// Registers leases with the layer's renewal task, starting it when needed.
pub(crate) struct Renewer<B> {
    backend: B,
    inbox: Mutex<Option<Arc<Inbox>>>,
}

impl<B: LockBackend> Renewer<B> {
    pub(crate) fn new(backend: B) -> Self {
        Self {
            backend,
            inbox: Mutex::new(None),
        }
    }

    /// Starts watching `lease`: a push onto the inbox; the timer lives in the shared task.
    pub(crate) fn watch(&self, lease: LockLease, plan: Plan, runtime: &Handle) {
        let first_due = plan
            .every
            .map_or(plan.valid_until, |every| Instant::now() + every)
            .min(plan.valid_until);
        let entry = Entry {
            lease,
            plan,
            first_due,
        };
        let inbox = {
            let mut slot = self.inbox.lock().unwrap_or_else(PoisonError::into_inner);
            match slot.as_ref() {
                Some(inbox) if inbox.alive.load(Ordering::Acquire) => inbox.clone(),
                // First use, or the task's runtime has shut down: start one on this runtime.
                _ => {
                    let inbox = Arc::new(Inbox {
                        queue: Mutex::new(Vec::new()),
                        idle: AtomicBool::new(false),
                        wake: Notify::new(),
                        closed: AtomicBool::new(false),
                        alive: AtomicBool::new(true),
                    });
                    runtime.spawn(run(self.backend.clone(), inbox.clone()));
                    *slot = Some(inbox.clone());
                    inbox
                }
            }
        };
        inbox
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(entry);
        if inbox.idle.swap(false, Ordering::AcqRel) {
            inbox.wake.notify_one();
        }
    }
}

impl<B> Drop for Renewer<B> {
    fn drop(&mut self) {
        let slot = self.inbox.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(inbox) = slot.take() {
            inbox.closed.store(true, Ordering::Release);
            inbox.wake.notify_one();
        }
    }
}

impl<B: Clone> Clone for Renewer<B> {
    /// A clone is a new, idle renewer for the same backend (a reconfigured layer gets its own).
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            inbox: Mutex::new(None),
        }
    }
}

/// Clears `Inbox::alive` however the task ends (including its runtime dropping it).
struct AliveFlag(Arc<Inbox>);

impl Drop for AliveFlag {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Release);
    }
}

async fn run<B: LockBackend>(backend: B, inbox: Arc<Inbox>) {
    let alive = AliveFlag(inbox);
    let inbox = &alive.0;
    let mut timers: DelayQueue<Entry> = DelayQueue::new();
    let mut extending = FuturesUnordered::new();
    let mut cadence = Duration::MAX;
    let mut next_drain = Instant::now();
    loop {
        let woken = inbox.wake.notified();
        tokio::pin!(woken);
        let arrived =
            std::mem::take(&mut *inbox.queue.lock().unwrap_or_else(PoisonError::into_inner));
        for entry in arrived {
            cadence = cadence.min(entry.cadence());
            let first_due = entry.first_due;
            timers.insert_at(entry, first_due);
        }
        let idle = timers.is_empty() && extending.is_empty();
        if idle {
            if inbox.closed.load(Ordering::Acquire) {
                // The layer and everything made from it are gone, so no request holds a lease.
                break;
            }
            inbox.idle.store(true, Ordering::Release);
            // A registration may have arrived between the drain and the flag.
            if !inbox
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
            {
                inbox.idle.store(false, Ordering::Release);
                continue;
            }
        } else if Instant::now() >= next_drain {
            next_drain = Instant::now() + cadence;
        }
        tokio::select! {
            () = &mut woken, if idle => {}
            () = tokio::time::sleep_until(next_drain), if !idle => {
                next_drain = Instant::now() + cadence;
            }
            Some(due) = timers.next() => {
                let entry = due.into_inner();
                if entry.lease.has_ended() {
                    continue;
                }
                let now = Instant::now();
                if now >= entry.plan.valid_until {
                    entry.lease.mark_lost("lease validity ran out before it could be renewed");
                    continue;
                }
                let renewing = entry.plan.every.is_some()
                    && entry.plan.renew_until.is_none_or(|until| now < until);
                if !renewing {
                    let at = entry.plan.valid_until;
                    timers.insert_at(entry, at);
                    continue;
                }
                let call = tokio::time::timeout(
                    entry.plan.timeout,
                    backend.extend(entry.lease.name(), entry.lease.token(), entry.plan.ttl),
                );
                extending.push(async move { (entry, now, call.await) });
            },
            Some((mut entry, sent_at, outcome)) = extending.next() => {
                if entry.lease.has_ended() {
                    continue;
                }
                let every = entry.plan.every.unwrap_or(entry.plan.ttl);
                match outcome {
                    Ok(Ok(Extend::Extended)) => {
                        tracing::trace!(lock = %entry.lease.label(), "lease renewed");
                        entry.plan.valid_until = sent_at + entry.plan.ttl;
                        let next = Instant::now() + every;
                        timers.insert_at(entry, next);
                    }
                    Ok(Ok(Extend::Lost)) => {
                        entry.lease.mark_lost("the lock was gone or held by another request");
                    }
                    Ok(Err(_)) | Err(_) => {
                        tracing::debug!(lock = %entry.lease.label(), "lease renewal failed, retrying");
                        crate::telemetry::backend_error("extend");
                        let retry = Instant::now() + (every / 3).max(Duration::from_millis(10));
                        let at = retry.min(entry.plan.valid_until);
                        timers.insert_at(entry, at);
                    }
                }
            },
        }
    }
}
