//! tower-lock on a plain `tower::Service`, with no HTTP server: a [`LockLayer`] keyed by the
//! `x-job-id` header around a `service_fn`, called directly with `oneshot`.
//!
//! It shows:
//!
//! 1. the default answers: 200 when the lock is free, 409 problem+json (with `Retry-After`) while
//!    another request runs the same job, 400 problem+json when the header is missing;
//! 2. `LockLayer::on_rejection` replacing those answers with your own responses;
//! 3. a `tower::timeout` **outside** the lock layer dropping a slow request: dropping the response
//!    future releases the lock, so the job can run again at once.
//!
//! ```text
//! cargo run --example tower_service_fn
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example tower_service_fn
//! ```
//!
//! No feature is needed. Without `REDIS_URL` the locks live in process, in a `MemoryBackend`, and
//! the example also prints `MemoryBackend::held()`, the number of locks held.

#[path = "support/driver.rs"]
mod driver;

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, header};
use tokio::sync::Notify;
use tower::{ServiceBuilder, ServiceExt};
use tower_lock::key::Header;
use tower_lock::{LockBackend, LockLayer, MemoryBackend, Rejection};

use driver::{BoxError, call, show_response};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // In process, the example also counts the locks held.
    driver::run_on_backend_from_env(
        |redis| run(redis, || None),
        |memory: MemoryBackend| {
            let held = memory.clone();
            run(memory, move || Some(held.held()))
        },
    )
    .await
}

/// A request for job `id` (no `x-job-id` header when `None`), quick or taking `work_ms` to run.
fn job(id: Option<&str>, work_ms: Option<u64>) -> Request<()> {
    let mut request = Request::post("/jobs/run");
    if let Some(ms) = work_ms {
        request = request.header("x-work-ms", ms);
    }
    if let Some(id) = id {
        request = request.header("x-job-id", id);
    }
    request.body(()).expect("a valid request")
}

/// Our own answers to rejections: plain text instead of problem+json.
fn plain_text_rejection(rejection: Rejection) -> Response<String> {
    let text = match &rejection {
        Rejection::Conflict { .. } => "that job is already running; try again later".to_owned(),
        Rejection::InvalidKey(why) => format!("cannot run a job without an id: {why}"),
        other => format!("the lock store failed ({})", other.status()),
    };
    let mut response = Response::builder()
        .status(rejection.status())
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8");
    // `retry_after_secs` is what the default response would have sent.
    if let Some(secs) = rejection.retry_after_secs() {
        response = response.header(header::RETRY_AFTER, secs);
    }
    response.body(text).expect("a valid response")
}

async fn run<B: LockBackend>(
    backend: B,
    held_count: impl Fn() -> Option<usize>,
) -> Result<(), BoxError> {
    let held = || held_count().map_or("n/a with Redis".to_owned(), |n| n.to_string());

    // The job: quick, or working for `x-work-ms` ms. `started` tells this driver that such a
    // long job is running (and holding its lock).
    let started = Arc::new(Notify::new());
    let job_started = started.clone();
    let run_job = tower::service_fn(move |req: Request<()>| {
        let started = job_started.clone();
        async move {
            let work_ms = match req.headers().get("x-work-ms") {
                Some(value) => Some(value.to_str()?.parse()?),
                None => None,
            };
            driver::hold(&started, work_ms).await;
            let id = req.headers()["x-job-id"].to_str()?;
            let work_ms = work_ms.unwrap_or(0);
            Ok::<_, BoxError>(Response::new(format!("job {id} done after {work_ms} ms")))
        }
    });

    println!("\n== 1. default responses ==");
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(backend.clone(), Header::new("x-job-id")))
        .service(run_job.clone());

    call("job a", &service, job(Some("a"), None)).await?;

    let running = tokio::spawn(service.clone().oneshot(job(Some("a"), Some(500))));
    started.notified().await;
    println!("(job a is running; locks held: {})", held());
    call("job a again, while it runs", &service, job(Some("a"), None)).await?;
    call("job b meanwhile", &service, job(Some("b"), None)).await?;
    show_response("the running job a, finished", running.await??).await?;
    call("a job without x-job-id", &service, job(None, None)).await?;
    println!("(locks held: {})", held());

    println!("\n== 2. on_rejection: our own responses ==");
    let custom = ServiceBuilder::new()
        .layer(
            LockLayer::new(backend.clone(), Header::new("x-job-id"))
                .on_rejection(plain_text_rejection),
        )
        .service(run_job.clone());
    let running = tokio::spawn(custom.clone().oneshot(job(Some("c"), Some(500))));
    started.notified().await;
    call("job c again, while it runs", &custom, job(Some("c"), None)).await?;
    call("a job without x-job-id", &custom, job(None, None)).await?;
    show_response("the running job c, finished", running.await??).await?;

    println!("\n== 3. a timeout outside the lock drops a slow job ==");
    // The timeout is the outer layer: when it fires it drops the lock layer's response future,
    // and with it the lock, which is then released on the runtime.
    let timed = ServiceBuilder::new()
        .timeout(Duration::from_millis(200))
        .layer(LockLayer::new(backend.clone(), Header::new("x-job-id")))
        .service(run_job);
    let slow = tokio::spawn(timed.clone().oneshot(job(Some("d"), Some(5_000))));
    started.notified().await;
    println!("(job d is running; locks held: {})", held());
    match slow.await? {
        Ok(response) => println!("job d: unexpectedly finished with {}", response.status()),
        Err(error) => println!(
            "job d: dropped by the timeout: {error} (Elapsed: {})",
            error.is::<tower::timeout::error::Elapsed>()
        ),
    }
    // The release is spawned when the future is dropped; give it a moment to run (with Redis
    // there is no count to poll, so this just waits 200 ms).
    for _ in 0..20 {
        if held_count() == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("(locks held after the timeout: {})", held());
    call(
        "job d again, right after the timeout",
        &timed,
        job(Some("d"), None),
    )
    .await?;
    Ok(())
}
