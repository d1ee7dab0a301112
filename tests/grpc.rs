//! gRPC over a real socket: the demo `Jobs` service (`examples/support/jobs.rs`) served by tonic
//! behind the lock layer, called by a real tonic client. Rejections arrive as gRPC statuses;
//! streams hold their lock until they end or are cancelled.

#[macro_use]
mod common;
#[path = "../examples/support/jobs.rs"]
mod jobs;

use std::convert::Infallible;
use std::time::Duration;

use http::{Request, StatusCode, header};
use http_body::Body as _;
use tokio::sync::oneshot;
use tonic::service::Routes;
use tonic::{Code, Status};
use tower::{Layer, ServiceExt};
use tower_lock::key::{Header, KeyTemplate, LockKey};
use tower_lock::{
    LeaseLostPolicy, LockBackend, LockLayer, LockPolicy, LockRoutes, MemoryBackend, Rejection,
};

use common::{Fixture, NS, RedisServer, eventually, until_held};
use jobs::{JobsClient, JobsServer, job_request};

/// A tonic server on a free loopback port, shut down when dropped.
struct Server {
    url: String,
    _shutdown: oneshot::Sender<()>,
}

impl Server {
    async fn start(routes: Routes) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (shutdown, stop) = oneshot::channel::<()>();
        tokio::spawn(jobs::serve(routes, listener, async {
            let _ = stop.await;
        }));
        Self {
            url,
            _shutdown: shutdown,
        }
    }

    async fn client(&self) -> JobsClient {
        JobsClient::connect(self.url.clone()).await.unwrap()
    }
}

/// The demo's locked routes on the fixture's backend, in the test namespace.
fn routes_on<B: LockBackend>(backend: B) -> Routes {
    Routes::new(jobs::layer(backend).namespace(NS).layer(JobsServer))
}

async fn serve<F: Fixture>(fixture: &F) -> Server {
    Server::start(routes_on(fixture.backend())).await
}

fn pushback_ms(status: &Status) -> Option<u64> {
    let value = status.metadata().get("grpc-retry-pushback-ms")?;
    Some(value.to_str().unwrap().parse().unwrap())
}

suite!(redis_and_memory:
    contention_is_aborted_with_retry_pushback,
    missing_job_id_is_invalid_argument,
    lease_and_fencing_token_reach_the_handler,
    stream_releases_its_lock_when_it_ends,
    stream_releases_its_lock_when_the_client_cancels,
);

async fn contention_is_aborted_with_retry_pushback<F: Fixture>() {
    let fixture = F::start().await;
    let server = serve(&fixture).await;
    let mut first = server.client().await;
    let holder =
        tokio::spawn(async move { first.run(job_request(Some("7"), "first", 3000)).await });
    until_held(&fixture, 1).await;

    let mut client = server.client().await;
    let status = client
        .run(job_request(Some("7"), "second", 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(
        status.message(),
        "Another request holds the lock for this resource; retry after it finishes."
    );
    // The holder's remaining lease (10 s by default, renewed), in ms.
    let pushback = pushback_ms(&status).expect("grpc-retry-pushback-ms");
    assert!((1..=10_000).contains(&pushback), "{pushback}");

    // Another job is not held.
    let other = client.run(job_request(Some("8"), "other", 0)).await;
    assert!(other.is_ok(), "{other:?}");

    let reply = holder.await.unwrap().unwrap().into_inner();
    assert_eq!(reply.id, "first");
    until_held(&fixture, 0).await;
    let after = client
        .run(job_request(Some("7"), "third", 0))
        .await
        .unwrap();
    assert!(after.into_inner().fencing_token > reply.fencing_token);
}

async fn missing_job_id_is_invalid_argument<F: Fixture>() {
    let fixture = F::start().await;
    let server = serve(&fixture).await;
    let mut client = server.client().await;
    let status = client.run(job_request(None, "a", 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        "the request has no header `x-job-id`, which the lock key needs"
    );
    assert_eq!(pushback_ms(&status), None);

    let status = client.watch(job_request(None, "a", 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    until_held(&fixture, 0).await;
}

async fn lease_and_fencing_token_reach_the_handler<F: Fixture>() {
    let fixture = F::start().await;
    let server = serve(&fixture).await;
    let mut client = server.client().await;
    // The handler reads the lease from `tonic::Request::extensions()` and answers with its
    // fencing token (it answers INTERNAL when there is none).
    let first = client.run(job_request(Some("9"), "a", 0)).await.unwrap();
    let second = client.run(job_request(Some("9"), "b", 0)).await.unwrap();
    let (first, second) = (first.into_inner(), second.into_inner());
    assert_eq!((first.id.as_str(), second.id.as_str()), ("a", "b"));
    assert!(first.fencing_token > 0);
    assert!(second.fencing_token > first.fencing_token);
}

async fn stream_releases_its_lock_when_it_ends<F: Fixture>() {
    let fixture = F::start().await;
    let server = serve(&fixture).await;
    let mut client = server.client().await;
    let mut stream = client
        .watch(job_request(Some("5"), "w", 2000))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first reply");
    assert!(first.fencing_token > 0);

    // While the stream runs, its job is held.
    let status = client
        .run(job_request(Some("5"), "x", 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");

    let mut replies = 1;
    while let Some(reply) = stream.message().await.unwrap() {
        assert_eq!(reply.fencing_token, first.fencing_token);
        replies += 1;
    }
    assert_eq!(replies, jobs::WATCH_REPLIES);
    // Released before the stream's trailers were sent: the next call gets the lock at once.
    let reply = client.run(job_request(Some("5"), "y", 0)).await.unwrap();
    assert!(reply.into_inner().fencing_token > first.fencing_token);
    until_held(&fixture, 0).await;
}

async fn stream_releases_its_lock_when_the_client_cancels<F: Fixture>() {
    let fixture = F::start().await;
    let server = serve(&fixture).await;
    let mut client = server.client().await;
    // A stream that would hold the job for a minute.
    let mut stream = client
        .watch(job_request(Some("6"), "w", 60_000))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("a first reply");
    until_held(&fixture, 1).await;
    let status = client
        .run(job_request(Some("6"), "x", 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");

    // The client cancels the call: the server drops the stream, and with it the lock.
    drop(stream);
    until_held(&fixture, 0).await;
    let reply = client.run(job_request(Some("6"), "y", 0)).await;
    assert!(reply.is_ok(), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_unavailable() {
    let mut redis = RedisServer::start();
    let server = Server::start(jobs::routes(Some(&redis.url())).unwrap()).await;
    let mut client = server.client().await;
    let reply = client.run(job_request(Some("1"), "up", 0)).await;
    assert!(reply.is_ok(), "{reply:?}");

    redis.stop();
    let status = client
        .run(job_request(Some("1"), "down", 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(pushback_ms(&status), Some(1000));
    assert!(status.message().contains("lock"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rejection_overrides_the_grpc_status() {
    let backend = MemoryBackend::new();
    let layer = jobs::layer(backend).on_rejection(|rejection: Rejection| {
        // A gRPC-aware handler: its own code and message, the default pushback kept.
        let mut response = rejection.clone().into_grpc_response();
        let headers = response.headers_mut();
        headers.insert("grpc-status", 8.into()); // RESOURCE_EXHAUSTED
        headers.insert(
            "grpc-message",
            format!("busy (was {})", rejection.grpc_code())
                .parse()
                .unwrap(),
        );
        response
    });
    let server = Server::start(Routes::new(layer.layer(JobsServer))).await;
    let mut client = server.client().await;
    let status = client.run(job_request(None, "a", 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), "busy (was 3)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_table_locks_only_its_methods_and_keys_on_the_method_path() {
    // Only `Run` is locked, on `{matched_path}` (the method's path) and the job id; `Watch`
    // passes through unlocked (its handler then finds no lease: INTERNAL).
    let backend = MemoryBackend::new();
    let table = LockRoutes::new(backend.clone())
        .route(
            jobs::RUN_PATH,
            LockPolicy::template("{matched_path}:{header.x-job-id}").unwrap(),
        )
        .unwrap();
    let server = Server::start(Routes::new(table.layer(JobsServer))).await;
    let mut first = server.client().await;
    let holder = tokio::spawn(async move { first.run(job_request(Some("3"), "a", 3000)).await });
    assert!(eventually(Duration::from_secs(5), async || backend.held() == 1).await);
    let mut client = server.client().await;
    let status = client
        .run(job_request(Some("3"), "b", 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    // The lock is the one the key `/tower_lock.demo.Jobs/Run:3` names.
    assert_eq!(backend.held(), 1);
    let name = tower_lock::LockLayer::new(MemoryBackend::new(), ()).lock_name(
        &LockKey::literal("/tower_lock.demo.Jobs/Run:3")
            .build()
            .unwrap(),
    );
    assert!(backend.remove(&name), "{name:?} is not the held lock");

    let status = client
        .watch(job_request(Some("3"), "w", 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    holder.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_keys_on_the_method_name_with_the_services_pattern() {
    // `Run` and `Watch` of one job lock apart: the key names the method.
    let key = KeyTemplate::parse("jobs.{path.method}:{header.x-job-id}")
        .unwrap()
        .with_pattern("/tower_lock.demo.Jobs/{method}")
        .unwrap();
    let layer = tower_lock::LockLayer::new(MemoryBackend::new(), key).hold_through_body(true);
    let server = Server::start(Routes::new(layer.layer(JobsServer))).await;
    let mut client = server.client().await;
    let mut stream = client
        .watch(job_request(Some("4"), "w", 60_000))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("a first reply");
    let reply = client.run(job_request(Some("4"), "r", 0)).await;
    assert!(reply.is_ok(), "{reply:?}");
    let status = client
        .watch(job_request(Some("4"), "w2", 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_wide_layer_locks_every_service() {
    let server = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (shutdown, stop) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .layer(jobs::layer(MemoryBackend::new()))
            .add_service(JobsServer);
        tokio::spawn(router.serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = stop.await;
            },
        ));
        Server {
            url,
            _shutdown: shutdown,
        }
    };
    let mut client = server.client().await;
    let status = client.run(job_request(None, "a", 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let reply = client.run(job_request(Some("1"), "a", 0)).await.unwrap();
    assert!(reply.into_inner().fencing_token > 0);
}

/// The rejection a gRPC call gets is Trailers-Only: HTTP 200, the status in the headers, and a
/// body that is over before it starts (so hyper sends the headers as the whole response).
#[tokio::test]
async fn grpc_rejections_are_trailers_only_and_other_requests_keep_problem_json() {
    let service = tower_lock::LockLayer::new(MemoryBackend::new(), Header::new("x-job-id")).layer(
        tower::service_fn(|_: Request<String>| async {
            Ok::<_, Infallible>(http::Response::new(String::from("done")))
        }),
    );
    let grpc = Request::post(jobs::RUN_PATH)
        .header(header::CONTENT_TYPE, "application/grpc+proto")
        .body(String::new())
        .unwrap();
    let response = service.clone().oneshot(grpc).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/grpc");
    assert_eq!(response.headers()["grpc-status"], "3");
    assert!(response.body().is_end_stream());

    let http = Request::post("/jobs")
        .header(header::CONTENT_TYPE, "application/json")
        .body(String::new())
        .unwrap();
    let response = service.oneshot(http).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    assert!(!response.headers().contains_key("grpc-status"));
    assert!(!response.body().is_end_stream());
}

/// Held on a real socket for the report: what a tonic client sees of each rejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_client_sees_each_rejection_as_a_status() {
    let mut redis = RedisServer::start();
    let server = Server::start(jobs::routes(Some(&redis.url())).unwrap()).await;
    let mut client = server.client().await;
    // The first call opens the backend's connection.
    client
        .run(job_request(Some("0"), "warm-up", 0))
        .await
        .unwrap();
    let mut first = server.client().await;
    let holder = tokio::spawn(async move { first.run(job_request(Some("1"), "a", 3000)).await });
    let locks = async || redis.lock_keys("tower-lock:").await.len() == 1;
    assert!(eventually(Duration::from_secs(5), locks).await);
    let held = client
        .run(job_request(Some("1"), "b", 0))
        .await
        .unwrap_err();
    holder.await.unwrap().unwrap();
    let missing = client.run(job_request(None, "a", 0)).await.unwrap_err();
    redis.stop();
    let down = client
        .run(job_request(Some("1"), "a", 0))
        .await
        .unwrap_err();
    for status in [&held, &missing, &down] {
        println!(
            "code={:?} ({}) message={:?} grpc-retry-pushback-ms={:?}",
            status.code(),
            status.code() as i32,
            status.message(),
            status.metadata().get("grpc-retry-pushback-ms")
        );
    }
    assert_eq!(
        [held.code(), missing.code(), down.code()],
        [Code::Aborted, Code::InvalidArgument, Code::Unavailable]
    );
}

/// A server whose job locks have a 300 ms lease (renewed every 100 ms) and are aborted when lost;
/// the memory backend, to take a lock away; and the name of job `id`'s lock.
async fn abort_on_lost_lease(
    hold_through_body: bool,
) -> (
    Server,
    MemoryBackend,
    impl Fn(&str) -> tower_lock::backend::LockName,
) {
    let backend = MemoryBackend::new();
    let layer = LockLayer::new(backend.clone(), KeyTemplate::parse(jobs::JOB_KEY).unwrap())
        .ttl(Duration::from_millis(300))
        .on_lease_lost(LeaseLostPolicy::Abort)
        .hold_through_body(hold_through_body);
    let server = Server::start(Routes::new(layer.layer(JobsServer))).await;
    let name = |id: &str| {
        LockLayer::new(MemoryBackend::new(), ())
            .lock_name(&LockKey::literal(&format!("job:{id}")).build().unwrap())
    };
    (server, backend, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_under_abort_is_unavailable() {
    let (server, backend, name) = abort_on_lost_lease(false).await;
    let mut client = server.client().await;
    let call = tokio::spawn(async move { client.run(job_request(Some("2"), "a", 30_000)).await });
    assert!(eventually(Duration::from_secs(5), async || backend.held() == 1).await);
    // Another process takes the lock away: the renewal finds it gone.
    assert!(backend.remove(&name("2")));
    let status = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call was not aborted")
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(pushback_ms(&status), Some(1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_under_abort_while_streaming_ends_the_stream_with_unavailable() {
    let (server, backend, name) = abort_on_lost_lease(true).await;
    let mut client = server.client().await;
    let mut stream = client
        .watch(job_request(Some("2"), "w", 60_000))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("a first reply");
    assert!(backend.remove(&name("2")));
    let status = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream was not aborted")
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("expired or was taken over"),
        "{status:?}"
    );
}

// ---- Red-team checks (attack13): cancellation, deadlines, the example's contract. ----

/// A unary call the client abandons while its handler holds the lock (the client's future is
/// dropped: tonic resets the HTTP/2 stream) releases the lock at once, not at lease expiry.
async fn abandoned_unary_call_releases<F: Fixture>() {
    let fixture = F::start().await;
    let server = serve(&fixture).await;
    let mut client = server.client().await;
    let call = client.run(job_request(Some("11"), "abandoned", 60_000));
    let abandoned = tokio::time::timeout(Duration::from_millis(500), call).await;
    assert!(abandoned.is_err(), "the call should still be running");
    until_held(&fixture, 0).await;
    let mut other = server.client().await;
    let reply = other.run(job_request(Some("11"), "next", 0)).await;
    assert!(reply.is_ok(), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_unary_call_releases_its_lock_memory() {
    abandoned_unary_call_releases::<common::Memory>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_unary_call_releases_its_lock_redis() {
    abandoned_unary_call_releases::<common::Redis>().await;
}

/// A call past its gRPC deadline (`grpc-timeout`, which tonic's server enforces) ends with
/// `DEADLINE_EXCEEDED`/`CANCELLED` and releases its lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_grpc_deadline_releases_its_lock() {
    let fixture = common::Redis::start().await;
    let server = serve(&fixture).await;
    let mut client = server.client().await;
    let mut request = job_request(Some("12"), "late", 60_000);
    request.set_timeout(Duration::from_millis(300));
    let status = tokio::time::timeout(Duration::from_secs(20), client.run(request))
        .await
        .expect("the deadline was not enforced")
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    until_held(&fixture, 0).await;
}

/// `content-type` parameters may follow optional whitespace, which is spaces *or tabs*
/// (RFC 9110 `OWS`): `application/grpc\t;…` is a gRPC call too.
#[test]
fn a_grpc_content_type_with_a_tab_before_its_parameters_is_grpc() {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc\t; charset=utf-8"),
    );
    assert!(tower_lock::grpc::is_grpc(&headers));
}

/// The example's contract (issue 13): `Run` "sleeps `hold_ms` while holding the lock". With
/// a paused clock, a 120 s hold must take 120 s of (virtual) time; the example clamps it to 60 s
/// (`jobs::MAX_HOLD`), which neither the README, the proto nor `examples/grpc.rs` states.
#[tokio::test(start_paused = true)]
async fn the_example_holds_the_lock_for_every_hold_ms_asked() {
    use http_body_util::BodyExt;
    use prost::Message;

    let service = jobs::layer(MemoryBackend::new()).layer(JobsServer);
    let message = jobs::RunRequest {
        id: "long".into(),
        hold_ms: 120_000,
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);
    let request = Request::post(jobs::RUN_PATH)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .header(jobs::JOB_ID, "13")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            bytes::Bytes::from(frame),
        )))
        .unwrap();
    let started = tokio::time::Instant::now();
    let response = service.oneshot(request).await.unwrap();
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("0")
    );
    let held = started.elapsed();
    assert!(held >= Duration::from_secs(120), "held for {held:?}");
}

/// A key the server cannot build on any call (a `{path.NAME}` with no pattern to read it from)
/// reaches a real client as `INTERNAL` with the percent-decoded detail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misconfigured_key_is_internal_to_a_real_client() {
    let layer = LockLayer::new(
        MemoryBackend::new(),
        KeyTemplate::parse("jobs.{path.method}").unwrap(),
    );
    let server = Server::start(Routes::new(layer.layer(JobsServer))).await;
    let mut client = server.client().await;
    let status = client
        .run(job_request(Some("1"), "a", 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("method"), "{status:?}");
}

/// `grpc-message` is percent-encoded on the wire and a real client decodes it back to the
/// detail: non-ASCII, `%`, and control characters survive the round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_client_decodes_the_percent_encoded_message_to_the_detail() {
    const DETAIL: &str = "job ünïcode 100% wrong: é\tend";
    let key = |_: &http::request::Parts| -> Result<Option<LockKey>, tower_lock::key::KeyRejection> {
        Err(tower_lock::key::KeyRejection::new(DETAIL))
    };
    let layer = LockLayer::new(MemoryBackend::new(), key);
    let server = Server::start(Routes::new(layer.layer(JobsServer))).await;
    let mut client = server.client().await;
    let status = client
        .run(job_request(Some("1"), "a", 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(status.message(), DETAIL);
}
