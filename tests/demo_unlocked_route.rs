//! Red team (issue 11, 1d9c6ca): the example server's unlocked deposit exists to show lost
//! updates under concurrency (demo.rs's route table, README "POST /unlocked/... shows lost
//! updates"). Without `hold_ms` it now yields once instead of `sleep(0)`: does a concurrent burst
//! still lose updates?

#[macro_use]
mod common;
#[path = "../examples/support/demo.rs"]
mod demo;

use std::sync::Arc;

use common::{Fixture, Memory, Redis};
use demo::{DemoConfig, spawn};

trait Configure: Fixture {
    fn configure(&self) -> DemoConfig;
}

impl Configure for Memory {
    fn configure(&self) -> DemoConfig {
        DemoConfig::default()
    }
}

impl Configure for Redis {
    fn configure(&self) -> DemoConfig {
        DemoConfig {
            redis_url: Some(self.server.url()),
            ..DemoConfig::default()
        }
    }
}

const CLIENTS: usize = 50;

/// `CLIENTS` concurrent unlocked deposits of 1 (no `hold_ms`), released together; the number lost.
async fn lost_in_one_burst(base: &str, account: &str) -> i64 {
    let client = reqwest::Client::new();
    // Every client released at once by the barrier.
    let barrier = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let client = client.clone();
            let barrier = barrier.clone();
            let url = format!("{base}/unlocked/accounts/{account}/deposit?amount=1");
            tokio::spawn(async move {
                barrier.wait().await;
                let response = client.post(&url).send().await.unwrap();
                assert_eq!(response.status(), reqwest::StatusCode::OK);
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let balance: serde_json::Value = reqwest::get(format!("{base}/accounts/{account}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    CLIENTS as i64 - balance["balance"].as_i64().unwrap()
}

async fn unlocked_route_loses_updates_without_hold_ms<F: Configure>() {
    let fixture = F::start().await;
    let server = spawn(fixture.configure()).await.expect("demo server");
    let base = server.url();
    let mut lost = Vec::new();
    for round in 0..5 {
        lost.push(lost_in_one_burst(&base, &format!("burst{round}")).await);
    }
    eprintln!("lost updates per burst of {CLIENTS}: {lost:?}");
    assert!(
        lost.iter().all(|&n| n > 0),
        "the unlocked route kept every deposit in some burst: {lost:?}"
    );
}

suite!(
    redis_and_memory:
    unlocked_route_loses_updates_without_hold_ms,
);
