//! Bounded waiting (issue 9): `Locks::lock(key, max_wait)` and `wait(max)` on layers. Waiters
//! queue per key in the process, first come first served; a release wakes the head at once
//! (Redis pub/sub, or in process); a crashed holder's expiry is noticed without any publish; the
//! subscriber connection's loss strands nobody; the cap answers 409 at once; `Retry-After`
//! follows the hold times the layer observed. On one Redis, in process and on a Redis Cluster
//! (`suite!(pushed: …)`: the backends that push wake-ups).

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;
use tower_lock::backend::{Acquire, AcquireOptions, LockBackend, LockToken};
use tower_lock::key::LockKey;
use tower_lock::{Locks, TryLockError};

use common::{
    Fixture, NS, body_json, eventually, holder_behind, holding, layer, retry_after, send,
    until_held,
};

fn engine<F: Fixture>(fixture: &F) -> Locks<F::Backend> {
    Locks::new(fixture.backend()).namespace(NS)
}

fn key(name: &str) -> LockKey {
    LockKey::new(name)
}

suite!(pushed:
    waiter_acquires_after_release,
    waiting_request_is_served_after_the_holder,
    waiter_gives_up_with_409_after_max_wait,
    waiters_in_one_process_are_served_fifo,
    dropped_waiter_leaves_queue_and_never_holds_the_lock,
    waiter_notices_expiry_of_a_crashed_holder,
    waiter_cap_answers_409_beyond_it,
    retry_after_follows_observed_hold_time,
    same_key_requests_in_wait_mode_are_all_served_one_at_a_time,
    a_lock_taken_after_waiting_is_renewed_and_fenced,
    fail_fast_stays_the_default,
);

async fn waiter_acquires_after_release<F: Fixture>() {
    let fixture = F::start().await;
    // A long lease: only the release can hand the lock over within the wait.
    let locks = engine(&fixture).ttl(Duration::from_secs(30));
    let first = locks.try_lock(&key("a")).await.unwrap();
    let waiter = tokio::spawn({
        let locks = locks.clone();
        async move { locks.lock(&key("a"), Duration::from_secs(10)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "the waiter took a held lock");
    let token = first.fencing_token();
    let released = Instant::now();
    first.release().await.unwrap();
    let second = waiter.await.unwrap().expect("the waiter gets the lock");
    // Woken by the release, not by the end of its 10 s wait (the bound is loose on purpose:
    // latency is the benchmark's business).
    let handover = released.elapsed();
    assert!(
        handover < Duration::from_secs(5),
        "handed over after {handover:?}"
    );
    assert!(second.fencing_token() > token || second.fencing_token() == 0);
    second.release().await.unwrap();
    assert_eq!(fixture.held().await, 0);
}

async fn waiting_request_is_served_after_the_holder<F: Fixture>() {
    let fixture = F::start().await;
    let service = holder_behind(layer(&fixture).wait(Duration::from_secs(10)));
    let first = tokio::spawn(send(&service, holding("k", 400)));
    until_held(&fixture, 1).await;
    let second = send(&service, holding("k", 0)).await;
    assert_eq!(second.status(), StatusCode::OK);
    let first = first.await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let (first, second) = (body_json(first).await, body_json(second).await);
    assert_eq!(second["locked"], true);
    assert!(second["fencing_token"].as_u64() > first["fencing_token"].as_u64());
    assert_eq!(fixture.held().await, 0);
}

async fn waiter_gives_up_with_409_after_max_wait<F: Fixture>() {
    let fixture = F::start().await;
    let max = Duration::from_millis(300);
    let service = holder_behind(layer(&fixture).wait(max));
    let first = tokio::spawn(send(&service, holding("k", 3000)));
    until_held(&fixture, 1).await;
    let started = Instant::now();
    let refused = send(&service, holding("k", 0)).await;
    let waited = started.elapsed();
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    assert!(
        waited >= max,
        "gave up after {waited:?}, before the wait of {max:?}"
    );
    assert!(
        !first.is_finished(),
        "gave up only after the holder finished ({waited:?})"
    );
    let body = body_json(refused).await;
    assert_eq!(body["status"], 409);
    assert!(body["retry_after_ms"].as_u64().is_some(), "{body}");
    first.abort();

    // The engine: the same, as `TryLockError::Held`.
    let locks = engine(&fixture).ttl(Duration::from_secs(30));
    let _held = locks.try_lock(&key("e")).await.unwrap();
    let started = Instant::now();
    let outcome = locks.lock(&key("e"), max).await;
    assert!(
        matches!(outcome, Err(TryLockError::Held { .. })),
        "{outcome:?}"
    );
    assert!(started.elapsed() >= max);
}

async fn waiters_in_one_process_are_served_fifo<F: Fixture>() {
    let fixture = F::start().await;
    let locks = engine(&fixture).ttl(Duration::from_secs(30));
    let first = locks.try_lock(&key("q")).await.unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..6 {
        let (locks, order) = (locks.clone(), order.clone());
        waiters.push(tokio::spawn(async move {
            let lock = locks
                .lock(&key("q"), Duration::from_secs(20))
                .await
                .unwrap();
            order.lock().unwrap().push(i);
            tokio::time::sleep(Duration::from_millis(5)).await;
            lock.release().await.unwrap();
        }));
        // Each waiter is in the queue before the next one comes.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.release().await.unwrap();
    for waiter in waiters {
        waiter.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4, 5]);
    assert_eq!(fixture.held().await, 0);
}

async fn dropped_waiter_leaves_queue_and_never_holds_the_lock<F: Fixture>() {
    let fixture = F::start().await;
    // One waiter at most: a second can only wait if the dropped one has left the queue.
    let locks = engine(&fixture).ttl(Duration::from_secs(30)).max_waiters(1);
    let first = locks.try_lock(&key("d")).await.unwrap();
    let dropped = tokio::time::timeout(
        Duration::from_millis(200),
        locks.lock(&key("d"), Duration::from_secs(20)),
    )
    .await;
    assert!(dropped.is_err(), "the waiter was not still waiting");
    let second = tokio::spawn({
        let locks = locks.clone();
        async move { locks.lock(&key("d"), Duration::from_secs(10)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !second.is_finished(),
        "the second waiter was refused: the dropped one still had its place"
    );
    first.release().await.unwrap();
    let second = second
        .await
        .unwrap()
        .expect("the second waiter gets the lock");
    second.release().await.unwrap();
    // The dropped waiter never took the lock afterwards.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fixture.held().await, 0);

    // A waiting request whose client goes away leaves no lock behind either.
    let service = holder_behind(layer(&fixture).wait(Duration::from_secs(20)));
    let holder = tokio::spawn(send(&service, holding("r", 500)));
    until_held(&fixture, 1).await;
    let gone = tokio::time::timeout(Duration::from_millis(100), send(&service, holding("r", 0)));
    assert!(gone.await.is_err());
    assert_eq!(holder.await.unwrap().status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fixture.held().await, 0);
}

async fn waiter_notices_expiry_of_a_crashed_holder<F: Fixture>() {
    let fixture = F::start().await;
    let locks = engine(&fixture).ttl(Duration::from_secs(30));
    let name = locks.name(&key("c"));
    // A holder that crashed: its lock (500 ms lease) is never released, so nothing publishes.
    let crashed = fixture
        .backend()
        .acquire(
            &name,
            LockToken::random(),
            AcquireOptions::new(Duration::from_millis(500)),
        )
        .await
        .unwrap();
    assert!(matches!(crashed, Acquire::Acquired { .. }));
    let started = Instant::now();
    let lock = locks
        .lock(&key("c"), Duration::from_secs(10))
        .await
        .expect("the lock, once the crashed holder's lease ran out");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(400), "{waited:?}");
    lock.release().await.unwrap();
}

async fn waiter_cap_answers_409_beyond_it<F: Fixture>() {
    let fixture = F::start().await;
    let service = holder_behind(layer(&fixture).wait(Duration::from_secs(20)).max_waiters(2));
    let first = tokio::spawn(send(&service, holding("k", 1500)));
    until_held(&fixture, 1).await;
    let waiters: Vec<_> = (0..2)
        .map(|_| tokio::spawn(send(&service, holding("k", 0))))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = send(&service, holding("k", 0)).await;
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    assert!(
        !first.is_finished(),
        "the request beyond the cap was answered only after the holder finished"
    );
    assert_eq!(first.await.unwrap().status(), StatusCode::OK);
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap().status(), StatusCode::OK);
    }
}

async fn retry_after_follows_observed_hold_time<F: Fixture>() {
    let fixture = F::start().await;
    // A 10 s lease renewed: the holder's remaining lease says nothing of when it will be done.
    let service = holder_behind(layer(&fixture).ttl(Duration::from_secs(10)));
    let conflict_while = async |hold_ms: u64| {
        let first = tokio::spawn(send(&service, holding("k", hold_ms)));
        until_held(&fixture, 1).await;
        let refused = send(&service, holding("k", 0)).await;
        assert_eq!(refused.status(), StatusCode::CONFLICT);
        let secs = retry_after(&refused);
        let body = body_json(refused).await;
        assert_eq!(first.await.unwrap().status(), StatusCode::OK);
        (
            secs,
            body["retry_after_ms"].as_u64().expect("retry_after_ms"),
        )
    };
    // Nothing observed yet: the holder's remaining lease.
    let (secs, ms) = conflict_while(300).await;
    assert!(secs >= 9 && ms > 9000, "{secs} s, {ms} ms");
    // Two holds of 300 ms observed: the estimate follows them.
    send(&service, holding("k", 300)).await;
    let (secs, ms) = conflict_while(300).await;
    assert_eq!(secs, 1);
    assert!((250..2000).contains(&ms), "{ms} ms");
}

async fn same_key_requests_in_wait_mode_are_all_served_one_at_a_time<F: Fixture>() {
    let fixture = F::start().await;
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let balance = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (inside, most, balance) = (inside.clone(), most.clone(), balance.clone());
        tower::service_fn(move |_request: http::Request<String>| {
            let (inside, most, balance) = (inside.clone(), most.clone(), balance.clone());
            async move {
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                // A read, a pause, a write: any overlap loses an update.
                let read = balance.load(Ordering::SeqCst);
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_micros(200)).await;
                balance.store(read + 1, Ordering::SeqCst);
                inside.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
            }
        })
    };
    let service = tower::ServiceBuilder::new()
        .layer(layer(&fixture).wait(Duration::from_secs(60)))
        .service(handler);
    let requests: Vec<_> = (0..200)
        .map(|_| tokio::spawn(send(&service, holding("same", 0))))
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "two requests held the lock at once"
    );
    assert_eq!(balance.load(Ordering::SeqCst), 200, "a deposit was lost");
    assert!(eventually(Duration::from_secs(5), async || fixture.held().await == 0).await);
}

async fn a_lock_taken_after_waiting_is_renewed_and_fenced<F: Fixture>() {
    let fixture = F::start().await;
    // A 300 ms lease renewed every 100 ms, held 900 ms after waiting for it.
    let locks = engine(&fixture).ttl(Duration::from_millis(300));
    let first = locks.try_lock(&key("f")).await.unwrap();
    let waiter = tokio::spawn({
        let locks = locks.clone();
        async move {
            let lock = locks
                .lock(&key("f"), Duration::from_secs(10))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(900)).await;
            assert!(
                !lock.is_lost(),
                "the lease taken after waiting was not renewed"
            );
            let token = lock.fencing_token();
            lock.release().await.unwrap();
            token
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let first_token = first.fencing_token();
    first.release().await.unwrap();
    assert!(waiter.await.unwrap() > first_token);
    assert_eq!(fixture.held().await, 0);
}

async fn fail_fast_stays_the_default<F: Fixture>() {
    let fixture = F::start().await;
    let service = holder_behind(layer(&fixture));
    let first = tokio::spawn(send(&service, holding("k", 1000)));
    until_held(&fixture, 1).await;
    let refused = send(&service, holding("k", 0)).await;
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    assert!(!first.is_finished());
    first.abort();
}

/// Behaviours of the Redis subscriber connection.
mod redis_subscriber {
    use super::*;
    use common::{Redis, RedisServer};

    async fn pubsub_clients(server: &RedisServer) -> usize {
        let mut connection = server.connection().await;
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut connection)
            .await
            .unwrap();
        list.lines().filter(|line| !line.is_empty()).count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_survive_subscriber_reconnect() {
        let fixture = Redis::start().await;
        // Leases far longer than the test: only a release (or a retry) can hand the lock over.
        let locks = engine(&fixture).ttl(Duration::from_secs(60));
        let first = locks.try_lock(&key("s")).await.unwrap();
        let waiter = tokio::spawn({
            let locks = locks.clone();
            async move { locks.lock(&key("s"), Duration::from_secs(20)).await }
        });
        assert!(
            eventually(Duration::from_secs(5), async || pubsub_clients(
                &fixture.server
            )
            .await
                == 1)
            .await,
            "no subscriber connection"
        );
        let kill = async || {
            let mut connection = fixture.server.connection().await;
            let killed: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("pubsub")
                .query_async(&mut connection)
                .await
                .unwrap();
            assert_eq!(killed, 1);
        };
        kill().await;
        // Released while the subscriber is reconnecting.
        first.release().await.unwrap();
        let second = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the waiter was stranded")
            .unwrap()
            .expect("the lock");

        // Killed while a waiter waits: the subscriber comes back, and the next release is
        // pushed to the waiter.
        let third = tokio::spawn({
            let locks = locks.clone();
            async move { locks.lock(&key("s"), Duration::from_secs(20)).await }
        });
        assert!(
            eventually(Duration::from_secs(5), async || pubsub_clients(
                &fixture.server
            )
            .await
                == 1)
            .await
        );
        kill().await;
        assert!(
            eventually(Duration::from_secs(5), async || pubsub_clients(
                &fixture.server
            )
            .await
                == 1)
            .await,
            "the subscriber did not reconnect"
        );
        second.release().await.unwrap();
        let third = tokio::time::timeout(Duration::from_secs(10), third)
            .await
            .expect("the waiter was stranded")
            .unwrap()
            .expect("the lock");
        third.release().await.unwrap();
    }

    /// One subscriber connection for all the waiters of a backend, whatever their number and
    /// keys; none once nobody waits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_subscriber_connection_serves_every_waiter() {
        let fixture = Redis::start().await;
        let locks = engine(&fixture).ttl(Duration::from_secs(60));
        let mut held = Vec::new();
        for k in ["x", "y", "z"] {
            held.push(locks.try_lock(&key(k)).await.unwrap());
        }
        let waiters: Vec<_> = (0..30)
            .map(|i| {
                let locks = locks.clone();
                let k = ["x", "y", "z"][i % 3];
                tokio::spawn(async move {
                    let lock = locks.lock(&key(k), Duration::from_secs(20)).await.unwrap();
                    lock.release().await.unwrap();
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(pubsub_clients(&fixture.server).await, 1);
        let mut connection = fixture.server.connection().await;
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(channels.len(), 3, "{channels:?}");
        for lock in held {
            lock.release().await.unwrap();
        }
        for waiter in waiters {
            waiter.await.unwrap();
        }
        // Nobody waits any more: the channels are unsubscribed.
        assert!(
            eventually(Duration::from_secs(5), async || {
                let channels: Vec<String> = redis::cmd("PUBSUB")
                    .arg("CHANNELS")
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                channels.is_empty()
            })
            .await
        );
    }
}

/// A lock taken after waiting is held through the body, and its loss under `Abort` is answered
/// 503 and releases nothing of another holder's, as a lock taken at once.
mod after_waiting {
    use super::*;
    use common::{Memory, Redis, body_text, streaming};
    use tower::ServiceBuilder;
    use tower_lock::LeaseLostPolicy;

    async fn holds_through_the_body_and_aborts_on_loss<F: Fixture>() {
        let fixture = F::start().await;
        // Hold-through-body: the waiter's streamed body keeps the lock until it is read.
        let service = ServiceBuilder::new()
            .layer(
                layer(&fixture)
                    .wait(Duration::from_secs(10))
                    .hold_through_body(true),
            )
            .service(streaming(3, Duration::from_millis(100)));
        let first = tokio::spawn(send(&service, common::request("b")));
        let first = first.await.unwrap();
        let second = tokio::spawn(send(&service, common::request("b")));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !second.is_finished(),
            "the waiter got the lock while a body held it"
        );
        body_text(first).await;
        let second = second.await.unwrap();
        assert_eq!(second.status(), StatusCode::OK);
        assert_eq!(fixture.held().await, 1, "the waiter's body holds the lock");
        body_text(second).await;
        until_held(&fixture, 0).await;

        // Abort: the waiter's lock is deleted behind its back while its handler runs.
        let service = holder_behind(
            layer(&fixture)
                .wait(Duration::from_secs(10))
                .ttl(Duration::from_millis(300))
                .on_lease_lost(LeaseLostPolicy::Abort),
        );
        let first = tokio::spawn(send(&service, holding("a", 200)));
        until_held(&fixture, 1).await;
        let second = tokio::spawn(send(&service, holding("a", 5000)));
        assert_eq!(first.await.unwrap().status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
        fixture.delete(&common::lock_name("a")).await;
        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the lease loss was not noticed")
            .unwrap();
        assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_redis() {
        holds_through_the_body_and_aborts_on_loss::<Redis>().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_memory() {
        holds_through_the_body_and_aborts_on_loss::<Memory>().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_cluster() {
        holds_through_the_body_and_aborts_on_loss::<common::cluster::Cluster>().await;
    }
}
