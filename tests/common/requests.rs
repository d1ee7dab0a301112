//! Requests, responses and the handlers the suites share.
//!
//! Handlers take their instructions from request headers: `x-gate` waits for a [`Gate`],
//! `x-hold-ms` holds the lock that long, `x-watch-lost` stops holding once the lease is lost.

use std::convert::Infallible;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Builder;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_lock::key::Header;
use tower_lock::{LockBackend, LockBody, LockLayer, LockLease};

use super::{Fixture, until_held};

// ---------------------------------------------------------------------------------------------
// Requests.

/// `POST /work`, locked on `key` by [`layer`](super::layer) (its `x-key` header).
pub fn request(key: &str) -> Builder {
    Request::post("/work").header("x-key", key)
}

/// `method uri`, nothing else.
pub fn call(method: Method, uri: &str) -> Builder {
    Request::builder().method(method).uri(uri)
}

/// `request`, with `x-gate` when `gated`: a handler with a [`Gate`] waits for it on such a
/// request.
pub fn gate_if(request: Builder, gated: bool) -> Builder {
    if gated {
        request.header("x-gate", "1")
    } else {
        request
    }
}

/// A request for [`holder`]: locked on `key`, held `ms` ms, or until the lease is lost.
pub fn holding(key: &str, ms: u64) -> Builder {
    request(key)
        .header("x-hold-ms", ms.to_string())
        .header("x-watch-lost", "1")
}

// ---------------------------------------------------------------------------------------------
// Sending requests and reading responses.

/// A service the helpers send requests through: it takes a `Request<String>`, can be cloned into
/// a task, and its errors can be printed.
pub trait Sendable:
    Service<Request<String>, Error: Debug, Future: Send> + Clone + Send + 'static
{
}

impl<S> Sendable for S where
    S: Service<Request<String>, Error: Debug, Future: Send> + Clone + Send + 'static
{
}

/// A body the helpers read to its end.
pub trait Readable: http_body::Body<Error: Debug> {}

impl<B: http_body::Body<Error: Debug>> Readable for B {}

/// Sends `request` (with an empty body) through a clone of `service`; the returned future owns
/// everything it needs, so it can be spawned. Panics if the service fails.
pub fn send<S: Sendable>(
    service: &S,
    request: Builder,
) -> impl Future<Output = S::Response> + Send + use<S> {
    let call = service
        .clone()
        .oneshot(request.body(String::new()).unwrap());
    async move { call.await.expect("handler error") }
}

/// Sends `request` as [`send`] does and reads the whole answer: its status and its body as text.
pub async fn answer<S, B>(service: &S, request: Builder) -> (StatusCode, String)
where
    S: Sendable<Response = Response<B>>,
    B: Readable,
{
    status_and_text(send(service, request).await).await
}

/// The status of `response` and its body as text.
pub async fn status_and_text<B: Readable>(response: Response<B>) -> (StatusCode, String) {
    (response.status(), body_text(response).await)
}

/// The `Retry-After` of `response`, in seconds; panics if there is none.
pub fn retry_after<B>(response: &Response<B>) -> u64 {
    let value = response.headers()[http::header::RETRY_AFTER].to_str();
    value.unwrap().parse().expect("Retry-After in seconds")
}

/// The whole body of `response`.
pub async fn body_bytes<B: Readable>(response: Response<B>) -> Bytes {
    response.into_body().collect().await.unwrap().to_bytes()
}

/// The body of `response` as text (bytes that are not UTF-8 replaced).
pub async fn body_text<B: Readable>(response: Response<B>) -> String {
    String::from_utf8_lossy(&body_bytes(response).await).into_owned()
}

/// The JSON body of `response` (problem+json, or a test handler's report).
pub async fn body_json<B: Readable>(response: Response<B>) -> serde_json::Value {
    serde_json::from_slice(&body_bytes(response).await).expect("a JSON body")
}

// ---------------------------------------------------------------------------------------------
// A request holding its lock while others come.

/// Sends `request` in the background (see [`send`]) and waits until it holds its lock, the only
/// lock held.
pub async fn start_holding<F, S>(
    fixture: &F,
    service: &S,
    request: Builder,
) -> tokio::task::JoinHandle<S::Response>
where
    F: Fixture,
    S: Sendable<Response: Send>,
{
    let holder = tokio::spawn(send(service, request));
    until_held(fixture, 1).await;
    holder
}

/// Sends `first` gated (its handler waits for `gate`) and, once it holds its lock (the only lock
/// held), `second`; then opens the gate. The responses: `first`'s, once it is done, and
/// `second`'s, which it got while `first` held the lock.
pub async fn while_held<F, S, B>(
    fixture: &F,
    service: &S,
    gate: &Gate,
    first: Builder,
    second: Builder,
) -> (Response<B>, Response<B>)
where
    F: Fixture,
    S: Sendable<Response = Response<B>>,
    B: Send + 'static,
{
    let holder = start_holding(fixture, service, first.header("x-gate", "1")).await;
    let during = send(service, second).await;
    gate.open();
    (holder.await.unwrap(), during)
}

/// Checks that the lock of `key` is still held (another request on it is refused: 409), then
/// that `holder`, a [`holder`] request holding it, ends `200 OK` without having lost its lease.
/// The holder's report.
pub async fn assert_held_throughout<S, B>(
    service: &S,
    key: &str,
    holder: tokio::task::JoinHandle<Response<B>>,
) -> serde_json::Value
where
    S: Sendable<Response = Response<B>>,
    B: Readable,
{
    let during = send(service, request(key)).await.status();
    assert_eq!(
        during,
        StatusCode::CONFLICT,
        "the lock of {key} was not held"
    );
    let response = holder.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let report = body_json(response).await;
    assert_eq!(report["lost"], false, "{report}");
    report
}

// ---------------------------------------------------------------------------------------------
// Handlers.

/// Holds gated requests (`x-gate`) until opened; stays open after that.
#[derive(Clone)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Default for Gate {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(false)))
    }
}

impl Gate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets every gated request through, now and later.
    pub fn open(&self) {
        self.0.send_replace(true);
    }

    /// Waits until the gate is open.
    pub async fn wait(&self) {
        let mut open = self.0.subscribe();
        let _ = open.wait_for(|open| *open).await;
    }

    /// Waits until the gate is open if `headers` has `x-gate`.
    pub async fn pass(&self, headers: &HeaderMap) {
        if headers.contains_key("x-gate") {
            self.wait().await;
        }
    }
}

/// The key of the lock a handler runs under (`lease`), or `unlocked`.
pub fn key_or_unlocked(lease: Option<&LockLease>) -> String {
    lease.map_or_else(
        || "unlocked".to_owned(),
        |lease| lease.name().lock_key().to_owned(),
    )
}

/// A handler answering [`key_or_unlocked`] for its request, once past `gate`.
pub fn echo<B>(
    gate: Gate,
) -> impl Service<Request<B>, Response = Response<B>, Error = Infallible, Future = impl Send>
+ Clone
+ Send
+ Sync
+ 'static
where
    B: From<String> + Send + 'static,
{
    tower::service_fn(move |request: Request<B>| {
        let gate = gate.clone();
        async move {
            gate.pass(request.headers()).await;
            let key = key_or_unlocked(request.extensions().get::<LockLease>());
            Ok(Response::new(B::from(key)))
        }
    })
}

/// A handler answering `text` to every request at once.
pub fn answers(
    text: &'static str,
) -> impl Service<Request<String>, Response = Response<String>, Error = Infallible, Future = impl Send>
+ Clone
+ Send
+ Sync
+ 'static {
    tower::service_fn(move |_request: Request<String>| {
        std::future::ready(Ok(Response::new(text.to_owned())))
    })
}

/// A handler answering a body of `chunks` lines (`chunk 0\n`, `chunk 1\n`, …), one every
/// `every`: the response comes at once, the body streams.
pub fn streaming(
    chunks: u32,
    every: Duration,
) -> impl Service<
    Request<String>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = Infallible> + Send + 'static>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_request: Request<String>| async move {
        let chunks = futures_util::stream::unfold(0, move |i| async move {
            if i == chunks {
                return None;
            }
            tokio::time::sleep(every).await;
            let frame = http_body::Frame::data(Bytes::from(format!("chunk {i}\n")));
            Some((Ok::<_, Infallible>(frame), i + 1))
        });
        Ok(Response::new(http_body_util::StreamBody::new(chunks)))
    })
}

/// A handler that holds its lock for `x-hold-ms` ms (returning early when its lease is lost, if
/// `x-watch-lost` is set) and answers what it saw:
/// `{"locked": bool, "fencing_token": n or null, "lost": bool, "elapsed_ms": n}`.
pub fn holder() -> impl Service<
    Request<String>,
    Response = Response<String>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    tower::service_fn(|request: Request<String>| async move {
        let started = Instant::now();
        let lease = request.extensions().get::<LockLease>().cloned();
        let hold = request
            .headers()
            .get("x-hold-ms")
            .map_or(0, |ms| ms.to_str().unwrap().parse().unwrap());
        let sleep = tokio::time::sleep(Duration::from_millis(hold));
        match (&lease, request.headers().contains_key("x-watch-lost")) {
            (Some(lease), true) => {
                tokio::select! {
                    _ = sleep => {}
                    _ = lease.lost() => {}
                }
            }
            _ => sleep.await,
        }
        let body = serde_json::json!({
            "locked": lease.is_some(),
            "fencing_token": lease.as_ref().map(LockLease::fencing_token),
            "lost": lease.as_ref().is_some_and(LockLease::is_lost),
            "elapsed_ms": started.elapsed().as_millis() as u64,
        });
        Ok(Response::new(body.to_string()))
    })
}

/// [`holder`] behind a lock layer, boxed.
pub type Holder = BoxCloneSyncService<Request<String>, Response<LockBody<String>>, Infallible>;

/// [`holder`] behind `layer`.
pub fn holder_behind<B: LockBackend>(layer: LockLayer<Header, B>) -> Holder {
    BoxCloneSyncService::new(ServiceBuilder::new().layer(layer).service(holder()))
}

// ---------------------------------------------------------------------------------------------
// Over HTTP.

/// Serves `app` over HTTP on a free loopback port: its base URL (`http://127.0.0.1:port`), and
/// the server's task (abort it when done).
pub async fn serve(app: axum::Router) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    (base, tokio::spawn(axum::serve(listener, app).into_future()))
}

/// Sends `n` requests `method {base}/{path}`, all locked on the same `x-key`, one after the
/// other, each read to the end as a client would before sending the next: their statuses and
/// bodies.
pub async fn in_a_row(
    base: &str,
    method: Method,
    path: &str,
    n: usize,
) -> Vec<(StatusCode, Bytes)> {
    let client = reqwest::Client::new();
    let mut answers = Vec::with_capacity(n);
    for _ in 0..n {
        let response = client
            .request(method.clone(), format!("{base}/{path}"))
            .header("x-key", "same-client")
            .send()
            .await
            .unwrap();
        let status = response.status();
        answers.push((status, response.bytes().await.unwrap()));
    }
    answers
}
