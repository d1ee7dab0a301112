//! Holding, renewing and releasing at the edges: bodies hyper never polls, declared lengths and
//! trailers, huge TTLs, idle and shut-down runtimes, stalled holders. Each test was first written
//! by an adversarial review of issue 7's fixes, failing, and is named after the promise it pins.

#[macro_use]
mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use tower::Layer;
use tower_lock::{LockLease, MemoryBackend};

use common::{
    Fixture, Redis, answers, current_thread, in_a_row, layer, layer_on, multi_thread, request,
    send, serve,
};

// ---------------------------------------------------------------------------------------------
// Item 8 (hold-through-body): "the compare-and-delete completes *before* the body reports its
// end ... so a client that reads the whole body and sends its next same-key request never meets
// its own lock". hyper never polls a body whose size hint is exactly 0 (an empty 200, a 204) or
// the body of a HEAD response: it drops it, and the guard's drop only *spawns* the release.

fn empty_body_app<F: Fixture>(fixture: &F) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/empty", post(|| async { "" }))
        .route("/no-content", post(|| async { StatusCode::NO_CONTENT }))
        .route("/get", get(|| async { "a body that HEAD does not send" }))
        .layer(layer(fixture).hold_through_body(true))
}

async fn hold_through_body_releases_before_an_empty_or_head_response_ends<F: Fixture>() {
    let fixture = F::start().await;
    let (base, server) = serve(empty_body_app(&fixture)).await;
    let mut met_own_lock = Vec::new();
    for (method, path) in [
        (Method::POST, "empty"),
        (Method::POST, "no-content"),
        (Method::HEAD, "get"),
    ] {
        let answers = in_a_row(&base, method.clone(), path, 50).await;
        for (i, (status, _)) in answers.into_iter().enumerate() {
            if status == StatusCode::CONFLICT {
                met_own_lock.push(format!("{method} /{path} request {i}"));
            }
        }
    }
    server.abort();
    assert!(
        met_own_lock.is_empty(),
        "{} sequential requests met their own previous request's lock (409): {met_own_lock:?}",
        met_own_lock.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Duration arithmetic: `LockLayer::ttl` accepts any Duration ("values under 1 ms are raised"),
// and the backends saturate (memory: a year; Redis: millis clamp). The request path must not
// panic on a huge TTL.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_ttl_does_not_panic_on_the_request_path() {
    let service = layer_on(MemoryBackend::new())
        .ttl(Duration::MAX)
        .layer(answers("ok"));
    let call = send(&service, request("huge-ttl"));
    let outcome = tokio::spawn(call).await;
    assert!(
        outcome.is_ok(),
        "a request under ttl(Duration::MAX) panicked: {:?}",
        outcome.err()
    );
    assert_eq!(outcome.unwrap().status(), StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// Item 2: "a lease must be renewed on a runtime that is alive". The renewal task is started on
// the runtime of the first request and reused by every later request of the layer, on any
// runtime, for as long as that runtime is not dropped. A current-thread runtime that is alive but
// idle (its `block_on` returned) never polls the task: leases registered from another runtime
// are neither renewed nor reported lost, and a second request takes the lock beside the first.

fn idle_runtime_case<F: Fixture>() {
    let worker = multi_thread(2);
    let fixture = worker.block_on(F::start());
    let ttl = Duration::from_millis(300);
    let held_for = Duration::from_millis(1200);
    let lost_seen = Arc::new(AtomicBool::new(false));
    let service = {
        let lost_seen = lost_seen.clone();
        layer(&fixture)
            .ttl(ttl)
            .layer(tower::service_fn(move |req: Request<String>| {
                let lost_seen = lost_seen.clone();
                async move {
                    let lease = req.extensions().get::<LockLease>().cloned().unwrap();
                    let long = req.headers().contains_key("x-long");
                    if long {
                        tokio::select! {
                            () = lease.lost() => lost_seen.store(true, Ordering::SeqCst),
                            () = tokio::time::sleep(held_for) => {}
                        }
                    }
                    Ok::<_, Infallible>(Response::new(String::from("ok")))
                }
            }))
    };

    // One quick request on a current-thread runtime that is then kept, idle: the layer's renewal
    // task now lives there.
    let idle = current_thread();
    let first = idle.block_on(send(&service, request("warm-up")));
    assert_eq!(first.status(), StatusCode::OK);

    // The real traffic runs on the multi-thread runtime.
    let (long, second) = worker.block_on(async {
        let long = tokio::spawn(send(&service, request("k").header("x-long", "1")));
        tokio::time::sleep(Duration::from_millis(700)).await;
        // The long request still runs (1.2 s), its 300 ms lease must have been renewed.
        let second = send(&service, request("k")).await;
        (long.await.unwrap(), second.status())
    });
    assert_eq!(long.status(), StatusCode::OK);
    let lost = lost_seen.load(Ordering::SeqCst);
    drop(idle);
    assert!(
        second == StatusCode::CONFLICT || lost,
        "a second request on key k got {second} while the first still ran, and the first was \
         never told its lease was lost: two holders, no signal"
    );
}

blocking_suite!(idle_renewal_runtime => idle_runtime_case);

// ---------------------------------------------------------------------------------------------
// Item 8 again, with bodies that are not empty: hyper stops polling a body once it has written
// the bytes a `Content-Length` header declared (a file streamed with its length), and right after
// a trailers frame. Either way the body is dropped without being polled to its end, and the
// release runs in the background after the client already has the whole response.

fn streamed_body_app<F: Fixture>(fixture: &F) -> axum::Router {
    use axum::routing::post;
    use bytes::Bytes;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let chunks = || {
        futures_util::stream::iter(
            ["one\n", "two\n", "three\n"].map(|c| Ok::<_, Infallible>(Bytes::from(c))),
        )
    };
    axum::Router::new()
        .route(
            "/stream-with-length",
            post(move || async move {
                (
                    [(http::header::CONTENT_LENGTH, "14")],
                    axum::body::Body::from_stream(chunks()),
                )
            }),
        )
        .route(
            "/trailers",
            post(|| async {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("x-checksum", http::HeaderValue::from_static("abc"));
                let frames = futures_util::stream::iter([
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"body\n"))),
                    Ok(Frame::trailers(trailers)),
                ]);
                axum::body::Body::new(StreamBody::new(frames))
            }),
        )
        .layer(layer(fixture).hold_through_body(true))
}

async fn hold_through_body_releases_before_a_sized_stream_or_trailers_end<F: Fixture>() {
    let fixture = F::start().await;
    let (base, server) = serve(streamed_body_app(&fixture)).await;
    let mut met_own_lock = Vec::new();
    for path in ["stream-with-length", "trailers"] {
        let answers = in_a_row(&base, Method::POST, path, 50).await;
        for (i, (status, body)) in answers.into_iter().enumerate() {
            if status == StatusCode::CONFLICT {
                met_own_lock.push(format!("/{path} request {i}"));
            } else {
                assert!(!body.is_empty(), "/{path} answered {status} with no body");
            }
        }
    }
    server.abort();
    assert!(
        met_own_lock.is_empty(),
        "{} sequential requests met their own previous request's lock (409): {met_own_lock:?}",
        met_own_lock.len()
    );
}

suite!(
    hold_through_body_releases_before_an_empty_or_head_response_ends,
    hold_through_body_releases_before_a_sized_stream_or_trailers_end,
);

// ---------------------------------------------------------------------------------------------
// Item 2 again: "a lease must be renewed on a runtime that is alive". A lease whose request runs
// on a live runtime is registered with the layer's one renewal task, wherever that task runs.
// When the task's runtime shuts down, the lease is marked lost, although its own runtime is
// alive and the lock is still ours: under `Abort`, a healthy request is answered 503.

fn other_runtime_shutdown_case<F: Fixture>() {
    use tower_lock::LeaseLostPolicy;
    let worker = multi_thread(2);
    let fixture = worker.block_on(F::start());
    let service = layer(&fixture)
        .ttl(Duration::from_millis(600))
        .on_lease_lost(LeaseLostPolicy::Abort)
        .layer(tower::service_fn(|req: Request<String>| async move {
            if req.headers().contains_key("x-long") {
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
            Ok::<_, Infallible>(Response::new(String::from("ok")))
        }));

    // A short-lived runtime on another thread serves one request (the renewal task starts there)
    // and then keeps running for 400 ms before it is shut down.
    let side = {
        let service = service.clone();
        std::thread::spawn(move || {
            current_thread().block_on(async {
                let response = send(&service, request("side")).await;
                assert_eq!(response.status(), StatusCode::OK);
                tokio::time::sleep(Duration::from_millis(400)).await;
            });
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    // The long request runs on the multi-thread runtime, which lives on.
    let status = worker
        .block_on(send(&service, request("k").header("x-long", "1")))
        .status();
    side.join().unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "a request on a live runtime, holding a healthy lock, was aborted because another \
         runtime (where the layer's renewal task happened to start) shut down"
    );
}

blocking_suite!(other_runtime_shutdown => other_runtime_shutdown_case);

// ---------------------------------------------------------------------------------------------
// `Renewer::watch` spawns the renewal task on the runtime captured when the response future was
// made; if that runtime has shut down, the new task is dropped at once (inbox dead), and `watch`
// loops forever (spawn, dead, spawn...) while holding the renewer's mutex: the request hangs, and
// so does every later request of the layer that takes a lock.

#[test]
fn a_request_made_on_a_runtime_that_shut_down_does_not_hang() {
    let mut service = layer_on(MemoryBackend::new()).layer(answers("ok"));
    let gone = current_thread();
    let future = {
        let _entered = gone.enter();
        tower::Service::call(&mut service, request("k").body(String::new()).unwrap())
    };
    drop(gone);
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let status = current_thread().block_on(future).map(|r| r.status());
        let _ = done.send(status);
    });
    let outcome = outcome.recv_timeout(Duration::from_secs(5));
    assert!(
        outcome.is_ok(),
        "the request never completed (watch() spins on a dead runtime): {outcome:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Item 3 ("the signal must fire no later than the moment validity runs out") against the memory
// backend's saturation: it stores at most a year of expiry (`far_future`), while the lease
// believes `started + ttl`. With a TTL over a year and no renewal, the lock silently expires a
// year in, another request takes it, and the first holder is told only at `started + ttl`.

#[tokio::test(start_paused = true)]
async fn a_ttl_over_a_year_on_the_memory_backend_is_signalled_when_the_lock_expires() {
    const DAY: Duration = Duration::from_secs(24 * 3600);
    let lost_seen = Arc::new(AtomicBool::new(false));
    let service = {
        let lost_seen = lost_seen.clone();
        layer_on(MemoryBackend::new())
            .ttl(DAY * 730)
            .no_renewal()
            .layer(tower::service_fn(move |req: Request<String>| {
                let lost_seen = lost_seen.clone();
                async move {
                    if req.headers().contains_key("x-long") {
                        let lease = req.extensions().get::<LockLease>().cloned().unwrap();
                        tokio::select! {
                            () = lease.lost() => lost_seen.store(true, Ordering::SeqCst),
                            () = tokio::time::sleep(DAY * 500) => {}
                        }
                    }
                    Ok::<_, Infallible>(Response::new(String::from("ok")))
                }
            }))
    };
    let long = tokio::spawn(send(&service, request("k").header("x-long", "1")));
    tokio::time::sleep(DAY * 400).await;
    let second = send(&service, request("k")).await.status();
    let lost = lost_seen.load(Ordering::SeqCst);
    long.abort();
    assert!(
        second == StatusCode::CONFLICT || lost,
        "400 days into a 730-day lease another request got {second}, and the holder was not \
         told its lease was lost"
    );
}

// ---------------------------------------------------------------------------------------------
// Redis paused (SIGSTOP) while a lease is held: the holder must be told its lease is lost no
// later than another request is admitted after Redis resumes. (Held up in this review; kept as a
// regression check of items 3 and 7 under a real stall.)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_never_admits_a_second_holder_before_the_first_is_told() {
    use tokio::sync::Mutex as AsyncMutex;
    let fixture = <Redis as Fixture>::start().await;
    let lost_at: Arc<AsyncMutex<Option<tokio::time::Instant>>> = Arc::default();
    let service = {
        let lost_at = lost_at.clone();
        layer(&fixture)
            .ttl(Duration::from_millis(400))
            .acquire_timeout(Duration::from_millis(2000))
            .layer(tower::service_fn(move |req: Request<String>| {
                let lost_at = lost_at.clone();
                async move {
                    if req.headers().contains_key("x-long") {
                        let lease = req.extensions().get::<LockLease>().cloned().unwrap();
                        tokio::select! {
                            () = lease.lost() => {
                                *lost_at.lock().await = Some(tokio::time::Instant::now());
                            }
                            () = tokio::time::sleep(Duration::from_secs(4)) => {}
                        }
                    }
                    Ok::<_, Infallible>(Response::new(String::from("ok")))
                }
            }))
    };
    let long = tokio::spawn(send(&service, request("k").header("x-long", "1")));
    tokio::time::sleep(Duration::from_millis(150)).await;
    fixture.server.pause();
    // B's acquire is queued on the paused server; it is answered when Redis resumes.
    let second = tokio::spawn(send(&service, request("k")));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    fixture.server.resume();
    let second = second.await.unwrap().status();
    let admitted_at = tokio::time::Instant::now();
    let lost = *lost_at.lock().await;
    long.abort();
    if second == StatusCode::OK {
        assert!(
            lost.is_some_and(|at| at <= admitted_at),
            "a second request was admitted after the pause, and the first holder was not told"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Issue 7, "also check": "detect the policy at connect time and warn, and document it beside
// persistence". The warning exists (`RedisBackend::connect`); the README, beside what a Redis
// restarted without persistence does to the fencing counters, says nothing of eviction.

#[test]
fn the_readme_documents_the_eviction_policy_beside_persistence() {
    let readme = include_str!("../README.md");
    let persistence = readme
        .find("persistence forgets its counters")
        .expect("the README's persistence paragraph");
    let mentions_eviction = ["maxmemory", "noeviction", "evict"]
        .iter()
        .any(|word| readme.to_lowercase().contains(word));
    assert!(
        mentions_eviction,
        "the README documents persistence (at byte {persistence}) but not that an evicting \
         maxmemory-policy can drop fencing counters and held locks"
    );
}

// ---------------------------------------------------------------------------------------------
// Item 3, a paused holder: "`lost()` fires no later than the moment validity runs out". The
// signal depends on the renewal task being scheduled; when the holder's runtime is stalled (a
// GC-like pause, CPU starvation, a blocking call: simulated here by blocking the only worker),
// the holder resumes after its validity ran out, another request has taken the lock, and
// `is_lost()` still says false: the lease knows its own validity but does not consult it.

#[test]
fn is_lost_is_true_once_validity_has_run_out_even_before_the_renewal_task_runs() {
    let backend = MemoryBackend::new();
    let ttl = Duration::from_millis(300);
    let (seen, lost_after_pause) = std::sync::mpsc::channel();
    let holder = layer_on(backend.clone())
        .ttl(ttl)
        .no_renewal()
        .layer(tower::service_fn(move |req: Request<String>| {
            let seen = seen.clone();
            async move {
                let lease = req.extensions().get::<LockLease>().cloned().unwrap();
                // The holder's process stalls for two TTLs (nothing else on this runtime runs).
                std::thread::sleep(Duration::from_millis(700));
                let _ = seen.send(lease.is_lost());
                Ok::<_, Infallible>(Response::new(String::from("ok")))
            }
        }));
    // Another instance of the service (its own layer and runtime), same store.
    let other = layer_on(backend).ttl(ttl).layer(answers("ok"));
    let paused = std::thread::spawn(move || {
        current_thread()
            .block_on(send(&holder, request("k")))
            .status()
    });
    std::thread::sleep(Duration::from_millis(450));
    let second = current_thread()
        .block_on(send(&other, request("k")))
        .status();
    let lost = lost_after_pause.recv().unwrap();
    assert_eq!(paused.join().unwrap(), StatusCode::OK);
    assert!(
        second != StatusCode::OK || lost,
        "another instance took the lock ({second}) and the paused holder, resuming after its \
         validity ran out, was told is_lost() == false"
    );
}
