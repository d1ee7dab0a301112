//! The lease a holder sees ([`LockLease`]): its fencing token, whether it is lost, and when its
//! validity runs out. The renewal task that keeps it alive is in `renewal`; a lease knows of it
//! only through [`Unschedule`], so that ending a lease takes it out of the schedule.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::backend::{Label, LockName, LockToken};
use crate::key::LockKey;

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
    key: LockKey,
    name: LockName,
    token: LockToken,
    fencing_token: u64,
    /// Cancelled when the lease is lost. Made by the first to wait for a loss or to mark one
    /// (most leases never are, and their requests never wait for it: the token is an allocation).
    lost: OnceLock<CancellationToken>,
    ended: AtomicBool,
    /// Wakes [`LockLease::lost`] waiters when the lock is released.
    ended_notify: Notify,
    log_keys: bool,
    /// When the lease was acquired (the start of the acquire call, as its validity counts).
    acquired: Instant,
    /// Nanoseconds after `acquired` at which the lease's validity runs out unless renewed; moved
    /// on by each successful extend.
    valid_for_ns: AtomicU64,
    /// Where the lease is scheduled for renewal, once it is.
    registration: OnceLock<Registration>,
}

/// A lease's place in a renewal schedule.
struct Registration {
    schedule: Weak<dyn Unschedule>,
    id: u64,
}

/// A renewal schedule, as a lease sees it: somewhere to take itself out of when it ends.
pub(crate) trait Unschedule: Send + Sync {
    /// Drops the entry `id` from the schedule, if it is there.
    fn unschedule(&self, id: u64);
}

impl LockLease {
    pub(crate) fn new(
        key: LockKey,
        name: LockName,
        token: LockToken,
        fencing_token: u64,
        log_keys: bool,
        acquired: Instant,
        ttl: Duration,
    ) -> Self {
        Self(Arc::new(Shared {
            key,
            name,
            token,
            fencing_token,
            lost: OnceLock::new(),
            ended: AtomicBool::new(false),
            ended_notify: Notify::new(),
            log_keys,
            acquired,
            valid_for_ns: AtomicU64::new(nanos(ttl)),
            registration: OnceLock::new(),
        }))
    }

    /// When the lease's validity runs out unless it is renewed before.
    pub(crate) fn valid_until(&self) -> Instant {
        let valid_for = Duration::from_nanos(self.0.valid_for_ns.load(Ordering::Acquire));
        self.0
            .acquired
            .checked_add(valid_for)
            .unwrap_or(self.0.acquired)
    }

    /// A successful extend moved the validity to `valid_until`.
    pub(crate) fn set_valid_until(&self, valid_until: Instant) {
        let valid_for = valid_until.saturating_duration_since(self.0.acquired);
        self.0
            .valid_for_ns
            .fetch_max(nanos(valid_for), Ordering::AcqRel);
    }

    /// How the lock is named in traces (a short hash unless the layer logs keys), written only
    /// when a trace is.
    pub(crate) fn label(&self) -> Label<'_> {
        self.0.name.label(self.0.log_keys)
    }

    /// The key the lock was taken on (request material: an account id, an idempotency key …),
    /// as a key template or [`LockKey::literal`] built it.
    pub fn key(&self) -> &LockKey {
        &self.0.key
    }

    /// The lock's backend name: the key under the engine's namespace, as a Redis Cluster hash
    /// tag, or its digest for a long key ([`LockName::lock_key`] is what Redis stores).
    pub fn name(&self) -> &LockName {
        &self.0.name
    }

    /// The fencing token of this acquisition: larger than every token handed out before it for the
    /// same key. Pass it to the resource you write to and let the resource refuse smaller ones.
    pub fn fencing_token(&self) -> u64 {
        self.0.fencing_token
    }

    /// Whether the lease is known to be lost: a renewal found the lock gone or taken, or its
    /// validity has run out without a successful renewal (also when the renewal task has not
    /// had a chance to run, e.g. after this process was paused), or the lock has been released
    /// (its request ended, or [`Lock::release`](crate::Lock::release) or drop) — so a clone
    /// kept by work that outlives the lock tells it to stop.
    pub fn is_lost(&self) -> bool {
        self.0
            .lost
            .get()
            .is_some_and(CancellationToken::is_cancelled)
            || self.has_ended()
            || Instant::now() >= self.valid_until()
    }

    /// Completes when the lease is lost (immediately if it already is), at the latest when its
    /// validity runs out without a successful renewal, or when the lock is released. Use it in
    /// `select!`.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static + use<> {
        let lease = self.clone();
        async move {
            loop {
                let released = lease.0.ended_notify.notified();
                tokio::pin!(released);
                // Registered before the check, so a release between the two is not missed.
                released.as_mut().enable();
                if lease.has_ended() {
                    return;
                }
                let valid_until = lease.valid_until();
                if Instant::now() >= valid_until {
                    lease.mark_lost("lease validity ran out without a renewal");
                    return;
                }
                tokio::select! {
                    () = lease.lost_token().cancelled() => return,
                    () = released => return,
                    () = tokio::time::sleep_until(valid_until) => {}
                }
            }
        }
    }

    pub(crate) fn lost_owned(&self) -> WaitForCancellationFutureOwned {
        self.lost_token().clone().cancelled_owned()
    }

    /// The token cancelled when the lease is lost, made on first use.
    fn lost_token(&self) -> &CancellationToken {
        self.0.lost.get_or_init(CancellationToken::new)
    }

    pub(crate) fn token(&self) -> LockToken {
        self.0.token
    }

    /// Marks the request over and takes the lease out of the renewal schedule (an extend already
    /// in flight finishes, and its outcome is ignored).
    pub(crate) fn end(&self) {
        self.0.ended.store(true, Ordering::SeqCst);
        self.0.ended_notify.notify_waiters();
        // Pairs with the fence in `register`: either this sees the registration, or the
        // registration sees `ended` and never enters the schedule.
        fence(Ordering::SeqCst);
        if let Some(registration) = self.0.registration.get()
            && let Some(schedule) = registration.schedule.upgrade()
        {
            schedule.unschedule(registration.id);
        }
    }

    pub(crate) fn has_ended(&self) -> bool {
        self.0.ended.load(Ordering::SeqCst)
    }

    /// Records where the lease is scheduled for renewal; `false` if it already was. Then, by a
    /// fence that pairs with the one in [`end`](Self::end), either `end` sees the registration
    /// or the caller sees [`has_ended`](Self::has_ended): a lease never stays scheduled after
    /// its end.
    pub(crate) fn register(&self, schedule: Weak<dyn Unschedule>, id: u64) -> bool {
        if self
            .0
            .registration
            .set(Registration { schedule, id })
            .is_err()
        {
            return false;
        }
        fence(Ordering::SeqCst);
        true
    }

    /// Marks the lease lost; reports it (a warning and `lease_lost_total`) only the first time,
    /// and only while its request runs. Returns whether it reported.
    pub(crate) fn mark_lost(&self, why: &'static str) -> bool {
        let lost = self.lost_token();
        let report = !self.has_ended() && !lost.is_cancelled();
        if report {
            tracing::warn!(lock = %self.label(), why, "lock lease lost");
            crate::telemetry::lease_lost();
        }
        lost.cancel();
        report
    }
}

/// `duration` in nanoseconds, saturating.
/// `duration` in nanoseconds, saturating.
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> LockLease {
        LockLease::new(
            LockKey::new("k"),
            LockName::new("t:", "k"),
            LockToken::random(),
            7,
            false,
            Instant::now(),
            Duration::from_secs(60),
        )
    }

    #[tokio::test]
    async fn a_lost_lease_is_reported_once_and_only_while_its_request_runs() {
        let lost = lease();
        assert!(!lost.is_lost());
        assert!(lost.mark_lost("first"), "the first loss is reported");
        assert!(lost.is_lost());
        assert!(!lost.mark_lost("again"), "a loss is reported once");
        let ended = lease();
        ended.end();
        assert!(ended.has_ended());
        assert!(
            !ended.mark_lost("after the end"),
            "an ended request has no lease to lose"
        );
        assert!(ended.is_lost(), "but its lease counts as lost from then on");
        assert!(!lease().has_ended());
    }

    /// The cancellation token is an allocation: made only for a request that waits for a loss
    /// or whose lease is lost, and then shared by every waiter, before the loss or after it.
    #[tokio::test]
    async fn a_loss_reaches_waiters_made_before_and_after_it_and_no_token_is_made_without_one() {
        let quiet = lease();
        assert!(!quiet.is_lost());
        quiet.end();
        assert!(quiet.0.lost.get().is_none(), "a token was made for nobody");

        let lost = lease();
        let before = lost.lost_owned();
        let before_public = lost.lost();
        assert!(lost.0.lost.get().is_some());
        assert!(lost.mark_lost("test"));
        let after = lost.lost_owned();
        let waited = tokio::time::timeout(Duration::from_secs(5), async {
            before.await;
            before_public.await;
            after.await;
            lost.lost().await;
        })
        .await;
        assert!(waited.is_ok(), "a waiter missed the loss");

        let marked_first = lease();
        marked_first.mark_lost("test");
        assert!(marked_first.is_lost());
        tokio::time::timeout(Duration::from_secs(5), marked_first.lost_owned())
            .await
            .expect("a waiter made after the loss waits forever");
    }

    #[test]
    fn debug_shows_the_fencing_token_and_never_the_token() {
        let lease = lease();
        let debug = format!("{lease:?}");
        assert!(debug.contains("fencing_token: 7"), "{debug}");
        assert!(debug.contains(&lease.name().fingerprint()), "{debug}");
        assert!(!debug.contains(&lease.token().to_hex()), "{debug}");
        assert_eq!(lease.label().to_string(), lease.name().fingerprint());
        let logged = LockLease::new(
            LockKey::new("k"),
            LockName::new("t:", "k"),
            LockToken::random(),
            1,
            true,
            Instant::now(),
            Duration::from_secs(1),
        );
        assert_eq!(logged.label().to_string(), "t:{k}");
    }
}
