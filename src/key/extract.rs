//! The built-in key extractors.

use std::borrow::Cow;
use std::sync::Arc;

use http::HeaderName;
use http::request::Parts;
use percent_encoding::percent_decode_str;

use super::{KeyExtractor, KeyRejection, LockKey};

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
            None => Err(KeyRejection::missing(format_args!(
                "header `{}`",
                self.name
            ))),
        }
    }
}

/// Locks on a query-string parameter (decoded as `application/x-www-form-urlencoded`).
///
/// A request without the parameter is rejected with 400 unless [`Query::optional`] is set.
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
        let found = parts.uri.query().and_then(|query| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(name, _)| **name == *self.name)
                .map(|(_, value)| value)
        });
        match found {
            Some(value) => Ok(Some(LockKey::new(value.as_bytes()))),
            None if self.optional => Ok(None),
            None => Err(KeyRejection::missing(format_args!(
                "query parameter `{}`",
                self.name
            ))),
        }
    }
}

/// Locks on the `n`-th segment of the URI path (0-based, after the leading `/`), percent-decoded.
///
/// `PathSegment::new(1)` on `/accounts/42/deposit` locks on `42`.
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
        let path = parts.uri.path();
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
/// The route pattern comes from axum's [`MatchedPath`](https://docs.rs/axum/latest/axum/extract/struct.MatchedPath.html)
/// (with the `axum` feature, when the layer is added with `route_layer`), or from the pattern given
/// with [`PathParam::with_pattern`] for other stacks. Both `{id}` and `:id` are understood, and so is
/// a trailing wildcard `{*rest}`. Values are percent-decoded, so `a%20b` and `a b` share a lock.
#[derive(Clone, Debug)]
pub struct PathParam {
    name: Arc<str>,
    pattern: Option<Arc<str>>,
}

impl PathParam {
    /// Locks on the path parameter `name` of the matched axum route.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            pattern: None,
        }
    }

    /// Locks on the parameter `name` of `pattern` (for stacks without axum's `MatchedPath`).
    pub fn with_pattern(pattern: &str, name: &str) -> Self {
        Self {
            name: name.into(),
            pattern: Some(pattern.into()),
        }
    }

    fn pattern<'a>(&'a self, parts: &'a Parts) -> Option<&'a str> {
        #[cfg(feature = "axum")]
        if let Some(matched) = parts.extensions.get::<axum::extract::MatchedPath>() {
            return Some(matched.as_str());
        }
        let _ = parts;
        self.pattern.as_deref()
    }
}

impl KeyExtractor for PathParam {
    fn extract(&self, parts: &Parts) -> Result<Option<LockKey>, KeyRejection> {
        let Some(pattern) = self.pattern(parts) else {
            return Err(KeyRejection::new(format!(
                "no route pattern is known for path parameter `{}`",
                self.name
            )));
        };
        match path_param(pattern, parts.uri.path(), &self.name) {
            Some(value) => Ok(Some(LockKey::new(value))),
            None => Err(KeyRejection::missing(format_args!(
                "path parameter `{}`",
                self.name
            ))),
        }
    }
}

/// Finds parameter `name` of `pattern` in `path`, percent-decoded.
pub(crate) fn path_param<'p>(pattern: &str, path: &'p str, name: &str) -> Option<Cow<'p, [u8]>> {
    let mut rest = path.strip_prefix('/').unwrap_or(path);
    for pattern_segment in pattern.strip_prefix('/').unwrap_or(pattern).split('/') {
        let (segment, after) = rest.split_once('/').unwrap_or((rest, ""));
        if let Some(param) = pattern_segment
            .strip_prefix("{*")
            .and_then(|p| p.strip_suffix('}'))
            .or_else(|| pattern_segment.strip_prefix("*"))
        {
            return (param == name && !rest.is_empty()).then(|| percent_decode_str(rest).into());
        }
        let param = pattern_segment
            .strip_prefix('{')
            .and_then(|p| p.strip_suffix('}'))
            .or_else(|| pattern_segment.strip_prefix(':'));
        if param == Some(name) {
            return (!segment.is_empty()).then(|| percent_decode_str(segment).into());
        }
        rest = after;
    }
    None
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

/// Two extractors combined: see [`KeyExtractorExt::and`](super::KeyExtractorExt::and).
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
        let old_style = PathParam::with_pattern("/accounts/:id", "id");
        assert_eq!(key(&old_style, "/accounts/7").unwrap(), Some("7".into()));
        let rest = PathParam::with_pattern("/files/{*path}", "path");
        assert_eq!(
            key(&rest, "/files/a/b.txt").unwrap(),
            Some("a/b.txt".into())
        );
        assert!(key(&id, "/accounts").is_err());
        assert!(key(&PathParam::new("id"), "/accounts/1").is_err());
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
