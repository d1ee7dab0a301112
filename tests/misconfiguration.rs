//! A lock key that can never be extracted is the server's mistake: answered 500 with a detail
//! that names the fix, and logged at error level once per layer (its extractor and the clones its
//! services hold), not once per request. What the client can fix stays a 400. What can be caught
//! while the app is built is an error then.
//!
//! Built with and without the `axum` feature: without it, a `{path.NAME}` under axum's
//! `route_layer` has no route to read (`cargo test --test misconfiguration` runs that side).

#[macro_use]
mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{ServiceBuilder, ServiceExt};
use tower_lock::key::{Header, KeyTemplate, PathParam};
use tower_lock::{LockLayer, LockPolicy, LockRoutes, Locks, RouteError};
use tracing::instrument::WithSubscriber;

use common::{Fixture, NS};

/// What the error-level log of a misconfigured key says.
const LOGGED: &str = "can never be extracted";

/// Error-level events written while a future runs (on whatever thread polls it).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Runs `future` with a subscriber of its own that records error-level events here.
    async fn capture<T>(&self, future: impl Future<Output = T>) -> T {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::ERROR)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        future.with_subscriber(subscriber).await
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// How many misconfiguration errors were logged.
    fn misconfigurations(&self) -> usize {
        self.text().matches(LOGGED).count()
    }
}

/// A handler that counts its calls.
fn counting(calls: &Arc<AtomicUsize>) -> axum::routing::MethodRouter {
    let calls = calls.clone();
    post(move || async move {
        calls.fetch_add(1, Ordering::SeqCst);
        "done"
    })
}

/// Sends a POST to `uri` through `app`: status and body.
async fn call<S>(app: &S, uri: &str, headers: &[(&str, &str)]) -> (StatusCode, String)
where
    S: tower::Service<Request<Body>, Error = Infallible> + Clone,
    S::Response: Into<Response<Body>>,
{
    let mut request = Request::builder().method(Method::POST).uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response: Response<Body> = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap()
        .into();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// Checks a 500 for a misconfigured key: problem+json of its own type, a detail holding every
/// `fix` fragment. Returns the detail.
fn assert_misconfigured((status, body): (StatusCode, String), fixes: &[&str]) -> String {
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let problem: serde_json::Value = serde_json::from_str(&body).expect("problem+json");
    assert_eq!(
        problem["type"], "urn:tower-lock:misconfigured-key",
        "{body}"
    );
    assert_eq!(problem["status"], 500);
    let detail = problem["detail"].as_str().unwrap().to_owned();
    for fix in fixes {
        assert!(detail.contains(fix), "no {fix:?} in the detail: {detail}");
    }
    detail
}

/// `{path.id}` on a route whose pattern has `{account}`: every request is a 500 naming the
/// route's parameters, the handler never runs, nothing is locked, one error is logged.
#[cfg(feature = "axum")]
async fn a_path_parameter_the_route_lacks_is_a_500_logged_once<F: Fixture>() {
    let fixture = F::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let policy = LockPolicy::template("account:{path.id}").unwrap();
    let app = Router::new()
        .route("/accounts/{account}/deposit", counting(&calls))
        .route_layer(policy.layer(fixture.backend()).namespace(NS));

    let logs = Logs::default();
    for _ in 0..2 {
        let response = logs.capture(call(&app, "/accounts/42/deposit", &[])).await;
        assert_misconfigured(
            response,
            &[
                "`id`",
                "`/accounts/{account}/deposit`",
                "(it has `account`)",
                "key on a parameter of the route",
            ],
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(fixture.held().await, 0);
    assert_eq!(logs.misconfigurations(), 1, "{}", logs.text());
    let logs = logs.text();
    assert!(logs.contains("ERROR"), "{logs}");
    assert!(logs.contains("account:{path.id}"), "{logs}");
}

/// A layer that no route pattern reaches. With the `axum` feature: a layer around the whole
/// router, which runs before routing, instead of `route_layer`. Without it: even `route_layer`,
/// since the crate cannot read axum's match then.
async fn a_layer_no_route_pattern_reaches_is_a_500_logged_once<F: Fixture>() {
    let fixture = F::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = LockPolicy::template("account:{path.id}")
        .unwrap()
        .layer(fixture.backend())
        .namespace(NS);
    let routes = Router::new().route("/accounts/{id}/deposit", counting(&calls));
    #[cfg(feature = "axum")]
    let (app, fixes) = (
        ServiceExt::<Request<Body>>::map_response(
            ServiceBuilder::new().layer(layer).service(routes),
            |response| response.map(Body::new),
        ),
        ["`route_layer`", "not around the router"],
    );
    #[cfg(not(feature = "axum"))]
    let (app, fixes) = (
        routes.route_layer(layer),
        ["without its `axum` feature", "enable the feature"],
    );

    let logs = Logs::default();
    for _ in 0..2 {
        let response = logs.capture(call(&app, "/accounts/42/deposit", &[])).await;
        let detail = assert_misconfigured(response, &fixes);
        // The other ways out are named too.
        for fix in ["`LockRoutes` table", "`KeyTemplate::with_pattern`"] {
            assert!(detail.contains(fix), "{detail}");
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(fixture.held().await, 0);
    assert_eq!(logs.misconfigurations(), 1, "{}", logs.text());
}

/// `PathParam::new` in a plain tower stack (no router, no pattern given), and in a route table
/// whose route lacks the parameter (an extractor the table cannot check when it is built):
/// 500s, each layer logging once.
async fn path_param_with_no_readable_route_is_a_500_logged_once_per_layer<F: Fixture>() {
    let fixture = F::start().await;
    let handler = tower::service_fn(|_: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Body::from("done")))
    });
    let plain = ServiceBuilder::new()
        .layer(LockLayer::new(fixture.backend(), PathParam::new("id")).namespace(NS))
        .service(handler)
        .map_response(|response| response.map(Body::new));
    let table = ServiceBuilder::new()
        .layer(
            LockRoutes::new(fixture.backend())
                .defaults(|layer| layer.namespace(NS))
                .route("/accounts/{account}", LockPolicy::key(PathParam::new("id")))
                .unwrap(),
        )
        .service(handler)
        .map_response(|response| response.map(Body::new));

    let logs = Logs::default();
    for _ in 0..2 {
        let response = logs.capture(call(&plain, "/accounts/42", &[])).await;
        assert_misconfigured(response, &["`PathParam::with_pattern`"]);
        let response = logs.capture(call(&table, "/accounts/42", &[])).await;
        assert_misconfigured(response, &["`/accounts/{account}`", "(it has `account`)"]);
    }
    assert_eq!(fixture.held().await, 0);
    // Two layers, two requests each: one log line per layer.
    assert_eq!(logs.misconfigurations(), 2, "{}", logs.text());
    let logs = logs.text();
    assert!(logs.contains("PathParam(\"id\")"), "{logs}");
}

/// What the client can fix stays a 400 and logs nothing: a missing header, a path that is not
/// the extractor's route, a value that is not UTF-8.
async fn client_mistakes_stay_400_and_are_not_logged<F: Fixture>() {
    let fixture = F::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new().route(
        "/{*rest}",
        counting(&calls).route_layer(
            LockPolicy::template("{header.x-tenant}:account:{path.id}")
                .unwrap()
                .layer_for(fixture.backend(), "/accounts/{id}/deposit")
                .unwrap()
                .namespace(NS),
        ),
    );
    let tenant = [("x-tenant", "acme")];

    let logs = Logs::default();
    for (uri, headers, says) in [
        ("/accounts/42/deposit", &[][..], "header `x-tenant`"),
        ("/accounts/42", &tenant[..], "path parameter `id`"),
        ("/accounts/%FF/deposit", &tenant[..], "UTF-8"),
    ] {
        let (status, body) = logs.capture(call(&app, uri, headers)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(problem["type"], "urn:tower-lock:invalid-lock-key");
        assert!(problem["detail"].as_str().unwrap().contains(says), "{body}");
    }
    let (status, body) = logs
        .capture(call(&app, "/accounts/42/deposit", &tenant))
        .await;
    assert_eq!((status, &*body), (StatusCode::OK, "done"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(logs.text(), "");
}

suite!(
    a_layer_no_route_pattern_reaches_is_a_500_logged_once,
    path_param_with_no_readable_route_is_a_500_logged_once_per_layer,
    client_mistakes_stay_400_and_are_not_logged,
);

#[cfg(feature = "axum")]
mod with_axum_feature {
    use super::*;
    suite!(a_path_parameter_the_route_lacks_is_a_500_logged_once);
}

/// A pattern that lacks a `{path.NAME}` of the key is refused while the app is built, wherever
/// a pattern meets a key: templates, policies' layers, route tables, `PathParam`.
#[test]
fn a_pattern_without_the_keys_path_parameter_is_refused_when_the_app_is_built() {
    let template = "account:{path.id}";
    let pattern = "/accounts/{account}";
    let is_the_placeholder = |error: &tower_lock::key::TemplateError| {
        assert_eq!(error.position(), 8, "{error}");
        assert!(error.expected().contains("(it has `account`)"), "{error}");
    };

    let error = KeyTemplate::parse(template)
        .unwrap()
        .with_pattern(pattern)
        .unwrap_err();
    is_the_placeholder(&error);

    let policy = LockPolicy::template(template).unwrap();
    let backend = tower_lock::MemoryBackend::new();
    is_the_placeholder(&policy.layer_for(backend.clone(), pattern).unwrap_err());
    let locks = Locks::new(backend.clone());
    is_the_placeholder(&policy.layer_for_with(&locks, pattern).unwrap_err());
    match LockRoutes::new(backend).route(pattern, policy) {
        Err(RouteError::Template(error)) => is_the_placeholder(&error),
        other => panic!("accepted: {other:?}"),
    }

    let panic = std::panic::catch_unwind(|| PathParam::with_pattern(pattern, "id")).unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert_eq!(
        message,
        "route pattern `/accounts/{account}` has no parameter `id`"
    );

    // A header-only key needs no parameter of the pattern.
    assert!(
        LockPolicy::key(Header::new("x-id"))
            .layer_for(tower_lock::MemoryBackend::new(), pattern)
            .is_ok()
    );
}
