//! Release paths: hold-through-body over real HTTP, abandoned acquires, background release, the
//! Redis backend's outcomes and errors, and what is traced and counted on the way.

#[macro_use]
mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc};
use tower::ServiceBuilder;
use tower_lock::backend::{Acquire, AcquireOptions, BackendErrorKind, Inspect, LockToken, Release};
use tower_lock::key::Header;
use tower_lock::{LeaseLostPolicy, LockBackend, LockLayer, MemoryBackend, RedisBackend};

use common::backends::{Acquires, Releases, Wrapped};
use common::logs::Captured;
use common::{
    Fixture, Redis, RedisServer, answers, eventually, in_a_row, layer, layer_on, lock_name,
    request, send, serve, streaming, until_held,
};

/// A handler answering a short body, whole (`/full`) or as a stream of chunks (`/stream`).
fn http_app<F: Fixture>(fixture: &F) -> axum::Router {
    use axum::routing::post;
    axum::Router::new()
        .route("/full", post(|| async { "done" }))
        .route(
            "/stream",
            post(|| async {
                let chunks = futures_util::stream::iter(
                    ["one\n", "two\n", "three\n"].map(|c| Ok::<_, Infallible>(Bytes::from(c))),
                );
                axum::body::Body::from_stream(chunks)
            }),
        )
        .layer(layer(fixture).hold_through_body(true))
}

async fn hold_through_body_releases_before_the_body_ends<F: Fixture>() {
    let fixture = F::start().await;
    let (base, server) = serve(http_app(&fixture)).await;
    for path in ["full", "stream"] {
        let answers = in_a_row(&base, Method::POST, path, 50).await;
        for (i, (status, body)) in answers.into_iter().enumerate() {
            assert_eq!(
                status,
                StatusCode::OK,
                "/{path} request {i} met a lock: {body:?}"
            );
        }
    }
    server.abort();
    assert_eq!(fixture.held().await, 0);
}

async fn lease_lost_mid_body_ends_the_body_with_an_error<F: Fixture>() {
    let fixture = F::start().await;
    let layer = layer(&fixture)
        .ttl(Duration::from_millis(300))
        .hold_through_body(true)
        .on_lease_lost(LeaseLostPolicy::Abort);
    // Long enough (10 s) that the renewal notices the loss well before the end.
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(streaming(200, Duration::from_millis(50)));
    let response = send(&service, request("s")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = tokio::spawn(response.into_body().collect());
    tokio::time::sleep(Duration::from_millis(150)).await;
    fixture.delete(&lock_name("s")).await;
    let collected = tokio::time::timeout(Duration::from_secs(20), body)
        .await
        .expect("the body did not end")
        .unwrap();
    let error = collected.expect_err("a body whose lease was lost ended cleanly (truncated)");
    assert!(error.to_string().contains("lease"), "{error}");
}

/// A layer on the fixture's backend whose releases wait for a permit of the returned gate, and
/// may take 30 s.
fn gated_releases<F: Fixture>(
    fixture: &F,
) -> (Arc<Semaphore>, LockLayer<Header, Wrapped<F::Backend>>) {
    let gate = Arc::new(Semaphore::new(0));
    let backend = Wrapped::new(fixture.backend()).releases(Releases::Gated(gate.clone()));
    let layer = layer_on(backend).release_timeout(Duration::from_secs(30));
    (gate, layer)
}

async fn background_release_returns_before_the_release_completes<F: Fixture>() {
    let fixture = F::start().await;
    let (gate, layer) = gated_releases(&fixture);
    let service = |background: bool| {
        ServiceBuilder::new()
            .layer(layer.clone().release_in_background(background))
            .service(answers(""))
    };
    // Control: by default the response waits for the (gated) release.
    let waiting = tokio::spawn(send(&service(false), request("a")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the gate does not hold the release");
    gate.add_permits(1);
    let response = waiting.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    until_held(&fixture, 0).await;

    // In the background: the response comes back while the release is still gated.
    let response = tokio::time::timeout(Duration::from_secs(5), send(&service(true), request("b")))
        .await
        .expect("the response waited for the release");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fixture.held().await, 1, "the release has not run yet");
    gate.add_permits(1);
    until_held(&fixture, 0).await;
}

/// With the release gated: a held-through body does not end before its release has completed
/// (deterministic on both backends), unless `release_in_background` is set.
async fn held_body_ends_after_its_release_unless_in_background<F: Fixture>() {
    let fixture = F::start().await;
    let (gate, layer) = gated_releases(&fixture);
    for background in [false, true] {
        let service = ServiceBuilder::new()
            .layer(
                layer
                    .clone()
                    .hold_through_body(true)
                    .release_in_background(background),
            )
            .service(answers("body"));
        let response = send(&service, request("k")).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = tokio::spawn(response.into_body().collect());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            body.is_finished(),
            background,
            "release_in_background = {background}"
        );
        assert_eq!(fixture.held().await, 1, "the release has not run yet");
        gate.add_permits(1);
        let body = body.await.unwrap().unwrap().to_bytes();
        assert_eq!(body, "body");
        until_held(&fixture, 0).await;
    }
}

/// A response body that says, as configured, whether it is over and whether its size is exactly
/// 0, and sends one data frame unless it is over.
struct Probe {
    ended: bool,
    exact_zero: bool,
}

impl http_body::Body for Probe {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if self.ended || self.exact_zero {
            return std::task::Poll::Ready(None);
        }
        self.ended = true;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from("body")))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.exact_zero {
            http_body::SizeHint::with_exact(0)
        } else {
            http_body::SizeHint::default()
        }
    }
}

/// A held-through response that has no body for the client to read — the answer to a HEAD, a
/// 204, a 304, a body known to be empty (by `is_end_stream` or an exact size of 0) — is not held
/// through its body (hyper drops such bodies unpolled, and the release would only be spawned):
/// the release completes before the response is returned, exactly as without hold-through-body.
/// A response with a body is returned at once, holding its lock. Each condition on its own.
async fn response_without_a_body_to_send_is_released_before_it_is_returned<F: Fixture>() {
    let fixture = F::start().await;
    let (gate, layer) = gated_releases(&fixture);
    let service = ServiceBuilder::new()
        .layer(layer.hold_through_body(true))
        .service(tower::service_fn(|req: Request<String>| async move {
            let kind = req.headers()["x-response"].to_str().unwrap().to_owned();
            let body = match kind.as_str() {
                // Knows it is over, but gives no exact size.
                "ended" => Probe {
                    ended: true,
                    exact_zero: false,
                },
                // Gives an exact size of 0, but does not say it is over.
                "sized-empty" => Probe {
                    ended: false,
                    exact_zero: true,
                },
                _ => Probe {
                    ended: false,
                    exact_zero: false,
                },
            };
            let mut response = Response::new(body);
            *response.status_mut() = match kind.as_str() {
                "204" => StatusCode::NO_CONTENT,
                "304" => StatusCode::NOT_MODIFIED,
                _ => StatusCode::OK,
            };
            Ok::<_, Infallible>(response)
        }));
    // (method, response kind, whether the response has a body to hold the lock through)
    let cases = [
        (Method::HEAD, "body", false),
        (Method::POST, "204", false),
        (Method::POST, "304", false),
        (Method::POST, "ended", false),
        (Method::POST, "sized-empty", false),
        (Method::POST, "body", true),
        (Method::GET, "body", true),
    ];
    for (method, kind, holds) in cases {
        let request = request("k")
            .method(method.clone())
            .header("x-response", kind);
        let call = tokio::spawn(send(&service, request));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            call.is_finished(),
            holds,
            "{method} answered {kind}: returned before its release = {}",
            call.is_finished()
        );
        assert_eq!(
            fixture.held().await,
            1,
            "{method} {kind}: the release has not run yet"
        );
        gate.add_permits(1);
        let response = call.await.unwrap();
        drop(response.into_body().collect().await.unwrap());
        until_held(&fixture, 0).await;
    }
}

suite!(
    response_without_a_body_to_send_is_released_before_it_is_returned,
    hold_through_body_releases_before_the_body_ends,
    held_body_ends_after_its_release_unless_in_background,
    lease_lost_mid_body_ends_the_body_with_an_error,
    background_release_returns_before_the_release_completes,
);

/// Calls the service from a thread without a Tokio runtime: the layer cannot run a backend call
/// there.
fn fail_open_without_a_runtime<F: Fixture>() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fixture = runtime.block_on(F::start());
    for fail_open in [true, false] {
        let calls = Arc::new(AtomicUsize::new(0));
        let handler = {
            let calls = calls.clone();
            tower::service_fn(move |_req: Request<String>| {
                calls.fetch_add(1, Ordering::SeqCst);
                std::future::ready(Ok::<_, Infallible>(Response::new(String::new())))
            })
        };
        let service = ServiceBuilder::new()
            .layer(layer(&fixture).fail_open(fail_open))
            .service(handler);
        let status = std::thread::spawn(move || {
            assert!(tokio::runtime::Handle::try_current().is_err());
            let mut call = std::pin::pin!(send(&service, request("k")));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            match call.as_mut().poll(&mut cx) {
                std::task::Poll::Ready(response) => response.status(),
                std::task::Poll::Pending => panic!("no runtime, yet the call is pending"),
            }
        })
        .join()
        .unwrap();
        if fail_open {
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                calls.load(Ordering::SeqCst),
                1,
                "fail-open calls the service"
            );
        } else {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(calls.load(Ordering::SeqCst), 0, "fail-closed calls nothing");
        }
    }
    drop(runtime);
}

blocking_suite!(
    fail_open_calls_the_service_without_a_runtime => fail_open_without_a_runtime,
    failed_cleanup_release_is_traced_and_counted => failed_cleanup_is_reported,
);

/// Runs `test` on a current-thread runtime (so spawned tasks run on this thread) under a
/// captured tracing subscriber and a local metrics recorder.
fn observed<T>(test: impl AsyncFnOnce() -> T) -> (T, String, metrics_util::debugging::Snapshotter) {
    let captured = Captured::default();
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = common::current_thread();
    let output = tracing::subscriber::with_default(captured.subscriber(), || {
        metrics::with_local_recorder(&recorder, || runtime.block_on(test()))
    });
    (output, captured.text(), snapshotter)
}

mod eviction_policy_that_can_drop_fences_is_warned {
    use super::*;

    fn warnings_on_connect(server: &RedisServer) -> String {
        let url = server.url();
        let ((), logs, _) = observed(async || {
            RedisBackend::connect(&url).await.unwrap();
        });
        logs
    }

    #[test]
    fn redis_backend() {
        let evicting = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
        let logs = warnings_on_connect(&evicting);
        assert!(logs.contains("WARN"), "{logs}");
        assert!(logs.contains("allkeys-lru"), "{logs}");
        assert!(logs.contains("fencing counters"), "{logs}");

        // Locks have an expiry, so `volatile-*` can evict a held lock.
        let volatile = RedisServer::start_with(&["--maxmemory-policy", "volatile-lru"]);
        let logs = warnings_on_connect(&volatile);
        assert!(logs.contains("WARN"), "{logs}");
        assert!(logs.contains("volatile-lru"), "{logs}");

        let default = RedisServer::start();
        let logs = warnings_on_connect(&default);
        assert!(!logs.contains("maxmemory_policy"), "{logs}");
    }
}

mod redis_backend_settings {
    use super::*;

    /// A server that accepts connections and never answers (a hung Redis behind a live socket):
    /// `connect` gives up after the response timeout of `RedisBackend::config`, not never.
    #[tokio::test]
    async fn connect_to_a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}/", listener.local_addr().unwrap());
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let started = tokio::time::Instant::now();
        let outcome =
            tokio::time::timeout(Duration::from_secs(10), RedisBackend::connect(&url)).await;
        assert!(
            matches!(outcome, Ok(Err(_))),
            "connect to a silent server did not fail by itself within 10 s"
        );
        assert!(
            started.elapsed() < Duration::from_secs(9),
            "{:?}",
            started.elapsed()
        );
        silent.abort();
    }

    /// A lease longer than Redis accepts for `PX` is clamped by the backend (callers of the
    /// trait are not bound by the layer's `MAX_TTL`), not sent as an invalid expire time.
    #[tokio::test]
    async fn a_huge_ttl_is_clamped_to_what_redis_accepts() {
        let fixture = Redis::start().await;
        let name = lock_name("huge");
        let token = LockToken::random();
        let acquired = fixture
            .backend()
            .acquire(&name, token, AcquireOptions::new(Duration::MAX))
            .await
            .unwrap();
        assert!(matches!(acquired, Acquire::Acquired { .. }), "{acquired:?}");
        let extended = fixture
            .backend()
            .extend(&name, token, Duration::MAX)
            .await
            .unwrap();
        assert_eq!(extended, tower_lock::backend::Extend::Extended);
    }

    #[tokio::test]
    async fn debug_names_the_backend_and_nothing_else() {
        let backend = RedisBackend::from_url("redis://user:secret@127.0.0.1:1/")
            .unwrap_or_else(|error| panic!("a lazy backend needs no server: {error}"));
        let debug = format!("{backend:?}");
        assert!(debug.starts_with("RedisBackend"), "{debug}");
        assert!(!debug.contains("secret"), "{debug}");
    }
}

fn failed_cleanup_is_reported<F: Fixture>() {
    let (fixture, logs, snapshotter) = observed(async || {
        let fixture = F::start().await;
        // The acquire lands, is answered with an error, and its clean-up fails.
        let backend = Wrapped::new(fixture.backend())
            .acquires(|_| Acquires::FailAfterLanding)
            .releases(Releases::Fail);
        let service = ServiceBuilder::new()
            .layer(layer_on(backend))
            .service(answers(""));
        let response = send(&service, request("k")).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        // The clean-up is spawned; let it run.
        tokio::time::sleep(Duration::from_millis(200)).await;
        fixture
    });
    drop(fixture);
    assert!(
        logs.contains("clean-up release after an abandoned acquire failed"),
        "{logs}"
    );
    let release_errors: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, _, _, _)| key.key().name() == "tower_lock_backend_errors_total")
        .filter(|(key, _, _, _)| {
            key.key()
                .labels()
                .any(|l| l.key() == "operation" && l.value() == "release")
        })
        .map(|(_, _, _, value)| match value {
            metrics_util::debugging::DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum();
    assert_eq!(release_errors, 1);
}

/// The status of a request whose acquire took exactly `took`, with a 1 s TTL and 100 ms minimum
/// validity.
async fn status_after_an_acquire_of(took: Duration) -> StatusCode {
    let (called, finish) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let backend = Wrapped::new(MemoryBackend::new()).acquires({
        let (called, finish) = (called.clone(), finish.clone());
        move |_| Acquires::Held {
            called: called.clone(),
            finish: finish.clone(),
        }
    });
    let service = ServiceBuilder::new()
        .layer(
            LockLayer::new(backend, Header::new("x-key"))
                .ttl(Duration::from_secs(1))
                .min_validity(Duration::from_millis(100))
                .acquire_timeout(Duration::from_secs(3600)),
        )
        .service(answers(""));
    let call = tokio::spawn(send(&service, request("k")));
    called.notified().await;
    tokio::time::advance(took).await;
    finish.notify_one();
    call.await.unwrap().status()
}

#[tokio::test(start_paused = true)]
async fn validity_equal_to_min_validity_is_accepted_and_just_under_is_refused() {
    assert_eq!(
        status_after_an_acquire_of(Duration::from_millis(900)).await,
        StatusCode::OK
    );
    assert_eq!(
        status_after_an_acquire_of(Duration::from_millis(901)).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

/// Redis-only: the backend's own answers, and connections that break.
mod redis_only {
    use super::*;
    use common::{Gate, Sendable};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_release_reports_each_outcome() {
        let fixture = Redis::start().await;
        let backend = fixture.backend();
        let name = lock_name("k");
        let options = AcquireOptions::new(Duration::from_secs(10));
        let ours = LockToken::random();
        assert!(matches!(
            backend.acquire(&name, ours, options).await.unwrap(),
            Acquire::Acquired { .. }
        ));
        assert_eq!(
            backend.release(&name, ours).await.unwrap(),
            Release::Released
        );
        assert_eq!(fixture.held().await, 0);
        assert_eq!(
            backend.release(&name, ours).await.unwrap(),
            Release::Expired
        );
        let theirs = LockToken::random();
        backend.acquire(&name, theirs, options).await.unwrap();
        assert_eq!(
            backend.release(&name, ours).await.unwrap(),
            Release::HeldByOther
        );
        assert_eq!(fixture.held().await, 1, "another holder's lock was touched");
    }

    /// Denies (or allows again) `EVALSHA` to the server's default user: the release script is
    /// refused while denied, as a release lost with a broken or overloaded connection fails.
    async fn evalsha_denied(server: &RedisServer, denied: bool) {
        let mut connection = server.connection().await;
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg(if denied { "-evalsha" } else { "+evalsha" })
            .query_async(&mut connection)
            .await
            .unwrap();
    }

    /// The lock layer with a 30 s lease and no fencing (its acquire is a plain `SET NX`, which
    /// the denial leaves alone) around a handler that waits for `gate`.
    fn gated_service(
        fixture: &Redis,
        gate: Gate,
    ) -> impl Sendable<Response = Response<tower_lock::LockBody<String>>> {
        ServiceBuilder::new()
            .layer(
                layer(fixture)
                    .ttl(Duration::from_secs(30))
                    .fencing(false)
                    .release_timeout(Duration::from_millis(200)),
            )
            .service(tower::service_fn(move |_: Request<String>| {
                let gate = gate.clone();
                async move {
                    gate.wait().await;
                    Ok::<_, Infallible>(Response::new(String::new()))
                }
            }))
    }

    /// A release Redis refuses is sent again until it lands: the lock goes within seconds of
    /// Redis taking releases again, not when its 30 s lease runs out (the soak's disconnect
    /// storms left locks behind for the whole lease when releases timed out on a loaded
    /// machine). Both ways a lock is released: when the response is ready, and in the
    /// background when the response future is dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_release_is_retried_until_it_lands() {
        let fixture = Redis::start().await;
        let name = lock_name("k");
        for dropped in [false, true] {
            let gate = Gate::new();
            let service = gated_service(&fixture, gate.clone());
            let call = tokio::spawn(send(&service, request("k")));
            until_held(&fixture, 1).await;
            evalsha_denied(&fixture.server, true).await;
            if dropped {
                call.abort();
                let _ = call.await;
            } else {
                gate.open();
                assert_eq!(call.await.unwrap().status(), StatusCode::OK);
            }
            // Refused (several times by now): still held.
            tokio::time::sleep(Duration::from_millis(700)).await;
            assert_eq!(fixture.held().await, 1, "dropped: {dropped}");
            evalsha_denied(&fixture.server, false).await;
            let allowed = std::time::Instant::now();
            assert!(
                eventually(Duration::from_secs(10), async || fixture.held().await == 0).await,
                "dropped: {dropped}: the lock stayed after Redis took releases again"
            );
            assert!(
                allowed.elapsed() < Duration::from_secs(5),
                "dropped: {dropped}: released {:?} after Redis took releases again",
                allowed.elapsed()
            );
            assert_eq!(fixture.backend.inspect(&name).await.unwrap(), Inspect::Free);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connection_refused_is_unavailable() {
        let mut server = RedisServer::start();
        let url = server.url();
        server.stop();
        let backend = RedisBackend::from_url(&url).unwrap();
        let name = lock_name("k");
        let error = backend
            .acquire(
                &name,
                LockToken::random(),
                AcquireOptions::new(Duration::from_secs(1)),
            )
            .await
            .expect_err("acquired on a stopped server");
        assert_eq!(error.kind(), BackendErrorKind::Unavailable, "{error}");
    }

    /// A TCP proxy in front of Redis that can hold back what clients send on the connections open
    /// so far, cut those connections on the client side (so the client reconnects), and deliver
    /// the held bytes later on the original server-side sockets: a request stuck on a broken
    /// connection that reaches Redis after everything the client sent since.
    struct Proxy {
        port: u16,
        connections: Arc<Mutex<Vec<mpsc::UnboundedSender<Command>>>>,
        held: Arc<AtomicUsize>,
    }

    enum Command {
        Hold,
        Cut,
        Deliver,
    }

    impl Proxy {
        async fn start(upstream: u16) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let connections: Arc<Mutex<Vec<mpsc::UnboundedSender<Command>>>> = Arc::default();
            let held = Arc::new(AtomicUsize::new(0));
            let registry = connections.clone();
            let counter = held.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (commands, inbox) = mpsc::unbounded_channel();
                    registry.lock().unwrap().push(commands);
                    tokio::spawn(relay(client, upstream, inbox, counter.clone()));
                }
            });
            Self {
                port,
                connections,
                held,
            }
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/", self.port)
        }

        fn to_open_connections(&self, command: impl Fn() -> Command) {
            for connection in self.connections.lock().unwrap().iter() {
                let _ = connection.send(command());
            }
        }
    }

    async fn relay(
        client: TcpStream,
        upstream: u16,
        mut inbox: mpsc::UnboundedReceiver<Command>,
        held_bytes: Arc<AtomicUsize>,
    ) {
        let server = TcpStream::connect(("127.0.0.1", upstream)).await.unwrap();
        let (mut from_client, mut to_client) = client.into_split();
        let (mut from_server, mut to_server) = server.into_split();
        let replies = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        });
        let holding = AtomicBool::new(false);
        let mut held = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            tokio::select! {
                read = from_client.read(&mut buffer) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) if holding.load(Ordering::SeqCst) => {
                        held.extend_from_slice(&buffer[..n]);
                        held_bytes.fetch_add(n, Ordering::SeqCst);
                    }
                    Ok(n) => {
                        if to_server.write_all(&buffer[..n]).await.is_err() {
                            return;
                        }
                    }
                },
                command = inbox.recv() => match command {
                    Some(Command::Hold) => holding.store(true, Ordering::SeqCst),
                    Some(Command::Cut) => break,
                    Some(Command::Deliver) | None => {}
                },
            }
        }
        // Cut: the client's socket closes; the server's stays open with the held bytes.
        replies.abort();
        drop(from_client);
        while let Some(command) = inbox.recv().await {
            if let Command::Deliver = command {
                let _ = to_server.write_all(&held).await;
                held.clear();
            }
        }
    }

    /// The clean-up of an acquire whose connection broke runs on a new connection; an acquire
    /// still held in the network can reach Redis after it. It then holds the key like a crashed
    /// holder's lock: other requests are refused (never a second holder beside it) for one TTL
    /// at most, and then the key is free. (Until issue 11, a tombstone checked by every acquire
    /// refused the late acquire; that check cost a script on every acquire.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_acquire_landing_after_its_clean_up_holds_the_key_one_ttl_at_most() {
        let fixture = Redis::start().await;
        let proxy = Proxy::start(fixture.server.port()).await;
        let backend = RedisBackend::connect(&proxy.url()).await.unwrap();
        let layer = layer_on(backend)
            .acquire_timeout(Duration::from_secs(5))
            .ttl(Duration::from_secs(2));
        let service = ServiceBuilder::new().layer(layer).service(answers(""));
        let send = |key: &str| send(&service, request(key));
        // Load the script, so the held request is one complete EVALSHA.
        assert_eq!(send("warm").await.status(), StatusCode::OK);
        let before_cleanup = fixture.server.command_calls("evalsha").await;

        // The acquire is sent and stuck on the wire; then the connection breaks.
        proxy.to_open_connections(|| Command::Hold);
        let stuck = tokio::spawn(send("k"));
        assert!(
            eventually(Duration::from_secs(5), async || proxy
                .held
                .load(Ordering::SeqCst)
                > 0)
            .await
        );
        proxy.to_open_connections(|| Command::Cut);
        let response = tokio::time::timeout(Duration::from_secs(10), stuck)
            .await
            .expect("the broken acquire never answered")
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        // Whether Redis gets a script call beyond the first `n` within 5 s.
        let evalsha_beyond = async |n| {
            let calls = async || fixture.server.command_calls("evalsha").await;
            eventually(Duration::from_secs(5), async || calls().await > n).await
        };
        // The clean-up runs on a new connection, finding nothing.
        assert!(
            evalsha_beyond(before_cleanup).await,
            "no clean-up reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;

        // Now the stuck acquire reaches Redis.
        let before_late = fixture.server.command_calls("evalsha").await;
        proxy.to_open_connections(|| Command::Deliver);
        assert!(
            evalsha_beyond(before_late).await,
            "the stuck acquire never reached Redis"
        );
        let landed = std::time::Instant::now();
        assert_eq!(fixture.held().await, 1, "the late acquire did not land");
        // Nobody holds it beside the orphan: requests are refused until it expires.
        assert_eq!(send("k").await.status(), StatusCode::CONFLICT);
        assert!(
            eventually(Duration::from_secs(4), async || fixture.held().await == 0).await,
            "the late acquire's lock outlived its TTL"
        );
        assert!(landed.elapsed() <= Duration::from_millis(2500));
        assert_eq!(send("k").await.status(), StatusCode::OK);
    }

    /// Red team (held): a release retried in the background never deletes a later holder's
    /// lock. The first release is refused (EVALSHA denied), the lock is deleted behind the
    /// layer's back and taken by another holder; once Redis takes releases again the retry
    /// lands as a compare-and-delete of the old token and leaves the new holder's lock alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retried_release_leaves_a_later_holders_lock_alone() {
        let fixture = Redis::start().await;
        let name = lock_name("k");
        let gate = Gate::new();
        let service = gated_service(&fixture, gate.clone());
        let call = tokio::spawn(send(&service, request("k")));
        until_held(&fixture, 1).await;
        evalsha_denied(&fixture.server, true).await;
        gate.open();
        assert_eq!(call.await.unwrap().status(), StatusCode::OK);
        // The release was refused; the retry keeps trying. Another holder takes the lock.
        tokio::time::sleep(Duration::from_millis(150)).await;
        fixture.delete(&name).await;
        let later = LockToken::random();
        assert!(matches!(
            fixture
                .backend
                .acquire(
                    &name,
                    later,
                    AcquireOptions::new(Duration::from_secs(30)).fencing(false)
                )
                .await
                .unwrap(),
            Acquire::Acquired { .. }
        ));
        evalsha_denied(&fixture.server, false).await;
        // Every retry (pauses up to 2 s) has landed by now.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(
            fixture.held().await,
            1,
            "the retried release deleted a later holder's lock"
        );
        assert_eq!(
            fixture.backend.release(&name, later).await.unwrap(),
            Release::Released
        );
    }

    /// Red team (fixed): an acquire that never reached Redis (nothing listens: the connection
    /// is refused) took nothing, so it leaves nothing to clean up. Before the fix every such
    /// request spawned a clean-up release retried in the background for the lock's whole TTL:
    /// while Redis was down one task per 503 piled up (a 30 s lease at 1000 requests/s: 30 000
    /// tasks, each sending every 2 s), and when Redis came back they all landed on it at once
    /// (here 21 calls for 20 requests), for locks that never existed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_acquire_refused_before_reaching_redis_sends_no_release_when_redis_returns() {
        let mut server = RedisServer::start();
        server.stop();
        let backend = RedisBackend::from_url(&server.url()).unwrap();
        let service = ServiceBuilder::new()
            .layer(layer_on(backend).ttl(Duration::from_secs(30)))
            .service(tower::service_fn(|_: Request<String>| async {
                Ok::<_, Infallible>(Response::new(String::new()))
            }));
        const REQUESTS: usize = 20;
        for i in 0..REQUESTS {
            let response = send(&service, request(&format!("k{i}"))).await;
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        server.restart();
        // The retries' pauses double up to 2 s: any still running has sent by now.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let releases = server.command_calls("evalsha").await + server.command_calls("eval").await;
        assert_eq!(
            releases, 0,
            "{releases} release calls reached the restarted Redis for {REQUESTS} acquires that never reached it"
        );
    }
}

/// Bodies go to hyper and axum from any thread: a held lock must not make the body `!Sync`.
#[test]
fn a_body_holding_a_lock_is_send_and_sync() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<tower_lock::LockBody<String>>();
}
