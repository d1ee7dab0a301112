//! Lease safety: renewal, lease loss, fencing tokens, minimum validity, hold-through-body.
//! Each behaviour runs against a real redis-server and against the memory backend.

#[macro_use]
mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_lock::backend::{
    Acquire, AcquireOptions, BackendFuture, Extend, LockName, LockToken, Release,
};
use tower_lock::key::{Header, LockKey};
use tower_lock::{LeaseLostPolicy, LockBackend, LockBody, LockLayer, LockLease};

use common::{
    Fixture, NS, Redis, RedisServer, body_json, eventually, layer, request, send, until_held,
};

type Svc = BoxCloneSyncService<Request<String>, Response<LockBody<String>>, Infallible>;

/// Counts extend calls, to see renewal traffic on any backend.
#[derive(Clone)]
struct Counting<B> {
    inner: B,
    extends: Arc<AtomicUsize>,
}

impl<B: LockBackend> LockBackend for Counting<B> {
    fn acquire(
        &self,
        name: &LockName,
        token: LockToken,
        options: AcquireOptions,
    ) -> BackendFuture<Acquire> {
        self.inner.acquire(name, token, options)
    }
    fn release(&self, name: &LockName, token: LockToken) -> BackendFuture<Release> {
        self.inner.release(name, token)
    }
    fn extend(&self, name: &LockName, token: LockToken, ttl: Duration) -> BackendFuture<Extend> {
        self.extends.fetch_add(1, Ordering::SeqCst);
        self.inner.extend(name, token, ttl)
    }
}

/// A handler that holds for `x-hold-ms` (returning early when its lease is lost, if `x-watch-lost`
/// is set) and answers `{"fencing_token": n, "lost": bool}`.
fn service<B: LockBackend>(layer: LockLayer<Header, B>) -> Svc {
    let handler = tower::service_fn(|req: Request<String>| async move {
        let lease = req.extensions().get::<LockLease>().cloned();
        let hold = req
            .headers()
            .get("x-hold-ms")
            .map_or(0, |v| v.to_str().unwrap().parse().unwrap());
        let sleep = tokio::time::sleep(Duration::from_millis(hold));
        match (&lease, req.headers().contains_key("x-watch-lost")) {
            (Some(lease), true) => {
                tokio::select! {
                    _ = sleep => {}
                    _ = lease.lost() => {}
                }
            }
            _ => sleep.await,
        }
        let body = serde_json::json!({
            "fencing_token": lease.as_ref().map(LockLease::fencing_token),
            "lost": lease.as_ref().is_some_and(LockLease::is_lost),
        });
        Ok::<_, Infallible>(Response::new(body.to_string()))
    });
    BoxCloneSyncService::new(ServiceBuilder::new().layer(layer).service(handler))
}

fn name(layer_ns: &str, key: &str) -> LockName {
    LockLayer::new(tower_lock::MemoryBackend::new(), Header::new("x"))
        .namespace(layer_ns)
        .lock_name(&LockKey::new(key))
}

async fn lease_is_renewed_past_its_ttl<F: Fixture>() {
    let fixture = F::start().await;
    let service = service(layer(&fixture).ttl(Duration::from_millis(300)));
    let holder = tokio::spawn(send(&service, request("k").header("x-hold-ms", "1500")));
    until_held(&fixture, 1).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Three TTLs later the lock is still held: renewal kept it.
    assert_eq!(
        send(&service, request("k")).await.status(),
        StatusCode::CONFLICT
    );
    let response = holder.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_json(response).await["lost"], false);
    assert_eq!(fixture.held().await, 0);
}

async fn renewal_stops_when_request_ends<F: Fixture>() {
    let fixture = F::start().await;
    let extends = Arc::new(AtomicUsize::new(0));
    let backend = Counting {
        inner: fixture.backend(),
        extends: extends.clone(),
    };
    let layer = LockLayer::new(backend, Header::new("x-key"))
        .namespace(NS)
        .ttl(Duration::from_millis(150));
    let service = service(layer);
    let response = send(&service, request("k").header("x-hold-ms", "400")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let during = extends.load(Ordering::SeqCst);
    assert!(
        during >= 3,
        "only {during} renewals in 400 ms at a 50 ms interval"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        extends.load(Ordering::SeqCst),
        during,
        "renewed after the end"
    );
    assert_eq!(fixture.held().await, 0);
}

async fn lease_lost_when_key_deleted<F: Fixture>() {
    let fixture = F::start().await;
    // Signal: the handler is told and stops early.
    let service = service(layer(&fixture).ttl(Duration::from_millis(300)));
    let watched = tokio::spawn(send(
        &service,
        request("k")
            .header("x-hold-ms", "5000")
            .header("x-watch-lost", "1"),
    ));
    until_held(&fixture, 1).await;
    fixture.delete(&name(NS, "k")).await;
    let response = tokio::time::timeout(Duration::from_secs(2), watched)
        .await
        .expect("the handler was not told its lease was lost")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_json(response).await["lost"], true);
}

async fn lease_lost_aborts_with_503_and_leaves_the_new_holder_alone<F: Fixture>() {
    let fixture = F::start().await;
    let service = service(
        layer(&fixture)
            .ttl(Duration::from_millis(300))
            .on_lease_lost(LeaseLostPolicy::Abort),
    );
    let aborted = tokio::spawn(send(&service, request("k").header("x-hold-ms", "5000")));
    until_held(&fixture, 1).await;
    // The lock vanishes and someone else takes it before the next renewal.
    let name = name(NS, "k");
    fixture.delete(&name).await;
    let other = fixture
        .backend()
        .acquire(
            &name,
            LockToken::random(),
            AcquireOptions::new(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    assert!(matches!(other, Acquire::Acquired { .. }));
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
            let layer = LockLayer::new(fixture.new_client(), Header::new("x-key")).namespace(NS);
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
    let streaming = |hold_through_body: bool| {
        let handler = tower::service_fn(|_req: Request<String>| async {
            let chunks = futures_util::stream::unfold(0, |i| async move {
                if i == 5 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                let frame = http_body::Frame::data(Bytes::from(format!("chunk {i}\n")));
                Some((Ok::<_, Infallible>(frame), i + 1))
            });
            Ok::<_, Infallible>(Response::new(http_body_util::StreamBody::new(chunks)))
        });
        ServiceBuilder::new()
            .layer(layer(&fixture).hold_through_body(hold_through_body))
            .service(handler)
    };
    for (hold, expected) in [(true, StatusCode::CONFLICT), (false, StatusCode::OK)] {
        let service = streaming(hold);
        let response = service
            .clone()
            .oneshot(request("s").body(String::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = tokio::spawn(response.into_body().collect());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let during = service
            .clone()
            .oneshot(request("s").body(String::new()).unwrap())
            .await
            .unwrap();
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
    let service = service(
        layer(&fixture)
            .ttl(Duration::from_millis(300))
            .max_hold(Duration::from_millis(600)),
    );
    let holder = tokio::spawn(send(
        &service,
        request("k")
            .header("x-hold-ms", "5000")
            .header("x-watch-lost", "1"),
    ));
    until_held(&fixture, 1).await;
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
    let service = service(
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
            lease.key(),
            lease.fencing_token(),
            lease.is_lost()
        )))
    });
    let service = ServiceBuilder::new()
        .layer(layer(&fixture))
        .service(handler);
    let response = service
        .oneshot(request("acct:1").body(String::new()).unwrap())
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "test-lock:{acct%3A1} 1 false");
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
        let service = service(layer(&fixture).ttl(Duration::from_millis(150)));
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
        let service = service(
            layer(&fixture)
                .ttl(Duration::from_millis(400))
                .acquire_timeout(Duration::from_millis(100)),
        );
        let watched = tokio::spawn(send(
            &service,
            request("k")
                .header("x-hold-ms", "5000")
                .header("x-watch-lost", "1"),
        ));
        until_held(&fixture, 1).await;
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
        let name = name(NS, "fenced");
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
        assert_eq!(last, 30);
    }
}

mod renewal_task {
    use super::*;
    use tower_lock::MemoryBackend;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn renewal_task_ends_when_the_layer_is_dropped() {
        let metrics = tokio::runtime::Handle::current().metrics();
        let backend = MemoryBackend::new();
        let service = service(
            LockLayer::new(backend.clone(), Header::new("x-key")).ttl(Duration::from_millis(300)),
        );
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
        let service = service(
            LockLayer::new(MemoryBackend::new(), Header::new("x-key"))
                .ttl(Duration::from_millis(300)),
        );
        let runtime = || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
        };
        let first = runtime();
        first.block_on(async {
            let response = send(&service, request("k")).await;
            assert_eq!(response.status(), StatusCode::OK);
        });
        // The renewal task died with its runtime; the next lock starts another.
        drop(first);
        runtime().block_on(async {
            let holder = tokio::spawn(send(&service, request("k").header("x-hold-ms", "1000")));
            tokio::time::sleep(Duration::from_millis(700)).await;
            assert_eq!(
                send(&service, request("k")).await.status(),
                StatusCode::CONFLICT
            );
            let response = holder.await.unwrap();
            assert_eq!(body_json(response).await["lost"], false);
        });
    }
}
