//! An axum 0.8 router with three routes, each locked by its own [`LockPolicy`].
//!
//! | route | lock key | policy |
//! |---|---|---|
//! | `POST /accounts/{id}/deposit` | `account:{path.id}` | 5 s lease; the handler reads `LockLease` and `FencingToken` |
//! | `GET`/`PUT /documents/{doc}` | `{header.x-tenant-id}:doc:{path.doc}` | `PUT` only, 2 s lease |
//! | `GET /reports/{name}` | `report:{path.name}` | `hold_through_body(true)`: held while the body streams |
//!
//! Each policy is attached to its own route with `MethodRouter::route_layer`
//! (`post(handler).route_layer(layer)`). `Router::route_layer` would instead apply one layer to
//! every route added before it.
//!
//! The example starts the server on `127.0.0.1:0`, sends its own requests with `reqwest`, prints
//! what comes back and exits:
//!
//! ```text
//! cargo run --example axum_routes --features axum
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example axum_routes --features axum
//! ```
//!
//! The `axum` feature is required: it lets `{path.NAME}` read axum's matched route and provides
//! the `LockLease` / `FencingToken` handler extractors. Without `REDIS_URL` the locks live in
//! process (`MemoryBackend`).

#[path = "support/driver.rs"]
mod driver;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::stream;
use http::Method;
use serde::Deserialize;
use tokio::sync::Notify;
use tower_lock::extract::FencingToken;
use tower_lock::{LockBackend, LockLease, LockPolicy, MemoryBackend, RedisBackend};

use driver::{BoxError, send, show};

/// Lets the driver below know that a handler is running (and holding its lock), so the
/// concurrent request is sent at the right moment instead of after a guessed sleep.
#[derive(Clone, Default)]
struct Started(Arc<Notify>);

/// `?hold_ms=N`: keep the handler (and so its lock) busy for `N` ms.
#[derive(Deserialize)]
struct Hold {
    hold_ms: Option<u64>,
}

/// Locked on `account:{id}`. The extractors are only available on a locked route: on a route
/// without a lock layer they answer 500 (use `Option<LockLease>` where the lock is optional).
async fn deposit(
    State(started): State<Started>,
    Path(id): Path<String>,
    Query(hold): Query<Hold>,
    lease: LockLease,
    FencingToken(token): FencingToken,
) -> String {
    driver::hold(&started.0, hold.hold_ms).await;
    // A real handler passes `token` to the store it writes to, which refuses smaller tokens, and
    // checks `lease.is_lost()` (or selects on `lease.lost()`) before committing.
    format!(
        "deposited into account {id} under lock `{}` (fencing token {token}, lost: {})",
        lease.key().as_str(),
        lease.is_lost()
    )
}

async fn put_document(
    State(started): State<Started>,
    Path(doc): Path<String>,
    Query(hold): Query<Hold>,
    lease: LockLease,
) -> String {
    driver::hold(&started.0, hold.hold_ms).await;
    format!("saved document {doc} under lock `{}`", lease.key().as_str())
}

/// `GET` is not in the policy's methods: it runs unlocked, so there is no lease.
async fn read_document(Path(doc): Path<String>, lease: Option<LockLease>) -> String {
    format!("document {doc} (locked: {})", lease.is_some())
}

/// Streams three chunks, 200 ms apart. The handler returns at once; the lock is held until the
/// last chunk has been sent because the policy says `hold_through_body(true)`.
async fn report(Path(name): Path<String>) -> Body {
    let chunks = stream::unfold(0u8, move |n| {
        let name = name.clone();
        async move {
            if n == 3 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let chunk = Bytes::from(format!("[{name} part {}]", n + 1));
            Some((Ok::<_, Infallible>(chunk), n + 1))
        }
    });
    Body::from_stream(chunks)
}

fn app<B: LockBackend>(backend: B, started: Started) -> Result<Router, BoxError> {
    let deposits = LockPolicy::template("account:{path.id}")?.ttl(Duration::from_secs(5));
    // Only writes are locked; the key is scoped by tenant, so two tenants' `readme` are two locks.
    let documents = LockPolicy::template("{header.x-tenant-id}:doc:{path.doc}")?
        .methods([Method::PUT])
        .ttl(Duration::from_secs(2));
    let reports = LockPolicy::template("report:{path.name}")?.hold_through_body(true);

    Ok(Router::new()
        .route(
            "/accounts/{id}/deposit",
            post(deposit).route_layer(deposits.layer(backend.clone())),
        )
        .route(
            "/documents/{doc}",
            get(read_document)
                .put(put_document)
                .route_layer(documents.layer(backend.clone())),
        )
        .route(
            "/reports/{name}",
            get(report).route_layer(reports.layer(backend)),
        )
        .with_state(started))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    driver::run_on_backend_from_env(run::<RedisBackend>, run::<MemoryBackend>).await
}

async fn run<B: LockBackend>(backend: B) -> Result<(), BoxError> {
    let started = Started::default();
    let base = driver::serve(app(backend, started.clone())?).await?;
    let client = reqwest::Client::new();

    println!("\n== POST /accounts/{{id}}/deposit, locked on account:{{path.id}} ==");
    let deposit = format!("{base}/accounts/42/deposit");
    send("deposit", client.post(&deposit)).await?;

    let holder = tokio::spawn(client.post(format!("{deposit}?hold_ms=1000")).send());
    started.0.notified().await;
    send(
        "deposit while another deposit holds account 42",
        client.post(&deposit),
    )
    .await?;
    send(
        "deposit into account 43 meanwhile",
        client.post(format!("{base}/accounts/43/deposit")),
    )
    .await?;
    show("the held deposit, finished", holder.await??).await?;

    println!("\n== PUT /documents/{{doc}}, locked on {{header.x-tenant-id}}:doc:{{path.doc}} ==");
    let readme = format!("{base}/documents/readme");
    send("PUT without x-tenant-id", client.put(&readme)).await?;
    let holder = tokio::spawn(
        client
            .put(format!("{readme}?hold_ms=1000"))
            .header("x-tenant-id", "acme")
            .send(),
    );
    started.0.notified().await;
    send(
        "PUT by acme while acme's PUT is running (2 s lease)",
        client.put(&readme).header("x-tenant-id", "acme"),
    )
    .await?;
    send(
        "PUT by globex meanwhile",
        client.put(&readme).header("x-tenant-id", "globex"),
    )
    .await?;
    send("GET meanwhile (not a locked method)", client.get(&readme)).await?;
    show("acme's PUT, finished", holder.await??).await?;

    println!("\n== GET /reports/{{name}}, hold_through_body(true) ==");
    let nightly = format!("{base}/reports/nightly");
    let streaming = client.get(&nightly).send().await?;
    println!(
        "first GET: {} (headers received, the handler has returned, the body is still streaming)",
        streaming.status()
    );
    send(
        "second GET while the first body streams",
        client.get(&nightly),
    )
    .await?;
    show("first GET, body read to the end", streaming).await?;
    // The lock is released as the body ends; that release is not awaited before the last bytes
    // reach the client, so give it a moment before asking again.
    tokio::time::sleep(Duration::from_millis(50)).await;
    send(
        "third GET, after the first body ended",
        client.get(&nightly),
    )
    .await?;
    Ok(())
}
