//! Key templates: a lock key described as text, compiled once at start-up.
//!
//! A [`KeyTemplate`] is literal text with placeholders in braces, such as
//! `"account:{path.id}"` or `"{header.x-tenant-id}:{query.doc}"`. Each placeholder names a part
//! of the request:
//!
//! | placeholder | value | missing |
//! |---|---|---|
//! | `{path.NAME}` | path parameter `NAME` of the matched route, percent-decoded to bytes; not UTF-8 once decoded, 400 | 400; **500** if the route has no `NAME` or no route is known |
//! | `{header.NAME}` | first value of request header `NAME` (case-insensitive) | 400 |
//! | `{query.NAME}` | query parameter `NAME`, decoded as `application/x-www-form-urlencoded`; given twice or not UTF-8 once decoded, 400 | 400 |
//! | `{method}` | the HTTP method, e.g. `PUT`; `HEAD` reads `GET` (it runs the GET handler) | never |
//! | `{matched_path}` | the route pattern, e.g. `/accounts/{id}` | **500** (no route is known) |
//!
//! `{{` and `}}` are a literal `{` and `}`. Whitespace inside braces is not allowed.
//!
//! `{path.NAME}` reads the value the router matched, and `{matched_path}` the pattern it matched:
//! a [`LockRoutes`](crate::LockRoutes) table's own route first; then, with the `axum` feature and
//! the layer added with `route_layer`, axum's match (right under `Router::nest` and
//! `nest_service` too, where axum strips the prefix from the URI); otherwise the pattern given
//! with [`KeyTemplate::with_pattern`], matched against the URI path as axum's router does.
//! Patterns use axum 0.8's syntax: `{id}`, text before a parameter (`/files/v{version}`), a final
//! catch-all `{*rest}`.
//!
//! A route that can never give the template its value is the server's mistake: see
//! [`KeyTemplate`] (answered 500, logged once).
//!
//! Request material (values of placeholders) is escaped as described in
//! [key hygiene](super#key-hygiene), so a `:` or a brace in a header value can neither forge
//! another key nor pick a Redis Cluster hash slot. Literal text is escaped the same way, except
//! that `:` is kept, so `account:{path.id}` reads `account:42`. A template always yields a key or
//! a rejection, never "no lock".
//!
//! Two placeholders need a separator between them: literal text with at least one punctuation
//! character that stays as itself in the key (`:`, `-`, `/`, `.`, …; not a letter, digit, space,
//! `%`, `#` or brace, which are letters of values or escaped). Every such separator character is
//! then escaped in the template's values (`{header.a}-{header.b}` gives `1%2D2-3` for `1-2` and
//! `3`), so two different tuples of values never share a key. `:` keeps keys most readable.
//!
//! [`KeyTemplate::parse`] reports a malformed template as a [`TemplateError`] with the byte
//! position and what was expected there, and [`KeyTemplate::with_pattern`] checks that every
//! `{path.NAME}` is a parameter of the pattern.
//!
//! ```
//! use tower_lock::key::{KeyExtractor, KeyTemplate};
//!
//! let template = KeyTemplate::parse("{header.x-tenant-id}:account:{path.id}")?
//!     .with_pattern("/accounts/{id}/deposit")?;
//!
//! let (parts, _) = http::Request::builder()
//!     .method("POST")
//!     .uri("/accounts/42/deposit")
//!     .header("X-Tenant-Id", "acme:eu")
//!     .body(())
//!     .unwrap()
//!     .into_parts();
//! let key = template.extract(&parts).unwrap().unwrap();
//! // The `:` of the header value is escaped; the literal ones are kept.
//! assert_eq!(key.as_str(), "acme%3Aeu:account:42");
//!
//! // A misspelt source is a configuration error, caught at start-up.
//! let error = KeyTemplate::parse("acc:{pth.id}").unwrap_err();
//! assert_eq!(error.position(), 4);
//! # Ok::<(), tower_lock::key::TemplateError>(())
//! ```

use std::ops::Range;
use std::sync::Arc;

use http::HeaderName;
use http::request::Parts;

use super::error::TemplateError;
use super::lock_key::{Piece, separators};
use super::pattern::{ParamSource, Pattern, no_pattern, path_params, route_pattern};
use super::sources::query_value;
use super::{KeyExtractor, KeyRejection, LockKey, ReportOnce};

const SOURCES: &str = "one of `path.NAME`, `header.NAME`, `query.NAME`, `method`, `matched_path`";

/// A lock key template such as `"account:{path.id}"`, compiled once at start-up.
///
/// Literal text with placeholders: `{path.NAME}` (a path parameter of the route pattern),
/// `{header.NAME}` (a request header), `{query.NAME}` (a query parameter), `{method}` and
/// `{matched_path}` (the route pattern). `{{` and `}}` are literal braces; whitespace inside
/// braces is not allowed; two placeholders need a punctuation separator between them.
/// Placeholder values are escaped (separator characters included), literal `:` is kept, and a
/// request without a referenced part is rejected with 400 naming that part (500 when the route
/// can never give a `{path.NAME}` or `{matched_path}`, below).
///
/// The route and its parameters are the ones the router matched (a `LockRoutes` table, or axum
/// with the `axum` feature; right under `Router::nest` and `nest_service`), otherwise the pattern
/// given with [`KeyTemplate::with_pattern`], matched against the URI path as axum's router does.
///
/// A route that can never give the template its value is the server's mistake, not the
/// client's: no route known at all (a layer around the whole axum router, which runs before
/// routing; the crate built without its `axum` feature under `route_layer`; no pattern given
/// outside a router), or a `{path.NAME}` the matched route pattern does not have. Such requests
/// are answered **500** with a detail that names the fix, before any part the request lacks is
/// looked at, and the template logs it at error level once (per template and its clones: one
/// layer). Where a pattern meets the template while the app is built
/// ([`KeyTemplate::with_pattern`], [`LockPolicy::layer_for`](crate::LockPolicy::layer_for),
/// [`LockRoutes::route`](crate::LockRoutes::route)), a missing parameter is an error then.
///
/// A separator is literal text with at least one punctuation character kept as itself in the
/// key (`:`, `-`, `/`, `.`, …; not a letter, digit, space, `%`, `#` or brace). Every separator
/// character is escaped in the template's values: `{header.a}-{header.b}` gives `1%2D2-3` for
/// `1-2` and `3`, and `1-2%2D3` for `1` and `2-3`. So one template never gives two different
/// tuples of values the same key.
///
/// ```
/// use tower_lock::key::{KeyExtractor, KeyTemplate};
///
/// let template = KeyTemplate::parse("{method}:{matched_path}:{query.doc}")?
///     .with_pattern("/docs")?;
/// let (parts, _) = http::Request::put("/docs?doc=a%3Ab").body(()).unwrap().into_parts();
/// assert_eq!(template.extract(&parts).unwrap().unwrap().as_str(), "PUT:/docs:a%3Ab");
/// # Ok::<(), tower_lock::key::TemplateError>(())
/// ```
///
/// Cloning is cheap: the compiled template is shared.
#[derive(Clone, Debug)]
pub struct KeyTemplate {
    compiled: Arc<Compiled>,
    pattern: Option<Pattern>,
    /// Shared by clones (the services of one layer): a misconfiguration is logged once.
    misconfigured: ReportOnce,
}

#[derive(Debug)]
struct Compiled {
    source: Box<str>,
    parts: Box<[Part]>,
    /// ASCII bytes escaped in material besides the usual ones: the separators' (a bit per byte).
    escape: u128,
}

#[derive(Debug)]
enum Part {
    Literal {
        text: Box<str>,
        /// Byte offset of the literal in the template text.
        at: usize,
    },
    Placeholder {
        source: Source,
        /// Byte range of the placeholder, braces included, in the template text.
        span: Range<usize>,
    },
}

#[derive(Debug)]
enum Source {
    Path(Box<str>),
    Header(HeaderName),
    Query(Box<str>),
    Method,
    MatchedPath,
}

impl KeyTemplate {
    /// The same template with its own once-per-layer misconfiguration report: each layer made
    /// from one policy logs its own misconfiguration.
    pub(crate) fn for_another_layer(&self) -> Self {
        let mut template = self.clone();
        template.misconfigured = ReportOnce::default();
        template
    }

    /// Compiles `text`, or reports where and why it is malformed.
    ///
    /// ```
    /// use tower_lock::key::KeyTemplate;
    ///
    /// assert!(KeyTemplate::parse("{method}:{matched_path}").is_ok());
    /// let error = KeyTemplate::parse("doc:{query.doc").unwrap_err();
    /// assert_eq!((error.position(), error.expected()), (4, "`}` to close this placeholder"));
    /// ```
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let error = |position: usize, expected: &str, found: String| TemplateError {
            template: text.into(),
            position,
            expected: expected.into(),
            found,
        };
        if text.is_empty() {
            return Err(error(
                0,
                "literal text or a placeholder",
                "an empty template".into(),
            ));
        }

        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut literal_at = 0;
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            if literal.is_empty() {
                literal_at = at;
            }
            match c {
                '{' if chars.next_if(|&(_, c)| c == '{').is_some() => literal.push('{'),
                '}' if chars.next_if(|&(_, c)| c == '}').is_some() => literal.push('}'),
                '}' => {
                    return Err(error(at, "`}}` for a literal `}`", "a lone `}`".into()));
                }
                '{' => {
                    let start = at + 1;
                    let end = loop {
                        match chars.next() {
                            Some((end, '}')) => break end,
                            Some((inner, '{')) => {
                                return Err(error(
                                    inner,
                                    "`}` to close the placeholder",
                                    "`{`".into(),
                                ));
                            }
                            Some((inner, c)) if c.is_whitespace() => {
                                return Err(error(
                                    inner,
                                    "no whitespace inside a placeholder",
                                    format!("whitespace {c:?}"),
                                ));
                            }
                            Some(_) => {}
                            None => {
                                return Err(error(
                                    at,
                                    "`}` to close this placeholder",
                                    "the end of the template".into(),
                                ));
                            }
                        }
                    };
                    let source = parse_source(&text[start..end], start)
                        .map_err(|(position, expected, found)| error(position, &expected, found))?;
                    if !literal.is_empty() {
                        parts.push(Part::Literal {
                            text: std::mem::take(&mut literal).into(),
                            at: literal_at,
                        });
                    }
                    parts.push(Part::Placeholder {
                        source,
                        span: at..end + 1,
                    });
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal {
                text: literal.into(),
                at: literal_at,
            });
        }
        let pieces: Vec<Piece> = parts
            .iter()
            .map(|part| match part {
                Part::Literal { text, at } => Piece::Literal { text, at: *at },
                Part::Placeholder { span, .. } => Piece::Value { span: span.clone() },
            })
            .collect();
        let escape = separators(text, &pieces)?;

        Ok(Self {
            compiled: Arc::new(Compiled {
                source: text.into(),
                parts: parts.into(),
                escape,
            }),
            pattern: None,
            misconfigured: ReportOnce::default(),
        })
    }

    /// Sets the route pattern, such as `/accounts/{id}/deposit`, for stacks without a router
    /// that reports its match. The syntax is axum 0.8's: `{id}`, text before a parameter
    /// (`/files/v{version}`), a final catch-all `{*rest}`; the pattern matches the URI path the
    /// way axum's router (matchit) does.
    ///
    /// Fails when axum would refuse `pattern` (the error is at byte 0 and names the reason), or
    /// when a `{path.NAME}` of the template is not a parameter of `pattern` (the error points at
    /// that placeholder).
    pub fn with_pattern(mut self, pattern: &str) -> Result<Self, TemplateError> {
        let compiled = Pattern::parse(pattern).map_err(|reason| TemplateError {
            template: self.as_str().into(),
            position: 0,
            expected: "a route pattern axum accepts".into(),
            found: format!("`{pattern}`: {reason}"),
        })?;
        let params: Vec<&str> = compiled.params().collect();
        for part in self.compiled.parts.iter() {
            if let Part::Placeholder {
                source: Source::Path(name),
                span,
            } = part
                && !params.contains(&&**name)
            {
                let known = if params.is_empty() {
                    "it has none".to_owned()
                } else {
                    let list: Vec<String> = params.iter().map(|p| format!("`{p}`")).collect();
                    format!("it has {}", list.join(", "))
                };
                return Err(TemplateError {
                    template: self.as_str().into(),
                    position: span.start,
                    expected: format!("a parameter of the route pattern `{pattern}` ({known})"),
                    found: format!("`{}`", &self.compiled.source[span.clone()]),
                });
            }
        }
        self.pattern = Some(compiled);
        // Another route: its misconfiguration, if any, is another one to report.
        self.misconfigured = ReportOnce::default();
        Ok(self)
    }

    /// The text the template was parsed from.
    pub fn as_str(&self) -> &str {
        &self.compiled.source
    }

    /// The placeholders of the template in order, braces included, e.g. `{path.id}`.
    pub fn placeholders(&self) -> impl Iterator<Item = &str> + '_ {
        self.compiled.parts.iter().filter_map(|part| match part {
            Part::Placeholder { span, .. } => Some(&self.compiled.source[span.clone()]),
            Part::Literal { .. } => None,
        })
    }
}

/// Parses the inside of a placeholder starting at byte `start`; errors are
/// `(position, expected, found)`.
fn parse_source(body: &str, start: usize) -> Result<Source, (usize, String, String)> {
    let end = start + body.len();
    // Only called when `body` is `prefix` or starts with `prefix.`.
    let named = |prefix: &str, what: &str| -> Result<&str, (usize, String, String)> {
        match body[prefix.len()..].strip_prefix('.') {
            Some(name) if !name.is_empty() => Ok(name),
            _ => Err((
                end,
                format!("{what}, as in `{{{prefix}.NAME}}`"),
                "`}`".into(),
            )),
        }
    };
    match body {
        "" => Err((
            start - 1,
            SOURCES.into(),
            "an empty placeholder `{}`".into(),
        )),
        "method" => Ok(Source::Method),
        "matched_path" => Ok(Source::MatchedPath),
        _ if body == "path" || body.starts_with("path.") => {
            let name = named("path", "a path parameter name")?;
            Ok(Source::Path(name.into()))
        }
        _ if body == "query" || body.starts_with("query.") => {
            let name = named("query", "a query parameter name")?;
            Ok(Source::Query(name.into()))
        }
        _ if body == "header" || body.starts_with("header.") => {
            let name = named("header", "a header name")?;
            HeaderName::from_bytes(name.as_bytes())
                .map(Source::Header)
                .map_err(|_| {
                    (
                        end - name.len(),
                        "a valid HTTP header name".into(),
                        format!("`{name}`"),
                    )
                })
        }
        _ => Err((start - 1, SOURCES.into(), format!("`{body}`"))),
    }
}

impl KeyExtractor for KeyTemplate {
    fn extract(&self, parts: &Parts) -> Result<Option<LockKey>, KeyRejection> {
        let key = self.render(parts);
        let template = format_args!("KeyTemplate({:?})", self.as_str());
        self.misconfigured.check(key, &template).map(Some)
    }
}

/// How a template tells `KeyTemplate::with_pattern`'s users to give it a pattern.
const GIVE_PATTERN: &str = "`KeyTemplate::with_pattern` or `LockPolicy::layer_for`";

impl KeyTemplate {
    /// What the route decides, read before any request part: a misconfiguration (no route
    /// pattern known, a `{path.NAME}` the route does not have) is the server's whatever the
    /// request carries, so it is reported before a part the request lacks. Returns the path
    /// parameters (when the template reads any) and the route pattern (for `{matched_path}`).
    fn route<'a>(
        &'a self,
        parts: &'a Parts,
    ) -> Result<(Option<ParamSource<'a>>, Option<&'a str>), KeyRejection> {
        let placeholders = || {
            self.compiled.parts.iter().filter_map(|part| match part {
                Part::Placeholder { source, span } => Some((source, span)),
                Part::Literal { .. } => None,
            })
        };
        let mut params = None;
        let mut pattern = None;
        for (source, span) in placeholders() {
            let placeholder = &self.compiled.source[span.clone()];
            let what = format_args!("`{placeholder}` in the key template `{}`", self.as_str());
            match source {
                Source::Path(name) => {
                    let params = match &mut params {
                        Some(params) => params,
                        None => params.insert(path_params(
                            parts,
                            self.pattern.as_ref(),
                            &what,
                            GIVE_PATTERN,
                        )?),
                    };
                    if let Some(misconfigured) = params.misconfigured(name) {
                        return Err(misconfigured);
                    }
                }
                Source::MatchedPath if pattern.is_none() => {
                    pattern = Some(
                        route_pattern(parts, self.pattern.as_ref())
                            .ok_or_else(|| no_pattern(&what, GIVE_PATTERN))?,
                    );
                }
                _ => {}
            }
        }
        Ok((params, pattern))
    }

    fn render(&self, parts: &Parts) -> Result<LockKey, KeyRejection> {
        let (path, matched_path) = self.route(parts)?;
        let escape = self.compiled.escape;
        let mut key = LockKey::empty();
        for part in self.compiled.parts.iter() {
            let source = match part {
                Part::Literal { text, .. } => {
                    key.push_literal(text);
                    continue;
                }
                Part::Placeholder { source, .. } => source,
            };
            match source {
                Source::Method => {
                    // axum (and HTTP) answer HEAD with the GET handler: one lock for both.
                    let method = if parts.method == http::Method::HEAD {
                        "GET"
                    } else {
                        parts.method.as_str()
                    };
                    key.push_material_escaping(method.as_bytes(), escape)
                }
                Source::MatchedPath => {
                    // Read by `route`, which fails when there is none.
                    let pattern = matched_path.unwrap_or_default();
                    key.push_material_escaping(pattern.as_bytes(), escape);
                }
                Source::Header(name) => match parts.headers.get(name) {
                    Some(value) => key.push_material_escaping(value.as_bytes(), escape),
                    None => return Err(KeyRejection::missing_header(name.clone())),
                },
                Source::Query(name) => match query_value(parts, name)? {
                    Some(value) => key.push_material_escaping(&value, escape),
                    None => {
                        return Err(KeyRejection::missing(format_args!(
                            "query parameter `{name}`"
                        )));
                    }
                },
                Source::Path(name) => {
                    // Read by `route` whenever the template has a `{path.NAME}`.
                    let value = match &path {
                        Some(params) => params.get(name)?,
                        None => &[],
                    };
                    key.push_material_escaping(value, escape);
                }
            }
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests;
