//! The behavioural suite of the foundation: every test runs against the Redis backend (a real
//! `redis-server` per test) and the in-process backend.

#[macro_use]
mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode, header};
use tokio::sync::Notify;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_lock::key::{Header, LockKey};
use tower_lock::{LockBackend, LockBody, LockLayer};

use common::{
    Fixture, NS, Redis, answers, body_json, eventually, layer, request, retry_after, send,
    start_holding, take_over, until_held,
};

type Svc = BoxCloneService<Request<String>, Response<LockBody<String>>, std::io::Error>;

/// What the test handler saw.
#[derive(Default)]
struct Probe {
    calls: AtomicUsize,
    running: AtomicUsize,
    max_running: AtomicUsize,
    gate: Notify,
}

/// A handler driven by headers: `x-hold-ms` sleeps, `x-gate` waits for `probe.gate`,
/// `x-fail` returns an error, `x-panic` panics.
fn service<B: LockBackend>(layer: LockLayer<Header, B>, probe: Arc<Probe>) -> Svc {
    let handler = tower::service_fn(move |req: Request<String>| {
        let probe = probe.clone();
        async move {
            probe.calls.fetch_add(1, Ordering::SeqCst);
            let now = probe.running.fetch_add(1, Ordering::SeqCst) + 1;
            probe.max_running.fetch_max(now, Ordering::SeqCst);
            let headers = req.headers();
            if let Some(ms) = headers.get("x-hold-ms") {
                let ms = ms.to_str().unwrap().parse().unwrap();
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if headers.contains_key("x-gate") {
                probe.gate.notified().await;
            }
            probe.running.fetch_sub(1, Ordering::SeqCst);
            if headers.contains_key("x-panic") {
                panic!("handler panicked on purpose");
            }
            if headers.contains_key("x-fail") {
                return Err(std::io::Error::other("handler failed on purpose"));
            }
            Ok(Response::new(String::from("ok")))
        }
    });
    BoxCloneService::new(ServiceBuilder::new().layer(layer).service(handler))
}

/// Waits until `n` handlers run at once.
async fn until_running(probe: &Probe, n: usize) {
    assert!(
        eventually(Duration::from_secs(5), async || probe
            .running
            .load(Ordering::SeqCst)
            == n)
        .await,
        "expected {n} handlers running, found {}",
        probe.running.load(Ordering::SeqCst)
    );
}

async fn contention_returns_409_with_retry_after<F: Fixture>() {
    let fixture = F::start().await;
    let probe = Arc::new(Probe::default());
    let service = service(layer(&fixture).ttl(Duration::from_secs(5)), probe.clone());
    let holder = start_holding(&fixture, &service, request("k").header("x-gate", "1")).await;
    // The lock is in the store before the holder's future has read the reply and called its
    // handler: wait for that call, so the count below is the 409's alone.
    assert!(
        eventually(Duration::from_secs(5), async || probe
            .calls
            .load(Ordering::SeqCst)
            == 1)
        .await
    );

    let response = send(&service, request("k")).await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let retry_after = retry_after(&response);
    assert!((1..=5).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    let problem = body_json(response).await;
    assert_eq!(problem["status"], 409);
    assert!(problem["type"].is_string() && problem["title"].is_string());
    assert!(problem["detail"].is_string());
    assert_eq!(
        probe.calls.load(Ordering::SeqCst),
        1,
        "inner called for the 409"
    );

    probe.gate.notify_one();
    assert_eq!(holder.await.unwrap().status(), StatusCode::OK);
}

async fn distinct_keys_run_in_parallel<F: Fixture>() {
    let fixture = F::start().await;
    let probe = Arc::new(Probe::default());
    let service = service(layer(&fixture), probe.clone());
    let a = tokio::spawn(send(&service, request("a").header("x-gate", "1")));
    let b = tokio::spawn(send(&service, request("b").header("x-gate", "1")));
    // Both handlers are inside at once: neither key blocks the other.
    until_running(&probe, 2).await;
    assert_eq!(fixture.held().await, 2);
    probe.gate.notify_waiters();
    assert_eq!(a.await.unwrap().status(), StatusCode::OK);
    assert_eq!(b.await.unwrap().status(), StatusCode::OK);
    assert_eq!(probe.max_running.load(Ordering::SeqCst), 2);
}

async fn lock_released_after_success<F: Fixture>() {
    let fixture = F::start().await;
    let service = service(layer(&fixture), Arc::default());
    assert_eq!(send(&service, request("k")).await.status(), StatusCode::OK);
    // The release is awaited before the response is returned: nothing to wait for.
    assert_eq!(fixture.held().await, 0);
    assert_eq!(send(&service, request("k")).await.status(), StatusCode::OK);
}

async fn lock_released_after_inner_error<F: Fixture>() {
    let fixture = F::start().await;
    let service = service(layer(&fixture), Arc::default());
    let result = service
        .clone()
        .oneshot(
            request("k")
                .header("x-fail", "1")
                .body(String::new())
                .unwrap(),
        )
        .await;
    assert!(result.is_err());
    assert_eq!(fixture.held().await, 0);
    assert_eq!(send(&service, request("k")).await.status(), StatusCode::OK);
}

async fn lock_released_after_panic<F: Fixture>() {
    let fixture = F::start().await;
    let service = service(layer(&fixture), Arc::default());
    let task = tokio::spawn(send(&service, request("k").header("x-panic", "1")));
    assert!(task.await.unwrap_err().is_panic());
    until_held(&fixture, 0).await;
    assert_eq!(send(&service, request("k")).await.status(), StatusCode::OK);
}

async fn response_future_drop_releases_lock<F: Fixture>() {
    let fixture = F::start().await;
    let probe = Arc::new(Probe::default());
    let service = service(layer(&fixture), probe.clone());
    let mut future = service.clone().oneshot(
        request("k")
            .header("x-gate", "1")
            .body(String::new())
            .unwrap(),
    );
    // Drive it until the handler runs (the lock is held), then drop it like a disconnect would.
    let _ = tokio::time::timeout(Duration::from_millis(300), &mut future).await;
    assert_eq!(fixture.held().await, 1);
    assert_eq!(probe.running.load(Ordering::SeqCst), 1);
    drop(future);
    until_held(&fixture, 0).await;
    assert_eq!(send(&service, request("k")).await.status(), StatusCode::OK);
}

async fn response_future_dropped_before_acquiring_leaves_no_lock<F: Fixture>() {
    let fixture = F::start().await;
    let probe = Arc::new(Probe::default());
    let mut service = service(layer(&fixture), probe.clone());
    service.ready().await.unwrap();
    // Made but never polled (the memory backend has already taken the lock by now).
    let future = service.call(request("k").body(String::new()).unwrap());
    drop(future);
    until_held(&fixture, 0).await;
    assert_eq!(send(&service, request("k")).await.status(), StatusCode::OK);
    assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
}

async fn release_never_deletes_a_foreign_lock<F: Fixture>() {
    let fixture = F::start().await;
    let layer = layer(&fixture).ttl(Duration::from_millis(300)).no_renewal();
    let name = layer.lock_name(&LockKey::new("k"));
    let probe = Arc::new(Probe::default());
    let service = service(layer, probe.clone());
    // A holds past its TTL.
    let a = start_holding(&fixture, &service, request("k").header("x-gate", "1")).await;
    until_held(&fixture, 0).await; // A's lease lapsed
    // Someone else takes the lock while A still runs.
    take_over(&fixture, &name).await;
    probe.gate.notify_one();
    assert_eq!(a.await.unwrap().status(), StatusCode::OK);
    // A's release left the other holder's lock alone.
    assert_eq!(fixture.held().await, 1);
    assert_eq!(
        send(&service, request("k")).await.status(),
        StatusCode::CONFLICT
    );
}

async fn extractor_rejection_returns_400<F: Fixture>() {
    let fixture = F::start().await;
    let probe = Arc::new(Probe::default());
    let service = service(layer(&fixture), probe.clone());
    let response = send(&service, Request::post("/work")).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    let problem = body_json(response).await;
    assert_eq!(problem["status"], 400);
    assert!(problem["detail"].as_str().unwrap().contains("x-key"));
    assert_eq!(probe.calls.load(Ordering::SeqCst), 0);
}

async fn none_key_passes_through<F: Fixture>() {
    let fixture = F::start().await;
    let probe = Arc::new(Probe::default());
    let layer = LockLayer::new(fixture.backend(), Header::new("x-key").optional()).namespace(NS);
    let service = service(layer, probe.clone());
    let a = tokio::spawn(send(&service, Request::post("/work").header("x-gate", "1")));
    let b = tokio::spawn(send(&service, Request::post("/work").header("x-gate", "1")));
    until_running(&probe, 2).await;
    assert_eq!(fixture.held().await, 0);
    probe.gate.notify_waiters();
    assert_eq!(a.await.unwrap().status(), StatusCode::OK);
    assert_eq!(b.await.unwrap().status(), StatusCode::OK);
}

async fn two_hundred_concurrent_same_key_requests_admit_exactly_one<F: Fixture>() {
    let fixture = F::start().await;
    let probe = Arc::new(Probe::default());
    let service = service(layer(&fixture), probe.clone());
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let service = service.clone();
            tokio::spawn(async move {
                send(&service, request("hot").header("x-gate", "1"))
                    .await
                    .status()
            })
        })
        .collect();
    // The admitted request waits at the gate until every other one has been answered.
    assert!(
        eventually(Duration::from_secs(10), async || tasks
            .iter()
            .filter(|t| t.is_finished())
            .count()
            == 199)
        .await,
        "199 requests should have been rejected while one holds the lock"
    );
    probe.gate.notify_waiters();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let conflict = statuses
        .iter()
        .filter(|s| **s == StatusCode::CONFLICT)
        .count();
    assert_eq!((ok, conflict), (1, 199));
    assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
    assert_eq!(probe.max_running.load(Ordering::SeqCst), 1);
}

async fn no_lock_keys_left_after_run<F: Fixture>() {
    let fixture = F::start().await;
    let service = service(layer(&fixture), Arc::default());
    let mut tasks = Vec::new();
    for i in 0..60 {
        let service = service.clone();
        let key = format!("k{}", i % 7);
        tasks.push(tokio::spawn(async move {
            let builder = request(&key).header("x-hold-ms", "5");
            let builder = match i % 3 {
                0 => builder.header("x-fail", "1"),
                _ => builder,
            };
            let _ = service.oneshot(builder.body(String::new()).unwrap()).await;
        }));
    }
    // And a few abandoned mid-flight.
    for i in 0..5 {
        let service = service.clone();
        let future = service.oneshot(
            request(&format!("dropped{i}"))
                .header("x-hold-ms", "10000")
                .body(String::new())
                .unwrap(),
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), future).await;
    }
    for task in tasks {
        task.await.unwrap();
    }
    until_held(&fixture, 0).await;
}

async fn inner_concurrency_limit_loses_no_request<F: Fixture>() {
    let fixture = F::start().await;
    let probe = Arc::new(Probe::default());
    let handler = tower::service_fn({
        let probe = probe.clone();
        move |_req: Request<String>| {
            let probe = probe.clone();
            async move {
                let now = probe.running.fetch_add(1, Ordering::SeqCst) + 1;
                probe.max_running.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                probe.running.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, Infallible>(Response::new(String::new()))
            }
        }
    });
    let service = ServiceBuilder::new()
        .layer(layer(&fixture))
        .concurrency_limit(1)
        .service(handler);
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let service = service.clone();
            tokio::spawn(async move {
                // Half the requests share a key, so some are rejected while holding a permit.
                let key = if i % 2 == 0 {
                    "shared".to_owned()
                } else {
                    format!("k{i}")
                };
                send(&service, request(&key)).await.status()
            })
        })
        .collect();
    let all = async {
        let mut statuses = Vec::new();
        for task in tasks {
            statuses.push(task.await.unwrap());
        }
        statuses
    };
    let statuses = tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .expect("a request got stuck behind the inner ConcurrencyLimit");
    assert_eq!(statuses.len(), 40);
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::CONFLICT)
    );
    // Distinct keys never conflict.
    assert_eq!(
        statuses
            .iter()
            .enumerate()
            .filter(|(i, s)| i % 2 == 1 && **s != StatusCode::OK)
            .count(),
        0
    );
    assert_eq!(probe.max_running.load(Ordering::SeqCst), 1);
    until_held(&fixture, 0).await;
}

async fn poll_ready_is_delegated_to_the_inner_service<F: Fixture>() {
    let fixture = F::start().await;
    let mut service = ServiceBuilder::new()
        .layer(layer(&fixture))
        .concurrency_limit(1)
        .service(answers(""));
    let mut other = service.clone();
    // `service` takes the only permit; `other` is not ready until that request is done.
    std::future::poll_fn(|cx| service.poll_ready(cx))
        .await
        .unwrap();
    let waker = futures_noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(other.poll_ready(&mut cx).is_pending());
    let response = service
        .call(request("k").body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(other.poll_ready(&mut cx).is_ready());
}

fn futures_noop_waker() -> std::task::Waker {
    std::task::Waker::noop().clone()
}

suite!(
    contention_returns_409_with_retry_after,
    distinct_keys_run_in_parallel,
    lock_released_after_success,
    lock_released_after_inner_error,
    lock_released_after_panic,
    response_future_drop_releases_lock,
    response_future_dropped_before_acquiring_leaves_no_lock,
    release_never_deletes_a_foreign_lock,
    extractor_rejection_returns_400,
    none_key_passes_through,
    two_hundred_concurrent_same_key_requests_admit_exactly_one,
    no_lock_keys_left_after_run,
    inner_concurrency_limit_loses_no_request,
    poll_ready_is_delegated_to_the_inner_service,
);

/// Redis-only behaviours: the server going away and coming back.
mod redis_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_down_returns_503_within_timeout() {
        let mut fixture = Redis::start().await;
        let probe = Arc::new(Probe::default());
        let timeout = Duration::from_millis(300);
        let service = service(layer(&fixture).acquire_timeout(timeout), probe.clone());
        assert_eq!(send(&service, request("k")).await.status(), StatusCode::OK);

        // Paused: the connection stays open and nothing answers; the acquire timeout decides.
        fixture.server.pause();
        let started = std::time::Instant::now();
        let response = send(&service, request("k")).await;
        let paused_elapsed = started.elapsed();
        fixture.server.resume();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(body_json(response).await["status"], 503);
        assert!(paused_elapsed < timeout * 3, "took {paused_elapsed:?}");

        // Stopped: connection refused.
        fixture.server.stop();
        let started = std::time::Instant::now();
        let response = send(&service, request("k")).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            started.elapsed() < timeout * 3,
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(
            probe.calls.load(Ordering::SeqCst),
            1,
            "fail-closed calls nothing"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn response_future_dropped_mid_acquire_leaves_no_lock() {
        let fixture = Redis::start().await;
        let service = service(
            layer(&fixture).acquire_timeout(Duration::from_secs(5)),
            Arc::default(),
        );
        // Load the script first, so the frozen server gets a complete EVALSHA.
        assert_eq!(
            send(&service, request("warm")).await.status(),
            StatusCode::OK
        );
        // The acquire script is sent to a frozen server; the client gives up and goes away.
        fixture.server.pause();
        let gave_up =
            tokio::time::timeout(Duration::from_millis(200), send(&service, request("k")))
                .await
                .is_err();
        assert!(gave_up);
        // Thawed, the server runs the SET it had queued... and then our clean-up.
        fixture.server.resume();
        assert!(
            eventually(Duration::from_secs(3), async || fixture.held().await == 0).await,
            "the lock taken by an abandoned acquire was left to its 10 s TTL"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fail_open_calls_the_service_unlocked_when_redis_is_down() {
        let mut fixture = Redis::start().await;
        let probe = Arc::new(Probe::default());
        let service = service(layer(&fixture).fail_open(true), probe.clone());
        fixture.server.stop();
        assert_eq!(send(&service, request("k")).await.status(), StatusCode::OK);
        assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovers_after_redis_restart() {
        let mut fixture = Redis::start().await;
        let service = service(layer(&fixture), Arc::default());
        assert_eq!(send(&service, request("k")).await.status(), StatusCode::OK);
        fixture.server.stop();
        assert_eq!(
            send(&service, request("k")).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        fixture.server.restart();
        assert!(
            eventually(Duration::from_secs(10), async || send(
                &service,
                request("k")
            )
            .await
            .status()
                == StatusCode::OK)
            .await,
            "the shared connection did not come back after the restart"
        );
        assert_eq!(fixture.held().await, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timed_out_acquire_is_cleaned_up() {
        let fixture = Redis::start().await;
        // An acquire timeout so short it fires while the script is in flight.
        let service = service(
            layer(&fixture).acquire_timeout(Duration::from_micros(1)),
            Arc::default(),
        );
        for i in 0..20 {
            let status = send(&service, request(&format!("k{i}"))).await.status();
            assert!(status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::OK);
        }
        until_held(&fixture, 0).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_share_one_connection() {
        let fixture = Redis::start().await;
        let service = service(layer(&fixture), Arc::default());
        let tasks: Vec<_> = (0..50)
            .map(|i| tokio::spawn(send(&service, request(&format!("k{i}")))))
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let mut connection = fixture.server.connection().await;
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut connection)
            .await
            .unwrap();
        // Ours and the test's own connection.
        assert_eq!(clients.lines().count(), 2, "{clients}");
    }
}
