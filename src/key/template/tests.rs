//! Unit tests of key templates.
use super::*;
use crate::key::KeyRejectionKind;
use crate::key::pattern::{PathParams, TableMatch};

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
fn path_placeholder_understands_prefixed_and_wildcard_patterns() {
    let version = KeyTemplate::parse("{path.version}")
        .unwrap()
        .with_pattern("/files/v{version}")
        .unwrap();
    assert_eq!(key(&version, &request("GET", "/files/v7", &[])), "7");
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

fn misconfiguration(template: &KeyTemplate, parts: &Parts) -> String {
    let rejection = template.extract(parts).expect_err("rejected");
    assert_eq!(
        rejection.kind(),
        KeyRejectionKind::Misconfigured,
        "{rejection}"
    );
    rejection.detail().to_owned()
}

#[test]
fn path_and_matched_path_without_any_pattern_are_misconfigured() {
    let path = KeyTemplate::parse("{path.id}").unwrap();
    let detail = misconfiguration(&path, &request("GET", "/accounts/1", &[]));
    assert!(
        detail.starts_with(
            "no route pattern is known for `{path.id}` in the key template `{path.id}`, so no \
             request can be keyed: "
        ),
        "{detail}"
    );
    // The fix is named.
    assert!(
        detail.contains("`LockRoutes` table") && detail.contains("`KeyTemplate::with_pattern`"),
        "{detail}"
    );
    #[cfg(feature = "axum")]
    assert!(detail.contains("`route_layer`"), "{detail}");
    #[cfg(not(feature = "axum"))]
    assert!(detail.contains("`axum` feature"), "{detail}");

    let matched = KeyTemplate::parse("{matched_path}").unwrap();
    let detail = misconfiguration(&matched, &request("GET", "/accounts/1", &[]));
    assert!(
        detail.starts_with("no route pattern is known for `{matched_path}` in the key template "),
        "{detail}"
    );
}

#[test]
fn a_misconfiguration_is_reported_before_a_part_the_request_lacks() {
    let template = KeyTemplate::parse("{header.x-tenant}:{path.id}").unwrap();
    misconfiguration(&template, &request("GET", "/accounts/1", &[]));
    let template = KeyTemplate::parse("{query.doc}:{matched_path}").unwrap();
    misconfiguration(&template, &request("GET", "/docs", &[]));
}

#[test]
fn a_path_parameter_the_matched_route_lacks_is_misconfigured() {
    // A table route (or axum's match) without `{id}`: no request to it can be keyed.
    let template = KeyTemplate::parse("account:{path.id}").unwrap();
    let mut parts = request("GET", "/accounts/7", &[]);
    parts.extensions.insert(TableMatch {
        pattern: "/accounts/{account}".into(),
        params: PathParams::from_raw([("account", "7")].into_iter()),
    });
    let detail = misconfiguration(&template, &parts);
    assert_eq!(
        detail,
        "the lock key reads the path parameter `id`, which the route pattern \
         `/accounts/{account}` does not have (it has `account`), so no request to this route can \
         be keyed: key on a parameter of the route, or add this lock layer only to routes with \
         `{id}`"
    );
}

#[test]
fn a_path_that_does_not_match_the_given_pattern_is_the_clients() {
    let template = KeyTemplate::parse("account:{path.id}")
        .unwrap()
        .with_pattern("/accounts/{id}")
        .unwrap();
    let rejection = template
        .extract(&request("GET", "/orders/1", &[]))
        .unwrap_err();
    assert_eq!(rejection.kind(), KeyRejectionKind::Missing);
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
fn with_pattern_refuses_patterns_axum_refuses() {
    for pattern in ["/accounts/:id", "accounts/{id}", "/a/*id", "", "/a?id={id}"] {
        let error = KeyTemplate::parse("{method}")
            .unwrap()
            .with_pattern(pattern)
            .unwrap_err();
        assert_eq!(
            error.expected(),
            "a route pattern axum accepts",
            "{pattern:?}"
        );
    }
    // A catch-all ends the pattern.
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

#[test]
fn separators_are_escaped_in_material() {
    let template = KeyTemplate::parse("k:{header.x-a}-{header.x-b}/").unwrap();
    let parts = request("GET", "/", &[("x-a", "1-2"), ("x-b", "3/4")]);
    // `-` separates the values, so it is escaped in them; `/` is trailing text, so it is not.
    assert_eq!(key(&template, &parts), "k:1%2D2-3/4/");
}

#[test]
fn separator_without_a_kept_punctuation_character_is_refused() {
    for (text, at) in [
        ("{method}v{query.v}", 8),
        ("{method} {query.v}", 8),
        ("{method}{{{query.v}", 8),
        ("x{method}a1%{query.v}", 9),
    ] {
        let (position, expected, _) = parse_error(text);
        assert_eq!(position, at, "{text}");
        assert!(expected.starts_with("a separator"), "{text}: {expected}");
    }
    assert!(KeyTemplate::parse("{method}{{-{query.v}").is_ok());
}
