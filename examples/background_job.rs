//! A background job and an HTTP route sharing one lock: the route `POST /accounts/{id}/deposit`
//! locks `account:{path.id}`, and a nightly job locks the same account with
//! `Locks::try_lock(&LockKey::literal("account:").part(id))`. Whichever holds the account, the
//! other is refused — the route with 409, the job with `TryLockError::Held`.
//!
//! ```text
//! cargo run --example background_job                                    # in-process locks
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example background_job  # locks in Redis
//! ```
//!
//! It runs to completion on its own in well under a second, and exits non-zero if the route and
//! the job ever hold the account at once.

#[path = "support/driver.rs"]
mod driver;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use http::{Method, Request, StatusCode};
use tower::ServiceExt;
use tower_lock::backend::Inspect;
use tower_lock::key::LockKey;
use tower_lock::{LockBackend, LockPolicy, Locks, MemoryBackend, RedisBackend, TryLockError};

use driver::BoxError;

/// How long a deposit holds the account.
const DEPOSIT_TAKES: Duration = Duration::from_millis(300);

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    driver::run_on_backend_from_env(run::<RedisBackend>, run::<MemoryBackend>).await
}

async fn run<B: LockBackend>(backend: B) -> Result<(), BoxError> {
    // One engine: namespace, lease and renewal shared by the route and the job.
    let locks = Locks::new(backend)
        .namespace("background-job-example:")
        .ttl(Duration::from_secs(5));

    // The route, locked on `account:{path.id}` through the engine.
    let app = Router::new()
        .route(
            "/accounts/{id}/deposit",
            post(|| async {
                tokio::time::sleep(DEPOSIT_TAKES).await;
                "deposited"
            }),
        )
        .route_layer(
            LockPolicy::template("account:{path.id}")?
                .methods([Method::POST])
                .layer_for_with(&locks, "/accounts/{id}/deposit")?,
        );
    let deposit = |id: &str| {
        let request = Request::post(format!("/accounts/{id}/deposit")).body(Body::empty());
        app.clone().oneshot(request.expect("a valid request"))
    };

    // The job's key for account 42: the very key the route's template gives `/accounts/42/…`.
    let account = LockKey::literal("account:").part("42").build()?;
    println!("lock name: {}", locks.name(&account).lock_key());

    // 1. The job holds the account: the route answers 409.
    let job = locks.try_lock(&account).await?;
    println!(
        "job: locked account 42, fencing token {}",
        job.fencing_token()
    );
    let response = deposit("42").await?;
    println!("route while the job holds it: {}", response.status());
    check(
        response.status() == StatusCode::CONFLICT,
        "the route must be refused",
    )?;
    println!("job: released ({:?})", job.release().await?);

    // 2. A deposit holds the account: the job is refused until the deposit is done.
    let request = tokio::spawn(deposit("42"));
    let mut waited = Duration::ZERO;
    while !locks.is_locked(&account).await? {
        check(
            waited < Duration::from_secs(2),
            "the deposit never took the lock",
        )?;
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += Duration::from_millis(5);
    }
    if let Inspect::Held { remaining } = locks.inspect(&account).await? {
        println!("inspect while the deposit runs: held, lease left {remaining:?}");
    }
    match locks.try_lock(&account).await {
        Err(TryLockError::Held { remaining }) => {
            println!("job while the route holds it: held by another, for {remaining:?}")
        }
        Ok(_) => return Err("the job and the route held the account at once".into()),
        Err(error) => return Err(error.into()),
    }
    let response = request.await??;
    println!("route: {}", response.status());
    check(
        response.status() == StatusCode::OK,
        "the deposit must succeed",
    )?;

    // 3. Free again: the job takes it.
    let job = locks.try_lock(&account).await?;
    println!(
        "job: locked account 42, fencing token {}",
        job.fencing_token()
    );
    println!("job: released ({:?})", job.release().await?);
    println!("the route and the job never held account 42 at once");
    Ok(())
}

fn check(condition: bool, what: &str) -> Result<(), BoxError> {
    if condition { Ok(()) } else { Err(what.into()) }
}
