//! Per-request distributed locks for Tower stacks (axum, hyper, tonic, plain
//! `tower::Service`s), on Redis or in process.
//!
//! A [`LockLayer`] extracts a lock key from each request ([`key`]), acquires a lock in a
//! [`backend`] before calling the inner service, answers **409 Conflict** with `Retry-After` and
//! an RFC 9457 problem+json body when another request holds it, and releases the lock when the
//! response future completes — on success, on error, on panic and when the future is dropped.
//!
//! | situation | response |
//! |---|---|
//! | lock acquired | inner service called; lock released after its response future completes |
//! | key held by another request | **409** (at once, or after waiting up to `max` with [`LockLayer::wait`]), `Retry-After` (estimated from the route's observed hold times, else the holder's remaining lease; rounded up, ≥ 1 s), problem+json with `retry_after_ms` |
//! | extractor rejects the request | **400**, problem+json |
//! | the key can never be extracted on this route (server misconfiguration) | **500**, problem+json naming the fix, logged once per layer |
//! | backend unreachable / timed out | **503**, `Retry-After: 1`, problem+json (or the inner service, unlocked, with [`LockLayer::fail_open`]) |
//! | a gRPC call (`content-type: application/grpc…`) | the same rejections as gRPC statuses in a Trailers-Only response: see [`grpc`] |
//! | custom rejection | [`LockLayer::on_rejection`] overrides any of the above |
//!
//! Rejections are responses, never errors: `Error` stays the inner service's, so axum's
//! `Infallible` routers take the layer without `HandleErrorLayer`.
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response, StatusCode};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_lock::{LockLayer, MemoryBackend, key::Header};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let backend = MemoryBackend::new();
//! let mut service = ServiceBuilder::new()
//!     .layer(LockLayer::new(backend.clone(), Header::new("idempotency-key")))
//!     .service_fn(|_req: Request<()>| async {
//!         Ok::<_, Infallible>(Response::new(String::from("done")))
//!     });
//!
//! let request = || Request::post("/orders").header("idempotency-key", "k1").body(()).unwrap();
//! let response = service.ready().await.unwrap().call(request()).await.unwrap();
//! assert_eq!(response.status(), StatusCode::OK);
//! assert_eq!(backend.held(), 0); // released before the response was returned
//!
//! let no_key = Request::post("/orders").body(()).unwrap();
//! let response = service.ready().await.unwrap().call(no_key).await.unwrap();
//! assert_eq!(response.status(), StatusCode::BAD_REQUEST);
//! # }
//! ```
//!
//! The lease, its renewal, lease loss and fencing tokens are described on [`LockLease`].
//!
//! Code outside HTTP (a background job, a queue consumer, a CLI) takes the same locks through a
//! [`Locks`] engine: [`Locks::try_lock`] on a key built with
//! [`LockKey::literal`](key::LockKey::literal), which names the lock a route's key template
//! names. Layers built from the engine ([`Locks::layer`], [`LockPolicy::layer_with`]) share its
//! settings and renewal task. See [`locks`].
#![warn(missing_docs)]
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod acquire;
pub mod backend;
mod body;
mod config;
mod core;
mod deadline;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod extract;
mod future;
pub mod grpc;
mod guard;
pub mod idempotency;
pub mod key;
mod layer;
mod lease;
pub mod locks;
pub mod policy;
mod renewal;
mod response;
pub mod routes;
mod service;
mod settings;
mod telemetry;
mod wait;

#[cfg(feature = "sentinel")]
pub use crate::backend::RedisSentinelBackend;
pub use crate::backend::{
    LockBackend, MemoryBackend, RedisBackend, RedisClusterBackend, RedlockBackend,
};
pub use crate::body::LockBody;
pub use crate::config::LeaseLostPolicy;
pub use crate::future::ResponseFuture;
pub use crate::layer::LockLayer;
pub use crate::lease::LockLease;
pub use crate::locks::{Lock, Locks, TryLockError};
pub use crate::policy::LockPolicy;
pub use crate::response::{Rejection, problem_response};
pub use crate::routes::{LockRoutes, LockRoutesService, RouteError};
pub use crate::service::LockService;
/// The redis-rs this crate is built on, so that `RedisBackend::new(ConnectionManager)` and
/// friends need no version of your own to match.
pub use redis;

/// The README's examples, compiled as doctests.
#[cfg(all(doctest, feature = "axum", feature = "tonic"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
