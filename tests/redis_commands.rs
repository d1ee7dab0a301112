//! What the Redis backend sends, counted at the server: an uncontended request is two client
//! commands (acquire, release) and a refused one is one, with fencing on and off; without
//! fencing the acquire is a plain `SET NX PX GET`, whose refusal still tells the holder's
//! remaining lease, renewals included.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use common::{Fixture, NS, Redis, RedisServer, request, send};
use http::{Request, Response, StatusCode, header};
use tokio::sync::Notify;
use tower::ServiceBuilder;
use tower_lock::key::Header;
use tower_lock::{LockLayer, RedisBackend};

/// The calls of each command so far (`cmdstat_*`); a script's own calls count under their names.
async fn command_stats(server: &RedisServer) -> HashMap<String, u64> {
    let mut connection = server.connection().await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(":calls=")?;
            Some((name.to_owned(), rest.split(',').next()?.parse().ok()?))
        })
        .collect()
}

/// How many calls of each command were made between two readings (the `INFO` itself left out).
fn delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> HashMap<String, u64> {
    after
        .iter()
        .filter(|(name, _)| name.as_str() != "info")
        .filter_map(|(name, calls)| {
            let change = calls - before.get(name).copied().unwrap_or(0);
            (change > 0).then(|| (name.clone(), change))
        })
        .collect()
}

fn counts(pairs: &[(&str, u64)]) -> HashMap<String, u64> {
    pairs.iter().map(|(n, c)| ((*n).to_owned(), *c)).collect()
}

/// A service holding its lock until `gate` is notified (when the request has `x-hold`).
fn service(
    backend: RedisBackend,
    fencing: bool,
    gate: Arc<Notify>,
) -> impl tower::Service<
    Request<String>,
    Response = Response<tower_lock::LockBody<String>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    let layer = LockLayer::new(backend, Header::new("x-key"))
        .namespace(NS)
        .fencing(fencing)
        .ttl(Duration::from_secs(3))
        .renew_every(Duration::from_millis(500));
    ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(move |req: Request<String>| {
            let gate = gate.clone();
            async move {
                if req.headers().contains_key("x-hold") {
                    gate.notified().await;
                }
                Ok::<_, Infallible>(Response::new(String::new()))
            }
        }))
}

async fn commands_per_request(fencing: bool) {
    let fixture = Redis::start().await;
    let gate = Arc::new(Notify::new());
    let service = service(fixture.backend.clone(), fencing, gate.clone());
    // Load the scripts first, so that every call below is an EVALSHA.
    assert_eq!(
        send(&service, request("warm")).await.status(),
        StatusCode::OK
    );

    let before = command_stats(&fixture.server).await;
    assert_eq!(send(&service, request("a")).await.status(), StatusCode::OK);
    let uncontended = delta(&before, &command_stats(&fixture.server).await);
    // The same key again: its fencing counter is still there.
    let before = command_stats(&fixture.server).await;
    assert_eq!(send(&service, request("a")).await.status(), StatusCode::OK);
    let again = delta(&before, &command_stats(&fixture.server).await);

    let holder = tokio::spawn(send(&service, request("b").header("x-hold", "1")));
    assert!(common::eventually(Duration::from_secs(5), async || fixture.held().await == 1).await);
    let before = command_stats(&fixture.server).await;
    let refused = send(&service, request("b")).await;
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    let conflict = delta(&before, &command_stats(&fixture.server).await);
    gate.notify_one();
    holder.await.unwrap();

    if fencing {
        // Two scripts: acquire (SET NX PX, then TIME, the counter's GET and its SET PXAT)
        // and release (GET, DEL; no PUBLISH, since nobody
        // waits: issue 11); the 409 is one script (SET refused, PTTL).
        let expected = counts(&[
            ("evalsha", 2),
            ("set", 2),
            ("time", 1),
            ("get", 2),
            ("del", 1),
        ]);
        assert_eq!(uncontended, expected, "uncontended, fencing on");
        // While the counter lives the clock is still read: a counter a failover left behind
        // (asynchronous replication) is passed by the clock (see `NEXT_FENCE`).
        assert_eq!(again, expected, "uncontended again, fencing on");
        assert_eq!(conflict, counts(&[("evalsha", 1), ("set", 1), ("pttl", 1)]));
    } else {
        // A plain SET, then the release script (GET, DEL; no PUBLISH, nobody waits); the 409 is
        // one SET.
        let expected = counts(&[("set", 1), ("evalsha", 1), ("get", 1), ("del", 1)]);
        assert_eq!(uncontended, expected, "uncontended, fencing off");
        assert_eq!(again, expected, "uncontended again, fencing off");
        assert_eq!(conflict, counts(&[("set", 1)]), "refused, fencing off");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fencing_a_request_is_two_scripts_and_a_conflict_one() {
    commands_per_request(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fencing_the_acquire_is_a_plain_set_and_a_conflict_one_set() {
    commands_per_request(false).await;
}

/// A refused plain `SET NX PX GET` reads the holder's deadline from the lock's value; renewals
/// move that deadline, so `Retry-After` stays the holder's real remaining lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fencing_retry_after_follows_the_holders_renewed_lease() {
    let fixture = Redis::start().await;
    let gate = Arc::new(Notify::new());
    let service = service(fixture.backend.clone(), false, gate.clone());
    let holder = tokio::spawn(send(&service, request("k").header("x-hold", "1")));
    assert!(common::eventually(Duration::from_secs(5), async || fixture.held().await == 1).await);
    // Past the first TTL's end: only renewals keep the lock (TTL 3 s, renewed every 500 ms).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let refused = send(&service, request("k")).await;
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    let retry_after: u64 = refused.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (2..=3).contains(&retry_after),
        "Retry-After {retry_after} s, the renewed lease has 2.5–3 s left"
    );
    gate.notify_one();
    holder.await.unwrap();
}

/// A Redis that forgot the scripts (restarted, failed over, `SCRIPT FLUSH`) gets each one loaded
/// again on its next use: acquire, renewal and release all work after a flush, and each flush
/// is followed by a `SCRIPT LOAD`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_flushed_from_redis_are_loaded_again_on_their_next_use() {
    use tower_lock::LockBackend;
    use tower_lock::backend::{Acquire, AcquireOptions, Extend, LockToken, Release};

    let server = RedisServer::start();
    let backend = RedisBackend::connect(&server.url()).await.unwrap();
    let name = common::lock_name("noscript");
    let token = LockToken::random();
    let ttl = Duration::from_secs(5);
    let flush = || async {
        let loads = server.command_calls("script|load").await;
        let mut connection = server.connection().await;
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut connection)
            .await
            .unwrap();
        loads
    };
    let loads = flush().await;
    let acquired = backend
        .acquire(&name, token, AcquireOptions::new(ttl))
        .await
        .unwrap();
    assert!(
        matches!(acquired, Acquire::Acquired { fencing_token } if fencing_token > 0),
        "{acquired:?}"
    );
    let after_acquire = flush().await;
    assert_eq!(
        after_acquire,
        loads + 1,
        "the acquire script was not loaded"
    );
    assert_eq!(
        backend.extend(&name, token, ttl).await.unwrap(),
        Extend::Extended
    );
    let after_extend = flush().await;
    assert_eq!(
        after_extend,
        after_acquire + 1,
        "the extend script was not loaded"
    );
    assert_eq!(
        backend.release(&name, token).await.unwrap(),
        Release::Released
    );
    assert_eq!(
        flush().await,
        after_extend + 1,
        "the release script was not loaded"
    );
}

/// Issue 11: a release publishes a wake-up only when a waiter has marked the lock. A fail-fast
/// attempt on a held lock marks nothing, and its release publishes nothing; a waiter's attempt
/// (`AcquireOptions::waiting`) marks it (`;` in place of the value's `:`), renewals keep the mark
/// (fails if a renewal rewrites the value without it), a refused plain `SET NX PX GET` still reads
/// the marked holder's deadline, and the release publishes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_release_that_a_waiter_marked_publishes_and_renewals_keep_the_mark() {
    use tower_lock::LockBackend;
    use tower_lock::backend::{Acquire, AcquireOptions, Extend, LockToken, Release};

    let fixture = Redis::start().await;
    let backend = &fixture.backend;
    let mut connection = fixture.server.connection().await;
    let ttl = Duration::from_secs(10);
    for fencing in [false, true] {
        let name = common::lock_name(&format!("marked-{fencing}"));
        let options = AcquireOptions::new(ttl).fencing(fencing);
        let mut separator = async || {
            let value: String = redis::cmd("GET")
                .arg(name.lock_key())
                .query_async(&mut connection)
                .await
                .unwrap();
            value.as_bytes()[32]
        };
        let publishes = async || fixture.server.command_calls("publish").await;
        let held = async |options: AcquireOptions| match backend
            .acquire(&name, LockToken::random(), options)
            .await
        {
            Ok(Acquire::Held { remaining }) => remaining,
            other => panic!("expected held, got {other:?}"),
        };
        let before = publishes().await;

        // Nobody waits: a fail-fast attempt marks nothing; renewal and release publish nothing.
        let holder = LockToken::random();
        let acquired = backend.acquire(&name, holder, options).await.unwrap();
        assert!(matches!(acquired, Acquire::Acquired { .. }));
        held(options).await;
        assert_eq!(
            separator().await,
            b':',
            "a fail-fast attempt marked the lock"
        );
        let extended = backend.extend(&name, holder, ttl).await.unwrap();
        assert_eq!(extended, Extend::Extended);
        let released = backend.release(&name, holder).await.unwrap();
        assert_eq!(released, Release::Released);
        assert_eq!(publishes().await, before, "an unwaited release published");

        // A waiter marks the held lock; two renewals keep the mark; the release publishes once.
        let holder = LockToken::random();
        let acquired = backend.acquire(&name, holder, options).await.unwrap();
        assert!(matches!(acquired, Acquire::Acquired { .. }));
        let remaining = held(options.waiting(true)).await;
        assert!(remaining.is_some_and(|r| r > Duration::from_secs(5)));
        assert_eq!(separator().await, b';', "the waiter did not mark the lock");
        for _ in 0..2 {
            let extended = backend.extend(&name, holder, ttl).await.unwrap();
            assert_eq!(extended, Extend::Extended);
            assert_eq!(
                separator().await,
                b';',
                "a renewal dropped the waiter's mark"
            );
        }
        // The marked value still gives a refused plain acquire the holder's deadline.
        let remaining = held(AcquireOptions::new(ttl).fencing(false)).await;
        assert!(
            remaining.is_some_and(|r| r > Duration::from_secs(5)),
            "{remaining:?}"
        );
        let released = backend.release(&name, holder).await.unwrap();
        assert_eq!(released, Release::Released);
        assert_eq!(
            publishes().await,
            before + 1,
            "a waited-for release did not publish"
        );
    }
}
