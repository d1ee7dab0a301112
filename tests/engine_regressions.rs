//! Regressions found by a red-team review of issue 8's engine/adapters split: each test pins a
//! promise the change makes (or keeps), failed before its fix, and says in its doc comment what
//! was broken.

#[macro_use]
mod common;

use std::convert::Infallible;
use std::time::{Duration, Instant as StdInstant};

use common::{Fixture, NS};
use http::{Request, Response, StatusCode};
use tower::ServiceBuilder;
use tower_lock::backend::{
    Acquire, AcquireOptions, BackendFuture, Extend, Inspect, LockName, LockToken, Release,
};
use tower_lock::key::{Header, LockKey};
use tower_lock::{LockBackend, LockLayer, LockLease, Locks, MemoryBackend, TryLockError};

/// A store whose client does its work when called, as `MemoryBackend` does (the lock is in the
/// store when `acquire` returns its future), and then spends `pause` before returning: a
/// contended mutex, a purge of expired entries, a preempted thread. A backend whose calls are
/// lazy (Redis: nothing is sent until the future is polled) loses nothing by the pause.
#[derive(Clone)]
struct SlowCaller<B> {
    inner: B,
    pause: Duration,
}

impl<B: LockBackend> LockBackend for SlowCaller<B> {
    fn acquire(
        &self,
        name: &LockName,
        token: LockToken,
        options: AcquireOptions,
    ) -> BackendFuture<Acquire> {
        let answer = self.inner.acquire(name, token, options);
        std::thread::sleep(self.pause);
        answer
    }

    fn release(&self, name: &LockName, token: LockToken) -> BackendFuture<Release> {
        self.inner.release(name, token)
    }

    fn extend(&self, name: &LockName, token: LockToken, ttl: Duration) -> BackendFuture<Extend> {
        self.inner.extend(name, token, ttl)
    }

    fn release_abandoned(
        &self,
        name: &LockName,
        token: LockToken,
        ttl: Duration,
    ) -> BackendFuture<Release> {
        self.inner.release_abandoned(name, token, ttl)
    }

    fn inspect(&self, name: &LockName) -> BackendFuture<Inspect> {
        self.inner.inspect(name)
    }

    fn force_release(&self, name: &LockName) -> BackendFuture<bool> {
        self.inner.force_release(name)
    }
}

fn account(id: &str) -> LockKey {
    LockKey::literal("account:").part(id).build().unwrap()
}

/// Takes `key` through `locks` as soon as the store lets anyone have it (within `within`).
async fn take_when_free<B: LockBackend>(
    locks: &Locks<B>,
    key: &LockKey,
    within: Duration,
) -> tower_lock::Lock<B> {
    let deadline = StdInstant::now() + within;
    loop {
        match locks.try_lock(key).await {
            Ok(lock) => return lock,
            Err(TryLockError::Held { .. }) if StdInstant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(error) => panic!("the lock never became free: {error}"),
        }
    }
}

/// The lease's validity counts "from the start of the acquire call" (`lease.rs`), so that
/// `is_lost()` is true, and `lost()` has fired, no later than the moment the store can give the
/// lock to someone else (README: "`lost()` fires no later than the moment validity runs out").
///
/// Was broken by the shared acquire path: `Core::attempt` (src/acquire.rs) calls
/// `backend.acquire(..)` first and only then reads `started: Instant::now()`. For a backend that
/// takes the lock inside the call (MemoryBackend does), whatever time the call spends after
/// taking the lock is added to the lease: the holder believes it holds the lock for that long
/// after the store has handed it to the next taker. Before the refactor the clock was read
/// before the call (layer and engine alike). Redis passes: its call sends nothing until polled.
async fn a_lease_is_lost_by_the_time_the_store_frees_its_lock<F: Fixture>() {
    let fixture = F::start().await;
    let ttl = Duration::from_millis(600);
    let slow = Locks::new(SlowCaller {
        inner: fixture.backend(),
        pause: Duration::from_millis(300),
    })
    .namespace(NS)
    .ttl(ttl)
    .no_renewal()
    .min_validity(Duration::ZERO);
    let other = Locks::new(fixture.new_client()).namespace(NS);
    let key = account("1");

    let first = slow.try_lock(&key).await.expect("free");
    let second = take_when_free(&other, &key, Duration::from_secs(5)).await;
    assert!(
        first.is_lost(),
        "two holders: the store gave the lock to a second taker (fencing token {}) while the \
         first lease (token {}) still says it is not lost",
        second.fencing_token(),
        first.fencing_token(),
    );
    drop(second);
    drop(first);
}

/// The same promise through the layer (the acquire path is shared): a handler's `LockLease`
/// reports the loss by the time the store lets another holder in.
async fn a_handlers_lease_is_lost_by_the_time_the_store_frees_its_lock<F: Fixture>() {
    let fixture = F::start().await;
    let layer = LockLayer::new(
        SlowCaller {
            inner: fixture.backend(),
            pause: Duration::from_millis(300),
        },
        Header::new("x-key"),
    )
    .namespace(NS)
    .ttl(Duration::from_millis(600))
    .no_renewal()
    .min_validity(Duration::ZERO);
    let other = Locks::new(fixture.new_client()).namespace(NS);
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(move |req: Request<String>| {
            let other = other.clone();
            async move {
                let lease = req.extensions().get::<LockLease>().cloned().unwrap();
                let second =
                    take_when_free(&other, &LockKey::new("k"), Duration::from_secs(5)).await;
                let report = format!(
                    "lost={} second-token={}",
                    lease.is_lost(),
                    second.fencing_token()
                );
                drop(second);
                Ok::<_, Infallible>(Response::new(report))
            }
        }));
    let response = common::send(&service, common::request("k")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let report = text(response).await;
    assert!(
        report.starts_with("lost=true"),
        "two holders: another holder took the lock while the handler's lease said {report}"
    );
}

async fn text(response: Response<tower_lock::LockBody<String>>) -> String {
    use http_body_util::BodyExt;
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// The same, on the plain `MemoryBackend` with no wrapper: its `acquire` reads the clock, then
/// waits for its mutex and, when the map is due, purges expired entries, all before it returns.
/// The acquire that purges a large map spends milliseconds there, and the lease counts its
/// validity from after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_lease_is_lost_by_the_time_the_store_frees_its_lock() {
    let backend = MemoryBackend::new();
    let filler = Locks::new(backend.clone()).namespace("filler:");
    // 2^k live entries: the next acquire purges (retains) all of them.
    let entries = 1usize << 18;
    let started = StdInstant::now();
    for i in 0..entries {
        let name = filler.name(&LockKey::new(i.to_string()));
        let options = AcquireOptions::new(Duration::from_secs(600)).fencing(false);
        let taken = backend.acquire(&name, LockToken::random(), options).await;
        assert!(matches!(taken, Ok(Acquire::Acquired { .. })));
    }
    eprintln!("filled {entries} in {:?}", started.elapsed());
    let locks = Locks::new(backend.clone())
        .namespace(NS)
        .ttl(Duration::from_millis(300))
        .no_renewal()
        .min_validity(Duration::ZERO);
    let key = account("1");
    let before = StdInstant::now();
    let first = locks.try_lock(&key).await.expect("free");
    eprintln!("the purging acquire took {:?}", before.elapsed());
    // Take it the moment the store lets anyone have it.
    let deadline = StdInstant::now() + Duration::from_secs(5);
    let second = loop {
        match locks.try_lock(&key).await {
            Ok(lock) => break lock,
            Err(TryLockError::Held { .. }) if StdInstant::now() < deadline => {
                tokio::task::yield_now().await
            }
            Err(error) => panic!("the lock never became free: {error}"),
        }
    };
    assert!(
        first.is_lost(),
        "two holders on MemoryBackend: a second taker (token {}) holds the lock while the first \
         lease (token {}) still says it is not lost",
        second.fencing_token(),
        first.fencing_token(),
    );
}

/// Error-level events written while a future runs (copied from `tests/misconfiguration.rs`).
#[cfg(feature = "axum")]
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(feature = "axum")]
impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(feature = "axum")]
impl Logs {
    async fn capture<T>(&self, future: impl Future<Output = T>) -> T {
        use tracing::instrument::WithSubscriber;
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::ERROR)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        future.with_subscriber(subscriber).await
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// README: a key that can never be extracted is answered 500 and "logged at error level once
/// per layer". One `LockPolicy` is naturally reused on several axum routes
/// (`post(h).route_layer(policy.layer(backend))` per route); here both routes lack `{id}`, so
/// both layers are misconfigured, and each should say so once.
///
/// Was broken: `LockPolicy::layer` clones the policy's `KeyTemplate`, and its `ReportOnce` flag
/// (src/key/rejection.rs, shared by clones) with it, so every layer made from one policy shares
/// one flag: the second layer's misconfiguration (with its own route pattern in the detail) is
/// never logged. (`layer_for` and `LockRoutes::route` reset the flag through `with_pattern`;
/// `layer` and `layer_with` do not.)
#[cfg(feature = "axum")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_layer_of_a_reused_policy_logs_its_misconfiguration_once() {
    use axum::Router;
    use axum::body::Body;
    use axum::routing::post;
    use tower::ServiceExt;
    use tower_lock::LockPolicy;

    let backend = MemoryBackend::new();
    let policy = LockPolicy::template("account:{path.id}").unwrap();
    let app = Router::new()
        .route(
            "/accounts/{account}/deposit",
            post(|| async { "done" }).route_layer(policy.layer(backend.clone())),
        )
        .route(
            "/users/{user}/deposit",
            post(|| async { "done" }).route_layer(policy.layer(backend.clone())),
        );
    let logs = Logs::default();
    for uri in ["/accounts/1/deposit", "/users/1/deposit"] {
        let request = Request::post(uri).body(Body::empty()).unwrap();
        let response = logs.capture(app.clone().oneshot(request)).await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::INTERNAL_SERVER_ERROR,
            "{uri}"
        );
    }
    let text = logs.text();
    assert_eq!(
        text.matches("can never be extracted").count(),
        2,
        "two misconfigured layers, logged: {text}"
    );
}

/// `LockPolicy`'s `Debug` "shows what it sets" (tests/settings.rs), and a policy "overrides the
/// layer's, table's or engine's settings with only what it sets" (README). Two policies that
/// lock differently over the same engine must not print the same.
///
/// Was broken: `impl Debug for LockPolicy` (src/policy.rs) applies the overrides to
/// `Settings::default()` and prints every resolved field, so a policy that sets no TTL prints
/// `ttl: 10s`, exactly as one that sets `ttl(10 s)`; over an engine with a 30 s TTL the first
/// locks for 30 s, the second for 10 s. Same for the namespace, fencing, renewal, …
#[test]
fn policies_that_lock_differently_print_differently() {
    use tower_lock::LockPolicy;

    let locks = Locks::new(MemoryBackend::new()).ttl(Duration::from_secs(30));
    let inherits = LockPolicy::template("a").unwrap();
    let sets = LockPolicy::template("a")
        .unwrap()
        .ttl(Duration::from_secs(10));
    let (inherits_layer, sets_layer) = (
        format!("{:?}", inherits.layer_with(&locks)),
        format!("{:?}", sets.layer_with(&locks)),
    );
    assert!(inherits_layer.contains("ttl: 30s"), "{inherits_layer}");
    assert!(sets_layer.contains("ttl: 10s"), "{sets_layer}");
    assert_ne!(
        format!("{inherits:?}"),
        format!("{sets:?}"),
        "a policy that leaves the TTL to the engine prints as one that sets 10 s"
    );
}

/// CHANGELOG.md: "until 1.0, a minor version may break the public API, and every such change is
/// listed here"; issue 8: "Start `CHANGELOG.md` listing the public API changes".
///
/// Was broken: the change under attack (840537e..HEAD) does not touch CHANGELOG.md, yet it removes
/// public methods (`LockKey::push`, `push_literal`, `push_material`, `empty`), changes what
/// `LockLease::key()` returns (the Redis name as `&str` → the `&LockKey`), adds
/// `KeyRejectionKind`, `KeyRejection::{kind, misconfigured, missing_header, header}`,
/// `Rejection::MisconfiguredKey` (a new 500), and a dozen setters on `LockPolicy`.
#[test]
fn the_changelog_lists_the_public_api_changes_of_issue_8() {
    let changelog =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/CHANGELOG.md")).unwrap();
    let missing: Vec<&str> = [
        "KeyRejectionKind",
        "MisconfiguredKey",
        "misconfigured",
        "missing_header",
        "push_literal",
        "push_material",
        "LockLease::key",
        "LockPolicy::renew_every",
    ]
    .into_iter()
    .filter(|item| !changelog.contains(item))
    .collect();
    assert!(
        missing.is_empty(),
        "CHANGELOG.md never mentions {missing:?}"
    );
}

/// `Lock::lease` (src/locks.rs): "Clones of it outlive the lock (and report it lost once it has
/// been released)". A job that hands a lease clone to a worker relies on it to stop the worker.
///
/// Was broken (already before this change; the doc line is older): releasing ends the lease
/// (`LockLease::end`) but neither cancels it nor moves its validity, so a clone's `is_lost()`
/// stays false, and `lost()` stays pending, until the TTL would have run out (10 s by default)
/// while another holder already has the lock.
async fn a_released_locks_lease_reports_it_lost<F: Fixture>() {
    let fixture = F::start().await;
    let locks = Locks::new(fixture.backend()).namespace(NS);
    let key = account("1");
    let lock = locks.try_lock(&key).await.unwrap();
    let lease = lock.lease().clone();
    assert_eq!(lock.release().await.unwrap(), Release::Released);
    let next = locks.try_lock(&key).await.expect("released: free");
    assert!(
        lease.is_lost(),
        "the released lock's lease says it is not lost while another holder (token {}) has it",
        next.fencing_token()
    );
    next.release().await.unwrap();
}

suite!(
    a_lease_is_lost_by_the_time_the_store_frees_its_lock,
    a_handlers_lease_is_lost_by_the_time_the_store_frees_its_lock,
    a_released_locks_lease_reports_it_lost,
);
