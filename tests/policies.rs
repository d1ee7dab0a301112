//! Policies, the route table and the Idempotency-Key preset: which requests a policy covers, which
//! route patterns a table accepts, and which keys the preset locks on. Every behaviour that takes
//! a lock runs on both backends (`suite!`).

#[macro_use]
mod common;

use axum::Router;
use axum::routing::get;
use http::{Method, StatusCode};
use tower::Layer;
use tower_lock::idempotency::{self, IdempotencyKey};
use tower_lock::key::Header;
use tower_lock::{LockPolicy, LockRoutes, RouteError};

use common::{
    Fixture, Gate, NS, answer, body_text, call, echo, gate_if, send, table, until_held, while_held,
};

/// A policy locking `template` for `method` requests only.
fn only(method: Method, template: &str) -> LockPolicy {
    LockPolicy::template(template).unwrap().methods([method])
}

// ---------------------------------------------------------------------------------------------
// HEAD is GET without a body: a policy that covers GET covers HEAD.

/// axum sends HEAD to the GET handler; the GET policy on that route must lock it too.
async fn head_request_is_locked_by_a_get_policy<F: Fixture>() {
    let fixture = F::start().await;
    let gate = Gate::new();
    let handler_gate = gate.clone();
    let policy = LockPolicy::key(Header::new("x-doc")).methods([Method::GET]);
    let app: Router = Router::new().route(
        "/docs",
        get(move |headers: http::HeaderMap| {
            let gate = handler_gate.clone();
            async move {
                gate.pass(&headers).await;
                "the document"
            }
        })
        .route_layer(policy.layer(fixture.backend()).namespace(NS)),
    );
    let doc = |method| call(method, "/docs").header("x-doc", "7");

    let (holder, head) =
        while_held(&fixture, &app, &gate, doc(Method::GET), doc(Method::HEAD)).await;
    assert_eq!(
        head.status(),
        StatusCode::CONFLICT,
        "a HEAD ran the GET handler beside the GET holding the lock"
    );
    assert_eq!(holder.status(), StatusCode::OK);
    until_held(&fixture, 0).await;
    // Once the GET is done, the HEAD is served (locked, then released).
    assert_eq!(send(&app, doc(Method::HEAD)).await.status(), StatusCode::OK);
    until_held(&fixture, 0).await;
}

/// The same in a route table: the GET route is the route of a HEAD request.
async fn head_request_is_locked_by_a_get_route_in_the_table<F: Fixture>() {
    let fixture = F::start().await;
    let gate = Gate::new();
    let routes = table(&fixture)
        .route("/docs/{id}", only(Method::GET, "doc:{path.id}"))
        .unwrap();
    let service = routes.layer(echo(gate.clone()));
    let doc = |method| call(method, "/docs/7");

    let (get, head) = (doc(Method::GET), doc(Method::HEAD));
    let (holder, head) = while_held(&fixture, &service, &gate, get, head).await;
    assert_eq!(head.status(), StatusCode::CONFLICT);
    let key = format!("{NS}{{doc:7}}");
    assert_eq!(body_text(holder).await, key);
    assert_eq!(
        answer(&service, doc(Method::HEAD)).await,
        (StatusCode::OK, key)
    );
    // Methods other than GET and HEAD stay unlocked.
    assert_eq!(answer(&service, doc(Method::POST)).await.1, "unlocked");
}

/// The other way round does not hold: a HEAD-only policy does not lock GET.
#[tokio::test]
async fn a_head_only_policy_does_not_lock_get() {
    let routes = LockRoutes::new(tower_lock::MemoryBackend::new())
        .route("/docs", only(Method::HEAD, "doc"))
        .unwrap();
    let service = routes.layer(echo(Gate::new()));
    assert_eq!(
        answer(&service, call(Method::GET, "/docs")).await.1,
        "unlocked"
    );
    assert_eq!(
        answer(&service, call(Method::HEAD, "/docs")).await.1,
        "tower-lock:{doc}"
    );
}

// ---------------------------------------------------------------------------------------------
// Route patterns: a pattern that can never match would leave its route unlocked.

/// Checks that a route table refuses `pattern` with a pattern error whose message says `hint`.
fn assert_refused(pattern: &str, hint: &str) {
    let policy = LockPolicy::template("x").unwrap();
    let message = match LockRoutes::new(tower_lock::MemoryBackend::new()).route(pattern, policy) {
        Err(RouteError::Pattern {
            pattern: p,
            message,
        }) => {
            assert_eq!(p, pattern);
            message
        }
        Err(other) => panic!("`{pattern}`: not a pattern error: {other}"),
        Ok(_) => panic!("`{pattern}` was accepted, and its route would run unlocked"),
    };
    assert!(
        message.contains(hint),
        "`{pattern}`: the message {message:?} does not say {hint:?}"
    );
}

/// Checks that axum and a route table both accept `pattern`.
fn assert_accepted(pattern: &str) {
    assert!(axum_accepts(pattern), "axum 0.8 rejects `{pattern}`");
    let policy = LockPolicy::template("x").unwrap();
    if let Err(error) = LockRoutes::new(tower_lock::MemoryBackend::new()).route(pattern, policy) {
        panic!("`{pattern}` refused although axum takes it: {error}");
    }
}

fn axum_accepts(pattern: &str) -> bool {
    let pattern = pattern.to_owned();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let accepted = std::panic::catch_unwind(move || {
        let _ = Router::<()>::new().route(&pattern, get(|| async {}));
    })
    .is_ok();
    std::panic::set_hook(hook);
    accepted
}

#[test]
fn route_table_refuses_patterns_axum_would_reject() {
    // (pattern, a word of the message that names the fix)
    let rejected_by_axum = [
        ("/accounts/:id", "`{id}`, not `:id`"),
        ("/accounts/:id/deposit", "`{id}`, not `:id`"),
        ("/a/*rest", "`{*rest}`, not `*rest`"),
        ("accounts/{id}", "start with `/`"),
        ("", "start with `/`"),
        ("*", "`/{*rest}`"),
        (":id", "`/{id}`"),
        ("/accounts/{id", "parameter"),
        ("/a/{*rest}/b", "end"),
        ("/a/{}", "parameter"),
        ("/files/{name}.json", "must end its segment"),
    ];
    for (pattern, hint) in rejected_by_axum {
        assert!(
            !axum_accepts(pattern),
            "axum 0.8 accepts `{pattern}`: the case belongs in the other list"
        );
        assert_refused(pattern, hint);
    }
}

#[test]
fn route_table_refuses_patterns_no_request_path_can_match() {
    // axum takes these, but a request path never contains these characters: the query and the
    // fragment are not part of the path, and the rest arrive percent-encoded.
    let never_match = [
        ("/a?x=1", "query"),
        ("/a#top", "fragment"),
        ("/a b", "percent-encoded"),
        ("/a/<id>", "percent-encoded"),
        ("/a\tb", "percent-encoded"),
    ];
    for (pattern, hint) in never_match {
        assert_refused(pattern, hint);
    }
}

#[test]
fn route_table_accepts_the_patterns_axum_accepts() {
    for pattern in [
        "/",
        "/files/v{version}",
        "/a/{*rest}",
        "/{*rest}",
        "/accounts/{id}/deposit",
        "/a/b:c",
        "/a/b*",
        "/{{literal}}/{id}",
        "/a/",
        "/caf%C3%A9",
        "/café",
        // Not an ASCII control character: a request path may carry its UTF-8 bytes as they are.
        "/a\u{85}",
    ] {
        assert_accepted(pattern);
    }
}

/// A parameter name is not path text: the character checks apply to literal text only.
#[test]
fn route_table_checks_only_the_literal_text_of_a_pattern() {
    for pattern in ["/a/{the id}", "/a/{id?}", "/a/{i#d}", "/a/{*the rest}"] {
        assert_accepted(pattern);
    }
}

// ---------------------------------------------------------------------------------------------
// The Idempotency-Key preset in a route table.

/// The preset covers POST and PATCH only: a `DELETE /orders` goes on to the table's DELETE route.
async fn idempotency_policy_leaves_other_methods_to_later_routes<F: Fixture>() {
    let fixture = F::start().await;
    let gate = Gate::new();
    let routes = table(&fixture)
        .route("/orders", idempotency::policy(IdempotencyKey::new()))
        .unwrap()
        .route("/orders", only(Method::DELETE, "orders:purge"))
        .unwrap();
    let service = routes.layer(echo(gate.clone()));
    let orders = |method| call(method, "/orders");

    let delete = || orders(Method::DELETE);
    let (holder, second) = while_held(&fixture, &service, &gate, delete(), delete()).await;
    assert_eq!(
        second.status(),
        StatusCode::CONFLICT,
        "the DELETE route's lock did not hold"
    );
    assert_eq!(body_text(holder).await, format!("{NS}{{orders:purge}}"));

    // The preset still owns POST (and answers its own 400), and GET is nobody's.
    let post = send(&service, orders(Method::POST)).await;
    assert_eq!(post.status(), StatusCode::BAD_REQUEST);
    let post = orders(Method::POST).header("idempotency-key", "k1");
    assert_eq!(
        answer(&service, post).await.1,
        format!("{NS}{{idempotency:k1}}")
    );
    assert_eq!(answer(&service, orders(Method::GET)).await.1, "unlocked");
}

/// In one namespace, `Idempotency-Key: 42` is not the lock of account 42, whether the account's
/// route keys on `account:{path.id}` or on the bare id.
async fn idempotency_keys_never_contend_with_account_locks<F: Fixture>() {
    let fixture = F::start().await;
    let gate = Gate::new();
    let routes = table(&fixture)
        .route("/orders", idempotency::policy(IdempotencyKey::new()))
        .unwrap()
        .route(
            "/users/{user}/orders",
            idempotency::policy(IdempotencyKey::new().scoped_by(Header::new("x-user"))),
        )
        .unwrap()
        .route(
            "/accounts/{id}/deposit",
            LockPolicy::template("account:{path.id}").unwrap(),
        )
        .unwrap()
        .route(
            "/bare/{id}/deposit",
            LockPolicy::template("{path.id}").unwrap(),
        )
        .unwrap()
        .route(
            "/scoped/{user}/{id}",
            LockPolicy::template("{path.user}:{path.id}").unwrap(),
        )
        .unwrap();
    let service = routes.layer(echo(gate.clone()));
    let post = |uri: &str, headers: &[(&str, &str)], gated: bool| {
        let mut builder = call(Method::POST, uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        send(&service, gate_if(builder, gated))
    };

    // Hold the idempotency keys `42` (unscoped) and alice's `42`.
    let unscoped = tokio::spawn(post("/orders", &[("idempotency-key", "42")], true));
    let scoped = tokio::spawn(post(
        "/users/alice/orders",
        &[("idempotency-key", "42"), ("x-user", "alice")],
        true,
    ));
    until_held(&fixture, 2).await;

    // Every account route for id 42 is free meanwhile.
    for uri in [
        "/accounts/42/deposit",
        "/bare/42/deposit",
        "/scoped/alice/42",
    ] {
        assert_eq!(
            post(uri, &[], false).await.status(),
            StatusCode::OK,
            "{uri} met the lock of an Idempotency-Key"
        );
    }
    // The keys themselves are still held.
    let retry = post("/orders", &[("idempotency-key", "42")], false).await;
    assert_eq!(retry.status(), StatusCode::CONFLICT);

    gate.open();
    let unscoped = body_text(unscoped.await.unwrap()).await;
    let scoped = body_text(scoped.await.unwrap()).await;
    assert_eq!(unscoped, format!("{NS}{{idempotency:42}}"));
    assert_eq!(scoped, format!("{NS}{{idempotency:alice:42}}"));
    until_held(&fixture, 0).await;
}

suite!(
    head_request_is_locked_by_a_get_policy,
    head_request_is_locked_by_a_get_route_in_the_table,
    idempotency_policy_leaves_other_methods_to_later_routes,
    idempotency_keys_never_contend_with_account_locks,
);
