//! Every duration setting saturates: whatever durations (zero to `Duration::MAX`) a layer or an
//! engine is given, a request is answered (200, or 503 when the settings leave no time to lock)
//! and a lock is taken and released, without a panic anywhere (request path, renewal task,
//! release task), on both backends.

#[macro_use]
mod common;

use std::convert::Infallible;
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Fixture, NS, eventually, request, send};
use http::{Request, Response, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tower::ServiceBuilder;
use tower_lock::key::{Header, LockKey};
use tower_lock::{LockLayer, Locks, TryLockError};

/// Panics seen anywhere in this test binary (spawned tasks included: Tokio catches those).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        Just(Duration::from_secs(u64::MAX)),
        Just(Duration::from_nanos(1)),
        (0u64..100_000).prop_map(Duration::from_millis),
        // Up to 20 years: past what Tokio's timers accept (about 2^36 ms, 2.2 years ahead).
        (0u64..20 * 365 * 24 * 3600).prop_map(Duration::from_secs),
        (0u64..=u64::MAX, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
    ]
}

/// One value for each duration setting, and whether renewal is off.
#[derive(Debug, Clone)]
struct Durations {
    ttl: Duration,
    acquire_timeout: Duration,
    release_timeout: Duration,
    renew_every: Duration,
    renew_timeout: Duration,
    max_hold: Duration,
    min_validity: Duration,
    no_renewal: bool,
}

fn durations() -> impl Strategy<Value = Durations> {
    (
        (duration(), duration(), duration(), duration()),
        (duration(), duration(), duration(), any::<bool>()),
    )
        .prop_map(
            |((ttl, acquire, release, every), (renew, hold, min, off))| Durations {
                ttl,
                acquire_timeout: acquire,
                release_timeout: release,
                renew_every: every,
                renew_timeout: renew,
                max_hold: hold,
                min_validity: min,
                no_renewal: off,
            },
        )
}

/// The settings applied through the builder methods both a layer and an engine have.
macro_rules! configure {
    ($builder:expr, $d:expr) => {{
        let d = &$d;
        let builder = $builder
            .ttl(d.ttl)
            .acquire_timeout(d.acquire_timeout)
            .release_timeout(d.release_timeout)
            .renew_every(d.renew_every)
            .renew_timeout(d.renew_timeout)
            .max_hold(d.max_hold)
            .min_validity(d.min_validity);
        if d.no_renewal {
            builder.no_renewal()
        } else {
            builder
        }
    }};
}

/// Runs `case` for generated durations, inside this test's runtime.
fn check<F: Fixture>(fixture: &F, case: impl AsyncFn(&F, Durations) -> Result<(), String>) {
    count_panics();
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let runtime = tokio::runtime::Handle::current();
    let result = runner.run(&durations(), |d| {
        let outcome = tokio::task::block_in_place(|| runtime.block_on(case(fixture, d)));
        prop_assert_eq!(outcome, Ok(()));
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic was seen");
        Ok(())
    });
    if let Err(error) = result {
        panic!("{error}");
    }
}

/// A release (or the clean-up of an acquire that timed out) bounded by a release timeout of a
/// few milliseconds may give up before it was sent: the lock then expires with its TTL, which
/// may be long. Deletes it, for the next case.
async fn clear_if_release_may_time_out<F: Fixture>(fixture: &F, d: &Durations) {
    if d.release_timeout < Duration::from_millis(100) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let locks = Locks::new(fixture.backend()).namespace(NS);
        let _ = locks.force_unlock(&LockKey::new("k")).await;
    }
}

/// Waits until no lock is held, or says how many are.
async fn released<F: Fixture>(fixture: &F) -> Result<(), String> {
    if eventually(Duration::from_secs(5), async || fixture.held().await == 0).await {
        Ok(())
    } else {
        Err(format!("{} locks left held", fixture.held().await))
    }
}

async fn any_durations_through_the_layer_answer_without_panicking<F: Fixture>() {
    let fixture = F::start().await;
    check(&fixture, async |fixture: &F, d: Durations| {
        let layer = configure!(
            LockLayer::new(fixture.backend(), Header::new("x-key")).namespace(NS),
            d
        );
        let service = ServiceBuilder::new()
            .layer(layer)
            .service_fn(|_: Request<String>| async {
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok::<_, Infallible>(Response::new(String::new()))
            });
        let status = send(&service, request("k")).await.status();
        if status != StatusCode::OK && status != StatusCode::SERVICE_UNAVAILABLE {
            return Err(format!("answered {status}"));
        }
        clear_if_release_may_time_out(fixture, &d).await;
        released(fixture).await
    });
}

async fn any_durations_through_the_engine_lock_or_say_why_not<F: Fixture>() {
    let fixture = F::start().await;
    check(&fixture, async |fixture: &F, d: Durations| {
        let locks = configure!(Locks::new(fixture.backend()).namespace(NS), d);
        let key = LockKey::new("k");
        match locks.try_lock(&key).await {
            Ok(lock) => {
                tokio::time::sleep(Duration::from_millis(2)).await;
                // A release may time out with a zero release timeout; the lock then expires.
                let _ = lock.release().await;
            }
            Err(TryLockError::Backend(_) | TryLockError::InsufficientValidity { .. }) => {}
            Err(error) => return Err(format!("try_lock: {error}")),
        }
        clear_if_release_may_time_out(fixture, &d).await;
        released(fixture).await
    });
}

suite!(
    any_durations_through_the_layer_answer_without_panicking,
    any_durations_through_the_engine_lock_or_say_why_not,
);
