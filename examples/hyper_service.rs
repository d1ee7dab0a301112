//! tower-lock on a bare hyper 1.x server, without axum: a [`LockRoutes`] table in a
//! `tower::ServiceBuilder` around a `service_fn`, served with `hyper::server::conn::http1` and
//! `hyper_util::service::TowerToHyperService`.
//!
//! `LockRoutes` matches method and path itself (axum's pattern syntax, first match wins):
//!
//! | route | methods | lock key |
//! |---|---|---|
//! | `/jobs/{id}` | `PUT` | `job:{path.id}` |
//! | `/reports/nightly` | all | `report:nightly` |
//!
//! Everything else (`GET /jobs/7`, `/health`, …) passes through unlocked. The handler reads the
//! lease, when there is one, with `req.extensions().get::<LockLease>()`.
//!
//! The example serves on `127.0.0.1:0`, drives its own requests with `reqwest`, prints what comes
//! back and exits. No feature is needed:
//!
//! ```text
//! cargo run --example hyper_service
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example hyper_service
//! ```

use std::convert::Infallible;
use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Notify;
use tower::ServiceBuilder;
use tower_lock::{LockBackend, LockLease, LockPolicy, LockRoutes, MemoryBackend, RedisBackend};

type BoxError = Box<dyn Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    match std::env::var("REDIS_URL") {
        Ok(url) => {
            println!("backend: Redis at {url}");
            run(RedisBackend::from_url(&url)?).await
        }
        Err(_) => {
            println!("backend: in process (set REDIS_URL to use Redis)");
            run(MemoryBackend::new()).await
        }
    }
}

/// The application: it does not know about locks, except that it may look at its lease.
///
/// `x-hold-ms: N` keeps the request (and its lock) busy for `N` ms; `started` tells the driver
/// below that such a request is running.
async fn handle(
    req: Request<Incoming>,
    started: Arc<Notify>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let hold_ms = req
        .headers()
        .get("x-hold-ms")
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if let Some(ms) = hold_ms {
        started.notify_one();
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let lock = match req.extensions().get::<LockLease>() {
        Some(lease) => format!(
            "locked on `{}`, fencing token {}",
            lease.key().as_str(),
            lease.fencing_token()
        ),
        None => "not locked".to_owned(),
    };
    let body = format!("{} {}: {lock}", req.method(), req.uri().path());
    Ok(Response::new(Full::new(Bytes::from(body))))
}

async fn run<B: LockBackend>(backend: B) -> Result<(), BoxError> {
    // Route patterns are checked now: a `{path.NAME}` the pattern lacks is an error here.
    let routes = LockRoutes::new(backend)
        .route(
            "/jobs/{id}",
            LockPolicy::template("job:{path.id}")?.methods([Method::PUT]),
        )?
        .route("/reports/nightly", LockPolicy::template("report:nightly")?)?;

    let started = Arc::new(Notify::new());
    let handler_started = started.clone();
    let service = ServiceBuilder::new()
        .layer(routes)
        .service_fn(move |req| handle(req, handler_started.clone()));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                if let Err(error) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    eprintln!("connection error: {error}");
                }
            });
        }
    });

    let client = reqwest::Client::new();
    let job = format!("{base}/jobs/7");

    show("PUT /jobs/7", client.put(&job).send().await?).await?;

    let holder = tokio::spawn(client.put(&job).header("x-hold-ms", "1000").send());
    started.notified().await;
    show(
        "PUT /jobs/7 while another PUT /jobs/7 runs",
        client.put(&job).send().await?,
    )
    .await?;
    show(
        "PUT /jobs/8 meanwhile",
        client.put(format!("{base}/jobs/8")).send().await?,
    )
    .await?;
    show(
        "GET /jobs/7 meanwhile (the policy locks PUT only)",
        client.get(&job).send().await?,
    )
    .await?;
    show(
        "GET /health (no route matches: passes through)",
        client.get(format!("{base}/health")).send().await?,
    )
    .await?;
    show("the held PUT /jobs/7, finished", holder.await??).await?;

    show(
        "POST /reports/nightly (every method of this route is locked)",
        client
            .post(format!("{base}/reports/nightly"))
            .send()
            .await?,
    )
    .await?;
    Ok(())
}

/// Prints status, `Retry-After` (when present) and body.
async fn show(label: &str, response: reqwest::Response) -> Result<(), BoxError> {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .map(|value| format!(", Retry-After: {}", value.to_str().unwrap_or("?")))
        .unwrap_or_default();
    let body = response.text().await?;
    println!("{label}:\n    {status}{retry_after}\n    {body}");
    Ok(())
}
