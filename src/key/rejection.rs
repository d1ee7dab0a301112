//! [`KeyRejection`]: why a request could not be keyed, and who must act on it.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::HeaderName;

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
    /// [`KeyRejection::missing_header`] (as [`Header`](super::Header) and `{header.NAME}` do).
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
