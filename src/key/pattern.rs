//! Route patterns: the one grammar `PathParam` and key templates read, and where the values of
//! path parameters come from at request time.
//!
//! The grammar is axum 0.8's, which is matchit 0.8's plus axum's own checks: a pattern starts
//! with `/`; a parameter is `{name}`, after optional static text in its segment
//! (`/files/v{version}`) and ending the segment; a catch-all `{*name}` ends the pattern; `{{` and
//! `}}` are literal braces; no segment starts with `:` or `*` (axum 0.7's syntax, which axum 0.8
//! refuses). Matching is matchit's own, so a pattern matches exactly the paths axum routes to it.
//!
//! At request time the values of path parameters come, in this order, from:
//!
//! 1. the route a [`LockRoutes`](crate::LockRoutes) table matched (its own pattern wins over any
//!    router around it);
//! 2. the pattern given to the extractor (`with_pattern`, `layer_for`), when it matches the URI
//!    path: the user's word for the route wins over a router around it, such as axum's
//!    `route_service("/api/{*rest}", …)`;
//! 3. with the `axum` feature, the values axum's router extracted (`RawPathParams`), whenever
//!    axum's `MatchedPath` is present: right under nesting, since axum strips the nest prefix from
//!    the URI but not from the pattern.
//!
//! A value that is not valid UTF-8 once percent-decoded is rejected with 400, as axum's `Path`
//! does: a handler reads text, so two byte strings it would read as one must not take two locks.
//!
//! A parameter that can never be read is the server's mistake, answered 500
//! ([`KeyRejectionKind::Misconfigured`](super::KeyRejectionKind::Misconfigured)): no source at
//! all (no table, no pattern of the extractor's own, no axum match), or a name the route pattern
//! in effect (the table's, the extractor's own, or axum's when the extractor has none) does not
//! have. A path that does not match the extractor's own pattern is the client's (400).

use std::borrow::Cow;
use std::sync::Arc;

use http::request::Parts;
use percent_encoding::percent_decode_str;

use super::KeyRejection;

/// A route pattern axum would accept, compiled for matching. Cheap to clone (shared parts): an
/// extractor holding one is cloned with its service, which axum does for every request.
#[derive(Clone)]
pub(crate) struct Pattern {
    text: Arc<str>,
    params: Arc<[Box<str>]>,
    matcher: Arc<matchit::Router<()>>,
}

impl std::fmt::Debug for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Pattern").field(&self.text).finish()
    }
}

impl Pattern {
    /// Compiles `pattern`, or says why axum would refuse it.
    pub(crate) fn parse(pattern: &str) -> Result<Self, String> {
        refuse_unmatchable(pattern)?;
        let params = pattern_params(pattern)?;
        let mut matcher = matchit::Router::new();
        matcher
            .insert(pattern, ())
            .map_err(|error| insert_error_message(&error))?;
        Ok(Self {
            text: pattern.into(),
            params: params.into_iter().map(Into::into).collect(),
            matcher: Arc::new(matcher),
        })
    }

    /// The pattern text.
    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// The parameter names, in order.
    pub(crate) fn params(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| &**p)
    }

    /// The parameters of `path`, percent-decoded, when the pattern matches it.
    pub(crate) fn matches(&self, path: &str) -> Option<PathParams> {
        let matched = self.matcher.at(path).ok()?;
        Some(PathParams::from_raw(matched.params.iter()))
    }
}

/// Whether axum 0.8 would accept `pattern` as a route; the error says why not.
#[cfg(test)]
pub(crate) fn check_pattern(pattern: &str) -> Result<(), String> {
    Pattern::parse(pattern).map(drop)
}

/// Refuses, with the fix, a route pattern that no request can match: the patterns axum 0.8 refuses
/// (`validate_path` and its v0.7 checks; matchit's own errors are checked at insertion), and
/// literal text that a request path (`http::Uri::path`) never contains.
fn refuse_unmatchable(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("a pattern must start with `/`; write `/` for the root".into());
    }
    // axum 0.8: a segment starting with `:` or `*` is the 0.7 syntax, which matchit 0.8 would
    // match literally (`/accounts/:id` matches only the path `/accounts/:id`).
    for (index, segment) in pattern.split('/').enumerate() {
        // The first segment of a pattern without its leading `/`: the fix needs one too.
        let slash = if index == 0 { "/" } else { "" };
        if let Some(name) = segment.strip_prefix(':') {
            let fix = if name.is_empty() { "name" } else { name };
            return Err(format!(
                "write `{slash}{{{fix}}}`, not `:{name}`: axum 0.8 refuses this 0.7 syntax, and \
                 matchit would match `:{name}` only as literal text"
            ));
        }
        if let Some(name) = segment.strip_prefix('*') {
            let fix = if name.is_empty() { "rest" } else { name };
            return Err(format!(
                "write `{slash}{{*{fix}}}`, not `*{name}`: axum 0.8 refuses this 0.7 syntax, and \
                 matchit would match `*{name}` only as literal text"
            ));
        }
    }
    if !pattern.starts_with('/') {
        return Err("a pattern must start with `/`, as every request path does".into());
    }
    // The literal text (outside `{param}`; `{{` and `}}` are literal braces).
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' | '}' if chars.peek() == Some(&c) => {
                chars.next();
            }
            '{' => {
                // A parameter: its name is not path text (matchit checks its syntax).
                for c in chars.by_ref() {
                    if c == '}' {
                        break;
                    }
                }
            }
            '?' => {
                return Err(concat!(
                    "the query string is not part of the path: drop `?…` from the pattern ",
                    "and key on `{query.NAME}` instead"
                )
                .into());
            }
            '#' => {
                return Err("a fragment (`#…`) is never sent to the server: drop it".into());
            }
            c if c.is_ascii_control() || c == ' ' || matches!(c, '<' | '>' | '`') => {
                return Err(format!(
                    "a request path never contains {c:?}: it arrives percent-encoded \
                     (write `%{:02X}`)",
                    u32::from(c)
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// matchit's insertion errors, said with the fix.
fn insert_error_message(error: &matchit::InsertError) -> String {
    match error {
        matchit::InsertError::InvalidParam => "a parameter needs a name and matching braces, \
             `{name}` or `{*name}` (write `{{` and `}}` for literal braces)"
            .into(),
        matchit::InsertError::InvalidParamSegment => "only one parameter per segment, after any \
             static text: `/files/v{version}`, not `/files/{name}.json`"
            .into(),
        matchit::InsertError::InvalidCatchAll => {
            "a catch-all `{*name}` must be the whole last segment, at the end of the pattern".into()
        }
        other => other.to_string(),
    }
}

/// The parameter names of `pattern`, or why axum 0.8 would refuse it (matchit's own insert
/// checks the rest).
///
/// Refused: an empty pattern, one without a leading `/` (literal `?`, `#` and other text no path
/// contains are refused before, by `refuse_unmatchable`),
/// a segment starting with `:` or `*` (axum 0.7 syntax, read literally by matchit 0.8), unbalanced
/// or empty braces, a parameter followed by more text in its segment, a catch-all that is not
/// last. Two parameters of one name are refused too.
fn pattern_params(pattern: &str) -> Result<Vec<&str>, String> {
    if pattern.is_empty() {
        return Err("a route pattern must start with `/`; use `/` for the root".into());
    }
    if !pattern.starts_with('/') {
        return Err("a route pattern must start with `/`".into());
    }
    for segment in pattern.split('/') {
        if segment.starts_with(':') {
            return Err(format!(
                "segment `{segment}` starts with `:`; write a parameter as `{{name}}`"
            ));
        }
        if segment.starts_with('*') {
            return Err(format!(
                "segment `{segment}` starts with `*`; write a catch-all as `{{*name}}`"
            ));
        }
    }
    let bytes = pattern.as_bytes();
    let mut params: Vec<&str> = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'{' if bytes.get(at + 1) == Some(&b'{') => at += 2,
            b'}' if bytes.get(at + 1) == Some(&b'}') => at += 2,
            b'}' => {
                return Err(format!(
                    "unmatched `}}` at byte {at}; write `}}}}` for a literal `}}`"
                ));
            }
            b'{' => {
                let Some(len) = pattern[at + 1..].find('}') else {
                    return Err(format!(
                        "unclosed `{{` at byte {at}: a parameter is `{{name}}`"
                    ));
                };
                let inner = &pattern[at + 1..at + 1 + len];
                let end = at + 1 + len + 1;
                let (name, catch_all) = match inner.strip_prefix('*') {
                    Some(name) => (name, true),
                    None => (inner, false),
                };
                if name.is_empty() || name.contains(['{', '*', '/']) {
                    return Err(format!("invalid parameter `{{{inner}}}` at byte {at}"));
                }
                if catch_all && end != bytes.len() {
                    return Err(format!("the catch-all `{{{inner}}}` must end the pattern"));
                }
                if end != bytes.len() && bytes[end] != b'/' {
                    return Err(format!(
                        "the parameter `{{{inner}}}` must end its segment (axum allows text \
                         before a parameter, not after it)"
                    ));
                }
                if params.contains(&name) {
                    return Err(format!("the parameter `{name}` appears twice"));
                }
                params.push(name);
                at = end;
            }
            _ => at += 1,
        }
    }
    Ok(params)
}

/// Path parameters of a matched request, percent-decoded to bytes.
#[derive(Clone, Debug, Default)]
pub(crate) struct PathParams(Vec<(Box<str>, Vec<u8>)>);

impl PathParams {
    /// From raw (percent-encoded) `(name, value)` pairs, as matchit gives them.
    pub(crate) fn from_raw<'a>(raw: impl Iterator<Item = (&'a str, &'a str)>) -> Self {
        Self(
            raw.map(|(name, value)| (name.into(), percent_decode_str(value).collect()))
                .collect(),
        )
    }

    /// Whether the route has a parameter `name` (its value may be empty).
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| **n == *name)
    }

    /// The names of the route's parameters.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(n, _)| &**n)
    }

    /// The value of parameter `name`. An empty value counts as missing.
    pub(crate) fn get(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .rev()
            .find(|(n, _)| **n == *name)
            .map(|(_, v)| &v[..])
            .filter(|v| !v.is_empty())
    }
}

/// What a [`LockRoutes`](crate::LockRoutes) table matched; put in the request's extensions only
/// while its key is extracted.
#[derive(Clone, Debug)]
pub(crate) struct TableMatch {
    pub(crate) pattern: Arc<str>,
    pub(crate) params: PathParams,
}

/// `pattern`'s parameters in `path` as it is (as axum matches it), or else in `path` normalized
/// (`//`, `.`, `..` and a trailing `/` folded away; see [`normalize`](super::normalize)).
fn matches_either(pattern: &Pattern, path: &str) -> Option<PathParams> {
    pattern.matches(path).or_else(|| {
        let normal = super::normalize::normalize(path);
        (normal != path).then(|| pattern.matches(&normal)).flatten()
    })
}

/// The route pattern of the request: the table's, `own` when it matches the path, axum's
/// `MatchedPath`, or `own`.
pub(crate) fn route_pattern<'a>(parts: &'a Parts, own: Option<&'a Pattern>) -> Option<&'a str> {
    if let Some(table) = parts.extensions.get::<TableMatch>() {
        return Some(&table.pattern);
    }
    if let Some(own) = own.filter(|pattern| matches_either(pattern, parts.uri.path()).is_some()) {
        return Some(own.as_str());
    }
    #[cfg(feature = "axum")]
    if let Some(matched) = parts.extensions.get::<axum::extract::MatchedPath>() {
        return Some(matched.as_str());
    }
    own.map(Pattern::as_str)
}

/// Where a request's path parameters come from (see the module docs).
pub(crate) enum ParamSource<'a> {
    /// The parameters of the route the key is attached to: a table's route, the extractor's own
    /// pattern (matching the path), or axum's match when the extractor has no pattern. A name
    /// they lack is one the route pattern does not have: no request can be keyed (500).
    Route {
        params: Cow<'a, PathParams>,
        pattern: &'a str,
    },
    /// axum's parameters, for an extractor whose own pattern does not match the path: a name they
    /// lack means this request is not on the extractor's route (400).
    #[cfg(feature = "axum")]
    Router(PathParams),
    /// The path does not match the extractor's own pattern, and no router reports a match.
    NoMatch,
}

impl ParamSource<'_> {
    /// The value of `name`, or the 400 (missing, not UTF-8) or 500 (a parameter the route
    /// pattern does not have) for it.
    pub(crate) fn get(&self, name: &str) -> Result<&[u8], KeyRejection> {
        if let Some(misconfigured) = self.misconfigured(name) {
            return Err(misconfigured);
        }
        let params = match self {
            Self::Route { params, .. } => &**params,
            #[cfg(feature = "axum")]
            Self::Router(params) => params,
            Self::NoMatch => return Err(missing(name)),
        };
        let value = params.get(name).ok_or_else(|| missing(name))?;
        if std::str::from_utf8(value).is_err() {
            // As axum's `Path` does: a handler reads text, so bytes it cannot read must not make
            // two locks of what it would take for one value.
            return Err(KeyRejection::new(format!(
                "the path parameter `{name}` is not valid UTF-8 once percent-decoded"
            )));
        }
        Ok(value)
    }

    /// The 500 for `name` when the route pattern in effect does not have it.
    pub(crate) fn misconfigured(&self, name: &str) -> Option<KeyRejection> {
        match self {
            Self::Route { params, pattern } if !params.contains(name) => {
                Some(not_in_pattern(name, pattern, params))
            }
            _ => None,
        }
    }
}

fn missing(name: &str) -> KeyRejection {
    KeyRejection::missing(format_args!("path parameter `{name}`"))
}

/// The 500 for a path parameter `name` that the matched route `pattern` does not have.
fn not_in_pattern(name: &str, pattern: &str, params: &PathParams) -> KeyRejection {
    let names: Vec<String> = params.names().map(|n| format!("`{n}`")).collect();
    let has = if names.is_empty() {
        "it has none".to_owned()
    } else {
        format!("it has {}", names.join(", "))
    };
    KeyRejection::misconfigured(format!(
        "the lock key reads the path parameter `{name}`, which the route pattern `{pattern}` does \
         not have ({has}), so no request to this route can be keyed: key on a parameter of the \
         route, or add this lock layer only to routes with `{{{name}}}`"
    ))
}

/// The 500 for `what` (a placeholder or extractor that needs a route pattern) when none is known:
/// no table route, no pattern of its own, no route axum matched. `give_pattern` names the
/// methods that give it one.
pub(crate) fn no_pattern(what: &dyn std::fmt::Display, give_pattern: &str) -> KeyRejection {
    #[cfg(feature = "axum")]
    let why = "no route that axum matched reaches the lock layer (add it to routes with axum's \
               `route_layer`, not around the router, where it runs before routing, nor with \
               `Router::layer`, which also wraps the fallback)";
    #[cfg(not(feature = "axum"))]
    let why = "tower-lock is built without its `axum` feature, so it cannot read the route axum \
               matched (enable the feature to use the layer with axum's `route_layer`)";
    KeyRejection::misconfigured(format!(
        "no route pattern is known for {what}, so no request can be keyed: {why}; otherwise put \
         the policy in a `LockRoutes` table, or give the pattern with {give_pattern}"
    ))
}

/// The path parameters of the request (see the module docs). `what` names the placeholder or
/// extractor, and `give_pattern` how to give it a pattern, in the 500 when no pattern is known.
pub(crate) fn path_params<'a>(
    parts: &'a Parts,
    own: Option<&'a Pattern>,
    what: &dyn std::fmt::Display,
    give_pattern: &str,
) -> Result<ParamSource<'a>, KeyRejection> {
    if let Some(table) = parts.extensions.get::<TableMatch>() {
        return Ok(ParamSource::Route {
            params: Cow::Borrowed(&table.params),
            pattern: &table.pattern,
        });
    }
    // A pattern given to the extractor is the user's word for this route: it wins over a
    // router around it (axum's `route_service("/api/{*rest}", …)`) whenever it matches.
    if let Some(own) = own
        && let Some(params) = matches_either(own, parts.uri.path())
    {
        return Ok(ParamSource::Route {
            params: Cow::Owned(params),
            pattern: own.as_str(),
        });
    }
    #[cfg(feature = "axum")]
    if let Some((params, pattern)) = axum_params(parts)? {
        return Ok(match own {
            // The path is not the extractor's route: the router's match may still hold the
            // value (a route around it with the same parameter), or say the request lacks it.
            Some(_) => ParamSource::Router(params),
            None => ParamSource::Route {
                params: Cow::Owned(params),
                pattern,
            },
        });
    }
    match own {
        Some(_) => Ok(ParamSource::NoMatch),
        None => Err(no_pattern(what, give_pattern)),
    }
}

/// The values axum's router extracted, when the request went through an axum route.
#[cfg(feature = "axum")]
fn axum_params(parts: &Parts) -> Result<Option<(PathParams, &str)>, KeyRejection> {
    use axum::extract::rejection::RawPathParamsRejection;
    use axum::extract::{FromRequestParts, MatchedPath, RawPathParams};
    use futures_util::FutureExt;

    let Some(matched) = parts.extensions.get::<MatchedPath>() else {
        return Ok(None);
    };
    // `RawPathParams` reads axum's private params extension through `&mut Parts`: give it a
    // scratch head carrying only the extensions. Its future never waits.
    let mut scratch = http::Request::new(()).into_parts().0;
    scratch.extensions = parts.extensions.clone();
    let params = match RawPathParams::from_request_parts(&mut scratch, &()).now_or_never() {
        Some(Ok(raw)) => PathParams(
            raw.iter()
                .map(|(name, value)| (name.into(), value.as_bytes().to_vec()))
                .collect(),
        ),
        Some(Err(RawPathParamsRejection::InvalidUtf8InPathParam(_))) => {
            return Err(KeyRejection::new(
                "a path parameter is not valid UTF-8 once percent-decoded",
            ));
        }
        // A route without parameters.
        Some(Err(_)) => PathParams::default(),
        None => {
            return Err(KeyRejection::new(
                "the route's path parameters are not ready",
            ));
        }
    };
    Ok(Some((params, matched.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cloned_pattern_shares_its_matcher_and_parameters() {
        // axum clones a route's service, and so its extractor, for every request: a clone must
        // not rebuild the matcher's tree or the parameter names.
        let pattern = Pattern::parse("/accounts/{id}/{op}").unwrap();
        let clone = pattern.clone();
        assert!(Arc::ptr_eq(&pattern.matcher, &clone.matcher));
        assert!(Arc::ptr_eq(&pattern.params, &clone.params));
    }

    #[test]
    fn accepted_patterns_give_their_parameters() {
        assert_eq!(pattern_params("/").unwrap(), Vec::<&str>::new());
        assert_eq!(pattern_params("/accounts/{id}/{op}").unwrap(), ["id", "op"]);
        assert_eq!(pattern_params("/files/v{version}").unwrap(), ["version"]);
        assert_eq!(pattern_params("/files/{*rest}").unwrap(), ["rest"]);
        assert_eq!(pattern_params("/{{lit}}/{id}").unwrap(), ["id"]);
        assert!(check_pattern("/files/v{version}").is_ok());
    }

    #[test]
    fn patterns_axum_refuses_are_refused() {
        for pattern in [
            "",
            "*",
            "accounts/{id}",
            "/accounts/:id",
            "/a/*rest",
            "/a?x=1",
            "/a#b",
            "/{}",
            "/{*}",
            "/{id",
            "/id}",
            "/{id}.json",
            "/{*rest}/more",
            "/{id}/{id}",
        ] {
            assert!(check_pattern(pattern).is_err(), "{pattern:?} was accepted");
        }
    }

    #[test]
    fn matching_is_matchits_and_values_are_decoded_bytes() {
        let pattern = Pattern::parse("/files/v{version}/{*rest}").unwrap();
        let params = pattern.matches("/files/v2/a%2Fb/c%FF").unwrap();
        assert_eq!(params.get("version"), Some(&b"2"[..]));
        assert_eq!(params.get("rest"), Some(&b"a/b/c\xff"[..]));
        assert!(pattern.matches("/files/2/x").is_none());
    }
}
