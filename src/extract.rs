//! Handler access to the lock with axum (feature `axum`).
//!
//! [`LockLease`] and [`FencingToken`] are axum extractors. `Option<LockLease>` works on routes
//! that may or may not be locked; plain `LockLease` answers 500 when the route is not protected
//! (a wiring mistake, not a client error).
//!
//! ```
//! use axum::{Router, routing::post};
//! use tower_lock::{LockLease, LockPolicy, MemoryBackend, extract::FencingToken};
//!
//! async fn deposit(lease: LockLease, FencingToken(token): FencingToken) -> String {
//!     // Pass `token` to the storage you write to; check `lease.is_lost()` before committing.
//!     format!("fencing token {token}, lost: {}", lease.is_lost())
//! }
//!
//! # fn main() -> Result<(), tower_lock::key::TemplateError> {
//! let app: Router = Router::new()
//!     .route("/accounts/{id}/deposit", post(deposit))
//!     .route_layer(LockPolicy::template("account:{path.id}")?.layer(MemoryBackend::new()));
//! # Ok(()) }
//! ```
//!
//! Without axum, read the lease from the request: `req.extensions().get::<LockLease>()`.

use std::convert::Infallible;

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;

use crate::lease::LockLease;
use crate::response::problem_response;

/// The fencing token of the request's lock, as an axum extractor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FencingToken(pub u64);

/// The rejection of [`LockLease`] and [`FencingToken`] on a route without a lock layer: 500.
#[derive(Clone, Copy, Debug)]
pub struct MissingLease;

impl IntoResponse for MissingLease {
    fn into_response(self) -> Response {
        problem_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "urn:tower-lock:missing-lease",
            "The handler expected a lock that this route does not take",
            "The route is not protected by a tower-lock layer, or the request was not locked.",
            None,
        )
        .map(axum::body::Body::from)
        .into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for LockLease {
    type Rejection = MissingLease;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<LockLease>()
            .cloned()
            .ok_or(MissingLease)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for LockLease {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<LockLease>().cloned())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for FencingToken {
    type Rejection = MissingLease;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<LockLease>()
            .map(|lease| FencingToken(lease.fencing_token()))
            .ok_or(MissingLease)
    }
}
