//! Edges of the fast paths (red-team tests of the performance changes): the Redis path without
//! fencing (prefix-compare release and extend, the holder's deadline in the value), `Bounded`
//! timers armed only when a call waits, the lazily made lease-lost token and the renewal nursery.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use common::{Fixture, Memory, NS, Redis};
use tower_lock::backend::{
    Acquire, AcquireOptions, BackendFuture, Extend, LockName, LockToken, Release,
};
use tower_lock::key::LockKey;
use tower_lock::{LockBackend, Locks, MemoryBackend, TryLockError};

fn locks<B: LockBackend>(backend: B) -> Locks<B> {
    Locks::new(backend).namespace(NS)
}

async fn get(fixture: &Redis, key: &str) -> Option<Vec<u8>> {
    let mut connection = fixture.server.connection().await;
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut connection)
        .await
        .unwrap()
}

async fn set(fixture: &Redis, key: &str, value: &[u8], px: u64) {
    let mut connection = fixture.server.connection().await;
    let () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("PX")
        .arg(px)
        .query_async(&mut connection)
        .await
        .unwrap();
}

async fn pttl(fixture: &Redis, key: &str) -> i64 {
    let mut connection = fixture.server.connection().await;
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut connection)
        .await
        .unwrap()
}

/// Values another writer may have left: shorter than a token, a prefix of ours, another token,
/// ours with one digit changed or upper-cased, binary. None of them is ours.
fn foreign_values(token: LockToken) -> Vec<Vec<u8>> {
    let ours = token.to_hex();
    let mut changed = ours.clone().into_bytes();
    changed[31] = if changed[31] == b'0' { b'1' } else { b'0' };
    let mut values = vec![
        Vec::new(),
        b"x".to_vec(),
        ours.as_bytes()[..31].to_vec(),
        format!("{}:99999999999999", &ours[..31]).into_bytes(),
        format!("{}:1", &ours[1..]).into_bytes(),
        format!("x{ours}:1").into_bytes(),
        format!("{}:1", ours.to_uppercase()).into_bytes(),
        changed.clone(),
        [changed.as_slice(), b":1"].concat(),
        format!("{}:1", LockToken::random().to_hex()).into_bytes(),
        vec![0xff; 64],
    ];
    values.retain(|v| !v.starts_with(ours.as_bytes()));
    values
}

/// A release or extend by our token never deletes or extends a value that is not ours, whatever
/// its length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_and_extend_leave_foreign_values_of_any_length_alone() {
    let fixture = Redis::start().await;
    let backend = fixture.backend();
    let name = common::lock_name("foreign");
    let token = LockToken::random();
    for value in foreign_values(token) {
        set(&fixture, name.lock_key(), &value, 60_000).await;
        let released = backend.release(&name, token).await.unwrap();
        assert_eq!(released, Release::HeldByOther, "value {value:?}");
        assert_eq!(
            get(&fixture, name.lock_key()).await.as_deref(),
            Some(&*value)
        );
        let extended = backend
            .extend(&name, token, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(extended, Extend::Lost, "value {value:?}");
        assert_eq!(
            get(&fixture, name.lock_key()).await.as_deref(),
            Some(&*value)
        );
        let left = pttl(&fixture, name.lock_key()).await;
        assert!(
            (1..=60_000).contains(&left),
            "extended a foreign value: {left}"
        );
    }
}

/// Two holders never: while one holds the lock (plain or fencing acquire), every other acquire on
/// another connection is refused, also after the holder extended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_client_is_refused_while_the_first_holds_and_after_it_extends() {
    let fixture = Redis::start().await;
    for fencing in [false, true] {
        let name = common::lock_name(&format!("two-{fencing}"));
        let first = fixture.backend();
        let second = fixture.new_client();
        let options = AcquireOptions::new(Duration::from_millis(300)).fencing(fencing);
        let mine = LockToken::random();
        let acquired = first.acquire(&name, mine, options).await.unwrap();
        assert!(matches!(acquired, Acquire::Acquired { .. }), "{acquired:?}");
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert_eq!(
                first
                    .extend(&name, mine, Duration::from_millis(300))
                    .await
                    .unwrap(),
                Extend::Extended
            );
            let refused = second
                .acquire(&name, LockToken::random(), options)
                .await
                .unwrap();
            assert!(matches!(refused, Acquire::Held { .. }), "{refused:?}");
        }
        assert_eq!(first.release(&name, mine).await.unwrap(), Release::Released);
    }
}

/// The `Retry-After` hint: a refused acquire reports the holder's remaining lease as last
/// extended (not as first acquired), on the plain `SET NX GET` path and on the scripted one
/// alike. For a lock made persistent behind its holder's back (`PERSIST`), the scripted path
/// (PTTL) has no hint, and the plain one reports the deadline the holder last recorded — as
/// `TryLockError::Held` documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_acquire_reports_the_remaining_lease_as_last_extended() {
    let fixture = Redis::start().await;
    for fencing in [false, true] {
        let name = common::lock_name(&format!("retry-{fencing}"));
        let backend = fixture.backend();
        let holder = LockToken::random();
        let options = AcquireOptions::new(Duration::from_secs(2)).fencing(fencing);
        backend.acquire(&name, holder, options).await.unwrap();
        let extended = backend
            .extend(&name, holder, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(extended, Extend::Extended);
        let refused = fixture
            .new_client()
            .acquire(&name, LockToken::random(), options)
            .await
            .unwrap();
        match refused {
            Acquire::Held {
                remaining: Some(remaining),
            } => assert!(
                remaining > Duration::from_secs(55) && remaining <= Duration::from_secs(60),
                "fencing {fencing}: {remaining:?}"
            ),
            other => panic!("fencing {fencing}: {other:?}"),
        }
        // The same lock made persistent by an operator (`PERSIST`).
        let mut connection = fixture.server.connection().await;
        let persisted: i64 = redis::cmd("PERSIST")
            .arg(name.lock_key())
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(persisted, 1);
        let refused = fixture
            .new_client()
            .acquire(&name, LockToken::random(), options)
            .await
            .unwrap();
        if fencing {
            assert!(
                matches!(refused, Acquire::Held { remaining: None }),
                "fencing {fencing}: a lock without expiry answered {refused:?}"
            );
        } else {
            assert!(
                matches!(refused, Acquire::Held { remaining: Some(r) } if r <= Duration::from_secs(60)),
                "fencing {fencing}: {refused:?}"
            );
        }
    }
}

/// What [`Stalling`] does with a call.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stall {
    /// The call lands on the memory backend, then its future is pending once (waking itself)
    /// and never completes.
    AfterLanding,
    /// Passes it on.
    Pass,
}

/// A memory backend whose acquires and releases land, then hang after one pending poll.
#[derive(Clone)]
struct Stalling {
    inner: MemoryBackend,
    acquires: Stall,
    releases: Stall,
}

/// Pending once (waking itself at once), then pending forever.
struct PendingOnceThenHang {
    polled: bool,
}

impl Future for PendingOnceThenHang {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if !self.polled {
            self.polled = true;
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

fn stall<T: Send + 'static>(call: BackendFuture<T>, how: Stall) -> BackendFuture<T> {
    if how == Stall::Pass {
        return call;
    }
    Box::pin(async move {
        let _landed = call.await;
        PendingOnceThenHang { polled: false }.await;
        unreachable!()
    })
}

impl LockBackend for Stalling {
    fn acquire(
        &self,
        name: &LockName,
        token: LockToken,
        options: AcquireOptions,
    ) -> BackendFuture<Acquire> {
        stall(self.inner.acquire(name, token, options), self.acquires)
    }
    fn release(&self, name: &LockName, token: LockToken) -> BackendFuture<Release> {
        stall(self.inner.release(name, token), self.releases)
    }
    fn extend(&self, name: &LockName, token: LockToken, ttl: Duration) -> BackendFuture<Extend> {
        self.inner.extend(name, token, ttl)
    }
}

/// The acquire timeout still applies to a backend future that is pending once then hangs, and
/// the lock that acquire took is cleaned up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_pending_once_then_hanging_times_out_and_its_lock_is_cleaned_up() {
    let memory = MemoryBackend::new();
    let backend = Stalling {
        inner: memory.clone(),
        acquires: Stall::AfterLanding,
        releases: Stall::Pass,
    };
    let locks = locks(backend).acquire_timeout(Duration::from_millis(200));
    let outcome = tokio::time::timeout(
        Duration::from_secs(3),
        locks.try_lock(&LockKey::new("stall")),
    )
    .await
    .expect("the acquire timeout did not apply");
    assert!(
        matches!(outcome, Err(TryLockError::Backend(_))),
        "{outcome:?}"
    );
    assert!(
        common::eventually(Duration::from_secs(2), async || memory.held() == 0).await,
        "the lock the timed-out acquire took leaked"
    );
}

/// The release timeout still applies to a release future that is pending once then hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_pending_once_then_hanging_times_out() {
    let backend = Stalling {
        inner: MemoryBackend::new(),
        acquires: Stall::Pass,
        releases: Stall::AfterLanding,
    };
    let locks = locks(backend).release_timeout(Duration::from_millis(200));
    let lock = locks.try_lock(&LockKey::new("stall")).await.unwrap();
    let released = tokio::time::timeout(Duration::from_secs(3), lock.release())
        .await
        .expect("the release timeout did not apply");
    assert!(released.is_err(), "{released:?}");
}

/// An acquire future dropped after its first (pending) poll, whose acquire landed: the lock it
/// took is deleted, not leaked until its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_dropped_after_landing_leaks_no_lock() {
    let memory = MemoryBackend::new();
    let backend = Stalling {
        inner: memory.clone(),
        acquires: Stall::AfterLanding,
        releases: Stall::Pass,
    };
    let locks = locks(backend).ttl(Duration::from_secs(60));
    let dropped = tokio::time::timeout(
        Duration::from_millis(50),
        locks.try_lock(&LockKey::new("dropped")),
    )
    .await;
    assert!(dropped.is_err());
    assert!(
        common::eventually(Duration::from_secs(2), async || memory.held() == 0).await,
        "the dropped acquire's lock leaked"
    );
}

/// Leases that outlive several renewal windows stay held, in a burst larger than the nursery
/// (32): each is renewed in time, none is reported lost, and nobody else gets the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_40_long_requests_keeps_every_lease_renewed() {
    let fixture = Memory::start().await;
    let locks = locks(fixture.backend())
        .ttl(Duration::from_millis(400))
        .renew_every(Duration::from_millis(100));
    let mut held = Vec::new();
    for i in 0..40 {
        held.push(
            locks
                .try_lock(&LockKey::new(format!("burst-{i}")))
                .await
                .unwrap(),
        );
    }
    let other = self::locks(fixture.backend());
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (i, lock) in held.iter().enumerate() {
            assert!(!lock.is_lost(), "lease {i} lost");
        }
        assert_eq!(fixture.held().await, 40);
        let refused = other.try_lock(&LockKey::new("burst-39")).await;
        assert!(
            matches!(refused, Err(TryLockError::Held { .. })),
            "two holders"
        );
    }
    for lock in held {
        assert_eq!(lock.release().await.unwrap(), Release::Released);
    }
}

/// The same on Redis, with a single long request among many short ones: the long one leaves the
/// nursery and is renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_request_among_short_ones_is_renewed_on_redis() {
    let fixture = Redis::start().await;
    let locks = locks(fixture.backend())
        .ttl(Duration::from_millis(500))
        .renew_every(Duration::from_millis(150));
    let long = locks.try_lock(&LockKey::new("long")).await.unwrap();
    for i in 0..100 {
        let short = locks
            .try_lock(&LockKey::new(format!("short-{i}")))
            .await
            .unwrap();
        short.release().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!long.is_lost());
    let other = self::locks(fixture.new_client());
    let refused = other.try_lock(&LockKey::new("long")).await;
    assert!(
        matches!(refused, Err(TryLockError::Held { .. })),
        "two holders"
    );
    assert_eq!(long.release().await.unwrap(), Release::Released);
}

/// A runtime shutting down with leases still in the nursery: each is reported lost, to `lost()`
/// waiters made before and after, and `is_lost` agrees.
#[test]
fn leases_in_the_nursery_are_lost_when_their_runtime_shuts_down() {
    let memory = MemoryBackend::new();
    let locks = locks(memory.clone()).ttl(Duration::from_secs(30));
    let runtime = common::multi_thread(1);
    let (held, waiting) = runtime.block_on(async {
        let mut held = Vec::new();
        for i in 0..5 {
            held.push(
                locks
                    .try_lock(&LockKey::new(format!("n-{i}")))
                    .await
                    .unwrap(),
            );
        }
        // Each waiter owns its lease clone: `lost()` borrows the lease for the future's type
        // (edition 2024 capture) although the future is `'static`. Not polled here: a waiter
        // polled on this runtime sleeps on its timer, which panics once the runtime is gone
        // (as any tokio timer does).
        let waiting: Vec<_> = held
            .iter()
            .map(|lock| {
                let lease = lock.lease().clone();
                async move { lease.lost().await }
            })
            .collect();
        (held, waiting)
    });
    drop(runtime);
    let other = common::current_thread();
    other.block_on(async {
        for (lock, before) in held.iter().zip(waiting) {
            tokio::time::timeout(Duration::from_secs(2), before)
                .await
                .expect("a waiter made before the shutdown missed the loss");
            tokio::time::timeout(Duration::from_secs(2), lock.lease().lost())
                .await
                .expect("a waiter made after the shutdown missed the loss");
            assert!(lock.is_lost());
        }
    });
    drop(held);
}

/// A lock deleted behind its holder's back: the next renewal finds it gone, and `lost()` fires
/// for a waiter made before the loss and one made after; `is_lost` agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_lock_fires_lost_for_waiters_before_and_after() {
    let fixture = Redis::start().await;
    let locks = locks(fixture.backend())
        .ttl(Duration::from_secs(3))
        .renew_every(Duration::from_millis(100));
    let lock = locks.try_lock(&LockKey::new("deleted")).await.unwrap();
    let before = lock.lease().lost();
    let fired = Arc::new(AtomicBool::new(false));
    let flag = fired.clone();
    let waiter = tokio::spawn(async move {
        before.await;
        flag.store(true, Ordering::SeqCst);
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!fired.load(Ordering::SeqCst));
    fixture.delete(lock.name()).await;
    tokio::time::timeout(Duration::from_secs(1), waiter)
        .await
        .expect("the waiter made before the loss did not fire")
        .unwrap();
    assert!(lock.is_lost());
    tokio::time::timeout(Duration::from_millis(100), lock.lease().lost())
        .await
        .expect("a waiter made after the loss did not fire");
    // Its release must not touch a new holder's lock.
    let other = self::locks(fixture.new_client());
    let new_holder = other.try_lock(&LockKey::new("deleted")).await.unwrap();
    assert_eq!(lock.release().await.unwrap(), Release::HeldByOther);
    assert!(!new_holder.is_lost());
    assert_eq!(fixture.held().await, 1);
}

/// Engines made from one (sharing its renewal task) with TTLs 100 times apart, on a
/// current-thread runtime, with bursts of short requests between: the short-TTL leases, registered
/// while the task lingers on the long interval, are still renewed in time.
#[test]
fn short_ttl_leases_registered_while_the_task_lingers_on_a_long_interval_are_renewed() {
    let runtime = common::current_thread();
    runtime.block_on(async {
        let memory = MemoryBackend::new();
        let base = locks(memory.clone());
        let slow = base.clone().ttl(Duration::from_secs(30));
        let fast = base
            .clone()
            .ttl(Duration::from_millis(300))
            .renew_every(Duration::from_millis(100));
        // The task starts, and lingers on the 10 s interval once this is released.
        slow.try_lock(&LockKey::new("slow"))
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut held = Vec::new();
        for round in 0..3 {
            for i in 0..20 {
                let key = LockKey::new(format!("fast-{round}-{i}"));
                held.push(fast.try_lock(&key).await.unwrap());
                let short = LockKey::new(format!("short-{round}-{i}"));
                slow.try_lock(&short)
                    .await
                    .unwrap()
                    .release()
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            for (i, lock) in held.iter().enumerate() {
                assert!(!lock.is_lost(), "fast lease {i} lost");
            }
            assert_eq!(memory.held(), held.len());
        }
        for lock in held {
            assert_eq!(lock.release().await.unwrap(), Release::Released);
        }
    });
}

/// A paused Redis: the acquire (a real I/O future, pending until Redis answers) is cut at the
/// acquire timeout, and once Redis resumes, the lock that acquire took is deleted by its clean-up
/// (sent after it on the same connection), not left for its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_on_a_paused_redis_times_out_and_leaves_no_lock_after_resume() {
    for fencing in [true, false] {
        paused_acquire(fencing).await;
    }
}

async fn paused_acquire(fencing: bool) {
    let fixture = Redis::start().await;
    let locks = locks(fixture.backend())
        .acquire_timeout(Duration::from_millis(300))
        .release_timeout(Duration::from_secs(5))
        .ttl(Duration::from_secs(60))
        .fencing(fencing);
    // Connected and warm.
    locks
        .try_lock(&LockKey::new("warm"))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    fixture.server.pause();
    let started = std::time::Instant::now();
    let outcome = locks.try_lock(&LockKey::new("paused")).await;
    let took = started.elapsed();
    fixture.server.resume();
    assert!(
        matches!(outcome, Err(TryLockError::Backend(_))),
        "{outcome:?}"
    );
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert!(
        common::eventually(Duration::from_secs(3), async || fixture.held().await == 0).await,
        "the timed-out acquire's lock was left for its TTL"
    );
    // The acquire did land (the warm-up's SET and this one), so the clean-up had work to do.
    assert!(
        common::eventually(Duration::from_secs(3), async || fixture
            .server
            .command_calls("set")
            .await
            >= 2)
        .await
    );
    let again = locks.try_lock(&LockKey::new("paused")).await;
    assert!(again.is_ok(), "{again:?}");
}
