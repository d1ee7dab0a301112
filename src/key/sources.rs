//! The built-in key extractors.

use std::borrow::Cow;
use std::sync::Arc;

use http::HeaderName;
use http::request::Parts;
use percent_encoding::percent_decode_str;

use super::pattern::{Pattern, path_params};
use super::{KeyExtractor, KeyRejection, LockKey, ReportOnce};

/// Locks on the value of a request header, e.g. `Idempotency-Key`.
///
/// A request without the header is rejected with 400 unless [`Header::optional`] is set, in which
/// case it passes through unlocked. When the header is repeated, the first value is used.
#[derive(Clone, Debug)]
pub struct Header {
    name: HeaderName,
    optional: bool,
}

impl Header {
    /// Locks on the header `name`.
    ///
    /// # Panics
    ///
    /// When `name` is not a valid header name: this happens while building the layer, never on
    /// a request path. Use [`Header::from_name`] with a parsed [`HeaderName`] to avoid it.
    pub fn new(name: &str) -> Self {
        Self::from_name(HeaderName::try_from(name).expect("invalid header name"))
    }

    /// Locks on the header `name`.
    pub fn from_name(name: HeaderName) -> Self {
        Self {
            name,
            optional: false,
        }
    }

    /// Requests without the header pass through unlocked instead of being rejected.
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }
}

impl KeyExtractor for Header {
    fn extract(&self, parts: &Parts) -> Result<Option<LockKey>, KeyRejection> {
        match parts.headers.get(&self.name) {
            Some(value) => Ok(Some(LockKey::new(value.as_bytes()))),
            None if self.optional => Ok(None),
            None => Err(KeyRejection::missing_header(self.name.clone())),
        }
    }
}

/// Locks on a query-string parameter, decoded as `application/x-www-form-urlencoded` to bytes
/// (`+` is a space; `%FE` and `%FF` stay different bytes).
///
/// A request without the parameter is rejected with 400 unless [`Query::optional`] is set. A
/// request giving the parameter more than once is rejected with 400: which value the handler
/// reads depends on the framework (axum's `Query<HashMap<_, _>>` keeps the last), so the lock
/// would be a guess.
#[derive(Clone, Debug)]
pub struct Query {
    name: Arc<str>,
    optional: bool,
}

impl Query {
    /// Locks on the query parameter `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            optional: false,
        }
    }

    /// Requests without the parameter pass through unlocked instead of being rejected.
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }
}

impl KeyExtractor for Query {
    fn extract(&self, parts: &Parts) -> Result<Option<LockKey>, KeyRejection> {
        match query_value(parts, &self.name)? {
            Some(value) => Ok(Some(LockKey::new(value))),
            None if self.optional => Ok(None),
            None => Err(KeyRejection::missing(format_args!(
                "query parameter `{}`",
                self.name
            ))),
        }
    }
}

/// The value of query parameter `name`, decoded as `application/x-www-form-urlencoded` (`+` is a
/// space, `%XX` a byte). A value that is not valid UTF-8 once decoded is rejected with 400, so
/// that two values a handler would read as one text never take two locks.
///
/// A parameter given more than once is ambiguous (frameworks disagree on which one counts:
/// axum's `Query<HashMap<_, _>>` keeps the last), so it is rejected with 400.
pub(crate) fn query_value(parts: &Parts, name: &str) -> Result<Option<Vec<u8>>, KeyRejection> {
    let Some(query) = parts.uri.query() else {
        return Ok(None);
    };
    let mut found = None;
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if form_decode(key) != name.as_bytes() {
            continue;
        }
        if found.is_some() {
            return Err(KeyRejection::new(format!(
                "the query parameter `{name}` is given more than once, so the lock key would be \
                 ambiguous"
            )));
        }
        let value = form_decode(value);
        if std::str::from_utf8(&value).is_err() {
            // The handler reads text (axum's `Query` replaces bad bytes with U+FFFD, so `%FE`
            // and `%FF` would be one document to it and two locks to us): refuse, as axum's
            // `Path` does.
            return Err(KeyRejection::new(format!(
                "the query parameter `{name}` is not valid UTF-8 once decoded"
            )));
        }
        found = Some(value);
    }
    Ok(found)
}

fn form_decode(text: &str) -> Vec<u8> {
    let plus_as_space: Cow<'_, str> = if text.contains('+') {
        text.replace('+', " ").into()
    } else {
        text.into()
    };
    percent_encoding::percent_decode_str(&plus_as_space).collect()
}

/// Locks on the `n`-th segment of the URI path (0-based, after the leading `/`), percent-decoded.
///
/// `PathSegment::new(1)` on `/accounts/42/deposit` locks on `42`. The path is the URI the layer
/// sees, normalized as [`LockRoutes`](crate::LockRoutes) normalizes it (no empty, `.` or `..`
/// segments: `//accounts/42` and `/x/../accounts/42` give `42` too); under axum's
/// `Router::nest` it lacks the nest prefix. Prefer [`PathParam`], which reads
/// the router's match.
#[derive(Clone, Copy, Debug)]
pub struct PathSegment {
    index: usize,
}

impl PathSegment {
    /// Locks on segment `index`.
    pub fn new(index: usize) -> Self {
        Self { index }
    }
}

impl KeyExtractor for PathSegment {
    fn extract(&self, parts: &Parts) -> Result<Option<LockKey>, KeyRejection> {
        let path = super::normalize::normalize(parts.uri.path());
        let path = path.as_ref();
        match path
            .strip_prefix('/')
            .unwrap_or(path)
            .split('/')
            .nth(self.index)
        {
            Some(segment) if !segment.is_empty() => Ok(Some(LockKey::new(
                percent_decode_str(segment).collect::<Vec<u8>>(),
            ))),
            _ => Err(KeyRejection::missing(format_args!(
                "path segment {}",
                self.index
            ))),
        }
    }
}

/// Locks on a named path parameter, such as `id` in `/accounts/{id}/deposit`.
///
/// The value is the one the router matched: the route of a [`LockRoutes`](crate::LockRoutes)
/// table; with the `axum` feature, the parameter axum's router extracted (right under
/// `Router::nest` and `nest_service` too); otherwise the pattern given with
/// [`PathParam::with_pattern`], matched against the URI path the way axum's router (matchit)
/// matches it. Patterns use axum 0.8's syntax: `{id}`, text before a parameter (`v{version}`),
/// a final catch-all `{*rest}`. Values are percent-decoded to bytes, so `a%20b` and `a b` share a
/// lock.
///
/// With no pattern known at all (no table, no pattern given, no axum match), or a `name` the
/// matched route pattern does not have, no request can be keyed: that is answered **500** (a
/// [misconfiguration](super::KeyRejectionKind::Misconfigured), logged at error level once per
/// extractor and its clones), not 400.
#[derive(Clone, Debug)]
pub struct PathParam {
    name: Arc<str>,
    pattern: Option<Pattern>,
    misconfigured: ReportOnce,
}

impl PathParam {
    /// Locks on the path parameter `name` of the matched route (axum, or a `LockRoutes` table).
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            pattern: None,
            misconfigured: ReportOnce::default(),
        }
    }

    /// Locks on the parameter `name` of `pattern` (for stacks without a router that reports its
    /// match).
    ///
    /// # Panics
    ///
    /// When axum would refuse `pattern` (see [`LockRoutes`](crate::LockRoutes)), or it has no
    /// parameter `name`: this happens while building the layer, never on a request path.
    pub fn with_pattern(pattern: &str, name: &str) -> Self {
        let pattern = Pattern::parse(pattern)
            .unwrap_or_else(|error| panic!("route pattern `{pattern}`: {error}"));
        assert!(
            pattern.params().any(|param| param == name),
            "route pattern `{}` has no parameter `{name}`",
            pattern.as_str()
        );
        Self {
            name: name.into(),
            pattern: Some(pattern),
            misconfigured: ReportOnce::default(),
        }
    }
}

impl KeyExtractor for PathParam {
    fn extract(&self, parts: &Parts) -> Result<Option<LockKey>, KeyRejection> {
        let name = &*self.name;
        let value = path_params(
            parts,
            self.pattern.as_ref(),
            &format_args!("`PathParam` `{name}`"),
            "`PathParam::with_pattern`",
        )
        .and_then(|params| params.get(name).map(LockKey::new));
        let extractor = format_args!("PathParam({name:?})");
        self.misconfigured.check(value, &extractor).map(Some)
    }
}

/// Locks every request on one constant key: one request at a time for the whole route.
#[derive(Clone, Debug)]
pub struct Global {
    key: LockKey,
}

impl Global {
    /// One lock named `name` for every request.
    pub fn new(name: &str) -> Self {
        Self {
            key: LockKey::new(name),
        }
    }
}

impl KeyExtractor for Global {
    fn extract(&self, _: &Parts) -> Result<Option<LockKey>, KeyRejection> {
        Ok(Some(self.key.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyExtractorExt;

    fn parts(uri: &str) -> Parts {
        http::Request::get(uri).body(()).unwrap().into_parts().0
    }

    fn key(extractor: &impl KeyExtractor, uri: &str) -> Result<Option<String>, KeyRejection> {
        extractor
            .extract(&parts(uri))
            .map(|key| key.map(|k| k.as_str().to_owned()))
    }

    #[test]
    fn query_parameter_is_decoded() {
        assert_eq!(
            key(&Query::new("doc"), "/x?a=1&doc=b+c%3A").unwrap(),
            Some("b%20c%3A".into())
        );
        assert!(key(&Query::new("doc"), "/x?a=1").is_err());
        assert_eq!(key(&Query::new("doc").optional(), "/x").unwrap(), None);
    }

    #[test]
    fn path_param_follows_the_pattern() {
        let id = PathParam::with_pattern("/accounts/{id}/deposit", "id");
        assert_eq!(
            key(&id, "/accounts/a%20b/deposit").unwrap(),
            Some("a%20b".into())
        );
        let version = PathParam::with_pattern("/files/v{version}", "version");
        assert_eq!(key(&version, "/files/v2").unwrap(), Some("2".into()));
        let rest = PathParam::with_pattern("/files/{*path}", "path");
        assert_eq!(
            key(&rest, "/files/a/b.txt").unwrap(),
            Some("a/b.txt".into())
        );
        assert!(key(&id, "/accounts").is_err());
    }

    #[test]
    fn path_param_rejections_say_whose_mistake_it_is() {
        use crate::key::KeyRejectionKind::{Misconfigured, Missing};
        let kind = |extractor: &PathParam, uri| key(extractor, uri).unwrap_err().kind();
        // The path is not the pattern's route: the client's.
        let id = PathParam::with_pattern("/accounts/{id}/deposit", "id");
        assert_eq!(kind(&id, "/accounts"), Missing);
        // No pattern at all: no request can be keyed.
        let detail = key(&PathParam::new("id"), "/accounts/1")
            .unwrap_err()
            .detail()
            .to_owned();
        assert_eq!(kind(&PathParam::new("id"), "/accounts/1"), Misconfigured);
        assert!(detail.contains("`PathParam::with_pattern`"), "{detail}");
    }

    #[test]
    fn path_segment_is_decoded() {
        assert_eq!(
            key(&PathSegment::new(1), "/accounts/4%32").unwrap(),
            Some("42".into())
        );
        assert!(key(&PathSegment::new(3), "/accounts/42").is_err());
    }

    #[test]
    fn and_joins_and_passes_none_through() {
        let both = Global::new("g").and(Query::new("q").optional());
        assert_eq!(key(&both, "/?q=1").unwrap(), Some("g:1".into()));
        assert_eq!(key(&both, "/").unwrap(), None);
    }
}
