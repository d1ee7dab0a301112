//! Lock keys: what a request is locked on, and how it is extracted.
//!
//! A [`KeyExtractor`] looks at a request's head (method, URI, headers, extensions) and answers:
//!
//! - `Ok(Some(key))`: lock on `key` before calling the inner service;
//! - `Ok(None)`: this request needs no lock, call the inner service directly;
//! - `Err(rejection)`: the request cannot be keyed, answer **400** with a problem+json body.
//!
//! Closures with the right signature are extractors, and the built-ins in this module cover the
//! usual sources: [`Header`], [`Query`], [`PathParam`], [`PathSegment`] and [`Global`], combined
//! with [`KeyExtractorExt::and`].
//!
//! # Key hygiene
//!
//! User-controlled material (a header value, a query parameter) goes through [`LockKey::new`],
//! which percent-escapes every byte that is not printable ASCII and every byte that has a meaning
//! in our key layout (`%`, `:`, `{`, `}`, `#`). So material is binary-safe, parts joined with `:`
//! never run into each other, and braces in user input can never choose a Redis Cluster hash
//! slot. A [key template](KeyTemplate) also escapes, in its values, every character its
//! separators are made of, and refuses placeholders with no separator between them, so within
//! one template two different tuples of values never produce the same key. Query values are
//! decoded to bytes (`%FE` and `%FF` stay different), and a key parameter given twice is a 400.
//!
//! The layer adds the namespace (default `tower-lock:`) and the key as a Redis Cluster hash tag
//! (`tower-lock:{account:42}`), names the empty key by a marker no material can produce (so its
//! hash tag is not empty and its fencing counter stays in its slot), and replaces keys longer
//! than its bound (default 256 bytes) with a SHA-256 digest.
//!
//! Keys of different extractors can meet: `Header::new("x-id")` and `PathParam::new("id")` both
//! give `42`. In one namespace, give each route's key a prefix of its own (`account:{path.id}`).
//!
//! ```
//! use tower_lock::key::{KeyExtractor, KeyExtractorExt, Header, PathSegment, LockKey};
//!
//! let extractor = Header::new("x-tenant-id").and(PathSegment::new(1));
//! let req = http::Request::post("/accounts/42/deposit")
//!     .header("x-tenant-id", "acme")
//!     .body(())
//!     .unwrap();
//! let (parts, _) = req.into_parts();
//! let key = extractor.extract(&parts).unwrap().unwrap();
//! assert_eq!(key.as_str(), "acme:42");
//! ```

mod error;
pub(crate) mod lock_key;
pub(crate) mod pattern;
mod sources;
mod template;

use std::borrow::Cow;
use std::fmt;

pub use error::TemplateError;
pub use lock_key::{KeyBuilder, LockKey};
pub use sources::{And, Global, Header, PathParam, PathSegment, Query};
pub use template::KeyTemplate;

/// Extracts the lock key from a request's head.
///
/// Implemented by the built-ins of this module and by every closure
/// `Fn(&http::request::Parts) -> Result<Option<LockKey>, KeyRejection>`.
///
/// ```
/// use tower_lock::key::{KeyExtractor, KeyRejection, LockKey};
///
/// // Lock on the job id of `/jobs/{id}`, but only for `PUT`.
/// let jobs = |parts: &http::request::Parts| -> Result<Option<LockKey>, KeyRejection> {
///     if parts.method != http::Method::PUT {
///         return Ok(None);
///     }
///     match parts.uri.path().strip_prefix("/jobs/") {
///         Some(id) if !id.is_empty() => Ok(Some(LockKey::new(id))),
///         _ => Err(KeyRejection::new("the path has no job id")),
///     }
/// };
/// let (parts, _) = http::Request::put("/jobs/7").body(()).unwrap().into_parts();
/// assert_eq!(jobs.extract(&parts).unwrap().unwrap().as_str(), "7");
/// ```
pub trait KeyExtractor: Clone + Send + Sync + 'static {
    /// Returns the key to lock on, `None` for no lock, or a rejection (answered with 400).
    fn extract(&self, parts: &http::request::Parts) -> Result<Option<LockKey>, KeyRejection>;
}

impl<F> KeyExtractor for F
where
    F: Fn(&http::request::Parts) -> Result<Option<LockKey>, KeyRejection>
        + Clone
        + Send
        + Sync
        + 'static,
{
    fn extract(&self, parts: &http::request::Parts) -> Result<Option<LockKey>, KeyRejection> {
        self(parts)
    }
}

/// A key extractor behind a pointer: what a [`LockPolicy`](crate::LockPolicy) keeps of any
/// extractor, and the idempotency preset of its scope.
pub(crate) type DynExtract =
    dyn Fn(&http::request::Parts) -> Result<Option<LockKey>, KeyRejection> + Send + Sync;

/// Combinators for every [`KeyExtractor`].
pub trait KeyExtractorExt: KeyExtractor + Sized {
    /// Locks on both keys joined with `:`; if either gives no key, the request is not locked.
    fn and<O: KeyExtractor>(self, other: O) -> And<Self, O> {
        And::new(self, other)
    }
}

impl<K: KeyExtractor> KeyExtractorExt for K {}

/// Why a request could not be keyed; answered with **400** and a problem+json body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRejection {
    detail: Cow<'static, str>,
}

impl KeyRejection {
    /// A rejection with the given human-readable detail (it is sent to the client).
    pub fn new(detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            detail: detail.into(),
        }
    }

    /// A rejection for a required request part that is missing, e.g. `missing("header `x-id`")`.
    pub fn missing(part: impl fmt::Display) -> Self {
        Self::new(format!(
            "the request has no {part}, which the lock key needs"
        ))
    }

    /// The detail sent to the client.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl fmt::Display for KeyRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for KeyRejection {}
