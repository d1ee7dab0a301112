//! What the examples that drive their own requests share: the backend `REDIS_URL` chooses, a
//! server on a free port, a handler held busy on request, and printing what comes back.
//!
//! Include it with `#[path = "support/driver.rs"] mod driver;`.
#![allow(dead_code)]

use std::error::Error;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_lock::{MemoryBackend, RedisBackend};

pub type BoxError = Box<dyn Error + Send + Sync>;

/// Runs the example on Redis at `REDIS_URL` when it is set (`on_redis`), else on the in-process
/// backend (`in_process`), after saying which. Both are usually the one generic `run`:
/// `run_on_backend_from_env(run::<RedisBackend>, run::<MemoryBackend>)`.
pub async fn run_on_backend_from_env<R, M>(
    on_redis: impl FnOnce(RedisBackend) -> R,
    in_process: impl FnOnce(MemoryBackend) -> M,
) -> Result<(), BoxError>
where
    R: Future<Output = Result<(), BoxError>>,
    M: Future<Output = Result<(), BoxError>>,
{
    match std::env::var("REDIS_URL") {
        Ok(url) => {
            println!("backend: Redis at {url}");
            on_redis(RedisBackend::from_url(&url)?).await
        }
        Err(_) => {
            println!("backend: in process (set REDIS_URL to use Redis)");
            in_process(MemoryBackend::new()).await
        }
    }
}

/// Serves `router` on `127.0.0.1:0` in the background; its base URL (`http://127.0.0.1:port`).
pub async fn serve(router: axum::Router) -> Result<String, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(base)
}

/// The `x-hold-ms` header: how long a request asks its handler to take.
pub fn hold_ms(headers: &HeaderMap) -> Option<u64> {
    headers.get("x-hold-ms")?.to_str().ok()?.parse().ok()
}

/// Keeps a handler (and so its lock) busy for `ms` ms when asked to, after telling the driver
/// through `started` that it runs: the driver then sends its concurrent request at the right
/// moment instead of after a guessed sleep.
pub async fn hold(started: &Notify, ms: Option<u64>) {
    if let Some(ms) = ms {
        started.notify_one();
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// Prints `label`, then the status, `Content-Type` and `Retry-After` (when present) and the body
/// of a response from a server.
pub async fn show(label: &str, response: reqwest::Response) -> Result<(), BoxError> {
    let (status, headers) = (response.status(), response.headers().clone());
    print(label, status, &headers, &response.text().await?);
    Ok(())
}

/// Sends `request` and [`show`]s what comes back.
pub async fn send(label: &str, request: reqwest::RequestBuilder) -> Result<(), BoxError> {
    show(label, request.send().await?).await
}

/// Calls `service` with `request` and [`show_response`]s what comes back.
pub async fn call<S, R, B>(
    label: &str,
    service: &S,
    request: http::Request<R>,
) -> Result<(), BoxError>
where
    S: tower::Service<http::Request<R>, Response = http::Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let response = service.clone().oneshot(request).await.map_err(Into::into)?;
    show_response(label, response).await
}

/// [`show`] for a response from a service called directly.
pub async fn show_response<B>(label: &str, response: http::Response<B>) -> Result<(), BoxError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(Into::into)?.to_bytes();
    print(
        label,
        parts.status,
        &parts.headers,
        &String::from_utf8_lossy(&body),
    );
    Ok(())
}

fn print(label: &str, status: StatusCode, headers: &HeaderMap, body: &str) {
    let mut shown = String::new();
    for name in [header::CONTENT_TYPE, header::RETRY_AFTER] {
        if let Some(value) = headers.get(&name) {
            shown += &format!(", {name}: {}", value.to_str().unwrap_or("?"));
        }
    }
    println!("{label}:\n    {status}{shown}\n    {body}");
}
