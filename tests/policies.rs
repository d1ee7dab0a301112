//! Policies, the route table and the Idempotency-Key preset: which requests a policy covers, which
//! route patterns a table accepts, and which keys the preset locks on. Every behaviour that takes
//! a lock runs on both backends (`suite!`).

#[macro_use]
mod common;

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::watch;
use tower::{ServiceBuilder, ServiceExt};
use tower_lock::idempotency::{self, IdempotencyKey};
use tower_lock::key::Header;
use tower_lock::{LockLease, LockPolicy, LockRoutes, RouteError};

use common::{Fixture, NS, until_held};

/// Holds gated requests until opened; stays open after that.
#[derive(Clone)]
struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    fn new() -> Self {
        Self(Arc::new(watch::Sender::new(false)))
    }

    fn open(&self) {
        self.0.send_replace(true);
    }

    async fn wait(&self) {
        let mut open = self.0.subscribe();
        let _ = open.wait_for(|open| *open).await;
    }
}

/// A handler that answers with the lock it ran under ("unlocked" without one), after waiting for
/// `gate` when the request has `x-gate`.
fn echo(
    gate: Gate,
) -> impl tower::Service<
    Request<String>,
    Response = Response<String>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |req: Request<String>| {
        let gate = gate.clone();
        async move {
            if req.headers().contains_key("x-gate") {
                gate.wait().await;
            }
            let key = req
                .extensions()
                .get::<LockLease>()
                .map_or_else(|| "unlocked".to_owned(), |lease| lease.key().to_owned());
            Ok(Response::new(key))
        }
    })
}

async fn text<B>(response: Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn call(method: Method, uri: &str) -> http::request::Builder {
    Request::builder().method(method).uri(uri)
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
                if headers.contains_key("x-gate") {
                    gate.wait().await;
                }
                "the document"
            }
        })
        .route_layer(policy.layer(fixture.backend()).namespace(NS)),
    );
    let request = |method: Method, gated: bool| {
        let mut builder = call(method, "/docs").header("x-doc", "7");
        if gated {
            builder = builder.header("x-gate", "1");
        }
        builder.body(axum::body::Body::empty()).unwrap()
    };

    let holder = tokio::spawn(app.clone().oneshot(request(Method::GET, true)));
    until_held(&fixture, 1).await;
    let head = app
        .clone()
        .oneshot(request(Method::HEAD, false))
        .await
        .unwrap();
    assert_eq!(
        head.status(),
        StatusCode::CONFLICT,
        "a HEAD ran the GET handler beside the GET holding the lock"
    );

    gate.open();
    assert_eq!(holder.await.unwrap().unwrap().status(), StatusCode::OK);
    until_held(&fixture, 0).await;
    // Once the GET is done, the HEAD is served (locked, then released).
    let head = app.oneshot(request(Method::HEAD, false)).await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    until_held(&fixture, 0).await;
}

/// The same in a route table: the GET route is the route of a HEAD request.
async fn head_request_is_locked_by_a_get_route_in_the_table<F: Fixture>() {
    let fixture = F::start().await;
    let gate = Gate::new();
    let routes = LockRoutes::new(fixture.backend())
        .defaults(|layer| layer.namespace(NS))
        .route(
            "/docs/{id}",
            LockPolicy::template("doc:{path.id}")
                .unwrap()
                .methods([Method::GET]),
        )
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(routes)
        .service(echo(gate.clone()));

    let holder = tokio::spawn(
        service.clone().oneshot(
            call(Method::GET, "/docs/7")
                .header("x-gate", "1")
                .body(String::new())
                .unwrap(),
        ),
    );
    until_held(&fixture, 1).await;
    let head = service
        .clone()
        .oneshot(call(Method::HEAD, "/docs/7").body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::CONFLICT);

    gate.open();
    assert_eq!(
        text(holder.await.unwrap().unwrap()).await,
        format!("{NS}{{doc:7}}")
    );
    let head = service
        .clone()
        .oneshot(call(Method::HEAD, "/docs/7").body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(text(head).await, format!("{NS}{{doc:7}}"));
    // Methods other than GET and HEAD stay unlocked.
    let post = service
        .oneshot(call(Method::POST, "/docs/7").body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(text(post).await, "unlocked");
}

/// The other way round does not hold: a HEAD-only policy does not lock GET.
#[tokio::test]
async fn a_head_only_policy_does_not_lock_get() {
    let routes = LockRoutes::new(tower_lock::MemoryBackend::new())
        .route(
            "/docs",
            LockPolicy::template("doc").unwrap().methods([Method::HEAD]),
        )
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(routes)
        .service(echo(Gate::new()));
    let get = service
        .clone()
        .oneshot(call(Method::GET, "/docs").body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(text(get).await, "unlocked");
    let head = service
        .oneshot(call(Method::HEAD, "/docs").body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(text(head).await, "tower-lock:{doc}");
}

// ---------------------------------------------------------------------------------------------
// Route patterns: a pattern that can never match would leave its route unlocked.

fn pattern_error(pattern: &str) -> String {
    let policy = LockPolicy::template("x").unwrap();
    match LockRoutes::new(tower_lock::MemoryBackend::new()).route(pattern, policy) {
        Err(RouteError::Pattern {
            pattern: p,
            message,
        }) => {
            assert_eq!(p, pattern);
            message
        }
        Err(other) => panic!("`{pattern}`: not a pattern error: {other}"),
        Ok(_) => panic!("`{pattern}` was accepted, and its route would run unlocked"),
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
        let message = pattern_error(pattern);
        assert!(
            message.contains(hint),
            "`{pattern}`: the message {message:?} does not say {hint:?}"
        );
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
        let message = pattern_error(pattern);
        assert!(
            message.contains(hint),
            "`{pattern}`: the message {message:?} does not say {hint:?}"
        );
    }
}

#[test]
fn route_table_accepts_the_patterns_axum_accepts() {
    let policy = LockPolicy::template("x").unwrap();
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
        assert!(axum_accepts(pattern), "axum 0.8 rejects `{pattern}`");
        if let Err(error) =
            LockRoutes::new(tower_lock::MemoryBackend::new()).route(pattern, policy.clone())
        {
            panic!("`{pattern}` refused: {error}");
        }
    }
}

/// A parameter name is not path text: the character checks apply to literal text only.
#[test]
fn route_table_checks_only_the_literal_text_of_a_pattern() {
    let policy = LockPolicy::template("x").unwrap();
    for pattern in ["/a/{the id}", "/a/{id?}", "/a/{i#d}", "/a/{*the rest}"] {
        assert!(axum_accepts(pattern), "axum 0.8 rejects `{pattern}`");
        if let Err(error) =
            LockRoutes::new(tower_lock::MemoryBackend::new()).route(pattern, policy.clone())
        {
            panic!("`{pattern}` refused although axum takes it: {error}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The Idempotency-Key preset in a route table.

/// The preset covers POST and PATCH only: a `DELETE /orders` goes on to the table's DELETE route.
async fn idempotency_policy_leaves_other_methods_to_later_routes<F: Fixture>() {
    let fixture = F::start().await;
    let gate = Gate::new();
    let routes = LockRoutes::new(fixture.backend())
        .defaults(|layer| layer.namespace(NS))
        .route("/orders", idempotency::policy(IdempotencyKey::new()))
        .unwrap()
        .route(
            "/orders",
            LockPolicy::template("orders:purge")
                .unwrap()
                .methods([Method::DELETE]),
        )
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(routes)
        .service(echo(gate.clone()));

    let holder = tokio::spawn(
        service.clone().oneshot(
            call(Method::DELETE, "/orders")
                .header("x-gate", "1")
                .body(String::new())
                .unwrap(),
        ),
    );
    until_held(&fixture, 1).await;
    let second = service
        .clone()
        .oneshot(call(Method::DELETE, "/orders").body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(
        second.status(),
        StatusCode::CONFLICT,
        "the DELETE route's lock did not hold"
    );
    gate.open();
    assert_eq!(
        text(holder.await.unwrap().unwrap()).await,
        format!("{NS}{{orders:purge}}")
    );

    // The preset still owns POST (and answers its own 400), and GET is nobody's.
    let post = service
        .clone()
        .oneshot(call(Method::POST, "/orders").body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::BAD_REQUEST);
    let post = service
        .clone()
        .oneshot(
            call(Method::POST, "/orders")
                .header("idempotency-key", "k1")
                .body(String::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(text(post).await, format!("{NS}{{idempotency:k1}}"));
    let get = service
        .oneshot(call(Method::GET, "/orders").body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(text(get).await, "unlocked");
}

/// In one namespace, `Idempotency-Key: 42` is not the lock of account 42, whether the account's
/// route keys on `account:{path.id}` or on the bare id.
async fn idempotency_keys_never_contend_with_account_locks<F: Fixture>() {
    let fixture = F::start().await;
    let gate = Gate::new();
    let routes = LockRoutes::new(fixture.backend())
        .defaults(|layer| layer.namespace(NS))
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
    let service = ServiceBuilder::new()
        .layer(routes)
        .service(echo(gate.clone()));
    let post = |uri: &str, headers: &[(&str, &str)], gated: bool| {
        let mut builder = call(Method::POST, uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        if gated {
            builder = builder.header("x-gate", "1");
        }
        service
            .clone()
            .oneshot(builder.body(String::new()).unwrap())
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
        let response = post(uri, &[], false).await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "{uri} met the lock of an Idempotency-Key"
        );
    }
    // The keys themselves are still held.
    let retry = post("/orders", &[("idempotency-key", "42")], false)
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::CONFLICT);

    gate.open();
    let unscoped = text(unscoped.await.unwrap().unwrap()).await;
    let scoped = text(scoped.await.unwrap().unwrap()).await;
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
