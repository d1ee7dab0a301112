//! Lease safety: renewal, lease loss, fencing tokens, minimum validity, hold-through-body.
//! Each behaviour runs against a real redis-server and against the memory backend.

#[macro_use]
mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;
use tower_lock::backend::{Acquire, AcquireOptions, LockToken};
use tower_lock::{LeaseLostPolicy, LockBackend, LockLease};

use common::backends::Wrapped;
use common::{
    Fixture, NS, Redis, RedisServer, assert_held_throughout, body_json, body_text, eventually,
    holder_behind, holding, layer, layer_on, lock_name, multi_thread, request, send, start_holding,
    streaming, take_over, until_held,
};

async fn lease_is_renewed_past_its_ttl<F: Fixture>() {
    let fixture = F::start().await;
    let service = holder_behind(layer(&fixture).ttl(Duration::from_millis(300)));
    let holder = start_holding(&fixture, &service, request("k").header("x-hold-ms", "1500")).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Three TTLs later the lock is still held: renewal kept it.
    assert_held_throughout(&service, "k", holder).await;
    assert_eq!(fixture.held().await, 0);
}

async fn renewal_stops_when_request_ends<F: Fixture>() {
    let fixture = F::start().await;
    let backend = Wrapped::new(fixture.backend());
    let service = holder_behind(layer_on(backend.clone()).ttl(Duration::from_millis(150)));
    let response = send(&service, request("k").header("x-hold-ms", "400")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let during = backend.extends();
    assert!(
        during >= 3,
        "only {during} renewals in 400 ms at a 50 ms interval"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(backend.extends(), during, "renewed after the end");
    assert_eq!(fixture.held().await, 0);
}

async fn lease_lost_when_key_deleted<F: Fixture>() {
    let fixture = F::start().await;
    // Signal: the handler is told and stops early.
    let service = holder_behind(layer(&fixture).ttl(Duration::from_millis(300)));
    let watched = start_holding(&fixture, &service, holding("k", 5000)).await;
    fixture.delete(&lock_name("k")).await;
    let response = tokio::time::timeout(Duration::from_secs(2), watched)
        .await
        .expect("the handler was not told its lease was lost")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_json(response).await["lost"], true);
}

async fn lease_lost_aborts_with_503_and_leaves_the_new_holder_alone<F: Fixture>() {
    let fixture = F::start().await;
    let service = holder_behind(
        layer(&fixture)
            .ttl(Duration::from_millis(300))
            .on_lease_lost(LeaseLostPolicy::Abort),
    );
    let aborted = start_holding(&fixture, &service, request("k").header("x-hold-ms", "5000")).await;
    // The lock vanishes and someone else takes it before the next renewal.
    let name = lock_name("k");
    fixture.delete(&name).await;
    take_over(&fixture, &name).await;
    let response = tokio::time::timeout(Duration::from_secs(2), aborted)
        .await
        .expect("the request was not aborted")
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body_json(response).await["status"], 503);
    assert_eq!(fixture.held().await, 1, "the new holder's lock was touched");
}

async fn fencing_tokens_strictly_increase<F: Fixture>() {
    let fixture = F::start().await;
    // In acquisition order: the handler appends while it holds the lock.
    let seen = Arc::new(Mutex::new(Vec::<u64>::new()));
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let seen = seen.clone();
            let handler = tower::service_fn(move |req: Request<String>| {
                let seen = seen.clone();
                async move {
                    let lease = req.extensions().get::<LockLease>().unwrap();
                    seen.lock().unwrap().push(lease.fencing_token());
                    Ok::<_, Infallible>(Response::new(String::new()))
                }
            });
            // Each client has its own backend connection and layer.
            let layer = layer_on(fixture.new_client());
            BoxCloneSyncService::new(ServiceBuilder::new().layer(layer).service(handler))
        })
        .collect();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| {
            tokio::spawn(async move {
                let mut acquired = 0;
                while acquired < 100 {
                    match send(&client, request("fenced")).await.status() {
                        StatusCode::OK => acquired += 1,
                        StatusCode::CONFLICT => tokio::task::yield_now().await,
                        other => panic!("unexpected {other}"),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1000);
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens did not strictly increase"
    );
}

async fn body_streaming_holds_the_lock<F: Fixture>() {
    let fixture = F::start().await;
    for (hold, expected) in [(true, StatusCode::CONFLICT), (false, StatusCode::OK)] {
        let service = ServiceBuilder::new()
            .layer(layer(&fixture).hold_through_body(hold))
            .service(streaming(5, Duration::from_millis(200)));
        let response = send(&service, request("s")).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = tokio::spawn(response.into_body().collect());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let during = send(&service, request("s")).await;
        assert_eq!(during.status(), expected, "hold_through_body = {hold}");
        let during_body = during.into_body().collect();
        let (streamed, _) = tokio::join!(body, during_body);
        let streamed = streamed.unwrap().unwrap().to_bytes();
        assert_eq!(streamed.iter().filter(|b| **b == b'\n').count(), 5);
        until_held(&fixture, 0).await;
    }
}

async fn max_hold_bounds_renewal<F: Fixture>() {
    let fixture = F::start().await;
    let service = holder_behind(
        layer(&fixture)
            .ttl(Duration::from_millis(300))
            .max_hold(Duration::from_millis(600)),
    );
    let holder = start_holding(&fixture, &service, holding("k", 5000)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Still renewed within max_hold.
    assert_eq!(
        send(&service, request("k")).await.status(),
        StatusCode::CONFLICT
    );
    // Renewal stopped at 600 ms; the lease runs out within one TTL after that.
    let response = tokio::time::timeout(Duration::from_secs(2), holder)
        .await
        .expect("the holder was not told its lease ran out")
        .unwrap();
    assert_eq!(body_json(response).await["lost"], true);
    assert_eq!(send(&service, request("k")).await.status(), StatusCode::OK);
}

async fn insufficient_validity_is_refused_with_503<F: Fixture>() {
    let fixture = F::start().await;
    let service = holder_behind(
        layer(&fixture)
            .ttl(Duration::from_millis(200))
            .min_validity(Duration::from_millis(400)),
    );
    let response = send(&service, request("k")).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body_json(response).await["status"], 503);
    assert_eq!(fixture.held().await, 0);
}

async fn lease_is_visible_to_the_handler<F: Fixture>() {
    let fixture = F::start().await;
    let handler = tower::service_fn(|req: Request<String>| async move {
        let lease = req.extensions().get::<LockLease>().unwrap();
        Ok::<_, Infallible>(Response::new(format!(
            "{} {} {}",
            lease.name().lock_key(),
            lease.fencing_token(),
            lease.is_lost()
        )))
    });
    let service = ServiceBuilder::new()
        .layer(layer(&fixture))
        .service(handler);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let response = send(&service, request("acct:1")).await;
    let text = body_text(response).await;
    let fields: Vec<&str> = text.split(' ').collect();
    assert_eq!(fields[0], "test-lock:{acct%3A1}", "{text}");
    // A fencing token from the clock (µs since 1970).
    assert!(fields[1].parse::<u64>().unwrap() >= before, "{text}");
    assert_eq!(fields[2], "false", "{text}");
}

suite!(
    lease_is_renewed_past_its_ttl,
    renewal_stops_when_request_ends,
    lease_lost_when_key_deleted,
    lease_lost_aborts_with_503_and_leaves_the_new_holder_alone,
    fencing_tokens_strictly_increase,
    body_streaming_holds_the_lock,
    max_hold_bounds_renewal,
    insufficient_validity_is_refused_with_503,
    lease_is_visible_to_the_handler,
);

mod redis_only {
    use super::*;
    use tower_lock::RedisBackend;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn renewal_stops_when_request_ends_on_the_server() {
        let fixture = Redis::start().await;
        let service = holder_behind(layer(&fixture).ttl(Duration::from_millis(150)));
        let before = fixture.server.command_calls("evalsha").await;
        let response = send(&service, request("k").header("x-hold-ms", "400")).await;
        assert_eq!(response.status(), StatusCode::OK);
        let after = fixture.server.command_calls("evalsha").await;
        // acquire + at least 3 renewals + release
        assert!(after - before >= 5, "{} scripts", after - before);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            fixture.server.command_calls("evalsha").await,
            after,
            "renewal traffic after the request ended"
        );
        assert!(fixture.server.lock_keys(NS).await.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lease_lost_when_redis_paused_past_validity() {
        let fixture = Redis::start().await;
        let service = holder_behind(
            layer(&fixture)
                .ttl(Duration::from_millis(400))
                .acquire_timeout(Duration::from_millis(100)),
        );
        let watched = start_holding(&fixture, &service, holding("k", 5000)).await;
        fixture.server.pause();
        let outcome = tokio::time::timeout(Duration::from_secs(3), watched).await;
        fixture.server.resume();
        let response = outcome
            .expect("the handler was not told while Redis was paused")
            .unwrap();
        assert_eq!(body_json(response).await["lost"], true);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fencing_tokens_strictly_increase_across_a_restart_with_aof() {
        let mut server = RedisServer::start_with_aof();
        let name = lock_name("fenced");
        let mut last = 0;
        for round in 0..3 {
            let backend = RedisBackend::connect(&server.url()).await.unwrap();
            for _ in 0..10 {
                let token = LockToken::random();
                let Acquire::Acquired { fencing_token } = backend
                    .acquire(&name, token, AcquireOptions::new(Duration::from_secs(5)))
                    .await
                    .unwrap()
                else {
                    panic!("lock unexpectedly held");
                };
                assert!(
                    fencing_token > last,
                    "round {round}: {fencing_token} <= {last}"
                );
                last = fencing_token;
                backend.release(&name, token).await.unwrap();
            }
            server.restart();
        }
    }
}

mod renewal_task {
    use super::*;
    use tower_lock::MemoryBackend;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn renewal_task_ends_when_the_layer_is_dropped() {
        let metrics = tokio::runtime::Handle::current().metrics();
        let backend = MemoryBackend::new();
        let service = holder_behind(layer_on(backend).ttl(Duration::from_millis(300)));
        let response = send(&service, request("k").header("x-hold-ms", "50")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(metrics.num_alive_tasks(), 1, "one renewal task per layer");
        drop(service);
        assert!(
            eventually(Duration::from_secs(2), async || metrics.num_alive_tasks()
                == 0)
            .await,
            "the renewal task outlived its layer"
        );
    }

    #[test]
    fn a_layer_outliving_its_first_runtime_still_renews() {
        let service = holder_behind(layer_on(MemoryBackend::new()).ttl(Duration::from_millis(300)));
        let first = multi_thread(2);
        first.block_on(async {
            let response = send(&service, request("k")).await;
            assert_eq!(response.status(), StatusCode::OK);
        });
        // The renewal task died with its runtime; the next lock starts another.
        drop(first);
        multi_thread(2).block_on(async {
            let holder = tokio::spawn(send(&service, request("k").header("x-hold-ms", "1000")));
            tokio::time::sleep(Duration::from_millis(700)).await;
            assert_held_throughout(&service, "k", holder).await;
        });
    }
}
