//! The demo gRPC service (`proto/demo.proto`) shared by `examples/grpc.rs` and `tests/grpc.rs`:
//! hand-written prost messages, the `tower_lock.demo.Jobs` server and a client, no protoc.
//!
//! Include it with `#[path = "support/jobs.rs"] mod jobs;` (from an example) or
//! `#[path = "../examples/support/jobs.rs"] mod jobs;` (from a test).
//!
//! | method | lock | what it does |
//! |---|---|---|
//! | `/tower_lock.demo.Jobs/Run` (unary) | `job:{x-job-id}` | sleeps `hold_ms`, answers `RunReply { id, fencing_token }` |
//! | `/tower_lock.demo.Jobs/Watch` (server streaming) | `job:{x-job-id}`, held until the stream ends or is cancelled | 5 `RunReply`s spread over `hold_ms` |
//!
//! The lock layer answers the rejections: `ABORTED` (with `grpc-retry-pushback-ms`) while
//! another call holds the job, `INVALID_ARGUMENT` without `x-job-id` metadata, `UNAVAILABLE`
//! when the lock store does not answer.
#![allow(dead_code)]

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use futures_util::future::BoxFuture;
use http::uri::PathAndQuery;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::Channel;
use tonic::{IntoRequest, Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;
use tower::{Layer, service_fn};
use tower_lock::key::KeyTemplate;
use tower_lock::{LockBackend, LockLayer, LockLease, MemoryBackend, RedisBackend};

/// The service's full name, as in `proto/demo.proto`.
pub const SERVICE: &str = "tower_lock.demo.Jobs";
/// The path of the unary method.
pub const RUN_PATH: &str = "/tower_lock.demo.Jobs/Run";
/// The path of the server-streaming method.
pub const WATCH_PATH: &str = "/tower_lock.demo.Jobs/Watch";
/// The metadata entry the calls are locked on.
pub const JOB_ID: &str = "x-job-id";
/// The lock key template: `job:{x-job-id}` (in Redis `tower-lock:{job:ID}`).
pub const JOB_KEY: &str = "job:{header.x-job-id}";
/// How many replies `Watch` streams.
pub const WATCH_REPLIES: u64 = 5;

/// `message RunRequest { string id = 1; uint64 hold_ms = 2; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct RunRequest {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(uint64, tag = "2")]
    pub hold_ms: u64,
}

/// `message RunReply { string id = 1; uint64 fencing_token = 2; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct RunReply {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(uint64, tag = "2")]
    pub fencing_token: u64,
}

/// The `Jobs` service, unlocked: the lock layer goes around it ([`routes`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct JobsServer;

impl NamedService for JobsServer {
    const NAME: &'static str = SERVICE;
}

/// The request's fencing token: the lock layer put its lease into the request's extensions,
/// and tonic hands them to the handler.
fn fencing_token<T>(request: &Request<T>) -> Result<u64, Status> {
    request
        .extensions()
        .get::<LockLease>()
        .map(LockLease::fencing_token)
        .ok_or_else(|| Status::internal("the lock layer does not wrap the Jobs service"))
}

fn hold(request: &RunRequest) -> Duration {
    Duration::from_millis(request.hold_ms)
}

async fn run(request: Request<RunRequest>) -> Result<Response<RunReply>, Status> {
    let fencing_token = fencing_token(&request)?;
    let message = request.into_inner();
    tokio::time::sleep(hold(&message)).await;
    Ok(Response::new(RunReply {
        id: message.id,
        fencing_token,
    }))
}

/// The stream of `Watch`: a reply, then one every `hold_ms / 4`, 5 in all.
type WatchStream = Pin<Box<dyn Stream<Item = Result<RunReply, Status>> + Send>>;

async fn watch(request: Request<RunRequest>) -> Result<Response<WatchStream>, Status> {
    let fencing_token = fencing_token(&request)?;
    let message = request.into_inner();
    let interval = hold(&message) / u32::try_from(WATCH_REPLIES - 1).unwrap_or(1);
    let reply = RunReply {
        id: message.id,
        fencing_token,
    };
    let stream = futures_util::stream::unfold(0, move |sent| {
        let reply = reply.clone();
        async move {
            if sent == WATCH_REPLIES {
                return None;
            }
            if sent > 0 {
                tokio::time::sleep(interval).await;
            }
            Some((Ok(reply), sent + 1))
        }
    });
    Ok(Response::new(Box::pin(stream) as WatchStream))
}

impl tower::Service<http::Request<Body>> for JobsServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match request.uri().path() {
            RUN_PATH => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                Ok(grpc.unary(service_fn(run), request).await)
            }),
            WATCH_PATH => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                Ok(grpc.server_streaming(service_fn(watch), request).await)
            }),
            other => {
                let status = Status::unimplemented(format!("no method {other}"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// The lock layer of the demo on `backend`: `job:{x-job-id}`, held through the response body
/// (so `Watch` holds its lock while it streams).
pub fn layer<B: LockBackend>(backend: B) -> LockLayer<KeyTemplate, B> {
    let key = KeyTemplate::parse(JOB_KEY).expect("the job key template is valid");
    LockLayer::new(backend, key).hold_through_body(true)
}

/// The locked `Jobs` service on `backend`, as tonic routes.
pub fn routes_on<B: LockBackend>(backend: B) -> Routes {
    Routes::new(layer(backend).layer(JobsServer))
}

/// The demo's routes: locks in Redis at `redis_url` (connected lazily, so the server starts while
/// Redis is down and answers `UNAVAILABLE` until it is up), or in process when it is `None`.
pub fn routes(redis_url: Option<&str>) -> redis::RedisResult<Routes> {
    Ok(match redis_url {
        None => routes_on(MemoryBackend::new()),
        Some(url) => routes_on(RedisBackend::from_url(url)?),
    })
}

/// Serves `routes` on `listener` until `shutdown` completes.
pub async fn serve(
    routes: Routes,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}

/// A client of the `Jobs` service.
#[derive(Clone, Debug)]
pub struct JobsClient {
    grpc: tonic::client::Grpc<Channel>,
}

impl JobsClient {
    /// Connects to `url` (`http://127.0.0.1:50051`).
    pub async fn connect(url: String) -> Result<Self, tonic::transport::Error> {
        let channel = tonic::transport::Endpoint::from_shared(url)?
            .connect()
            .await?;
        Ok(Self {
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.grpc
            .ready()
            .await
            .map_err(|error| Status::unavailable(format!("channel not ready: {error}")))
    }

    /// Calls `Run`.
    pub async fn run(
        &mut self,
        request: impl IntoRequest<RunRequest>,
    ) -> Result<Response<RunReply>, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static(RUN_PATH);
        self.grpc
            .unary(request.into_request(), path, ProstCodec::default())
            .await
    }

    /// Calls `Watch`.
    pub async fn watch(
        &mut self,
        request: impl IntoRequest<RunRequest>,
    ) -> Result<Response<Streaming<RunReply>>, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static(WATCH_PATH);
        self.grpc
            .server_streaming(request.into_request(), path, ProstCodec::default())
            .await
    }
}

/// A request for job `id` holding its lock `hold_ms`, with its `x-job-id` metadata (none when
/// `job` is `None`).
pub fn job_request(job: Option<&str>, id: &str, hold_ms: u64) -> Request<RunRequest> {
    let mut request = Request::new(RunRequest {
        id: id.to_owned(),
        hold_ms,
    });
    if let Some(job) = job {
        let value = job.parse().expect("a job id is ASCII metadata");
        request.metadata_mut().insert(JOB_ID, value);
    }
    request
}
