//! Lock keys: path parameters read the way the router matched them (nesting, route tables,
//! text before a parameter), template keys that never collide, query values as bytes, and the
//! empty key's hash slot.

#[macro_use]
mod common;

use std::collections::HashMap;

use axum::Router;
use axum::body::Body;
use axum::routing::{MethodRouter, post};
use http::{HeaderMap, Request, StatusCode};
use proptest::prelude::*;
use tower::Layer;
use tower_lock::key::{Header, KeyExtractor, KeyTemplate, LockKey, PathParam, Query};
use tower_lock::{LockLayer, LockLease, LockPolicy, MemoryBackend};

use common::{
    Fixture, Gate, NS, answer, echo, key_or_unlocked, status_and_text, table, until_held,
    while_held,
};

/// An axum handler answering with the name of the lock it runs under (or `unlocked`); with an
/// `x-gate` header it first waits for `gate`.
fn handler(gate: Gate) -> MethodRouter {
    post(
        move |lease: Option<LockLease>, headers: HeaderMap| async move {
            gate.pass(&headers).await;
            key_or_unlocked(lease.as_ref())
        },
    )
}

async fn call(app: &Router, uri: &str) -> (StatusCode, String) {
    answer(app, Request::post(uri)).await
}

/// While one request holds the lock of `first`, `second` is refused (409); then both run under
/// the lock name `expected`.
async fn contend<F: Fixture>(
    fixture: &F,
    app: &Router,
    gate: &Gate,
    first: &str,
    second: &str,
    expected: &str,
) {
    let (holder, during) = while_held(
        fixture,
        app,
        gate,
        Request::post(first),
        Request::post(second),
    )
    .await;
    let (status, body) = status_and_text(during).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "{second} ran beside {first}: {body}"
    );
    assert_eq!(
        status_and_text(holder).await,
        (StatusCode::OK, expected.to_owned()),
        "{first}"
    );
    until_held(fixture, 0).await;
    assert_eq!(
        call(app, second).await,
        (StatusCode::OK, expected.to_owned()),
        "{second}"
    );
}

#[derive(Clone, Copy, Debug)]
enum Source {
    Template,
    PathParam,
}

/// `POST /accounts/{id}/{op}`, locked on the account by `source`.
fn accounts<F: Fixture>(fixture: &F, source: Source, gate: Gate) -> Router {
    let route = match source {
        Source::Template => handler(gate).route_layer(
            LockPolicy::template("account:{path.id}")
                .unwrap()
                .layer(fixture.backend())
                .namespace(NS),
        ),
        Source::PathParam => handler(gate)
            .route_layer(LockLayer::new(fixture.backend(), PathParam::new("id")).namespace(NS)),
    };
    Router::new().route("/accounts/{id}/{op}", route)
}

async fn nested_router_locks_on_the_account_not_the_operation<F: Fixture>() {
    let fixture = F::start().await;
    // Where the API is mounted, and how.
    type Mount = fn(Router) -> Router;
    let mounts: [(&str, Mount); 5] = [
        ("/", |api| Router::new().merge(api)),
        ("/v1/", |api| Router::new().nest("/v1", api)),
        ("/v1/tenants/acme/", |api| {
            Router::new().nest("/v1", Router::new().nest("/tenants/{tenant}", api))
        }),
        ("/v1/", |api| Router::new().nest_service("/v1", api)),
        ("/v1/v2/", |api| {
            Router::new().nest_service("/v1", Router::new().nest("/v2", api))
        }),
    ];
    for source in [Source::Template, Source::PathParam] {
        let expected = match source {
            Source::Template => format!("{NS}{{account:42}}"),
            Source::PathParam => format!("{NS}{{42}}"),
        };
        for (prefix, mount) in mounts {
            let gate = Gate::new();
            let app = mount(accounts(&fixture, source, gate.clone()));
            let deposit = format!("{prefix}accounts/42/deposit");
            let withdraw = format!("{prefix}accounts/42/withdraw");
            println!("{source:?} {deposit}");
            contend(&fixture, &app, &gate, &deposit, &withdraw, &expected).await;
        }
    }
}

/// `LockRoutes` mounted in axum under a catch-all: the table's own route decides the key.
async fn route_table_pattern_wins_over_axum_matched_path<F: Fixture>() {
    let fixture = F::start().await;
    let gate = Gate::new();
    let routes = table(&fixture)
        .route(
            "/api/accounts/{id}/{op}",
            LockPolicy::template("account:{path.id}").unwrap(),
        )
        .unwrap()
        .route(
            "/api/docs/{doc}",
            LockPolicy::template("{matched_path}:{path.doc}").unwrap(),
        )
        .unwrap();
    let service = routes.layer(echo::<Body>(gate.clone()));
    let app = Router::new().route_service("/api/{*rest}", service);

    contend(
        &fixture,
        &app,
        &gate,
        "/api/accounts/42/deposit",
        "/api/accounts/42/withdraw",
        &format!("{NS}{{account:42}}"),
    )
    .await;
    assert_eq!(
        call(&app, "/api/docs/readme").await,
        (
            StatusCode::OK,
            format!("{NS}{{/api/docs/%7Bdoc%7D:readme}}")
        )
    );
}

/// `/files/v{version}`: axum, a route table and a plain layer with the pattern all read `2`.
async fn parameter_after_static_text_is_read<F: Fixture>() {
    let fixture = F::start().await;
    let expected = format!("{NS}{{file:2}}");
    let policy = LockPolicy::template("file:{path.version}").unwrap();

    let axum_app = Router::new().route(
        "/files/v{version}",
        handler(Gate::new()).route_layer(policy.layer(fixture.backend()).namespace(NS)),
    );
    assert_eq!(
        call(&axum_app, "/files/v2").await,
        (StatusCode::OK, expected.clone())
    );

    let routes = table(&fixture)
        .route("/files/v{version}", policy.clone())
        .expect("a parameter after static text is a parameter");
    let table_app =
        Router::new().route_service("/{*rest}", routes.layer(echo::<Body>(Gate::new())));
    assert_eq!(
        call(&table_app, "/files/v2").await,
        (StatusCode::OK, expected)
    );

    let extractor = PathParam::with_pattern("/files/v{version}", "version");
    let (parts, ()) = Request::get("/files/v2").body(()).unwrap().into_parts();
    assert_eq!(extractor.extract(&parts).unwrap().unwrap().as_str(), "2");
    let template = KeyTemplate::parse("file:{path.version}")
        .unwrap()
        .with_pattern("/files/v{version}")
        .unwrap();
    assert_eq!(
        template.extract(&parts).unwrap().unwrap().as_str(),
        "file:2"
    );
}

/// `?doc=a&doc=b`: which one would the handler use? Refuse rather than guess.
async fn repeated_query_parameter_is_a_400<F: Fixture>() {
    let fixture = F::start().await;
    let gate = Gate::new();
    let app = Router::new()
        .route(
            "/template",
            handler(gate.clone()).route_layer(
                LockPolicy::template("doc:{query.doc}")
                    .unwrap()
                    .layer(fixture.backend())
                    .namespace(NS),
            ),
        )
        .route(
            "/query",
            handler(gate)
                .route_layer(LockLayer::new(fixture.backend(), Query::new("doc")).namespace(NS)),
        );
    for path in ["/template", "/query"] {
        let (status, body) = call(&app, &format!("{path}?doc=a&doc=b")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert!(body.contains("more than once"), "{body}");
        let (status, body) = call(&app, &format!("{path}?doc=a&doc=a")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        let (status, body) = call(&app, &format!("{path}?doc=a&other=b")).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert!(body.ends_with("a}"), "{body}");
    }
}

/// The empty key (an empty header value) is one lock like any other, under a marker that keeps
/// its hash tag non-empty.
async fn empty_key_is_one_lock_under_a_non_empty_hash_tag<F: Fixture>() {
    let fixture = F::start().await;
    let gate = Gate::new();
    let app = Router::new().route(
        "/work",
        handler(gate.clone()).route_layer(common::layer(&fixture)),
    );
    let empty = || Request::post("/work").header("x-key", "");
    let (holder, during) = while_held(&fixture, &app, &gate, empty(), empty()).await;
    assert_eq!(during.status(), StatusCode::CONFLICT);
    assert_eq!(
        status_and_text(holder).await,
        (StatusCode::OK, format!("{NS}{{#empty}}"))
    );
}

suite!(
    empty_key_is_one_lock_under_a_non_empty_hash_tag,
    nested_router_locks_on_the_account_not_the_operation,
    route_table_pattern_wins_over_axum_matched_path,
    parameter_after_static_text_is_read,
    repeated_query_parameter_is_a_400,
);

fn parts(uri: &str, headers: &[(&str, &[u8])]) -> http::request::Parts {
    let mut request = Request::get(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(()).unwrap().into_parts().0
}

fn key_of(extractor: &impl KeyExtractor, uri: &str, headers: &[(&str, &[u8])]) -> String {
    extractor
        .extract(&parts(uri, headers))
        .unwrap()
        .unwrap()
        .as_str()
        .to_owned()
}

#[test]
fn adjacent_placeholders_are_refused() {
    let error = KeyTemplate::parse("k:{header.x-a}{header.x-b}").unwrap_err();
    assert_eq!(error.position(), 14);
    assert_eq!(
        error.expected(),
        "a separator such as `:` between two placeholders"
    );
    assert_eq!(error.found(), "`{header.x-b}` right after `{header.x-a}`");
    // A separator of letters, or only of escaped characters, cannot be found in the key.
    assert_eq!(
        KeyTemplate::parse("{method}and{query.q}")
            .unwrap_err()
            .position(),
        8
    );
    assert_eq!(
        KeyTemplate::parse("{method}{{{query.q}")
            .unwrap_err()
            .position(),
        8
    );
    assert_eq!(
        KeyTemplate::parse("{method} {query.q}")
            .unwrap_err()
            .position(),
        8
    );
    assert!(LockPolicy::template("{path.a}{path.b}").is_err());
}

#[test]
fn values_containing_the_separator_get_distinct_keys() {
    let template = KeyTemplate::parse("{header.x-a}-{header.x-b}").unwrap();
    let first = key_of(&template, "/", &[("x-a", b"1-2"), ("x-b", b"3")]);
    let second = key_of(&template, "/", &[("x-a", b"1"), ("x-b", b"2-3")]);
    assert_ne!(first, second);
    assert_eq!(first, "1%2D2-3");
}

#[test]
fn query_values_are_decoded_text_or_refused() {
    let template = KeyTemplate::parse("doc:{query.doc}").unwrap();
    let query = Query::new("doc");
    // Not UTF-8 once decoded: a handler would read `%FE` and `%FF` as one U+FFFD; refused.
    for uri in ["/?doc=%FF", "/?doc=%FE"] {
        let (parts, ()) = Request::get(uri).body(()).unwrap().into_parts();
        assert!(template.extract(&parts).is_err(), "{uri}");
        assert!(query.extract(&parts).is_err(), "{uri}");
    }
    // Text is decoded exactly, with no lossy replacement.
    assert_eq!(key_of(&template, "/?doc=%C3%A9", &[]), "doc:%C3%A9");
    assert_eq!(key_of(&query, "/?doc=%EF%BF%BD", &[]), "%EF%BF%BD");
    assert_ne!(
        key_of(&query, "/?doc=%EF%BF%BD", &[]),
        key_of(&query, "/?doc=%C3%A9", &[])
    );
    // `+` is a space; an escaped `+` is a plus; the parameter's name is decoded too.
    assert_eq!(key_of(&query, "/?d%6Fc=a+b%2B", &[]), "a%20b+");
}

/// Redis Cluster's key slot: CRC16 (XMODEM) of the hash tag (the text between the first `{`
/// and the next `}`, when not empty), else of the whole key, modulo 16384.
fn cluster_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &bytes[open + 1..open + 1 + close])
        })
        .unwrap_or(bytes);
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[test]
fn empty_key_keeps_lock_and_fence_in_one_slot() {
    // The reference values of the Redis Cluster specification.
    assert_eq!(cluster_slot("123456789"), 0x31C3);
    assert_eq!(
        cluster_slot("{user1000}.following"),
        cluster_slot("user1000")
    );

    let layer = LockLayer::new(MemoryBackend::new(), Header::new("x-key")).namespace(NS);
    let empty = layer.lock_name(&LockKey::new(""));
    assert_eq!(
        cluster_slot(empty.lock_key()),
        cluster_slot(empty.fence_key()),
        "{} and {}",
        empty.lock_key(),
        empty.fence_key()
    );
    // No material names the empty key's lock.
    for material in ["", "#empty", "%23empty", "empty", "{}"] {
        let name = layer.lock_name(&LockKey::new(material));
        assert_eq!(material.is_empty(), name == empty, "{material:?}");
    }
}

/// Pieces of a separator: some are kept in the key (punctuation), some are escaped there (`{{`
/// renders as `%7B`, a space as `%20`), some are letters or digits.
const SEPARATOR_PIECES: &[&str] = &[
    "-", ".", "_", "~", "/", ":", "!", "*", "+", ",", "a", "Z", "1", " ", "%", "{{", "}}", "é",
];
const PUNCTUATION: &[&str] = &["-", ".", "_", "~", "/", ":", "!", "*", "+", ",", "=", "@"];

/// A literal: pieces, with `punctuation` (if any) inserted at `at`.
fn literal(pieces: &[&str], punctuation: Option<&str>, at: usize) -> String {
    let mut pieces = pieces.to_vec();
    if let Some(p) = punctuation {
        pieces.insert(at.min(pieces.len()), p);
    }
    pieces.concat()
}

/// The text a literal stands for in the key's material world (`{{` is a `{`).
fn unescaped(literal: &str) -> String {
    literal.replace("{{", "{").replace("}}", "}")
}

fn percent_encode_all(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

fn template_strategy() -> impl Strategy<Value = (String, Vec<String>)> {
    let piece = prop::sample::select(SEPARATOR_PIECES);
    let separator = (
        prop::collection::vec(piece.clone(), 0..4),
        prop::sample::select(PUNCTUATION),
        0usize..4,
    )
        .prop_map(|(pieces, p, at)| literal(&pieces, Some(p), at));
    let edge = prop::collection::vec(piece, 0..3).prop_map(|pieces| literal(&pieces, None, 0));
    (edge.clone(), prop::collection::vec(separator, 1..3), edge).prop_map(
        |(lead, separators, trail)| {
            let mut text = lead;
            for (i, separator) in separators.iter().enumerate() {
                text.push_str(&format!("{{query.q{i}}}{separator}"));
            }
            text.push_str(&format!("{{query.q{}}}{trail}", separators.len()));
            (text, separators)
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// For templates with arbitrary separators, and many tuples of values built from the very
    /// characters the separators (and escapes) are made of, no two tuples share a key.
    #[test]
    fn distinct_material_never_shares_a_key(
        (text, separators) in template_strategy(),
        choices in prop::collection::vec(prop::collection::vec(prop::collection::vec(0usize..64, 0..4), 3), 48),
    ) {
        let template = KeyTemplate::parse(&text).unwrap();
        // Material is made of the separators' own text and characters, escapes, and bytes.
        let mut tokens: Vec<Vec<u8>> = vec![b"%".to_vec(), b"%2D".to_vec(), b"1".to_vec(), b"a".to_vec(), "é".as_bytes().to_vec(), b" ".to_vec()];
        for separator in &separators {
            let separator = unescaped(separator);
            tokens.push(separator.clone().into_bytes());
            tokens.extend(separator.chars().map(|c| c.to_string().into_bytes()));
        }
        let arity = separators.len() + 1;
        let mut seen: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        for choice in &choices {
            let values: Vec<Vec<u8>> = choice[..arity]
                .iter()
                .map(|picks| picks.iter().flat_map(|&i| tokens[i % tokens.len()].clone()).collect())
                .collect();
            let query: Vec<String> = values
                .iter()
                .enumerate()
                .map(|(i, value)| format!("q{i}={}", percent_encode_all(value)))
                .collect();
            let key = key_of(&template, &format!("/?{}", query.join("&")), &[]);
            if let Some(other) = seen.insert(key.clone(), values.clone()) {
                prop_assert_eq!(&other, &values, "template {:?} gives {:?} to both", text, key);
            }
        }
    }
}
