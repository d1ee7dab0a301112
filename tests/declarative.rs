//! Declarative protection: policies, the route table, the Idempotency-Key preset, axum and hyper
//! integration, tracing.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use http::{Method, Request, Response, StatusCode};
use tower::{Layer, ServiceBuilder};
use tower_lock::extract::FencingToken;
use tower_lock::key::Header;
use tower_lock::{LockLease, LockPolicy, LockRoutes, MemoryBackend, RouteError};

use common::{
    Fixture, Gate, Memory, Redis, answer, body_json, body_text, call, echo, retry_after, send,
    while_held,
};

#[tokio::test]
async fn route_table_first_match_wins_and_unmatched_requests_pass_through() {
    let routes = LockRoutes::new(MemoryBackend::new())
        .route(
            "/accounts/{id}/deposit",
            LockPolicy::template("deposit:{path.id}")
                .unwrap()
                .methods([Method::POST]),
        )
        .unwrap()
        // Overlaps the route above; only reached by methods the first one does not lock.
        .route(
            "/accounts/{id}/{action}",
            LockPolicy::template("account:{path.id}:{method}").unwrap(),
        )
        .unwrap()
        .route("/reports/{*rest}", LockPolicy::template("reports").unwrap())
        .unwrap();
    let service = routes.layer(echo(Gate::new()));
    let key = async |method: Method, uri: &str| answer(&service, call(method, uri)).await.1;
    assert_eq!(
        key(Method::POST, "/accounts/42/deposit").await,
        "tower-lock:{deposit:42}"
    );
    assert_eq!(
        key(Method::PUT, "/accounts/42/deposit").await,
        "tower-lock:{account:42:PUT}"
    );
    assert_eq!(
        key(Method::GET, "/reports/2026/11").await,
        "tower-lock:{reports}"
    );
    assert_eq!(key(Method::GET, "/accounts/42").await, "unlocked");
    assert_eq!(key(Method::GET, "/elsewhere").await, "unlocked");
}

#[test]
fn route_table_rejects_bad_patterns_and_templates_at_build_time() {
    let unknown_param = LockRoutes::new(MemoryBackend::new()).route(
        "/accounts/{id}",
        LockPolicy::template("account:{path.account_id}").unwrap(),
    );
    let Err(RouteError::Template(error)) = unknown_param else {
        panic!("a template naming a missing path parameter was accepted");
    };
    assert_eq!(error.position(), 8);

    let bad_pattern = LockRoutes::new(MemoryBackend::new())
        .route("/accounts/{id", LockPolicy::template("x").unwrap());
    assert!(matches!(bad_pattern, Err(RouteError::Pattern { .. })));

    let bad_template = LockPolicy::template("account:{pth.id}").unwrap_err();
    assert_eq!(bad_template.position(), 8);
    assert!(bad_template.to_string().contains("expected"));
}

#[tokio::test]
async fn route_policy_settings_apply_per_route() {
    let fixture = Memory::start().await;
    let gate = Gate::new();
    let routes = LockRoutes::new(fixture.backend())
        .defaults(|layer| layer.namespace("app:"))
        .route(
            "/slow/{id}",
            LockPolicy::template("slow:{path.id}")
                .unwrap()
                .ttl(Duration::from_secs(30)),
        )
        .unwrap();
    let service = routes.layer(echo(gate.clone()));
    let slow = || Request::post("/slow/1");
    let (holder, conflict) = while_held(&fixture, &service, &gate, slow(), slow()).await;
    assert_eq!(conflict.status(), StatusCode::CONFLICT);
    // The route's 30 s lease, not the default 10 s.
    let retry_after = retry_after(&conflict);
    assert!(retry_after > 10, "Retry-After {retry_after}");
    assert_eq!(body_text(holder).await, "app:{slow:1}");
}

#[tokio::test]
async fn template_missing_part_is_a_400_naming_it() {
    let routes = LockRoutes::new(MemoryBackend::new())
        .route(
            "/docs",
            LockPolicy::template("{header.x-tenant-id}:{query.doc}").unwrap(),
        )
        .unwrap();
    let service = routes.layer(echo(Gate::new()));
    let missing_header = send(&service, Request::get("/docs?doc=1")).await;
    assert_eq!(missing_header.status(), StatusCode::BAD_REQUEST);
    let problem = body_json(missing_header).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("x-tenant-id"),
        "{problem}"
    );
    let acme = |uri| Request::get(uri).header("x-tenant-id", "acme");
    let missing_query = send(&service, acme("/docs")).await;
    assert_eq!(missing_query.status(), StatusCode::BAD_REQUEST);
    let problem = body_json(missing_query).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("doc"),
        "{problem}"
    );
    assert_eq!(
        answer(&service, acme("/docs?doc=a%3Ab")).await,
        (StatusCode::OK, "tower-lock:{acme:a%3Ab}".to_owned())
    );
}

/// The axum app of these tests: two routes protected declaratively with `route_layer`.
fn axum_app(backend: MemoryBackend, gate: Gate) -> Router {
    async fn deposit(lease: LockLease, FencingToken(token): FencingToken) -> String {
        format!("{} {token}", lease.name().lock_key())
    }
    async fn optional(lease: Option<LockLease>) -> String {
        format!("{}", lease.is_some())
    }
    // Each route carries its own policy: `route_layer` on the method router.
    Router::new()
        .route(
            "/accounts/{id}/deposit",
            post(deposit).route_layer(
                LockPolicy::template("account:{path.id}")
                    .unwrap()
                    .layer(backend.clone()),
            ),
        )
        .route(
            "/slow/{id}",
            post(move || {
                let gate = gate.clone();
                async move {
                    gate.wait().await;
                    "done"
                }
            })
            .route_layer(LockPolicy::key(Header::new("x-user")).layer(backend)),
        )
        .route("/open", get(optional))
}

#[tokio::test]
async fn axum_route_layer_with_infallible_router() {
    let fixture = Memory::start().await;
    let gate = Gate::new();
    let app = axum_app(fixture.backend(), gate.clone());
    // The layered router is still an `Infallible` service: no HandleErrorLayer needed.
    fn infallible<S: tower::Service<Request<axum::body::Body>, Error = Infallible>>(_: &S) {}
    infallible(&app);
    // `{path.id}` read axum's matched route; the handler extracted the lease and its token.
    let (status, text) = answer(&app, Request::post("/accounts/7/deposit")).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (key, token) = text.split_once(' ').unwrap();
    assert_eq!(key, "tower-lock:{account:7}");
    assert!(token.parse::<u64>().unwrap() > 1, "{text}");

    // route_layer: an unmatched path is a 404, never a lock rejection.
    let not_found = send(&app, Request::post("/nowhere")).await;
    assert_eq!(not_found.status(), StatusCode::NOT_FOUND);

    // The unlocked route sees no lease.
    assert_eq!(answer(&app, Request::get("/open")).await.1, "false");

    // The second route's policy: 400 without the header, 409 while held.
    let no_user = send(&app, Request::post("/slow/1")).await;
    assert_eq!(no_user.status(), StatusCode::BAD_REQUEST);
    let slow = || Request::post("/slow/1").header("x-user", "ann");
    let (holder, conflict) = while_held(&fixture, &app, &gate, slow(), slow()).await;
    assert_eq!(conflict.status(), StatusCode::CONFLICT);
    assert_eq!(holder.status(), StatusCode::OK);
}

#[tokio::test]
async fn lease_extractor_without_a_lock_is_a_500() {
    async fn needs_lease(_lease: LockLease) -> &'static str {
        "unreachable"
    }
    let app: Router = Router::new().route("/", get(needs_lease));
    let response = send(&app, Request::get("/")).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

mod idempotency_preset {
    use super::*;
    use tower_lock::idempotency;

    async fn preset_over_http(backend: impl tower_lock::LockBackend) {
        let gate = Gate::new();
        let service = ServiceBuilder::new()
            .layer(idempotency::layer_with(
                backend,
                idempotency::IdempotencyKey::new().scoped_by(Header::new("x-user")),
            ))
            .service(echo(gate.clone()));
        let order = |user: &str, key: Option<&str>, gated: bool| {
            let mut builder = Request::post("/orders").header("x-user", user);
            if let Some(key) = key {
                builder = builder.header("idempotency-key", key);
            }
            send(&service, common::gate_if(builder, gated))
        };

        let missing = order("ann", None, false).await;
        assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            missing.headers()["content-type"],
            "application/problem+json"
        );
        assert_eq!(
            body_json(missing).await["title"],
            "Idempotency-Key is missing"
        );

        let first = tokio::spawn(order("ann", Some("\"k1\""), true));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let retry = order("ann", Some("\"k1\""), false).await;
        assert_eq!(retry.status(), StatusCode::CONFLICT);
        assert!(retry.headers().contains_key("retry-after"));
        assert_eq!(
            body_json(retry).await["title"],
            "A request is outstanding for this Idempotency-Key"
        );
        // Another caller's identical key is another lock.
        let other_user = order("bob", Some("\"k1\""), false).await;
        assert_eq!(other_user.status(), StatusCode::OK);

        gate.open();
        assert_eq!(first.await.unwrap().status(), StatusCode::OK);
        // Done: the same key may be sent again (replay is the handler's business).
        let again = order("ann", Some("\"k1\""), false).await;
        assert_eq!(again.status(), StatusCode::OK);

        // GET is not a protected method.
        assert_eq!(
            answer(&service, Request::get("/orders")).await.1,
            "unlocked"
        );
    }

    #[tokio::test]
    async fn idempotency_preset_on_memory() {
        preset_over_http(MemoryBackend::new()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idempotency_preset_on_redis_leaves_no_keys() {
        let fixture = Redis::start().await;
        preset_over_http(fixture.backend()).await;
        let mut connection = fixture.server.connection().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut connection)
            .await
            .unwrap();
        // No lock left, and no fencing counter per idempotency key.
        assert!(keys.is_empty(), "{keys:?}");
    }
}

mod hyper_only {
    use super::*;
    use hyper::server::conn::http1;
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hyper_server_with_a_route_table_end_to_end() {
        let fixture = Redis::start().await;
        let gate = Gate::new();
        let opener = gate.clone();
        let routes = LockRoutes::new(fixture.backend())
            .route(
                "/jobs/{id}",
                LockPolicy::template("job:{path.id}")
                    .unwrap()
                    .methods([Method::PUT]),
            )
            .unwrap();
        let handler = tower::service_fn(move |req: Request<hyper::body::Incoming>| {
            let gate = gate.clone();
            async move {
                gate.pass(req.headers()).await;
                let token = req
                    .extensions()
                    .get::<LockLease>()
                    .map_or(0, LockLease::fencing_token);
                Ok::<_, Infallible>(Response::new(http_body_util::Full::new(
                    bytes::Bytes::from(token.to_string()),
                )))
            }
        });
        let service = ServiceBuilder::new().layer(routes).service(handler);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let service = TowerToHyperService::new(service.clone());
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/jobs/9");
        let first = client.put(&url).send().await.unwrap();
        assert_eq!(first.status(), StatusCode::OK);
        let token: u64 = first.text().await.unwrap().parse().unwrap();
        assert!(token > 1, "a fencing token from the clock: {token}");
        let holder = tokio::spawn(client.put(&url).header("x-gate", "1").send());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let conflict = client.put(&url).send().await.unwrap();
        assert_eq!(conflict.status(), StatusCode::CONFLICT);
        assert_eq!(
            conflict.headers()["content-type"],
            "application/problem+json"
        );
        // GET is not locked by the PUT policy.
        let get = client.get(&url).send().await.unwrap();
        assert_eq!(get.text().await.unwrap(), "0");
        opener.open();
        let held = holder.await.unwrap().unwrap();
        assert_eq!(held.status(), StatusCode::OK);
        let second: u64 = held.text().await.unwrap().parse().unwrap();
        assert!(second > token, "{second} after {token}");
    }
}
