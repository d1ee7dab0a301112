//! Key templates: a lock key described as text, compiled once at start-up.
//!
//! A [`KeyTemplate`] is literal text with placeholders in braces, such as
//! `"account:{path.id}"` or `"{header.x-tenant-id}:{query.doc}"`. Each placeholder names a part
//! of the request:
//!
//! | placeholder | value | missing |
//! |---|---|---|
//! | `{path.NAME}` | path parameter `NAME` of the route pattern, percent-decoded | 400 |
//! | `{header.NAME}` | first value of request header `NAME` (case-insensitive) | 400 |
//! | `{query.NAME}` | first query parameter `NAME`, decoded as `application/x-www-form-urlencoded` | 400 |
//! | `{method}` | the HTTP method, e.g. `PUT` | never |
//! | `{matched_path}` | the route pattern, e.g. `/accounts/{id}` | 400 |
//!
//! `{{` and `}}` are a literal `{` and `}`. Whitespace inside braces is not allowed.
//!
//! The route pattern used by `{path.NAME}` and `{matched_path}` is axum's
//! [`MatchedPath`](https://docs.rs/axum/latest/axum/extract/struct.MatchedPath.html) when present
//! (with the `axum` feature, when the layer is added with `route_layer`), otherwise the pattern
//! given with [`KeyTemplate::with_pattern`]. Patterns may write parameters as `{id}` or `:id`, and
//! a trailing wildcard as `{*rest}`.
//!
//! Request material (values of placeholders) is escaped as described in
//! [key hygiene](super#key-hygiene), so a `:` or a brace in a header value can neither forge
//! another key nor pick a Redis Cluster hash slot. Literal text is escaped the same way, except
//! that `:` is kept, so `account:{path.id}` reads `account:42`. A template always yields a key or
//! a rejection, never "no lock".
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

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use http::HeaderName;
use http::request::Parts;

use super::extract::path_param;
use super::{KeyExtractor, KeyRejection, LockKey};

const SOURCES: &str = "one of `path.NAME`, `header.NAME`, `query.NAME`, `method`, `matched_path`";

/// A lock key template such as `"account:{path.id}"`, compiled once at start-up.
///
/// Literal text with placeholders: `{path.NAME}` (a path parameter of the route pattern),
/// `{header.NAME}` (a request header), `{query.NAME}` (a query parameter), `{method}` and
/// `{matched_path}` (the route pattern). `{{` and `}}` are literal braces; whitespace inside
/// braces is not allowed. Placeholder values are escaped, literal `:` is kept, and a request
/// without a referenced part is rejected with 400 naming that part.
///
/// The route pattern is axum's `MatchedPath` when present (with the `axum` feature), otherwise
/// the one given with [`KeyTemplate::with_pattern`].
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
    pattern: Option<Arc<str>>,
}

#[derive(Debug)]
struct Compiled {
    source: Box<str>,
    parts: Box<[Part]>,
}

#[derive(Debug)]
enum Part {
    Literal(Box<str>),
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
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
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
                        parts.push(Part::Literal(std::mem::take(&mut literal).into()));
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
            parts.push(Part::Literal(literal.into()));
        }

        Ok(Self {
            compiled: Arc::new(Compiled {
                source: text.into(),
                parts: parts.into(),
            }),
            pattern: None,
        })
    }

    /// Sets the route pattern, such as `/accounts/{id}/deposit`, for stacks without axum's
    /// `MatchedPath`; `:id` and a trailing `{*rest}` are understood too.
    ///
    /// Fails when a `{path.NAME}` of the template is not a parameter of `pattern`; the error
    /// points at that placeholder.
    pub fn with_pattern(mut self, pattern: &str) -> Result<Self, TemplateError> {
        let params = pattern_params(pattern);
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
        self.pattern = Some(pattern.into());
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
            Part::Literal(_) => None,
        })
    }

    fn route_pattern<'a>(&'a self, parts: &'a Parts) -> Option<&'a str> {
        #[cfg(feature = "axum")]
        if let Some(matched) = parts.extensions.get::<axum::extract::MatchedPath>() {
            return Some(matched.as_str());
        }
        let _ = parts;
        self.pattern.as_deref()
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

/// The parameter names of a route pattern, as [`path_param`] reads them.
fn pattern_params(pattern: &str) -> Vec<&str> {
    let mut params = Vec::new();
    for segment in pattern.strip_prefix('/').unwrap_or(pattern).split('/') {
        if let Some(param) = segment
            .strip_prefix("{*")
            .and_then(|p| p.strip_suffix('}'))
            .or_else(|| segment.strip_prefix('*'))
        {
            // `path_param` stops at the wildcard: nothing after it can match.
            params.push(param);
            break;
        }
        if let Some(param) = segment
            .strip_prefix('{')
            .and_then(|p| p.strip_suffix('}'))
            .or_else(|| segment.strip_prefix(':'))
        {
            params.push(param);
        }
    }
    params
}

impl KeyExtractor for KeyTemplate {
    fn extract(&self, parts: &Parts) -> Result<Option<LockKey>, KeyRejection> {
        let mut key = LockKey::empty();
        for part in self.compiled.parts.iter() {
            let source = match part {
                Part::Literal(text) => {
                    key.push_literal(text);
                    continue;
                }
                Part::Placeholder { source, .. } => source,
            };
            match source {
                Source::Method => key.push_material(parts.method.as_str()),
                Source::MatchedPath => match self.route_pattern(parts) {
                    Some(pattern) => key.push_material(pattern),
                    None => {
                        return Err(KeyRejection::new(
                            "no route pattern is known for `{matched_path}`; give one with \
                             `KeyTemplate::with_pattern`, or add the layer with axum's \
                             `route_layer`",
                        ));
                    }
                },
                Source::Header(name) => match parts.headers.get(name) {
                    Some(value) => key.push_material(value.as_bytes()),
                    None => return Err(KeyRejection::missing(format_args!("header `{name}`"))),
                },
                Source::Query(name) => {
                    let found = parts.uri.query().and_then(|query| {
                        form_urlencoded::parse(query.as_bytes())
                            .find(|(found, _)| **found == **name)
                            .map(|(_, value)| value)
                    });
                    match found {
                        Some(value) => key.push_material(value.as_bytes()),
                        None => {
                            return Err(KeyRejection::missing(format_args!(
                                "query parameter `{name}`"
                            )));
                        }
                    }
                }
                Source::Path(name) => {
                    let Some(pattern) = self.route_pattern(parts) else {
                        return Err(KeyRejection::new(format!(
                            "no route pattern is known for path parameter `{name}`; give one \
                             with `KeyTemplate::with_pattern`, or add the layer with axum's \
                             `route_layer`"
                        )));
                    };
                    match path_param(pattern, parts.uri.path(), name) {
                        Some(value) => key.push_material(value),
                        None => {
                            return Err(KeyRejection::missing(format_args!(
                                "path parameter `{name}`"
                            )));
                        }
                    }
                }
            }
        }
        Ok(Some(key))
    }
}

/// A malformed key template: where it went wrong and what was expected there.
///
/// This is a configuration error, reported while the service is built:
///
/// ```
/// use tower_lock::key::KeyTemplate;
///
/// let error = KeyTemplate::parse("acc:{pth.id}").unwrap_err();
/// assert_eq!(
///     error.to_string(),
///     "key template `acc:{pth.id}`: at byte 4: expected one of `path.NAME`, `header.NAME`, \
///      `query.NAME`, `method`, `matched_path`, found `pth.id`"
/// );
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateError {
    template: Box<str>,
    position: usize,
    expected: String,
    found: String,
}

impl TemplateError {
    /// Byte offset in the template text where the error was found.
    pub fn position(&self) -> usize {
        self.position
    }

    /// What was expected at [`position`](Self::position), e.g. ``a valid HTTP header name``.
    pub fn expected(&self) -> &str {
        &self.expected
    }

    /// What was found instead, e.g. ``a lone `}` ``.
    pub fn found(&self) -> &str {
        &self.found
    }

    /// The template text.
    pub fn template(&self) -> &str {
        &self.template
    }
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "key template `{}`: at byte {}: expected {}, found {}",
            self.template, self.position, self.expected, self.found
        )
    }
}

impl std::error::Error for TemplateError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn key(template: &KeyTemplate, parts: &Parts) -> String {
        template
            .extract(parts)
            .expect("keyed")
            .expect("a template always locks")
            .as_str()
            .to_owned()
    }

    fn rejection(template: &KeyTemplate, parts: &Parts) -> String {
        template
            .extract(parts)
            .expect_err("rejected")
            .detail()
            .to_owned()
    }

    fn parse_error(text: &str) -> (usize, String, String) {
        let error = KeyTemplate::parse(text).expect_err("invalid template");
        (
            error.position(),
            error.expected().into(),
            error.found().into(),
        )
    }

    #[test]
    fn path_placeholder_reads_the_parameter_of_the_given_pattern() {
        let template = KeyTemplate::parse("account:{path.id}")
            .unwrap()
            .with_pattern("/accounts/{id}/deposit")
            .unwrap();
        let parts = request("POST", "/accounts/a%20b/deposit", &[]);
        assert_eq!(key(&template, &parts), "account:a%20b");
    }

    #[test]
    fn path_placeholder_understands_colon_and_wildcard_patterns() {
        let colon = KeyTemplate::parse("{path.id}")
            .unwrap()
            .with_pattern("/accounts/:id")
            .unwrap();
        assert_eq!(key(&colon, &request("GET", "/accounts/7", &[])), "7");
        let wildcard = KeyTemplate::parse("file:{path.rest}")
            .unwrap()
            .with_pattern("/files/{*rest}")
            .unwrap();
        assert_eq!(
            key(&wildcard, &request("GET", "/files/a/b.txt", &[])),
            "file:a/b.txt"
        );
    }

    #[test]
    fn header_placeholder_is_case_insensitive_and_takes_the_first_value() {
        let template = KeyTemplate::parse("{header.X-Tenant-Id}:{query.doc}").unwrap();
        let parts = request(
            "GET",
            "/docs?doc=d1",
            &[("x-tenant-id", "acme"), ("x-tenant-id", "other")],
        );
        assert_eq!(key(&template, &parts), "acme:d1");
    }

    #[test]
    fn query_placeholder_is_form_decoded() {
        let template = KeyTemplate::parse("doc:{query.doc}").unwrap();
        let parts = request("GET", "/x?a=1&doc=b+c%2F", &[]);
        assert_eq!(key(&template, &parts), "doc:b%20c/");
    }

    #[test]
    fn method_and_matched_path_come_from_the_request_and_the_given_pattern() {
        let template = KeyTemplate::parse("{method}:{matched_path}")
            .unwrap()
            .with_pattern("/accounts/{id}")
            .unwrap();
        let parts = request("PUT", "/accounts/1", &[]);
        // The braces of the pattern are material, so they are escaped.
        assert_eq!(key(&template, &parts), "PUT:/accounts/%7Bid%7D");
    }

    #[test]
    fn literal_only_template_is_a_constant_key() {
        let template = KeyTemplate::parse("global").unwrap();
        assert_eq!(key(&template, &request("GET", "/", &[])), "global");
        assert_eq!(template.placeholders().count(), 0);
    }

    #[test]
    fn user_material_is_escaped_while_literal_colons_are_kept() {
        let template = KeyTemplate::parse("t:{header.x-tenant}:q:{query.q}").unwrap();
        let parts = request("GET", "/?q=%7Bslot%7D%3Ax", &[("x-tenant", "a:b{c}#")]);
        assert_eq!(key(&template, &parts), "t:a%3Ab%7Bc%7D%23:q:%7Bslot%7D%3Ax");
    }

    #[test]
    fn double_braces_are_literal_braces_and_are_escaped_in_the_key() {
        let template = KeyTemplate::parse("{{tag}}:{method}").unwrap();
        assert_eq!(template.placeholders().collect::<Vec<_>>(), ["{method}"]);
        assert_eq!(key(&template, &request("GET", "/", &[])), "%7Btag%7D:GET");
        let nested = KeyTemplate::parse("{{{method}}}").unwrap();
        assert_eq!(key(&nested, &request("GET", "/", &[])), "%7BGET%7D");
    }

    #[test]
    fn as_str_and_placeholders_report_the_source() {
        let text = "{header.x-tenant-id}:{query.doc}:{path.id}";
        let template = KeyTemplate::parse(text).unwrap();
        assert_eq!(template.as_str(), text);
        assert_eq!(
            template.placeholders().collect::<Vec<_>>(),
            ["{header.x-tenant-id}", "{query.doc}", "{path.id}"]
        );
    }

    #[test]
    fn clones_share_the_compiled_template() {
        let template = KeyTemplate::parse("a:{method}").unwrap();
        let clone = template.clone();
        assert!(Arc::ptr_eq(&template.compiled, &clone.compiled));
    }

    #[test]
    fn missing_header_is_rejected_naming_the_header() {
        let template = KeyTemplate::parse("{header.X-Tenant-Id}").unwrap();
        let detail = rejection(&template, &request("GET", "/", &[]));
        assert_eq!(
            detail,
            "the request has no header `x-tenant-id`, which the lock key needs"
        );
    }

    #[test]
    fn missing_query_parameter_is_rejected_naming_the_parameter() {
        let template = KeyTemplate::parse("{query.doc}").unwrap();
        let detail = rejection(&template, &request("GET", "/x?a=1", &[]));
        assert_eq!(
            detail,
            "the request has no query parameter `doc`, which the lock key needs"
        );
        assert!(rejection(&template, &request("GET", "/x", &[])).contains("`doc`"));
    }

    #[test]
    fn missing_path_parameter_is_rejected_naming_the_parameter() {
        let template = KeyTemplate::parse("{path.id}")
            .unwrap()
            .with_pattern("/accounts/{id}")
            .unwrap();
        let detail = rejection(&template, &request("GET", "/accounts", &[]));
        assert_eq!(
            detail,
            "the request has no path parameter `id`, which the lock key needs"
        );
    }

    #[test]
    fn path_and_matched_path_without_any_pattern_are_rejected() {
        let path = KeyTemplate::parse("{path.id}").unwrap();
        let detail = rejection(&path, &request("GET", "/accounts/1", &[]));
        assert!(
            detail.starts_with("no route pattern is known for path parameter `id`; "),
            "{detail}"
        );
        let matched = KeyTemplate::parse("{matched_path}").unwrap();
        let detail = rejection(&matched, &request("GET", "/accounts/1", &[]));
        assert!(
            detail.starts_with("no route pattern is known for `{matched_path}`; "),
            "{detail}"
        );
    }

    #[test]
    fn first_missing_part_in_template_order_is_reported() {
        let template = KeyTemplate::parse("{query.a}:{header.b}").unwrap();
        assert!(rejection(&template, &request("GET", "/", &[])).contains("query parameter `a`"));
    }

    #[test]
    fn with_pattern_rejects_unknown_path_parameters_at_the_placeholder() {
        let error = KeyTemplate::parse("a:{path.id}:{path.nope}")
            .unwrap()
            .with_pattern("/accounts/{id}")
            .unwrap_err();
        assert_eq!(error.position(), 12);
        assert_eq!(
            error.expected(),
            "a parameter of the route pattern `/accounts/{id}` (it has `id`)"
        );
        assert_eq!(error.found(), "`{path.nope}`");

        let error = KeyTemplate::parse("{path.id}")
            .unwrap()
            .with_pattern("/health")
            .unwrap_err();
        assert_eq!(error.position(), 0);
        assert_eq!(
            error.expected(),
            "a parameter of the route pattern `/health` (it has none)"
        );
    }

    #[test]
    fn with_pattern_ignores_parameters_after_a_wildcard() {
        // `path_param` stops at the wildcard, so a parameter after it could never be found.
        assert!(
            KeyTemplate::parse("{path.id}")
                .unwrap()
                .with_pattern("/files/{*rest}/{id}")
                .is_err()
        );
    }

    #[test]
    fn unknown_source_is_reported_at_the_opening_brace() {
        let error = KeyTemplate::parse("acc:{pth.id}").unwrap_err();
        assert_eq!(error.position(), 4);
        assert_eq!(error.expected(), SOURCES);
        assert_eq!(
            error.to_string(),
            "key template `acc:{pth.id}`: at byte 4: expected one of `path.NAME`, \
             `header.NAME`, `query.NAME`, `method`, `matched_path`, found `pth.id`"
        );
        assert_eq!(
            parse_error("{foo.x}"),
            (0, SOURCES.into(), "`foo.x`".into())
        );
        assert_eq!(
            parse_error("x{method.x}"),
            (1, SOURCES.into(), "`method.x`".into())
        );
    }

    #[test]
    fn unterminated_placeholder_is_reported_at_its_opening_brace() {
        assert_eq!(
            parse_error("doc:{query.doc"),
            (
                4,
                "`}` to close this placeholder".into(),
                "the end of the template".into()
            )
        );
        assert_eq!(
            parse_error("{"),
            (
                0,
                "`}` to close this placeholder".into(),
                "the end of the template".into()
            )
        );
    }

    #[test]
    fn brace_inside_a_placeholder_is_reported_where_it_is() {
        assert_eq!(
            parse_error("{path.{id}}"),
            (6, "`}` to close the placeholder".into(), "`{`".into())
        );
    }

    #[test]
    fn stray_closing_brace_is_reported() {
        assert_eq!(
            parse_error("account}"),
            (7, "`}}` for a literal `}`".into(), "a lone `}`".into())
        );
        assert_eq!(
            parse_error("{method}}"),
            (8, "`}}` for a literal `}`".into(), "a lone `}`".into())
        );
    }

    #[test]
    fn empty_placeholder_is_reported() {
        assert_eq!(
            parse_error("a:{}"),
            (2, SOURCES.into(), "an empty placeholder `{}`".into())
        );
    }

    #[test]
    fn missing_name_after_a_source_is_reported_where_the_name_should_be() {
        assert_eq!(
            parse_error("{path.}"),
            (
                6,
                "a path parameter name, as in `{path.NAME}`".into(),
                "`}`".into()
            )
        );
        assert_eq!(
            parse_error("ab{header.}"),
            (
                10,
                "a header name, as in `{header.NAME}`".into(),
                "`}`".into()
            )
        );
        assert_eq!(
            parse_error("{query}"),
            (
                6,
                "a query parameter name, as in `{query.NAME}`".into(),
                "`}`".into()
            )
        );
    }

    #[test]
    fn invalid_header_name_is_reported_at_the_name() {
        assert_eq!(
            parse_error("t:{header.x(y)}"),
            (10, "a valid HTTP header name".into(), "`x(y)`".into())
        );
    }

    #[test]
    fn whitespace_inside_braces_is_reported_where_it_is() {
        assert_eq!(
            parse_error("{ path.id}"),
            (
                1,
                "no whitespace inside a placeholder".into(),
                "whitespace ' '".into()
            )
        );
        assert_eq!(
            parse_error("k:{path.id\t}"),
            (
                10,
                "no whitespace inside a placeholder".into(),
                "whitespace '\\t'".into()
            )
        );
        // Outside braces whitespace is literal text (escaped in the key).
        let template = KeyTemplate::parse("a b").unwrap();
        assert_eq!(key(&template, &request("GET", "/", &[])), "a%20b");
    }

    #[test]
    fn empty_template_is_rejected() {
        assert_eq!(
            parse_error(""),
            (
                0,
                "literal text or a placeholder".into(),
                "an empty template".into()
            )
        );
    }

    #[test]
    fn positions_are_byte_offsets_after_non_ascii_text() {
        // `é` is two bytes.
        assert_eq!(parse_error("é{x}").0, 2);
    }

    #[cfg(feature = "axum")]
    #[tokio::test]
    async fn axum_matched_path_is_preferred_over_the_given_pattern() {
        use axum::routing::post;
        use tower::ServiceExt;

        // `MatchedPath` has no public constructor: let an axum router insert it, and extract
        // the key from the handler's request parts.
        let template = KeyTemplate::parse("{matched_path}:{path.id}")
            .unwrap()
            .with_pattern("/other/{id}")
            .unwrap();
        let app = axum::Router::new().route(
            "/accounts/{id}/deposit",
            post(move |parts: Parts| async move {
                match template.extract(&parts) {
                    Ok(key) => key.unwrap().as_str().to_owned(),
                    Err(rejection) => format!("rejected: {rejection}"),
                }
            }),
        );
        let request = http::Request::post("/accounts/42/deposit")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(&body[..], b"/accounts/%7Bid%7D/deposit:42");
    }
}
