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

#[path = "support/driver.rs"]
mod driver;

use std::convert::Infallible;
use std::sync::Arc;

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

use driver::{BoxError, send, show};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    driver::run_on_backend_from_env(run::<RedisBackend>, run::<MemoryBackend>).await
}

/// The application: it does not know about locks, except that it may look at its lease.
///
/// `x-hold-ms: N` keeps the request (and its lock) busy for `N` ms; `started` tells the driver
/// below that such a request is running.
async fn handle(
    req: Request<Incoming>,
    started: Arc<Notify>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    driver::hold(&started, driver::hold_ms(req.headers())).await;
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

    send("PUT /jobs/7", client.put(&job)).await?;

    let holder = tokio::spawn(client.put(&job).header("x-hold-ms", "1000").send());
    started.notified().await;
    send(
        "PUT /jobs/7 while another PUT /jobs/7 runs",
        client.put(&job),
    )
    .await?;
    send(
        "PUT /jobs/8 meanwhile",
        client.put(format!("{base}/jobs/8")),
    )
    .await?;
    send(
        "GET /jobs/7 meanwhile (the policy locks PUT only)",
        client.get(&job),
    )
    .await?;
    send(
        "GET /health (no route matches: passes through)",
        client.get(format!("{base}/health")),
    )
    .await?;
    show("the held PUT /jobs/7, finished", holder.await??).await?;

    send(
        "POST /reports/nightly (every method of this route is locked)",
        client.post(format!("{base}/reports/nightly")),
    )
    .await?;
    Ok(())
}
