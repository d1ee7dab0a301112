//! Red team: a request on a Tokio runtime built without its time driver (`enable_io()` only, or
//! no `enable_*` at all). "Never panic on a request path."
//!
//! The uncontended request on the memory backend holds (the deadline timer of `src/deadline.rs`
//! is armed only for a call that is pending). A waiting request panics in `src/wait/mod.rs`
//! (`tokio::time::timeout_at`): ignored below. Every other timer of the crate (renewal, retried
//! releases, Redis calls that are pending) needs the time driver too, as redis-rs does.

use std::convert::Infallible;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use tower::{ServiceBuilder, ServiceExt};
use tower_lock::key::Header;
use tower_lock::{LockLayer, MemoryBackend};

async fn handler(_request: Request<()>) -> Result<Response<String>, Infallible> {
    Ok(Response::new(String::new()))
}

fn request() -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = Method::POST;
    request
        .headers_mut()
        .insert("x-key", http::HeaderValue::from_static("k"));
    request
}

fn no_timer() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

#[test]
fn an_uncontended_request_without_a_time_driver_does_not_panic() {
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(MemoryBackend::new(), Header::new("x-key")))
        .service_fn(handler);
    let status = no_timer().block_on(async move {
        let response = service.oneshot(request()).await.unwrap();
        response.status()
    });
    assert_eq!(status, StatusCode::OK);
}

#[test]
#[ignore = "fails: src/wait/mod.rs's timeout_at panics (timers are disabled) on a runtime without enable_time; documented in the README (Semantics: the layer needs Tokio's timer); pre-existing (issue 9), not issue 11"]
fn a_waiting_request_without_a_time_driver_does_not_panic() {
    let backend = MemoryBackend::new();
    let layer = LockLayer::new(backend, Header::new("x-key")).wait(Duration::from_millis(50));
    let service =
        ServiceBuilder::new()
            .layer(layer)
            .service_fn(|_request: Request<()>| async move {
                // Hold the lock while a second request waits for it.
                tokio::task::yield_now().await;
                Ok::<_, Infallible>(Response::new(String::new()))
            });
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        no_timer().block_on(async move {
            let first = service.clone().oneshot(request());
            let second = service.clone().oneshot(request());
            let (a, b) = tokio::join!(first, second);
            (a.unwrap().status(), b.unwrap().status())
        })
    }));
    let statuses = outcome.expect("a request path panicked on a runtime without timers");
    eprintln!("{statuses:?}");
}
