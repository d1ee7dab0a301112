//! Which key a request locks, and whether it is locked, at the edges: HEAD under `{method}`,
//! query values a handler cannot read as text, nest mountings, and a differential check of
//! `LockRoutes` against axum's own router. First written by an adversarial review of issue 7's
//! fixes (the first two failing then).

#[macro_use]
mod common;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::Query as AxumQuery;
use axum::routing::{MethodRouter, get, post};
use http::{HeaderMap, Method, Request, StatusCode};
use tower::{ServiceBuilder, ServiceExt};
use tower_lock::{LockLease, LockPolicy};

use common::{
    Fixture, Gate, Memory, NS, answer, call, key_or_unlocked, status_and_text, until_held,
    while_held,
};

/// Answers with the lock it runs under (or `unlocked`) and, after `|`, the `doc` query
/// parameter as axum's `Query` reads it; with an `x-gate` header it first waits for `gate`.
fn handler(gate: Gate) -> MethodRouter {
    post(
        move |lease: Option<LockLease>,
              headers: HeaderMap,
              AxumQuery(query): AxumQuery<HashMap<String, String>>| async move {
            gate.pass(&headers).await;
            let lock = key_or_unlocked(lease.as_ref());
            let doc = query.get("doc").cloned().unwrap_or_default();
            format!("{lock}|{doc}")
        },
    )
}

/// Item 4: "A policy that covers GET covers HEAD" — axum runs the GET handler for a HEAD, so a
/// HEAD must meet the lock the GET holds. With `{method}` in the key it does not: the GET holds
/// `GET:doc:7`, the HEAD takes `HEAD:doc:7`, and the GET handler runs twice at once on doc 7.
async fn head_meets_the_lock_of_get_under_a_method_key<F: Fixture>() {
    let fixture = F::start().await;
    let gate = Gate::new();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let get_handler = {
        let gate = gate.clone();
        let calls = calls.clone();
        get(move |headers: HeaderMap| async move {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            gate.pass(&headers).await;
            "body"
        })
    };
    let app = Router::new().route(
        "/docs/{doc}",
        get_handler.route_layer(
            LockPolicy::template("{method}:doc:{path.doc}")
                .unwrap()
                .methods([Method::GET])
                .layer(fixture.backend())
                .namespace(NS),
        ),
    );
    let doc = |method| call(method, "/docs/7");
    let (first, during) =
        while_held(&fixture, &app, &gate, doc(Method::GET), doc(Method::HEAD)).await;
    until_held(&fixture, 0).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(
        during.status(),
        StatusCode::CONFLICT,
        "a HEAD ran the GET handler beside a GET holding the lock on doc 7 ({} handler runs)",
        calls.load(std::sync::atomic::Ordering::SeqCst)
    );
}

/// Item 10 keeps query values as bytes, so `%FF` and `%FE` could lock apart while axum's `Query`
/// (like every `form_urlencoded` reader) decodes both lossily to the one document U+FFFD and the
/// handler would run twice at once on it. A value that is not UTF-8 once decoded is a 400; the
/// real U+FFFD (`%EF%BF%BD`) is a document like any other.
async fn query_value_a_handler_cannot_read_as_text_is_a_400<F: Fixture>() {
    let fixture = F::start().await;
    let app = Router::new().route(
        "/docs",
        handler(Gate::new()).route_layer(
            LockPolicy::template("doc:{query.doc}")
                .unwrap()
                .layer(fixture.backend())
                .namespace(NS),
        ),
    );
    for bad in ["/docs?doc=%FF", "/docs?doc=%FE", "/docs?doc=a%C3"] {
        let (status, body) = answer(&app, Request::post(bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body.contains("UTF-8"), "{bad}: {body}");
    }
    let (status, body) = answer(&app, Request::post("/docs?doc=%EF%BF%BD")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(fixture.held().await, 0);
}

suite!(
    head_meets_the_lock_of_get_under_a_method_key,
    query_value_a_handler_cannot_read_as_text_is_a_400,
);

// ---------------------------------------------------------------------------------------------
// What held up (these pass): item 1's mountings beyond the regression test's, and a differential
// check of `LockRoutes` against axum's own router on generated patterns and paths.

#[tokio::test]
async fn held_up_more_nest_mountings_lock_the_account() {
    let fixture = Memory::start().await;
    let gate = Gate::new();
    let policy = || {
        LockPolicy::template("account:{path.id}")
            .unwrap()
            .layer(fixture.backend())
            .namespace(NS)
    };
    let api_route_layer = || {
        Router::new().route(
            "/accounts/{id}/{op}",
            handler(gate.clone()).route_layer(policy()),
        )
    };
    let api_layer = || {
        Router::new()
            .route("/accounts/{id}/{op}", handler(gate.clone()))
            .layer(policy())
    };
    let api_router_route_layer = || {
        Router::new()
            .route("/accounts/{id}/{op}", handler(gate.clone()))
            .route_layer(policy())
    };
    let mounts: Vec<(&str, Router)> = vec![
        ("/v1/", Router::new().nest("/v1", api_layer())),
        ("/v1/", Router::new().nest("/v1", api_router_route_layer())),
        ("/v1/", Router::new().nest_service("/v1", api_layer())),
        (
            "/x/y/",
            Router::new().nest(
                "/x",
                Router::new().nest_service("/y", Router::new().merge(api_route_layer())),
            ),
        ),
        // The inner `{id}` is the account; the outer one is not.
        ("/t/9/", Router::new().nest("/t/{id}", api_route_layer())),
    ];
    for (prefix, app) in mounts {
        let uri = format!("{prefix}accounts/42/deposit");
        assert_eq!(
            answer(&app, Request::post(&uri)).await,
            (StatusCode::OK, format!("{NS}{{account:42}}|")),
            "{uri}"
        );
    }
}

mod differential {
    use super::*;
    use proptest::prelude::*;
    use tower_lock::key::{Global, PathParam};
    use tower_lock::{LockRoutes, MemoryBackend};

    /// `/` and fewer than `most` of `pieces`, in any order.
    fn joined(pieces: &'static [&'static str], most: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(proptest::sample::select(pieces), 0..most)
            .prop_map(|parts| format!("/{}", parts.concat()))
    }

    fn pattern_strategy() -> impl Strategy<Value = String> {
        let pieces = &[
            "/", "a", "b", "{", "}", "{x}", "{y}", "{*r}", "*", ":", ".", "%2F", "{{", "}}",
        ];
        joined(pieces, 7)
    }

    fn path_strategy() -> impl Strategy<Value = String> {
        joined(&["/", "a", "b", "x", "*", ":", ".", "%2F", "%FF", "%"], 8)
    }

    fn params(pattern: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = pattern;
        while let Some(start) = rest.find('{') {
            if rest[start..].starts_with("{{") {
                rest = &rest[start + 2..];
                continue;
            }
            let Some(end) = rest[start..].find('}') else {
                break;
            };
            names.push(
                rest[start + 1..start + end]
                    .trim_start_matches('*')
                    .to_owned(),
            );
            rest = &rest[start + end + 1..];
        }
        names
    }

    async fn outcome(app: Router, path: &str) -> Option<(StatusCode, String)> {
        let request = Request::post(path).body(Body::empty()).ok()?;
        Some(status_and_text(app.oneshot(request).await.unwrap()).await)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, .. ProptestConfig::default() })]
        #[test]
        fn held_up_route_table_locks_whatever_axum_routes_to_the_same_pattern(pattern in pattern_strategy(), paths in proptest::collection::vec(path_strategy(), 1..6)) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let names = params(&pattern);
            let backend = MemoryBackend::new();
            let table = std::panic::catch_unwind(|| {
                match names.first() {
                    Some(name) => LockRoutes::new(backend.clone()).route(&pattern, LockPolicy::key(PathParam::new(name))),
                    None => LockRoutes::new(backend.clone()).route(&pattern, LockPolicy::key(Global::new("g"))),
                }
            });
            let table = match table {
                Ok(table) => table,
                Err(_) => panic!("LockRoutes::route panicked on {pattern:?}"),
            };
            let axum = std::panic::catch_unwind(|| {
                let layer = match names.first() {
                    Some(name) => LockPolicy::key(PathParam::new(name)).layer(backend.clone()),
                    None => LockPolicy::key(Global::new("g")).layer(backend.clone()),
                };
                Router::new().route(&pattern, post(|lease: Option<LockLease>| async move {
                    key_or_unlocked(lease.as_ref())
                }).route_layer(layer))
            });
            match (&table, &axum) {
                (Ok(_), Err(_)) => panic!("axum refuses {pattern:?}, the table accepts it"),
                // Refusing more than axum is safe (it never leaves a route unlocked).
                (Err(_), _) => return Ok(()),
                (Ok(_), Ok(_)) => {}
            }
            let table = table.unwrap();
            let axum_app = axum.unwrap();
            let table_app = Router::new().fallback_service(ServiceBuilder::new().layer(table).service(common::echo::<Body>(Gate::new())));
            for path in paths {
                let a = runtime.block_on(outcome(axum_app.clone(), &path));
                let t = runtime.block_on(outcome(table_app.clone(), &path));
                let (Some(a), Some(t)) = (a, t) else { continue };
                let a_ran = a.0 == StatusCode::OK;
                let t_locked = t.1 != "unlocked" || t.0 != StatusCode::OK;
                prop_assert!(!a_ran || t_locked, "pattern {pattern:?} path {path:?}: axum ran {a:?}, table {t:?}");
                if a_ran && t.0 == StatusCode::OK {
                    prop_assert_eq!(&a.1, &t.1, "pattern {:?} path {:?}", pattern, path);
                }
            }
        }
    }
}

/// Held up: every spelling of a repeated key parameter that axum's `Query` reads as one name is
/// a 400, and hostile query strings never panic.
#[test]
fn held_up_repeated_query_parameter_spellings_are_refused() {
    use tower_lock::key::{KeyExtractor, Query};
    let template = tower_lock::key::KeyTemplate::parse("doc:{query.doc}").unwrap();
    let extract = |uri: &str| {
        let (parts, ()) = Request::get(uri).body(()).unwrap().into_parts();
        (
            Query::new("doc")
                .extract(&parts)
                .map(|k| k.map(|k| k.as_str().to_owned())),
            template
                .extract(&parts)
                .map(|k| k.map(|k| k.as_str().to_owned())),
        )
    };
    // (query string, whether both refuse it)
    let cases = [
        ("/?doc=a&doc=b", true),
        ("/?doc=a&d%6Fc=b", true),
        ("/?doc=a&doc", true),
        ("/?doc&doc", true),
        ("/?doc=a&doc=", true),
        ("/?%64%6F%63=a&doc=a", true),
        ("/?doc=%", false),
        ("/?doc=%Z", false),
        ("/?doc=%%%", false),
        ("/?doc=+%2B+", false),
        ("/?=&&=&doc=x", false),
    ];
    for (uri, refused) in cases {
        let (query, template) = extract(uri);
        assert!(
            query.is_err() == refused && template.is_err() == refused,
            "{uri}: {query:?} {template:?}"
        );
    }
}
