//! Settings live in one place: a route table's defaults reach every route whatever the order
//! of calls, a policy overrides only what it sets (over the engine or the table it is used
//! with), and a lease names its key and its backend name apart.

#[macro_use]
mod common;

use std::convert::Infallible;
use std::time::Duration;

use common::{Fixture, NS, request, send};
use http::{Method, Request, Response, StatusCode};
use tower::ServiceBuilder;
use tower_lock::key::LockKey;
use tower_lock::{LockLease, LockPolicy, LockRoutes, Locks};

/// A service that answers with the lease it ran under: its key, its backend name, its TTL as
/// the remaining validity (rounded to seconds).
fn report_lease() -> impl tower::Service<
    Request<String>,
    Response = Response<String>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(|req: Request<String>| async move {
        let report = match req.extensions().get::<LockLease>() {
            Some(lease) => format!("{} {}", lease.key().as_str(), lease.name().lock_key()),
            None => "unlocked".to_owned(),
        };
        Ok::<_, Infallible>(Response::new(report))
    })
}

async fn text(response: Response<tower_lock::LockBody<String>>) -> String {
    use http_body_util::BodyExt;
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

async fn route_defaults_reach_routes_added_before_and_after<F: Fixture>() {
    let fixture = F::start().await;
    let policy = || {
        LockPolicy::template("{header.x-key}")
            .unwrap()
            .methods([Method::POST])
    };
    let routes = LockRoutes::new(fixture.backend())
        .route("/before", policy())
        .unwrap()
        .defaults(|layer| layer.namespace(NS))
        .route("/after", policy())
        .unwrap();
    let service = ServiceBuilder::new().layer(routes).service(report_lease());
    for path in ["/before", "/after"] {
        let response = send(&service, request("k").uri(path)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            text(response).await,
            format!("k {NS}{{k}}"),
            "the route {path} did not take the table's namespace"
        );
    }
}

async fn a_policy_overrides_only_what_it_sets<F: Fixture>() {
    let fixture = F::start().await;
    let locks = Locks::new(fixture.backend())
        .namespace(NS)
        .ttl(Duration::from_secs(30));
    // The policy changes the TTL; the engine's namespace stays.
    let layer = LockPolicy::template("{header.x-key}")
        .unwrap()
        .ttl(Duration::from_secs(2))
        .layer_with(&locks);
    let debug = format!("{layer:?}");
    assert!(debug.contains("ttl: 2s"), "{debug}");
    assert!(debug.contains(&format!("namespace: \"{NS}\"")), "{debug}");
    let service = ServiceBuilder::new().layer(layer).service(report_lease());
    let response = send(&service, request("k")).await;
    assert_eq!(text(response).await, format!("k {NS}{{k}}"));
    // The engine keeps its own TTL.
    assert!(format!("{locks:?}").contains("ttl: 30s"), "{locks:?}");
}

async fn a_lease_names_its_key_and_its_backend_name_apart<F: Fixture>() {
    let fixture = F::start().await;
    let locks = Locks::new(fixture.backend()).namespace(NS).max_key_len(12);
    let short = LockKey::literal("acct:").part("4:2").build().unwrap();
    let lock = locks.try_lock(&short).await.unwrap();
    assert_eq!(lock.lease().key(), &short);
    assert_eq!(lock.lease().key().as_str(), "acct:4%3A2");
    assert_eq!(lock.name().lock_key(), format!("{NS}{{acct:4%3A2}}"));
    lock.release().await.unwrap();
    // A long key is stored under its digest; the lease still has the key.
    let long = LockKey::literal("account:")
        .part("123456789")
        .build()
        .unwrap();
    let lock = locks.try_lock(&long).await.unwrap();
    assert_eq!(lock.lease().key(), &long);
    assert!(lock.name().lock_key().starts_with(&format!("{NS}{{#")));
    lock.release().await.unwrap();
}

/// `LockPolicy` has every setting a layer has, and its `Debug` shows what it sets.
#[test]
fn a_policy_debug_shows_its_settings() {
    let policy = LockPolicy::template("a")
        .unwrap()
        .namespace("p:")
        .renew_every(Duration::from_millis(700))
        .fail_open(true);
    let debug = format!("{policy:?}");
    for field in ["namespace: \"p:\"", "renew_every: 700ms", "fail_open: true"] {
        assert!(debug.contains(field), "no `{field}` in {debug}");
    }
}

suite!(
    route_defaults_reach_routes_added_before_and_after,
    a_policy_overrides_only_what_it_sets,
    a_lease_names_its_key_and_its_backend_name_apart,
);
