//! gRPC: rejections as gRPC statuses, and the lock layers on tonic services.
//!
//! # Rejections a gRPC client understands
//!
//! A request whose `content-type` is `application/grpc` or `application/grpc+…` (`+proto`,
//! `+json`, …) is answered the way a gRPC client expects a failed call to end: a *Trailers-Only*
//! response (HTTP **200**, `content-type: application/grpc`, an empty body, and the status in the
//! headers), never a problem+json body, which a gRPC client would read as a broken frame. Every
//! other request keeps problem+json. [`LockLayer::on_rejection`](crate::LockLayer::on_rejection)
//! still overrides both (its handler can call [`Rejection::into_grpc_response`]).
//!
//! | rejection | HTTP (problem+json) | gRPC `grpc-status` | `grpc-retry-pushback-ms` |
//! |---|---|---|---|
//! | key held by another request ([`Conflict`](Rejection::Conflict)) | 409 | `ABORTED` (10) | [`Rejection::retry_after`] in ms (≥ 1): the layer's estimate of when the lock is free |
//! | key missing or invalid ([`InvalidKey`](Rejection::InvalidKey)) | 400 | `INVALID_ARGUMENT` (3) | none |
//! | backend unavailable or too slow ([`BackendUnavailable`](Rejection::BackendUnavailable)) | 503 | `UNAVAILABLE` (14) | 1000 |
//! | acquired with too little validity ([`InsufficientValidity`](Rejection::InsufficientValidity)) | 503 | `UNAVAILABLE` (14) | 1000 |
//! | lease lost under [`LeaseLostPolicy::Abort`](crate::LeaseLostPolicy::Abort) ([`LeaseLost`](Rejection::LeaseLost)); while a held-through body streams, in its trailers | 503 (an HTTP body ends with an error) | `UNAVAILABLE` (14) | 1000 |
//! | misconfigured key ([`MisconfiguredKey`](Rejection::MisconfiguredKey)) | 500 | `INTERNAL` (13) | none |
//!
//! `grpc-retry-pushback-ms` (the gRPC retry design's "retry after N ms") is sent where HTTP sends
//! `Retry-After`, with millisecond precision. `grpc-message` is the problem's `detail` text, percent-encoded as the gRPC
//! protocol requires (every byte outside printable ASCII, and `%`).
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_lock::{LockLayer, MemoryBackend, key::Header};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut service = ServiceBuilder::new()
//!     .layer(LockLayer::new(MemoryBackend::new(), Header::new("x-job-id")))
//!     .service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(String::new())) });
//! let request = Request::post("/tower_lock.demo.Jobs/Run")
//!     .header("content-type", "application/grpc")
//!     .body(())
//!     .unwrap();
//! let response = service.ready().await.unwrap().call(request).await.unwrap();
//! assert_eq!(response.status(), 200);
//! assert_eq!(response.headers()["grpc-status"], "3"); // INVALID_ARGUMENT: no x-job-id
//! assert_eq!(
//!     response.headers()["grpc-message"],
//!     "the request has no header `x-job-id`, which the lock key needs"
//! );
//! # }
//! ```
//!
//! # With tonic (feature `tonic`)
//!
//! [`LockService`](crate::LockService) and [`LockRoutesService`](crate::LockRoutesService)
//! implement tonic's `tonic::server::NamedService` when the service they wrap
//! does, so a locked service is added like any other:
//! `Server::builder().add_service(LockLayer::new(backend, key).layer(JobsServer::new(jobs)))`.
//! The layer also works for a whole server: `Server::builder().layer(layer)`. Streaming methods
//! need [`hold_through_body(true)`](crate::LockLayer::hold_through_body): a tonic handler returns
//! its stream at once, and the lock is then held until the stream ends (its trailers are sent)
//! or the client cancels the call (the stream is dropped). With it, unary calls are released
//! just before their trailers are sent.
//!
//! **Keys from metadata.** gRPC metadata are HTTP/2 headers, so [`Header`](crate::key::Header)
//! and the `{header.NAME}` placeholder of a [`KeyTemplate`](crate::key::KeyTemplate) read them:
//! `Header::new("x-job-id")`, `"job:{header.x-job-id}"`. A call without that metadata gets
//! `INVALID_ARGUMENT`. (A binary `-bin` entry is read as its base64 text.)
//!
//! **Keys from the method.** The path of a gRPC request is `/package.Service/Method`. To lock per
//! method, give a template the service's pattern and name the method with `{path.NAME}`:
//! `KeyTemplate::parse("jobs.{path.method}:{header.x-job-id}")?.with_pattern("/tower_lock.demo.Jobs/{method}")?`
//! locks `Run` and `Stop` of one job apart. To lock only some methods, put them in a
//! [`LockRoutes`](crate::LockRoutes) table (one route per method path, e.g.
//! `.route("/tower_lock.demo.Jobs/Run", policy)?`; other methods pass through unlocked), where
//! `{matched_path}` is the full method path.
//!
//! **The lease in the handler.** The [`LockLease`](crate::LockLease) is put into the request's
//! extensions, which tonic hands over: `request.extensions().get::<LockLease>()` on the
//! `tonic::Request` gives it, with its [fencing token](crate::LockLease::fencing_token).
//!
#![cfg_attr(
    feature = "tonic",
    doc = r#"
```
use tonic::{Request, Status};
use tower_lock::LockLease;

// In a tonic handler (`async fn run(&self, request: Request<RunRequest>) -> …`):
fn fencing_token<T>(request: &Request<T>) -> Result<u64, Status> {
    request
        .extensions()
        .get::<LockLease>()
        .map(LockLease::fencing_token)
        .ok_or_else(|| Status::internal("the lock layer does not wrap this service"))
}
```
"#
)]
//!
//! Rejections turn into a `tonic::Status` too (`Status::from(rejection)`), for code that takes
//! locks itself with [`Locks`](crate::Locks).
//!
//! `examples/grpc.rs` is a complete tonic server (`proto/demo.proto`).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::response::Rejection;

/// The gRPC status codes the layer answers with.
mod code {
    pub(super) const INVALID_ARGUMENT: i32 = 3;
    pub(super) const ABORTED: i32 = 10;
    pub(super) const INTERNAL: i32 = 13;
    pub(super) const UNAVAILABLE: i32 = 14;
}

/// `grpc-message` percent-encodes every byte outside printable ASCII (0x20–0x7E), and `%`
/// (non-ASCII bytes are always encoded by `percent_encoding`).
const GRPC_MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

/// Whether a request with these headers is a gRPC call: its `content-type` is
/// `application/grpc`, or `application/grpc+…` (`+proto`, `+json`), in any case, with or
/// without parameters. gRPC-Web (`application/grpc-web…`) is not: it keeps problem+json.
///
/// ```
/// use http::{HeaderMap, HeaderValue, header::CONTENT_TYPE};
///
/// let mut headers = HeaderMap::new();
/// headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc+proto"));
/// assert!(tower_lock::grpc::is_grpc(&headers));
/// headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
/// assert!(!tower_lock::grpc::is_grpc(&headers));
/// ```
pub fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    let value = value.as_bytes();
    let prefix = b"application/grpc";
    value.len() >= prefix.len()
        && value[..prefix.len()].eq_ignore_ascii_case(prefix)
        && matches!(
            value.get(prefix.len()),
            None | Some(b'+' | b';' | b' ' | b'\t')
        )
}

impl Rejection {
    /// The gRPC status code of this rejection (see the [table](crate::grpc)): `ABORTED` (10),
    /// `INVALID_ARGUMENT` (3), `UNAVAILABLE` (14) or `INTERNAL` (13).
    ///
    /// ```
    /// use tower_lock::Rejection;
    ///
    /// assert_eq!(Rejection::Conflict { remaining: None, retry_after: None }.grpc_code(), 10);
    /// ```
    pub fn grpc_code(&self) -> i32 {
        match self {
            Self::Conflict { .. } => code::ABORTED,
            Self::InvalidKey(_) => code::INVALID_ARGUMENT,
            Self::MisconfiguredKey(_) => code::INTERNAL,
            Self::BackendUnavailable(_) | Self::InsufficientValidity { .. } | Self::LeaseLost => {
                code::UNAVAILABLE
            }
        }
    }

    /// The `grpc-retry-pushback-ms` of the gRPC response: where HTTP sends `Retry-After`,
    /// [`Rejection::retry_after`] in milliseconds, rounded up, at least 1. For a conflict: the
    /// layer's estimate of when the lock is free; for a backend failure or lost lease: 1000; for
    /// a bad or misconfigured key: none.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_lock::Rejection;
    ///
    /// let held = Rejection::Conflict {
    ///     remaining: Some(Duration::from_secs(9)),
    ///     retry_after: Some(Duration::from_micros(2_500_100)),
    /// };
    /// assert_eq!(held.grpc_retry_pushback_ms(), Some(2501));
    /// ```
    pub fn grpc_retry_pushback_ms(&self) -> Option<u64> {
        self.retry_after().map(|after| ceil_millis(after).max(1))
    }

    /// The text of `grpc-message`, before percent-encoding: the problem+json `detail`.
    pub fn grpc_message(&self) -> String {
        self.problem().2
    }

    /// The gRPC response to a gRPC call: a Trailers-Only response (HTTP 200,
    /// `content-type: application/grpc`, empty body) with `grpc-status`, the percent-encoded
    /// `grpc-message` and, where retrying helps, `grpc-retry-pushback-ms`. The layer sends it
    /// to every [gRPC request](is_grpc) unless [`on_rejection`](crate::LockLayer::on_rejection)
    /// is set.
    ///
    /// ```
    /// use tower_lock::Rejection;
    ///
    /// let response = Rejection::Conflict { remaining: None, retry_after: None }.into_grpc_response();
    /// assert_eq!(response.status(), 200);
    /// assert_eq!(response.headers()["grpc-status"], "10");
    /// assert_eq!(response.headers()["grpc-retry-pushback-ms"], "1000");
    /// assert!(response.body().is_empty());
    /// ```
    pub fn into_grpc_response(self) -> Response<Bytes> {
        let mut response = Response::new(Bytes::new());
        *response.status_mut() = StatusCode::OK;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        self.insert_grpc_status(headers);
        response
    }

    /// `grpc-status`, `grpc-message` and `grpc-retry-pushback-ms`, in headers or trailers.
    fn insert_grpc_status(&self, headers: &mut HeaderMap) {
        headers.insert("grpc-status", HeaderValue::from(self.grpc_code()));
        let message = utf8_percent_encode(&self.grpc_message(), GRPC_MESSAGE).to_string();
        // Percent-encoded text is visible ASCII: always a valid header value.
        if let Ok(message) = HeaderValue::from_str(&message) {
            headers.insert("grpc-message", message);
        }
        if let Some(ms) = self.grpc_retry_pushback_ms() {
            headers.insert("grpc-retry-pushback-ms", HeaderValue::from(ms));
        }
    }
}

/// The trailers that end a gRPC response held through its body whose lease is lost under
/// [`LeaseLostPolicy::Abort`](crate::LeaseLostPolicy::Abort): `UNAVAILABLE`, as for a lease lost
/// before the handler answered, instead of a reset stream the client would report as `INTERNAL`.
pub(crate) fn lease_lost_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    Rejection::LeaseLost.insert_grpc_status(&mut trailers);
    trailers
}

fn ceil_millis(duration: Duration) -> u64 {
    let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    millis.saturating_add(u64::from(
        !duration.subsec_nanos().is_multiple_of(1_000_000),
    ))
}

#[cfg(feature = "tonic")]
mod tonic_support;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{HeaderMap, HeaderValue, header};

    use super::*;
    use crate::backend::{BackendError, BackendErrorKind};
    use crate::key::KeyRejection;

    fn content_type(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn grpc_content_types_are_recognised_and_lookalikes_are_not() {
        for grpc in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc+json",
            "Application/GRPC",
            "application/grpc; charset=utf-8",
        ] {
            assert!(is_grpc(&content_type(grpc)), "{grpc}");
        }
        for other in [
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/grpcx",
            "application/json",
            "application/problem+json",
            "text/plain",
        ] {
            assert!(!is_grpc(&content_type(other)), "{other}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn every_rejection_maps_to_the_status_of_the_table() {
        let unavailable = BackendError::new(BackendErrorKind::Unavailable, "down");
        for (rejection, code, pushback) in [
            (
                Rejection::Conflict {
                    remaining: Some(Duration::from_millis(1500)),
                    retry_after: None,
                },
                10,
                Some(1500),
            ),
            (
                Rejection::Conflict {
                    remaining: Some(Duration::from_millis(9000)),
                    retry_after: Some(Duration::from_millis(120)),
                },
                10,
                Some(120),
            ),
            (
                Rejection::Conflict {
                    remaining: None,
                    retry_after: None,
                },
                10,
                Some(1000),
            ),
            (
                Rejection::Conflict {
                    remaining: Some(Duration::ZERO),
                    retry_after: None,
                },
                10,
                Some(1),
            ),
            (
                Rejection::from(KeyRejection::missing_header(http::HeaderName::from_static(
                    "x-job-id",
                ))),
                3,
                None,
            ),
            (Rejection::from(KeyRejection::new("bad")), 3, None),
            (
                Rejection::from(KeyRejection::misconfigured("fix it")),
                13,
                None,
            ),
            (Rejection::BackendUnavailable(unavailable), 14, Some(1000)),
            (
                Rejection::InsufficientValidity {
                    validity: Duration::from_millis(3),
                },
                14,
                Some(1000),
            ),
            (Rejection::LeaseLost, 14, Some(1000)),
        ] {
            let message = rejection.grpc_message();
            let response = rejection.into_grpc_response();
            assert_eq!(response.status(), StatusCode::OK);
            let headers = response.headers();
            assert_eq!(headers[header::CONTENT_TYPE], "application/grpc");
            assert_eq!(headers["grpc-status"], code.to_string().as_str());
            assert!(!message.is_empty());
            assert_eq!(
                headers
                    .get("grpc-retry-pushback-ms")
                    .map(|v| v.to_str().unwrap().to_owned()),
                pushback.map(|ms: u64| ms.to_string())
            );
            assert!(!headers.contains_key(header::RETRY_AFTER));
            assert!(response.body().is_empty());
        }
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        let rejection = Rejection::from(KeyRejection::new("100% wrong: ünïcode\r\nand a tab\t."));
        let response = rejection.into_grpc_response();
        assert_eq!(
            response.headers()["grpc-message"],
            "100%25 wrong: %C3%BCn%C3%AFcode%0D%0Aand a tab%09."
        );
    }

    #[test]
    fn pushback_rounds_up_to_the_millisecond() {
        assert_eq!(ceil_millis(Duration::from_micros(1)), 1);
        assert_eq!(ceil_millis(Duration::from_millis(7)), 7);
        assert_eq!(ceil_millis(Duration::from_nanos(7_000_001)), 8);
        assert_eq!(ceil_millis(Duration::MAX), u64::MAX);
    }
}
