//! `LockRoutes` cannot be bypassed by spelling a path another way: every spelling of a route
//! takes that route's lock (with the same parameters), and a spelling that routers disagree on
//! (percent-encoded separators that would make it another route) is refused with 400.

#[macro_use]
mod common;

use axum::http::{Method, StatusCode};
use common::*;
use tower::Layer;
use tower_lock::LockPolicy;
use tower_lock::key::PathSegment;

/// The key `echo` answers for a request locked on `job:7`.
fn job_7() -> String {
    format!("{NS}{{job:7}}")
}

/// `POST /jobs/{id}/run` locked on `job:{id}`, and `/files/{*path}` on `file:{path}`, in front
/// of a handler that answers its lock's key (waiting for `gate` when asked to).
fn jobs_and_files<F: Fixture>(
    fixture: &F,
    gate: Gate,
) -> impl Sendable<Response = http::Response<tower_lock::LockBody<String>>> {
    table(fixture)
        .route(
            "/jobs/{id}/run",
            LockPolicy::template("job:{path.id}")
                .unwrap()
                .methods([Method::POST]),
        )
        .unwrap()
        .route(
            "/files/{*path}",
            LockPolicy::template("file:{path.path}").unwrap(),
        )
        .unwrap()
        .layer(echo(gate))
}

async fn key_for<F: Fixture>(fixture: &F, path: &str) -> (StatusCode, String) {
    answer(
        &jobs_and_files(fixture, Gate::new()),
        call(Method::POST, path),
    )
    .await
}

async fn a_trailing_slash_takes_the_routes_lock<F: Fixture>() {
    let fixture = F::start().await;
    assert_eq!(
        key_for(&fixture, "/jobs/7/run/").await,
        (StatusCode::OK, job_7())
    );
}

async fn a_doubled_slash_takes_the_routes_lock<F: Fixture>() {
    let fixture = F::start().await;
    for path in [
        "//jobs/7/run",
        "/jobs//7/run",
        "/jobs/7//run",
        "///jobs/7/run//",
    ] {
        assert_eq!(
            key_for(&fixture, path).await,
            (StatusCode::OK, job_7()),
            "{path}"
        );
    }
}

async fn a_dot_segment_takes_the_routes_lock<F: Fixture>() {
    let fixture = F::start().await;
    for path in ["/jobs/7/./run", "/./jobs/7/run", "/jobs/7/run/."] {
        assert_eq!(
            key_for(&fixture, path).await,
            (StatusCode::OK, job_7()),
            "{path}"
        );
    }
}

async fn a_dot_dot_segment_takes_the_lock_of_the_route_it_resolves_to<F: Fixture>() {
    let fixture = F::start().await;
    for path in ["/jobs/x/../7/run", "/../jobs/7/run", "/jobs/7/run/x/.."] {
        assert_eq!(
            key_for(&fixture, path).await,
            (StatusCode::OK, job_7()),
            "{path}"
        );
    }
}

/// The lock is the route's, not another: a spelling arriving while the canonical path holds the
/// lock gets the 409.
async fn a_respelled_path_is_refused_while_the_route_is_held<F: Fixture>() {
    let fixture = F::start().await;
    for path in [
        "/jobs/7/run",
        "/jobs/7/run/",
        "//jobs/7/run",
        "/jobs/7/./run",
        "/jobs/x/../7/run",
    ] {
        let gate = Gate::new();
        let service = jobs_and_files(&fixture, gate.clone());
        let canonical = call(Method::POST, "/jobs/7/run");
        let (holder, respelled) = while_held(
            &fixture,
            &service,
            &gate,
            canonical,
            call(Method::POST, path),
        )
        .await;
        assert_eq!(respelled.status(), StatusCode::CONFLICT, "{path}");
        assert_eq!(body_text(holder).await, job_7());
    }
}

async fn an_encoded_slash_that_would_make_another_route_is_refused<F: Fixture>() {
    let fixture = F::start().await;
    for path in [
        "/jobs/7%2Frun",
        "/jobs/7%2frun",
        "/jobs%2F7%2Frun",
        "/jobs/7%5Crun",
    ] {
        let (status, body) = key_for(&fixture, path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert!(body.contains("percent-encoded"), "{path}: {body}");
    }
    assert_eq!(fixture.held().await, 0);
}

async fn an_encoded_dot_segment_that_would_make_another_route_is_refused<F: Fixture>() {
    let fixture = F::start().await;
    for path in [
        "/jobs/x/%2e%2e/7/run",
        "/jobs/x/%2E%2E/7/run",
        "/jobs/7/%2e/run",
    ] {
        let (status, body) = key_for(&fixture, path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
    }
}

/// Inside a wildcard an encoded slash is part of the value, as in axum: both readings are the
/// same route, so it is locked, on the decoded value.
async fn an_encoded_slash_inside_a_wildcard_is_part_of_its_value<F: Fixture>() {
    let fixture = F::start().await;
    let (status, key) = key_for(&fixture, "/files/a%2Fb").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(key, format!("{NS}{{file:a/b}}"));
    // A plain `/` in the wildcard is the same file: the same lock.
    assert_eq!(key_for(&fixture, "/files/a/b").await, (StatusCode::OK, key));
}

/// Documented: matching is case-sensitive, as axum's is; other percent-encodings are not
/// decoded (axum does not route `/jobs/7/%72un` to `/jobs/{id}/run` either).
async fn other_cases_and_encodings_are_other_paths<F: Fixture>() {
    let fixture = F::start().await;
    for path in ["/Jobs/7/run", "/jobs/7/RUN", "/jobs/7/%72un"] {
        assert_eq!(
            key_for(&fixture, path).await,
            (StatusCode::OK, "unlocked".to_owned()),
            "{path}"
        );
    }
}

suite!(redis_and_memory:
    a_trailing_slash_takes_the_routes_lock,
    a_doubled_slash_takes_the_routes_lock,
    a_dot_segment_takes_the_routes_lock,
    a_dot_dot_segment_takes_the_lock_of_the_route_it_resolves_to,
    a_respelled_path_is_refused_while_the_route_is_held,
    an_encoded_slash_that_would_make_another_route_is_refused,
    an_encoded_dot_segment_that_would_make_another_route_is_refused,
    an_encoded_slash_inside_a_wildcard_is_part_of_its_value,
    other_cases_and_encodings_are_other_paths,
);

/// `PathSegment` counts segments of the normalized path: `//jobs/7` is segment 1 = `7`.
#[tokio::test]
async fn path_segment_reads_the_normalized_path() {
    let fixture = Memory::start().await;
    let routes = table(&fixture)
        .route("/jobs/{id}", LockPolicy::key(PathSegment::new(1)))
        .unwrap();
    let service = routes.layer(echo(Gate::new()));
    for path in ["/jobs/7", "//jobs/7", "/x/../jobs/7/", "/jobs/./7"] {
        let (status, key) = answer(&service, call(Method::POST, path)).await;
        assert_eq!(
            (status, key.as_str()),
            (StatusCode::OK, "test-lock:{7}"),
            "{path}"
        );
    }
}

/// A route that matches the path as it comes is matched as axum matches it, with axum's
/// parameters: normalizing never loses a match (`/{*r}` matches `//` with `r` = `/`, which
/// normalized would be `/`, which it does not match).
#[tokio::test]
async fn the_path_as_it_comes_is_matched_first_with_axums_parameters() {
    let fixture = Memory::start().await;
    let service = table(&fixture)
        .route("/{*r}", LockPolicy::template("r:{path.r}").unwrap())
        .unwrap()
        .layer(echo(Gate::new()));
    for (path, key) in [("//", "r:/"), ("/a//b", "r:a//b"), ("/a/./b/", "r:a/./b/")] {
        assert_eq!(
            answer(&service, call(Method::POST, path)).await,
            (StatusCode::OK, format!("{NS}{{{key}}}")),
            "{path}"
        );
    }
}

/// Routes are tried in order, each on the path as it comes and then normalized: a catch-all
/// after a route does not take that route's respellings.
#[tokio::test]
async fn a_catch_all_after_a_route_does_not_take_its_respellings() {
    let fixture = Memory::start().await;
    let service = table(&fixture)
        .route(
            "/jobs/{id}/run",
            LockPolicy::template("job:{path.id}").unwrap(),
        )
        .unwrap()
        .route("/{*rest}", LockPolicy::template("any").unwrap())
        .unwrap()
        .layer(echo(Gate::new()));
    for path in [
        "/jobs/7/run",
        "//jobs/7/run",
        "/jobs/7/run/",
        "/jobs/x/../7/run",
    ] {
        assert_eq!(
            answer(&service, call(Method::POST, path)).await,
            (StatusCode::OK, job_7()),
            "{path}"
        );
    }
    assert_eq!(
        answer(&service, call(Method::POST, "/other")).await,
        (StatusCode::OK, format!("{NS}{{any}}"))
    );
}
