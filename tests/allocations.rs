//! In process (memory backend) the layer allocates 8 times per request more than a bare
//! `service_fn` (README "Performance", BENCHMARKS.md's in-process table: 2.0 and 10.0; found by
//! the red team when the README said "10 over"). Counted here the way
//! `benches/concurrency/inproc.rs` counts them: requests in a row in one task of a
//! multi-thread runtime, a `POST` with an `x-key` header, the whole process's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use http::{Method, Request, Response, StatusCode};
use tower::{ServiceBuilder, ServiceExt};
use tower_lock::key::Header;
use tower_lock::{LockLayer, MemoryBackend};

struct Counting;

static ON: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicU64 = AtomicU64::new(0);

// SAFETY: delegates to `System` unchanged; counting touches only atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

async fn handler(_request: Request<()>) -> Result<Response<String>, Infallible> {
    Ok(Response::new(String::new()))
}

fn request() -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = Method::POST;
    request
        .headers_mut()
        .insert("x-key", http::HeaderValue::from_static("inproc"));
    request
}

const OPS: u64 = 2000;

/// Allocations per request of `OPS` requests in a row through `service`, after a warm-up.
fn per_request<S, B>(runtime: &tokio::runtime::Runtime, service: S) -> f64
where
    S: tower::Service<Request<()>, Response = Response<B>> + Clone + Send + 'static,
    B: Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    runtime.block_on(async move {
        tokio::spawn(async move {
            for _ in 0..OPS / 10 {
                let response = service.clone().oneshot(request()).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
            }
            COUNT.store(0, Ordering::SeqCst);
            ON.store(true, Ordering::SeqCst);
            for _ in 0..OPS {
                let response = service.clone().oneshot(request()).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
            }
            ON.store(false, Ordering::SeqCst);
            COUNT.load(Ordering::SeqCst) as f64 / OPS as f64
        })
        .await
        .unwrap()
    })
}

#[test]
fn in_process_the_layer_allocates_what_the_readme_says() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bare = per_request(&runtime, ServiceBuilder::new().service_fn(handler));
    let layer = per_request(
        &runtime,
        ServiceBuilder::new()
            .layer(LockLayer::new(MemoryBackend::new(), Header::new("x-key")))
            .service_fn(handler),
    );
    eprintln!("allocations per request: bare {bare}, layer {layer}");
    // BENCHMARKS.md (release build): bare 2.0, layer 10.0, so 8 over bare, as the README says.
    // This debug build counts one more in both (the request's header map), and the same
    // difference.
    assert!(
        layer - bare <= 8.05,
        "layer {layer} allocations per request, bare {bare}: more than BENCHMARKS.md's 8 over bare"
    );
}
