//! [`KeyExtractor`]: what finds a request's lock key, and its combinators.

use http::request::Parts;

use super::lock_key::LockKey;
use super::rejection::KeyRejection;

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
    /// for a [misconfiguration](super::KeyRejectionKind::Misconfigured)).
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

/// Two extractors combined: see [`KeyExtractorExt::and`](KeyExtractorExt::and).
#[derive(Clone, Debug)]
pub struct And<A, B> {
    first: A,
    second: B,
}

impl<A, B> And<A, B> {
    pub(crate) fn new(first: A, second: B) -> Self {
        Self { first, second }
    }
}

impl<A: KeyExtractor, B: KeyExtractor> KeyExtractor for And<A, B> {
    fn extract(&self, parts: &Parts) -> Result<Option<LockKey>, KeyRejection> {
        let Some(first) = self.first.extract(parts)? else {
            return Ok(None);
        };
        Ok(self
            .second
            .extract(parts)?
            .map(|second| first.join(&second)))
    }
}
