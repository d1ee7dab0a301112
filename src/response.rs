//! Rejections and their RFC 9457 `application/problem+json` responses.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::backend::{BackendError, FailureReason};
use crate::key::{KeyRejection, KeyRejectionKind};

/// Why the layer answered instead of the inner service.
///
/// Each rejection has a default response ([`Rejection::into_response`]); replace it with
/// [`LockLayer::on_rejection`](crate::LockLayer::on_rejection).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Rejection {
    /// Another request holds the lock: **409 Conflict**.
    Conflict {
        /// How long the holder's lease has left, if known.
        remaining: Option<Duration>,
        /// When the lock is likely free: estimated from the hold times the layer observed on
        /// this route and the local waiters ahead (see [`Rejection::retry_after`]); `None`
        /// before any hold time was observed.
        retry_after: Option<Duration>,
    },
    /// The key extractor rejected the request, which lacks or garbles a part the key needs
    /// ([`KeyRejectionKind::Missing`] or [`KeyRejectionKind::Invalid`]): **400 Bad Request**.
    InvalidKey(KeyRejection),
    /// The key extractor can key no request on this route: the server is misconfigured
    /// ([`KeyRejectionKind::Misconfigured`], e.g. a `{path.NAME}` the route pattern does not
    /// have): **500 Internal Server Error**.
    MisconfiguredKey(KeyRejection),
    /// The backend failed or timed out (fail-closed): **503 Service Unavailable**.
    BackendUnavailable(BackendError),
    /// The lock was acquired, but with less validity left than the configured minimum:
    /// **503 Service Unavailable**.
    InsufficientValidity {
        /// The validity that was left.
        validity: Duration,
    },
    /// The lease was lost while the handler ran, and the layer's policy is
    /// [`LeaseLostPolicy::Abort`](crate::LeaseLostPolicy::Abort): **503 Service Unavailable**.
    LeaseLost,
}

impl Rejection {
    /// The status code of the default response.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::InvalidKey(_) => StatusCode::BAD_REQUEST,
            Self::MisconfiguredKey(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::BackendUnavailable(_) | Self::InsufficientValidity { .. } | Self::LeaseLost => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// When retrying is likely to succeed, as precisely as the layer knows it.
    ///
    /// For a conflict: the layer's estimate of when the lock is free. The layer keeps a moving
    /// average of how long requests on this route held the lock (from lock to release: the
    /// handler's response, or the end of the body under
    /// [`hold_through_body`](crate::LockLayer::hold_through_body); 1/8 weight to the newest),
    /// and estimates that the holder and each local
    /// waiter ahead will hold it that long; when the lease is not renewed, the holder's turn
    /// ends with its remaining lease at the latest. Before any hold time was observed, the
    /// holder's remaining lease (which renewal keeps near the TTL, so it is an upper bound). For
    /// a backend failure or lost lease: 1 s. For a bad or misconfigured key: none (retrying
    /// will not help).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Conflict {
                retry_after: Some(estimate),
                ..
            } => Some(*estimate),
            Self::Conflict {
                remaining: Some(remaining),
                ..
            } => Some(*remaining),
            Self::Conflict {
                remaining: None, ..
            } => Some(Duration::from_secs(1)),
            Self::InvalidKey(_) | Self::MisconfiguredKey(_) => None,
            Self::BackendUnavailable(_) | Self::InsufficientValidity { .. } | Self::LeaseLost => {
                Some(Duration::from_secs(1))
            }
        }
    }

    /// The `Retry-After` the default response carries, in whole seconds:
    /// [`Rejection::retry_after`] rounded up, at least 1 (the response's problem+json body
    /// carries it in milliseconds too, as `retry_after_ms`).
    ///
    /// For a conflict: the layer's estimate of when the lock is free (or the holder's remaining
    /// lease). For a backend failure or lost lease: 1. For a bad or misconfigured key: none
    /// (retrying will not help).
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::Conflict { .. } => self.retry_after().map(|after| ceil_secs(after).max(1)),
            Self::InvalidKey(_) | Self::MisconfiguredKey(_) => None,
            Self::BackendUnavailable(_) | Self::InsufficientValidity { .. } | Self::LeaseLost => {
                Some(1)
            }
        }
    }

    pub(crate) fn problem(&self) -> (&'static str, &'static str, String) {
        match self {
            Self::Conflict { .. } => (
                "urn:tower-lock:lock-held",
                "The resource is locked by another request",
                "Another request holds the lock for this resource; retry after it finishes."
                    .to_owned(),
            ),
            Self::InvalidKey(rejection) => (
                "urn:tower-lock:invalid-lock-key",
                "The request cannot be locked",
                rejection.detail().to_owned(),
            ),
            Self::MisconfiguredKey(rejection) => (
                "urn:tower-lock:misconfigured-key",
                "The lock key of this route is misconfigured",
                rejection.detail().to_owned(),
            ),
            Self::BackendUnavailable(error) => (
                "urn:tower-lock:backend-unavailable",
                "The lock service is unavailable",
                // The backend error itself goes to the logs, not to clients: only its reason.
                backend_detail(error).to_owned(),
            ),
            Self::InsufficientValidity { validity } => (
                "urn:tower-lock:insufficient-validity",
                "The lock was acquired too late to be safe",
                format!(
                    "The lock had only {} ms of validity left after acquiring it.",
                    validity.as_millis()
                ),
            ),
            Self::LeaseLost => (
                "urn:tower-lock:lease-lost",
                "The lock was lost while the request was processed",
                "The request's lock expired or was taken over before it finished; its work was \
                 abandoned."
                    .to_owned(),
            ),
        }
    }

    /// The default response: the status, `Retry-After` where retrying helps, and an RFC 9457
    /// problem+json body with `type`, `title`, `status` and `detail`.
    pub fn into_response(self) -> Response<Bytes> {
        let status = self.status();
        let (kind, title, detail) = self.problem();
        let retry_after_ms = self
            .retry_after()
            .map(|after| u64::try_from(after.as_millis()).unwrap_or(u64::MAX).max(1));
        problem(
            status,
            kind,
            title,
            &detail,
            self.retry_after_secs(),
            retry_after_ms,
        )
    }

    /// The default response to a request: a gRPC status ([`Rejection::into_grpc_response`]) for a
    /// [gRPC call](crate::grpc::is_grpc), problem+json ([`Rejection::into_response`]) otherwise.
    pub(crate) fn into_response_for(self, grpc: bool) -> Response<Bytes> {
        if grpc {
            self.into_grpc_response()
        } else {
            self.into_response()
        }
    }
}

/// The 503 detail for a backend failure: what happened, never the error's own message (which
/// may name hosts or keys).
fn backend_detail(error: &BackendError) -> &'static str {
    match error.reason() {
        FailureReason::TimedOut => {
            "The lock could not be acquired because the lock store did not answer in time."
        }
        FailureReason::Refused => {
            "The lock could not be acquired because the lock store refused or closed the \
             connection."
        }
        FailureReason::Denied => {
            "The lock could not be acquired because the lock store denied access (credentials or \
             permissions)."
        }
        FailureReason::Tls => {
            "The lock could not be acquired because the TLS connection to the lock store failed."
        }
        _ => "The lock could not be acquired because the lock store failed.",
    }
}

/// A key rejection as the layer answers it: [`Rejection::MisconfiguredKey`] (500) for a
/// [misconfiguration](KeyRejectionKind::Misconfigured), [`Rejection::InvalidKey`] (400) for the
/// rest.
impl From<KeyRejection> for Rejection {
    fn from(rejection: KeyRejection) -> Self {
        match rejection.kind() {
            KeyRejectionKind::Misconfigured => Self::MisconfiguredKey(rejection),
            _ => Self::InvalidKey(rejection),
        }
    }
}

/// Builds an RFC 9457 problem+json response.
pub fn problem_response(
    status: StatusCode,
    kind: &str,
    title: &str,
    detail: &str,
    retry_after_secs: Option<u64>,
) -> Response<Bytes> {
    problem(status, kind, title, detail, retry_after_secs, None)
}

/// [`problem_response`], with `retry_after_ms` in the body when given.
fn problem(
    status: StatusCode,
    kind: &str,
    title: &str,
    detail: &str,
    retry_after_secs: Option<u64>,
    retry_after_ms: Option<u64>,
) -> Response<Bytes> {
    let mut body = serde_json::json!({
        "type": kind,
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    if let (Some(ms), Some(fields)) = (retry_after_ms, body.as_object_mut()) {
        fields.insert("retry_after_ms".to_owned(), ms.into());
    }
    let mut response = Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let Some(secs) = retry_after_secs {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

fn ceil_secs(duration: Duration) -> u64 {
    duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_the_holders_lease_up_and_is_at_least_one() {
        let conflict = |ms| Rejection::Conflict {
            remaining: Some(Duration::from_millis(ms)),
            retry_after: None,
        };
        assert_eq!(conflict(0).retry_after_secs(), Some(1));
        assert_eq!(conflict(1).retry_after_secs(), Some(1));
        assert_eq!(conflict(1000).retry_after_secs(), Some(1));
        assert_eq!(conflict(1001).retry_after_secs(), Some(2));
        assert_eq!(
            Rejection::InvalidKey(KeyRejection::new("x")).retry_after_secs(),
            None
        );
    }

    #[test]
    fn key_rejections_are_answered_by_kind() {
        for (rejection, status, kind) in [
            (
                KeyRejection::new("bad"),
                StatusCode::BAD_REQUEST,
                "urn:tower-lock:invalid-lock-key",
            ),
            (
                KeyRejection::missing("header `x`"),
                StatusCode::BAD_REQUEST,
                "urn:tower-lock:invalid-lock-key",
            ),
            (
                KeyRejection::misconfigured("fix the route"),
                StatusCode::INTERNAL_SERVER_ERROR,
                "urn:tower-lock:misconfigured-key",
            ),
        ] {
            let detail = rejection.detail().to_owned();
            let rejection = Rejection::from(rejection);
            assert_eq!(rejection.status(), status);
            assert_eq!(rejection.retry_after_secs(), None);
            let response = rejection.into_response();
            assert_eq!(response.status(), status);
            assert!(!response.headers().contains_key(header::RETRY_AFTER));
            let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
            assert_eq!(body["type"], kind);
            assert_eq!(body["status"], status.as_u16());
            assert_eq!(body["detail"], detail);
        }
    }

    #[test]
    fn a_backend_failures_detail_says_what_happened_and_nothing_else() {
        use crate::backend::BackendErrorKind;
        for (reason, says) in [
            (FailureReason::TimedOut, "did not answer in time"),
            (FailureReason::Refused, "refused or closed the connection"),
            (FailureReason::Denied, "denied access"),
            (
                FailureReason::Tls,
                "TLS connection to the lock store failed",
            ),
            (FailureReason::Other, "the lock store failed"),
        ] {
            let error = BackendError::new(BackendErrorKind::Unavailable, "redis: secret-host:6380")
                .with_reason(reason);
            let response = Rejection::BackendUnavailable(error).into_response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()[header::RETRY_AFTER], "1");
            let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
            assert_eq!(body["type"], "urn:tower-lock:backend-unavailable");
            let detail = body["detail"].as_str().unwrap();
            assert!(detail.contains(says), "{reason:?}: {detail}");
            assert!(!response_text(&response).contains("secret-host"));
        }
        // A layer timeout is a timeout.
        let error = BackendError::new(BackendErrorKind::Timeout, "acquire timed out");
        let body = Rejection::BackendUnavailable(error).into_response();
        assert!(response_text(&body).contains("did not answer in time"));
    }

    fn response_text(response: &Response<Bytes>) -> String {
        String::from_utf8_lossy(response.body()).into_owned()
    }

    #[test]
    fn conflict_is_problem_json() {
        let response = Rejection::Conflict {
            remaining: Some(Duration::from_millis(2500)),
            retry_after: None,
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["status"], 409);
        assert!(body["title"].is_string() && body["type"].is_string());
        assert!(body["detail"].is_string());
        assert_eq!(body["retry_after_ms"], 2500);
    }

    #[test]
    fn a_conflicts_estimate_wins_over_the_holders_lease() {
        let rejection = Rejection::Conflict {
            remaining: Some(Duration::from_secs(10)),
            retry_after: Some(Duration::from_millis(1200)),
        };
        assert_eq!(rejection.retry_after_secs(), Some(2));
        let response = rejection.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["retry_after_ms"], 1200);
    }
}
