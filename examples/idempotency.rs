//! The `Idempotency-Key` preset (`tower_lock::idempotency`) on an axum `POST /orders` route, with
//! keys scoped by the caller's `x-user` header so two users' keys never collide.
//!
//! What the preset answers, after the IETF httpapi draft "The Idempotency-Key HTTP Header Field":
//!
//! - `POST` without `Idempotency-Key` (or, here, without `x-user`): **400** problem+json;
//! - a retry while the first request with the same key is still being processed: **409**
//!   problem+json titled "A request is outstanding for this Idempotency-Key";
//! - the same key from another user, or from the same user once the first request completed:
//!   processed normally;
//! - `GET` (and every method other than `POST` and `PATCH`): not locked.
//!
//! **Response replay is out of scope.** The lock only guarantees that two requests with the same
//! key are never processed at the same time. Remembering the first response and replaying it to
//! later retries (and answering 422 when a key is reused with another payload) is the handler's
//! job, typically with a table of `(user, key) → response` written in the same transaction as the
//! order. This example's handler does not do it, so the last retry below creates a second order.
//!
//! The example serves on `127.0.0.1:0`, drives its own requests with `reqwest`, prints what comes
//! back and exits. No feature is needed (the key uses no path parameter):
//!
//! ```text
//! cargo run --example idempotency
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example idempotency
//! ```

#[path = "support/driver.rs"]
mod driver;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use tokio::sync::Notify;
use tower_lock::idempotency::{self, IdempotencyKey};
use tower_lock::key::Header;
use tower_lock::{LockBackend, MemoryBackend, RedisBackend};

use driver::{BoxError, send, show};

#[derive(Clone, Default)]
struct AppState {
    next_order: Arc<AtomicU64>,
    /// Tells the driver below that a slow request (`x-hold-ms`) is being processed.
    started: Arc<Notify>,
}

async fn create_order(State(state): State<AppState>, headers: HeaderMap) -> String {
    driver::hold(&state.started, driver::hold_ms(&headers)).await;
    // The layer guarantees both headers are present here.
    let user = headers["x-user"].to_str().unwrap_or("?");
    // The key as the lock read it (`"k"` and `k` are one key).
    let key = tower_lock::idempotency::key_in(&headers).unwrap_or_default();
    let order = state.next_order.fetch_add(1, Ordering::Relaxed) + 1;
    // A real handler would first look up (user, key) and replay the stored response if found.
    format!("order #{order} created for {user} (Idempotency-Key {key})")
}

async fn list_orders(State(state): State<AppState>) -> String {
    format!(
        "{} orders so far (GET is not locked)",
        state.next_order.load(Ordering::Relaxed)
    )
}

fn app<B: LockBackend>(backend: B, state: AppState) -> Router {
    // `Idempotency-Key` on POST and PATCH, scoped by `x-user`: the lock key is
    // `idempotency:user:key`, apart from every other route's keys in the namespace.
    let key = IdempotencyKey::new().scoped_by(Header::new("x-user"));
    Router::new()
        .route(
            "/orders",
            post(create_order)
                .get(list_orders)
                .route_layer(idempotency::layer_with(backend, key)),
        )
        .with_state(state)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    driver::run_on_backend_from_env(run::<RedisBackend>, run::<MemoryBackend>).await
}

async fn run<B: LockBackend>(backend: B) -> Result<(), BoxError> {
    let state = AppState::default();
    let base = driver::serve(app(backend, state.clone())).await?;
    let orders = format!("{base}/orders");

    let client = reqwest::Client::new();
    // Idempotency-Key values are Structured Field strings, hence the quotes.
    let post = |user: Option<&str>, key: Option<&str>| {
        let mut request = client.post(&orders);
        if let Some(user) = user {
            request = request.header("x-user", user);
        }
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request
    };

    send("POST without x-user", post(None, Some("\"8e03978e\""))).await?;
    send("POST without Idempotency-Key", post(Some("alice"), None)).await?;

    let first = tokio::spawn(
        post(Some("alice"), Some("\"8e03978e\""))
            .header("x-hold-ms", "1000")
            .send(),
    );
    state.started.notified().await;
    send(
        "alice retries the same key while her first POST is processed",
        post(Some("alice"), Some("\"8e03978e\"")),
    )
    .await?;
    send(
        "bob uses the same key meanwhile",
        post(Some("bob"), Some("\"8e03978e\"")),
    )
    .await?;
    send("GET /orders meanwhile", client.get(&orders)).await?;
    show("alice's first POST, finished", first.await??).await?;
    send(
        "alice retries the same key after it completed (no replay: a second order)",
        post(Some("alice"), Some("\"8e03978e\"")),
    )
    .await?;
    Ok(())
}
