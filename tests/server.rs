//! The example server's contract, exercised over HTTP on both backends.

#[macro_use]
mod common;
#[path = "../examples/support/demo.rs"]
mod demo;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use common::{Fixture, Memory, Redis, RedisServer};
use demo::{DemoConfig, Running, spawn};

/// A backend the demo can run on: its locks and balances in that Redis, or in process.
trait DemoBackend: Fixture {
    fn redis_url(&self) -> Option<String>;
}

impl DemoBackend for Redis {
    fn redis_url(&self) -> Option<String> {
        Some(self.server.url())
    }
}

impl DemoBackend for Memory {
    fn redis_url(&self) -> Option<String> {
        None
    }
}

async fn start<F: DemoBackend>(fixture: &F, config: DemoConfig) -> Running {
    spawn(DemoConfig {
        redis_url: fixture.redis_url(),
        ..config
    })
    .await
    .expect("demo server")
}

async fn post(url: String) -> reqwest::Response {
    reqwest::Client::new().post(url).send().await.unwrap()
}

async fn deposit_contract<F: DemoBackend>() {
    let fixture = F::start().await;
    let server = start(&fixture, DemoConfig::default()).await;
    let base = server.url();

    let response = post(format!("{base}/accounts/a1/deposit?amount=5")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["account"], "a1");
    assert_eq!(body["balance"], 5);
    assert!(body["fencing_token"].as_u64().unwrap() >= 1);

    // A second deposit while the first holds the lock: 409 with Retry-After and problem+json.
    let slow = tokio::spawn(post(format!(
        "{base}/accounts/a1/deposit?amount=5&hold_ms=800"
    )));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let conflict = post(format!("{base}/accounts/a1/deposit?amount=7")).await;
    assert_eq!(conflict.status(), StatusCode::CONFLICT);
    assert!(conflict.headers().contains_key("retry-after"));
    assert_eq!(
        conflict.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = conflict.json().await.unwrap();
    assert_eq!(problem["status"], 409);
    let slow = slow.await.unwrap();
    assert_eq!(slow.status(), StatusCode::OK);
    let slow: Value = slow.json().await.unwrap();
    assert_eq!(slow["balance"], 10);

    let balance: Value = reqwest::get(format!("{base}/accounts/a1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(balance, serde_json::json!({"account": "a1", "balance": 10}));

    let unknown: Value = reqwest::get(format!("{base}/accounts/nobody"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(unknown["balance"], 0);

    let unlocked = post(format!("{base}/unlocked/accounts/a1/deposit?amount=1")).await;
    assert_eq!(unlocked.status(), StatusCode::OK);
    let unlocked: Value = unlocked.json().await.unwrap();
    assert_eq!(unlocked["balance"], 11);

    let bad = post(format!("{base}/accounts/a1/deposit?amount=abc")).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

async fn concurrent_burst_keeps_every_locked_deposit<F: DemoBackend>() {
    let fixture = F::start().await;
    let server = start(&fixture, DemoConfig::default()).await;
    let base = server.url();
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            let url = format!("{base}/accounts/burst/deposit?amount=1&hold_ms=5");
            tokio::spawn(async move {
                loop {
                    let status = client.post(&url).send().await.unwrap().status();
                    match status {
                        StatusCode::OK => return,
                        StatusCode::CONFLICT => {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        other => panic!("unexpected {other}"),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let balance: Value = client
        .get(format!("{base}/accounts/burst"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(balance["balance"], 20, "a locked deposit was lost");
}

async fn stale_token_write_is_refused<F: DemoBackend>() {
    let fixture = F::start().await;
    // Leases of 300 ms that are not renewed: a slow deposit outlives its lock.
    let server = start(
        &fixture,
        DemoConfig {
            lock_ttl: Some(Duration::from_millis(300)),
            renew_lease: false,
            ..DemoConfig::default()
        },
    )
    .await;
    let base = server.url();
    let slow = tokio::spawn(post(format!(
        "{base}/accounts/f1/deposit?amount=100&hold_ms=1000"
    )));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The lease has lapsed: a second deposit gets the lock, a larger token, and writes first.
    let fast = post(format!("{base}/accounts/f1/deposit?amount=1")).await;
    assert_eq!(fast.status(), StatusCode::OK);
    let fast: Value = fast.json().await.unwrap();
    // The first deposit's write carries the older token and is refused.
    let slow = slow.await.unwrap();
    assert_eq!(slow.status(), StatusCode::CONFLICT);
    assert_eq!(slow.headers()["content-type"], "application/problem+json");
    let problem: Value = slow.json().await.unwrap();
    assert_eq!(problem["type"], demo::STALE_TOKEN_TYPE);
    let balance: Value = reqwest::get(format!("{base}/accounts/f1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(balance["balance"], fast["balance"]);
    assert_eq!(balance["balance"], 1);
}

async fn stream_holds_the_lock_until_the_body_is_sent<F: DemoBackend>() {
    let fixture = F::start().await;
    let server = start(&fixture, DemoConfig::default()).await;
    let base = server.url();
    let stream = reqwest::get(format!("{base}/stream/s1?ms=800"))
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let body = tokio::spawn(stream.text());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = post(format!("{base}/accounts/s1/deposit?amount=1")).await;
    assert_eq!(during.status(), StatusCode::CONFLICT);
    let text = body.await.unwrap().unwrap();
    assert_eq!(text.lines().count(), 5, "{text}");
    let mut after = StatusCode::CONFLICT;
    for _ in 0..50 {
        after = post(format!("{base}/accounts/s1/deposit?amount=1"))
            .await
            .status();
        if after == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(after, StatusCode::OK);
}

async fn orders_follow_the_idempotency_key_preset<F: DemoBackend>() {
    let fixture = F::start().await;
    let server = start(&fixture, DemoConfig::default()).await;
    let client = reqwest::Client::new();
    let url = format!("{}/orders", server.url());
    let missing = client.post(&url).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );

    let first = tokio::spawn(
        client
            .post(format!("{url}?hold_ms=500"))
            .header("idempotency-key", "order-1")
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    let retry = client
        .post(&url)
        .header("idempotency-key", "order-1")
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::CONFLICT);
    let problem: Value = retry.json().await.unwrap();
    assert_eq!(
        problem["title"],
        "A request is outstanding for this Idempotency-Key"
    );
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let body: Value = first.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"order": "order-1"}));
}

async fn long_hold_outlives_lock_ttl_safely<F: DemoBackend>() {
    let fixture = F::start().await;
    // LOCK_TTL_MS=300 with the default renewal: a 1.2 s deposit keeps its lock all along.
    let server = start(
        &fixture,
        DemoConfig {
            lock_ttl: Some(Duration::from_millis(300)),
            ..DemoConfig::default()
        },
    )
    .await;
    let base = server.url();
    let slow = tokio::spawn(post(format!(
        "{base}/accounts/t1/deposit?amount=10&hold_ms=1200"
    )));
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let during = post(format!("{base}/accounts/t1/deposit?amount=1")).await;
        assert_eq!(
            during.status(),
            StatusCode::CONFLICT,
            "lock lapsed mid-request"
        );
    }
    let slow = slow.await.unwrap();
    assert_eq!(slow.status(), StatusCode::OK);
    let slow: Value = slow.json().await.unwrap();
    assert_eq!(slow["balance"], 10);
}

suite!(
    deposit_contract,
    concurrent_burst_keeps_every_locked_deposit,
    stale_token_write_is_refused,
    stream_holds_the_lock_until_the_body_is_sent,
    orders_follow_the_idempotency_key_preset,
    long_hold_outlives_lock_ttl_safely,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_answers_503_with_retry_after() {
    let mut redis = RedisServer::start();
    let server = spawn(DemoConfig {
        redis_url: Some(redis.url()),
        ..DemoConfig::default()
    })
    .await
    .expect("demo server");
    let base = server.url();
    assert_eq!(
        post(format!("{base}/accounts/x/deposit")).await.status(),
        StatusCode::OK
    );
    redis.stop();
    let response = post(format!("{base}/accounts/x/deposit")).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["status"], 503);
}
