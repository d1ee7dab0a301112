//! The lock engine outside HTTP: `Locks::try_lock`, the held `Lock`, inspection and forced
//! unlocks, keys built from code, and layers that share the engine's settings and renewal.
//! Every behaviour that takes a lock runs on both backends (`suite!`).

#[macro_use]
mod common;

use std::time::Duration;

use axum::Router;
use axum::routing::post;
use http::{HeaderMap, Method, Request, StatusCode};
use proptest::prelude::*;
use tower::Layer;
use tower_lock::backend::{BackendErrorKind, Inspect, Release};
use tower_lock::key::{Header, KeyExtractor, KeyTemplate, LockKey};
use tower_lock::{LockPolicy, LockRoutes, Locks, TryLockError};

use common::backends::{Acquires, Wrapped};
use common::{Fixture, Gate, NS, answers, eventually, gate_if, send, until_held};

fn engine<F: Fixture>(fixture: &F) -> Locks<F::Backend> {
    Locks::new(fixture.backend()).namespace(NS)
}

fn account(id: &str) -> LockKey {
    LockKey::literal("account:").part(id).build().unwrap()
}

/// An engine on the fixture's backend whose acquires all do as `acquires` says.
fn wrapped<F: Fixture>(fixture: &F, acquires: Acquires) -> Locks<Wrapped<F::Backend>> {
    Locks::new(Wrapped::new(fixture.backend()).acquires(move |_| acquires.clone())).namespace(NS)
}

suite!(
    route_and_background_job_exclude_each_other,
    try_lock_tells_held_from_a_backend_failure,
    a_timed_out_acquire_is_cleaned_up,
    a_lock_with_too_little_validity_is_released_and_refused,
    release_reports_released_expired_and_taken_over,
    dropping_a_lock_releases_it,
    engine_locks_are_renewed_while_held,
    inspect_and_is_locked_report_the_holder,
    inspect_and_force_unlock_are_unsupported_by_default,
    force_unlock_deletes_the_lock_and_the_holder_learns_it,
    layers_built_from_the_engine_share_its_names_and_renewal_task,
);

/// A job holding `account:42` through the engine makes the route answer 409; a request holding
/// it makes the job's `try_lock` answer `Held`. Other accounts are not excluded.
async fn route_and_background_job_exclude_each_other<F: Fixture>() {
    let fixture = F::start().await;
    let locks = engine(&fixture).ttl(Duration::from_secs(5));
    let gate = Gate::new();
    let handler_gate = gate.clone();
    let app = Router::new()
        .route(
            "/accounts/{id}/deposit",
            post(move |headers: HeaderMap| {
                let gate = handler_gate.clone();
                async move {
                    gate.pass(&headers).await;
                    "deposited"
                }
            }),
        )
        .route_layer(
            LockPolicy::template("account:{path.id}")
                .unwrap()
                .methods([Method::POST])
                .layer_with(&locks),
        );
    let deposit = |id: &str, gated: bool| {
        send(
            &app,
            gate_if(Request::post(format!("/accounts/{id}/deposit")), gated),
        )
    };

    // The job holds the account: the route is refused, another account is not.
    let job = locks.try_lock(&account("42")).await.expect("the job locks");
    assert_eq!(deposit("42", false).await.status(), StatusCode::CONFLICT);
    assert_eq!(deposit("43", false).await.status(), StatusCode::OK);
    assert_eq!(job.release().await.unwrap(), Release::Released);
    assert_eq!(deposit("42", false).await.status(), StatusCode::OK);

    // A request holds the account: the job is refused, and gets it once the request is done.
    let request = tokio::spawn(deposit("42", true));
    until_held(&fixture, 1).await;
    match locks.try_lock(&account("42")).await {
        Err(TryLockError::Held { remaining }) => {
            assert!(
                remaining.is_some_and(|r| r <= Duration::from_secs(5)),
                "{remaining:?}"
            );
        }
        other => panic!("expected Held while the route holds the lock, got {other:?}"),
    }
    let other = locks
        .try_lock(&account("43"))
        .await
        .expect("another account");
    gate.open();
    assert_eq!(request.await.unwrap().status(), StatusCode::OK);
    let job = locks
        .try_lock(&account("42"))
        .await
        .expect("free once the request is done");
    assert_eq!(job.release().await.unwrap(), Release::Released);
    assert_eq!(other.release().await.unwrap(), Release::Released);
    until_held(&fixture, 0).await;
}

/// `Held` for a lock someone holds, `Backend` for a backend that fails or does not answer in
/// time: never one for the other.
async fn try_lock_tells_held_from_a_backend_failure<F: Fixture>() {
    let fixture = F::start().await;
    let locks = engine(&fixture);
    let first = locks.try_lock(&account("1")).await.expect("free");
    assert!(matches!(
        locks.try_lock(&account("1")).await,
        Err(TryLockError::Held { remaining: Some(_) })
    ));

    let failing = wrapped(&fixture, Acquires::Fail);
    match failing.try_lock(&account("2")).await {
        Err(TryLockError::Backend(error)) => {
            assert_eq!(error.kind(), BackendErrorKind::Unavailable)
        }
        other => panic!("expected a backend error, got {other:?}"),
    }

    let stalling = wrapped(&fixture, Acquires::AnsweredAfter(Duration::from_secs(5)))
        .acquire_timeout(Duration::from_millis(50));
    // Even on a held lock, an acquire that does not answer in time is a failure, not `Held`.
    match stalling.try_lock(&account("1")).await {
        Err(TryLockError::Backend(error)) => assert_eq!(error.kind(), BackendErrorKind::Timeout),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(first.release().await.unwrap(), Release::Released);
}

/// An acquire that lands in the backend but is answered after the acquire timeout leaves no lock
/// behind: it is cleaned up, as a layer's is, instead of blocking the key for a whole TTL.
async fn a_timed_out_acquire_is_cleaned_up<F: Fixture>() {
    let fixture = F::start().await;
    let stalling = wrapped(&fixture, Acquires::AnsweredAfter(Duration::from_secs(2)))
        .ttl(Duration::from_secs(60))
        .acquire_timeout(Duration::from_millis(100));
    assert!(matches!(
        stalling.try_lock(&account("7")).await,
        Err(TryLockError::Backend(_))
    ));
    until_held(&fixture, 0).await;
    let locks = engine(&fixture);
    let lock = locks.try_lock(&account("7")).await.expect("no lock left");
    lock.release().await.unwrap();
}

/// A lock acquired so slowly that less than the minimum validity is left is released before
/// `try_lock` answers `InsufficientValidity`.
async fn a_lock_with_too_little_validity_is_released_and_refused<F: Fixture>() {
    let fixture = F::start().await;
    let slow = wrapped(
        &fixture,
        Acquires::AnsweredAfter(Duration::from_millis(300)),
    )
    .ttl(Duration::from_secs(1))
    .acquire_timeout(Duration::from_secs(5))
    .min_validity(Duration::from_millis(800));
    match slow.try_lock(&account("1")).await {
        Err(TryLockError::InsufficientValidity { validity }) => {
            assert!(validity < Duration::from_millis(800), "{validity:?}")
        }
        other => panic!("expected InsufficientValidity, got {other:?}"),
    }
    assert_eq!(fixture.held().await, 0, "released before try_lock answered");
}

/// `release()` reports what it found: our lock, an expired lease, or another holder's lock (left
/// alone).
async fn release_reports_released_expired_and_taken_over<F: Fixture>() {
    let fixture = F::start().await;
    let locks = engine(&fixture);
    let lock = locks.try_lock(&account("1")).await.unwrap();
    assert!(lock.fencing_token() > 0);
    assert_eq!(lock.name(), &locks.name(&account("1")));
    assert_eq!(lock.release().await.unwrap(), Release::Released);
    assert!(!locks.is_locked(&account("1")).await.unwrap());

    // No minimum validity: a slow acquire under load must not turn into InsufficientValidity.
    let short = engine(&fixture)
        .ttl(Duration::from_millis(200))
        .min_validity(Duration::ZERO)
        .no_renewal();
    let expired = short.try_lock(&account("2")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(expired.is_lost());
    assert_eq!(expired.release().await.unwrap(), Release::Expired);

    let old = short.try_lock(&account("3")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let new = locks.try_lock(&account("3")).await.expect("expired: free");
    assert!(new.fencing_token() > old.fencing_token());
    assert_eq!(old.release().await.unwrap(), Release::HeldByOther);
    assert!(locks.is_locked(&account("3")).await.unwrap(), "left alone");
    assert_eq!(new.release().await.unwrap(), Release::Released);
}

/// Dropping a lock releases it in the background, and ends its lease.
async fn dropping_a_lock_releases_it<F: Fixture>() {
    let fixture = F::start().await;
    let locks = engine(&fixture);
    let lock = locks.try_lock(&account("1")).await.unwrap();
    let lease = lock.lease().clone();
    assert_eq!(fixture.held().await, 1);
    drop(lock);
    until_held(&fixture, 0).await;
    assert_eq!(locks.renewal_entries().0, 0, "no longer renewed");
    assert!(!locks.is_locked(&account("1")).await.unwrap());
    drop(lease);
    let again = locks
        .try_lock(&account("1"))
        .await
        .expect("free after the drop");
    again.release().await.unwrap();
}

/// A lock held past its TTL is renewed by the engine's task, and its lease is never lost.
async fn engine_locks_are_renewed_while_held<F: Fixture>() {
    let fixture = F::start().await;
    let locks = engine(&fixture)
        .ttl(Duration::from_secs(1))
        .renew_every(Duration::from_millis(100));
    let lock = locks.try_lock(&account("1")).await.unwrap();
    assert_eq!(locks.renewal_entries().0, 1);
    // Well past the TTL: only renewals keep it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!lock.is_lost());
    assert!(locks.is_locked(&account("1")).await.unwrap());
    assert!(matches!(
        locks.try_lock(&account("1")).await,
        Err(TryLockError::Held { .. })
    ));
    assert_eq!(lock.release().await.unwrap(), Release::Released);
    assert_eq!(locks.renewal_entries().0, 0);
}

/// `inspect` and `is_locked` read the holder's remaining lease without taking anything.
async fn inspect_and_is_locked_report_the_holder<F: Fixture>() {
    let fixture = F::start().await;
    let locks = engine(&fixture).ttl(Duration::from_secs(10));
    assert_eq!(locks.inspect(&account("1")).await.unwrap(), Inspect::Free);
    assert!(!locks.is_locked(&account("1")).await.unwrap());

    let lock = locks.try_lock(&account("1")).await.unwrap();
    match locks.inspect(&account("1")).await.unwrap() {
        Inspect::Held {
            remaining: Some(remaining),
        } => assert!(
            remaining > Duration::from_secs(5) && remaining <= Duration::from_secs(10),
            "{remaining:?}"
        ),
        other => panic!("expected the holder's lease, got {other:?}"),
    }
    assert!(locks.is_locked(&account("1")).await.unwrap());
    assert!(!locks.is_locked(&account("2")).await.unwrap());
    assert_eq!(fixture.held().await, 1, "inspecting takes nothing");
    lock.release().await.unwrap();
    assert_eq!(locks.inspect(&account("1")).await.unwrap(), Inspect::Free);
}

/// A backend that does not implement the provided `inspect` and `force_release` answers
/// `Unsupported`, never a made-up "free".
async fn inspect_and_force_unlock_are_unsupported_by_default<F: Fixture>() {
    let fixture = F::start().await;
    let foreign = wrapped(&fixture, Acquires::Pass);
    let lock = foreign.try_lock(&account("1")).await.unwrap();
    let error = foreign.is_locked(&account("1")).await.unwrap_err();
    assert_eq!(error.kind(), BackendErrorKind::Unsupported);
    let error = foreign.force_unlock(&account("1")).await.unwrap_err();
    assert_eq!(error.kind(), BackendErrorKind::Unsupported);
    assert_eq!(fixture.held().await, 1, "the lock is untouched");
    lock.release().await.unwrap();
}

/// `force_unlock` deletes whoever's lock it is; the next taker gets a larger fencing token (the
/// counter is kept), and the old holder's lease reports the loss at its next renewal.
async fn force_unlock_deletes_the_lock_and_the_holder_learns_it<F: Fixture>() {
    let fixture = F::start().await;
    let locks = engine(&fixture)
        .ttl(Duration::from_secs(10))
        .renew_every(Duration::from_millis(50));
    assert!(
        !locks.force_unlock(&account("1")).await.unwrap(),
        "nothing held"
    );

    let stuck = locks.try_lock(&account("1")).await.unwrap();
    assert!(locks.force_unlock(&account("1")).await.unwrap());
    assert!(!locks.is_locked(&account("1")).await.unwrap());
    let next = locks
        .try_lock(&account("1"))
        .await
        .expect("free after the forced unlock");
    assert!(next.fencing_token() > stuck.fencing_token());
    assert!(
        eventually(Duration::from_secs(5), async || stuck.is_lost()).await,
        "the old holder learns of the loss"
    );
    assert!(!next.is_lost());
    assert_eq!(stuck.release().await.unwrap(), Release::HeldByOther);
    assert_eq!(next.release().await.unwrap(), Release::Released);
}

/// A layer (and a policy's layer, even with its own TTL, and a route table) built from an engine
/// names keys as the engine does and renews on the engine's task.
async fn layers_built_from_the_engine_share_its_names_and_renewal_task<F: Fixture>() {
    let fixture = F::start().await;
    let locks = engine(&fixture).namespace("shared:");
    let layer = locks.layer(Header::new("x-key"));
    let policy = LockPolicy::template("account:{path.id}")
        .unwrap()
        .ttl(Duration::from_secs(3))
        .layer_with(&locks);
    assert_eq!(layer.lock_name(&account("1")), locks.name(&account("1")));
    assert_eq!(policy.lock_name(&account("1")), locks.name(&account("1")));
    assert_eq!(locks.name(&account("1")).lock_key(), "shared:{account:1}");

    let attached = LockPolicy::template("account:{path.id}")
        .unwrap()
        .layer_for_with(&locks, "/accounts/{id}")
        .unwrap();
    assert_eq!(attached.lock_name(&account("1")), locks.name(&account("1")));

    let lock = locks.try_lock(&account("1")).await.unwrap();
    assert_eq!(
        layer.renewal_entries().0,
        1,
        "the layer's schedule is the engine's"
    );
    assert_eq!(
        policy.renewal_entries().0,
        1,
        "the policy's schedule is the engine's"
    );
    assert_eq!(attached.renewal_entries().0, 1);

    // A route table built from the engine locks in the engine's namespace: the job excludes it.
    let routes = LockRoutes::from_locks(&locks)
        .route(
            "/accounts/{id}/deposit",
            LockPolicy::template("account:{path.id}").unwrap(),
        )
        .unwrap();
    let service = routes.layer(answers(""));
    let call = |id: &str| send(&service, Request::post(format!("/accounts/{id}/deposit")));
    assert_eq!(call("1").await.status(), StatusCode::CONFLICT);
    assert_eq!(call("2").await.status(), StatusCode::OK);

    lock.release().await.unwrap();
    assert_eq!(layer.renewal_entries().0, 0);
    assert_eq!(call("1").await.status(), StatusCode::OK);
}

#[test]
fn key_builder_refuses_parts_without_a_separator() {
    let error = LockKey::builder().part("1").part("2").build().unwrap_err();
    assert_eq!(
        error.to_string(),
        "key template `{part1}{part2}`: at byte 7: expected a separator such as `:` between two \
         placeholders, found `{part2}` right after `{part1}`"
    );
    let error = LockKey::literal("a:")
        .part("1")
        .literal("x")
        .part("2")
        .build()
        .unwrap_err();
    assert_eq!(error.position(), 9);
    assert_eq!(error.template(), "a:{part1}x{part2}");
    assert!(LockKey::builder().build().unwrap().is_empty());
}

#[test]
fn key_builder_escapes_like_a_template() {
    let key = LockKey::literal("doc{v}:").part("a:b{c}").build().unwrap();
    assert_eq!(key.as_str(), "doc%7Bv%7D:a%3Ab%7Bc%7D");
    let key = LockKey::builder()
        .part("1/2")
        .literal("/")
        .part("3")
        .build()
        .unwrap();
    assert_eq!(key.as_str(), "1%2F2/3");
}

#[derive(Clone, Debug)]
enum Piece {
    Literal(String),
    Part(Vec<u8>),
}

fn piece() -> impl Strategy<Value = Piece> {
    let chars = prop::sample::select(vec![
        ':', '-', '/', '.', '_', '~', 'a', 'Z', '1', ' ', '%', '#', '{', '}', 'é',
    ]);
    let literal = prop::collection::vec(chars, 0..4)
        .prop_map(|chars| Piece::Literal(chars.into_iter().collect()));
    let bytes = prop::sample::select(vec![
        b':', b'-', b'/', b'.', b'a', b'1', b' ', b'%', b'#', b'{', b'}', 0x80, 0xFF, b'\t',
    ]);
    let part = prop::collection::vec(bytes, 0..4).prop_map(Piece::Part);
    prop_oneof![literal, part]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// For any sequence of literals and values, `LockKey` built from code and the equivalent key
    /// template (values read from headers) agree: both refuse it for the same reason, or both
    /// give the same key.
    #[test]
    fn key_builder_and_template_give_the_same_key(pieces in prop::collection::vec(piece(), 0..6)) {
        let mut builder = LockKey::builder();
        let mut text = String::new();
        let mut request = Request::get("/");
        for (index, piece) in pieces.iter().enumerate() {
            match piece {
                Piece::Literal(literal) => {
                    builder = builder.literal(literal);
                    text.push_str(&literal.replace('{', "{{").replace('}', "}}"));
                }
                Piece::Part(value) => {
                    builder = builder.part(value);
                    text.push_str(&format!("{{header.h{index}}}"));
                    request = request.header(
                        format!("h{index}"),
                        http::HeaderValue::from_bytes(value).unwrap(),
                    );
                }
            }
        }
        let built = builder.build();
        if text.is_empty() {
            prop_assert!(built.unwrap().is_empty());
            return Ok(());
        }
        match (KeyTemplate::parse(&text), built) {
            (Ok(template), Ok(key)) => {
                let (parts, _) = request.body(()).unwrap().into_parts();
                let expected = template.extract(&parts).unwrap().unwrap();
                prop_assert_eq!(key, expected, "template {:?}", text);
            }
            (Err(template), Err(builder)) => {
                prop_assert_eq!(template.expected(), builder.expected(), "template {:?}", text);
            }
            (template, builder) => prop_assert!(
                false,
                "template {:?}: {:?}, builder: {:?}",
                text,
                template.map(|_| ()),
                builder
            ),
        }
    }
}
