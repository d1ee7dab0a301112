//! Lock keys: what a request is locked on, and how it is extracted.
//!
//! A [`KeyExtractor`] looks at a request's head (method, URI, headers, extensions) and answers:
//!
//! - `Ok(Some(key))`: lock on `key` before calling the inner service;
//! - `Ok(None)`: this request needs no lock, call the inner service directly;
//! - `Err(rejection)`: the request cannot be keyed: answer **400** with a problem+json body when
//!   the request lacks or garbles a part the key needs, and **500** when no request could be
//!   keyed because the server is wired wrong (see [`KeyRejectionKind`]).
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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::HeaderName;

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
    /// Returns the key to lock on, `None` for no lock, or a rejection (answered with 400, or 500
    /// for a [misconfiguration](KeyRejectionKind::Misconfigured)).
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

/// Why a request could not be keyed, and who must act: the client (**400**) or whoever
/// configured the server (**500**). Answered with a problem+json body whose `detail` is
/// [`KeyRejection::detail`].
///
/// ```
/// use tower_lock::key::{KeyRejection, KeyRejectionKind};
///
/// let missing = KeyRejection::missing_header(http::HeaderName::from_static("x-tenant-id"));
/// assert_eq!(missing.kind(), KeyRejectionKind::Missing);
/// assert_eq!(missing.header().map(|name| name.as_str()), Some("x-tenant-id"));
///
/// let invalid = KeyRejection::new("the job id is not a number");
/// assert_eq!(invalid.kind(), KeyRejectionKind::Invalid);
///
/// let wiring = KeyRejection::misconfigured("the auth layer must run before the lock layer");
/// assert_eq!(wiring.kind(), KeyRejectionKind::Misconfigured);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRejection {
    kind: KeyRejectionKind,
    detail: Cow<'static, str>,
    /// The header whose absence this is, for [`KeyRejection::missing_header`].
    header: Option<HeaderName>,
}

/// What kind of [`KeyRejection`] a rejection is, which decides its response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyRejectionKind {
    /// The request lacks a part the key needs (a header, a query or path parameter, a path
    /// segment): **400**.
    Missing,
    /// The request has the part, but it cannot name a lock (not UTF-8 once decoded, given twice,
    /// not what the extractor accepts): **400**.
    Invalid,
    /// No request can be keyed, whatever it carries: the server is wired wrong (a `{path.NAME}`
    /// the route pattern does not have, a layer that no route pattern reaches). **500 Internal
    /// Server Error**; the built-in extractors also log it at error level, once per extractor.
    Misconfigured,
}

impl KeyRejection {
    /// A rejection of invalid request input ([`KeyRejectionKind::Invalid`], 400) with the given
    /// human-readable detail (it is sent to the client).
    pub fn new(detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind: KeyRejectionKind::Invalid,
            detail: detail.into(),
            header: None,
        }
    }

    /// A rejection for a required request part that is missing ([`KeyRejectionKind::Missing`],
    /// 400), e.g. ``missing("query parameter `doc`")``.
    pub fn missing(part: impl fmt::Display) -> Self {
        Self {
            kind: KeyRejectionKind::Missing,
            ..Self::new(format!(
                "the request has no {part}, which the lock key needs"
            ))
        }
    }

    /// A rejection for a missing request header ([`KeyRejectionKind::Missing`], 400) that
    /// records which header: [`KeyRejection::header`].
    pub fn missing_header(name: HeaderName) -> Self {
        Self {
            header: Some(name.clone()),
            ..Self::missing(format_args!("header `{name}`"))
        }
    }

    /// A server misconfiguration ([`KeyRejectionKind::Misconfigured`], 500): no request could be
    /// keyed. Say in `detail` what to fix; it is sent to the client in the problem+json body.
    /// Log it yourself if your extractor makes it (the built-in extractors log theirs once).
    pub fn misconfigured(detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind: KeyRejectionKind::Misconfigured,
            ..Self::new(detail)
        }
    }

    /// The same rejection with another detail (the idempotency preset's wording).
    pub(crate) fn with_detail(mut self, detail: impl Into<Cow<'static, str>>) -> Self {
        self.detail = detail.into();
        self
    }

    /// Who must act on this rejection, and so its response.
    pub fn kind(&self) -> KeyRejectionKind {
        self.kind
    }

    /// The header whose absence this rejection reports, when it was made by
    /// [`KeyRejection::missing_header`] (as [`Header`] and `{header.NAME}` do).
    pub fn header(&self) -> Option<&HeaderName> {
        self.header.as_ref()
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
/// Logs the first misconfiguration an extractor meets, at error level, once for the extractor
/// and its clones (a layer's services share their extractor's clones): every request of a
/// misconfigured route is answered 500, and one log line says why.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReportOnce(Arc<AtomicBool>);

impl ReportOnce {
    /// Passes `result` through, logging it first if it is the first misconfiguration met.
    /// `extractor` names the extractor in the log (a template's text, say).
    pub(crate) fn check<T>(
        &self,
        result: Result<T, KeyRejection>,
        extractor: &dyn fmt::Display,
    ) -> Result<T, KeyRejection> {
        if let Err(rejection) = &result
            && rejection.kind() == KeyRejectionKind::Misconfigured
            && !self.0.load(Ordering::Relaxed)
            && !self.0.swap(true, Ordering::Relaxed)
        {
            tracing::error!(
                extractor = %extractor,
                detail = rejection.detail(),
                "the lock key of a route can never be extracted: every request to it is answered \
                 500 until the server is fixed (logged once)"
            );
        }
        result
    }
}
