//! The example server's contract, exercised over HTTP on both backends.

#[macro_use]
mod common;
#[path = "../examples/support/demo.rs"]
mod demo;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use common::cluster::Cluster;
use common::redlock::Redlock;
use common::{Fixture, Memory, Redis};
use demo::{DemoConfig, Running, spawn};

/// A backend the demo can run on: its locks and balances in that Redis, Cluster or Redlock, or
/// in process.
trait DemoBackend: Fixture {
    /// `config` pointed at this backend.
    fn configure(&self, config: DemoConfig) -> DemoConfig;
    /// The demo's lock keys held now (`None` in process, where names are not listed).
    fn held_lock_keys(&self) -> impl Future<Output = Option<Vec<String>>> + Send;
}

impl DemoBackend for Redis {
    fn configure(&self, config: DemoConfig) -> DemoConfig {
        DemoConfig {
            redis_url: Some(self.server.url()),
            ..config
        }
    }
    async fn held_lock_keys(&self) -> Option<Vec<String>> {
        Some(self.server.lock_keys(demo::DEFAULT_NAMESPACE).await)
    }
}

impl DemoBackend for Memory {
    fn configure(&self, config: DemoConfig) -> DemoConfig {
        config
    }
    async fn held_lock_keys(&self) -> Option<Vec<String>> {
        None
    }
}

impl DemoBackend for Cluster {
    fn configure(&self, config: DemoConfig) -> DemoConfig {
        DemoConfig {
            cluster_nodes: self.cluster.urls(),
            ..config
        }
    }
    async fn held_lock_keys(&self) -> Option<Vec<String>> {
        Some(self.cluster.lock_keys(demo::DEFAULT_NAMESPACE).await)
    }
}

impl DemoBackend for Redlock {
    fn configure(&self, config: DemoConfig) -> DemoConfig {
        DemoConfig {
            redlock_nodes: self.urls(),
            ..config
        }
    }
    /// Lock keys on any node.
    async fn held_lock_keys(&self) -> Option<Vec<String>> {
        let mut keys = Vec::new();
        for i in 0..self.servers.len() {
            let mut connection = self.node(i).await?;
            let found: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}*", demo::DEFAULT_NAMESPACE))
                .query_async(&mut connection)
                .await
                .ok()?;
            keys.extend(found.into_iter().filter(|k| !k.ends_with(":fence")));
        }
        Some(keys)
    }
}

#[cfg(feature = "sentinel")]
impl DemoBackend for common::sentinel::Sentinel {
    fn configure(&self, config: DemoConfig) -> DemoConfig {
        DemoConfig {
            sentinels: self.group.sentinel_urls(),
            sentinel_master: Some(common::sentinel::MASTER.to_owned()),
            ..config
        }
    }
    async fn held_lock_keys(&self) -> Option<Vec<String>> {
        Some(self.group.lock_keys(demo::DEFAULT_NAMESPACE).await)
    }
}

async fn start<F: DemoBackend>(fixture: &F, config: DemoConfig) -> Running {
    spawn(fixture.configure(config)).await.expect("demo server")
}

/// Leases of `ms`, renewed or not.
fn leases(ms: u64, renewed: bool) -> DemoConfig {
    DemoConfig {
        lock_ttl: Some(Duration::from_millis(ms)),
        renew_lease: renewed,
        ..DemoConfig::default()
    }
}

async fn post(url: String) -> reqwest::Response {
    reqwest::Client::new().post(url).send().await.unwrap()
}

/// Asserts that `response` has `status`; its JSON body.
async fn answered(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status, "{}", response.url());
    response.json().await.unwrap()
}

/// Asserts that `response` is a problem+json with `status`; the problem.
async fn problem(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status, "{}", response.url());
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    response.json().await.unwrap()
}

/// `GET /accounts/{account}`: `{"account": id, "balance": b}`.
async fn account(base: &str, account: &str) -> Value {
    let response = reqwest::get(format!("{base}/accounts/{account}")).await;
    response.unwrap().json().await.unwrap()
}

/// Starts `GET /stream/{account}?ms=800` and, once its headers are in, reads its body in the
/// background; returns that read.
async fn stream(base: &str, account: &str) -> tokio::task::JoinHandle<reqwest::Result<String>> {
    let stream = reqwest::get(format!("{base}/stream/{account}?ms=800"))
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    tokio::spawn(stream.text())
}

async fn deposit_contract<F: DemoBackend>() {
    let fixture = F::start().await;
    let server = start(&fixture, DemoConfig::default()).await;
    let base = server.url();

    let response = post(format!("{base}/accounts/a1/deposit?amount=5")).await;
    let body = answered(response, StatusCode::OK).await;
    assert_eq!(body["account"], "a1");
    assert_eq!(body["balance"], 5);
    assert!(body["fencing_token"].as_u64().unwrap() >= 1);

    // A second deposit while the first holds the lock: 409 with Retry-After and problem+json.
    let slow = tokio::spawn(post(format!(
        "{base}/accounts/a1/deposit?amount=5&hold_ms=800"
    )));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let conflict = post(format!("{base}/accounts/a1/deposit?amount=7")).await;
    assert!(conflict.headers().contains_key("retry-after"));
    let problem = problem(conflict, StatusCode::CONFLICT).await;
    assert_eq!(problem["status"], 409);
    // The lock conflict is the layer's; the stale-token 409 is the handler's.
    assert_eq!(problem["type"], "urn:tower-lock:lock-held");
    let slow = answered(slow.await.unwrap(), StatusCode::OK).await;
    assert_eq!(slow["balance"], 10);

    assert_eq!(
        account(&base, "a1").await,
        serde_json::json!({"account": "a1", "balance": 10})
    );
    assert_eq!(account(&base, "nobody").await["balance"], 0);

    let unlocked = answered(
        post(format!("{base}/unlocked/accounts/a1/deposit?amount=1")).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(unlocked["balance"], 11);

    let bad = post(format!("{base}/accounts/a1/deposit?amount=abc")).await;
    let problem = answered(bad, StatusCode::BAD_REQUEST).await;
    assert_eq!(problem["type"], demo::INVALID_QUERY_TYPE);
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
    assert_eq!(
        account(&base, "burst").await["balance"],
        20,
        "a locked deposit was lost"
    );
}

async fn stale_token_write_is_refused<F: DemoBackend>() {
    let fixture = F::start().await;
    // Leases of 300 ms that are not renewed: a slow deposit outlives its lock.
    let server = start(&fixture, leases(300, false)).await;
    let base = server.url();
    let slow = tokio::spawn(post(format!(
        "{base}/accounts/f1/deposit?amount=100&hold_ms=1000"
    )));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The lease has lapsed: a second deposit gets the lock, a larger token, and writes first.
    let fast = answered(
        post(format!("{base}/accounts/f1/deposit?amount=1")).await,
        StatusCode::OK,
    )
    .await;
    // The first deposit's write carries the older token and is refused.
    let problem = problem(slow.await.unwrap(), StatusCode::CONFLICT).await;
    assert_eq!(problem["type"], demo::STALE_TOKEN_TYPE);
    let balance = account(&base, "f1").await;
    assert_eq!(balance["balance"], fast["balance"]);
    assert_eq!(balance["balance"], 1);
}

/// The lost update of issue 7, item 5, step by step. Leases of 200 ms, not renewed:
/// A takes the lock and reads the balance; its lease lapses; B takes the lock with a newer
/// token and reads the same balance; A writes; B writes. Fencing only the write accepts both
/// (A's token is still the highest the record has seen when A writes) and B's stale sum
/// overwrites A's deposit. With the read fenced too, B's read raises the record's fence above
/// A's token, so A's write is refused.
async fn stale_holder_write_after_newer_read_is_refused<F: DemoBackend>() {
    let fixture = F::start().await;
    let server = start(&fixture, leases(200, false)).await;
    let base = server.url();
    let initial = post(format!("{base}/accounts/l1/deposit?amount=10")).await;
    assert_eq!(initial.status(), StatusCode::OK);

    // A: lock (lease 200 ms), read 10, hold 500 ms, write 10 + 100.
    let started = tokio::time::Instant::now();
    let a = tokio::spawn(post(format!(
        "{base}/accounts/l1/deposit?amount=100&hold_ms=500"
    )));
    // B: as soon as A's lease has lapsed (about 200 ms in), lock with a newer token and read,
    // well before A writes (about 500 ms in); hold 400 ms, write what it read + 1.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut refused = 0;
    let b = loop {
        let response = post(format!("{base}/accounts/l1/deposit?amount=1&hold_ms=400")).await;
        if response.status() != StatusCode::CONFLICT {
            break response;
        }
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["type"], "urn:tower-lock:lock-held", "{problem}");
        refused += 1;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "A's 200 ms lease never lapsed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // B's first attempts met A's lock: A took it first, and B got in once A's lease lapsed.
    assert!(
        refused > 0,
        "A had not taken the lock 150 ms after it was sent; the interleaving was not reproduced"
    );
    let a = a.await.unwrap();
    let (a_status, a_type) = (a.status(), a.headers().get("content-type").cloned());
    let a: Value = a.json().await.unwrap();
    let b = answered(b, StatusCode::OK).await;
    assert_eq!(b["balance"], 11, "B read the balance before A wrote");

    let balance = account(&base, "l1").await;
    // No deposit answered 200 is lost: the balance is the initial one plus every accepted amount.
    let accepted = 10 + if a_status == StatusCode::OK { 100 } else { 0 } + 1;
    assert_eq!(
        balance["balance"], accepted,
        "lost update: A answered {a_status} {a}, B {b}, balance {balance}"
    );
    // A's write carried the older token after B's read: refused with the stale-token problem.
    assert_eq!(a_status, StatusCode::CONFLICT, "{a}");
    assert_eq!(a_type.unwrap(), "application/problem+json");
    assert_eq!(a["type"], demo::STALE_TOKEN_TYPE);
    assert_eq!(balance["balance"], 11);
}

/// The store's fenced read raises the fence: afterwards a read or write with an older token is
/// refused, an equal or newer one goes through. Exact for tokens beyond 2^53 (Lua's doubles).
async fn fenced_read_raises_the_fence<F: DemoBackend>() {
    use demo::{FencedRead, FencedWrite};

    let fixture = F::start().await;
    let server = start(&fixture, DemoConfig::default()).await;
    let store = &server.store;
    let read = async |account, token| store.read_fenced(account, token).await.unwrap();
    let write =
        async |account, balance, token| store.write_fenced(account, balance, token).await.unwrap();
    assert_eq!(read("r1", 5).await, FencedRead::Current { balance: 0 });
    assert_eq!(read("r1", 4).await, FencedRead::Stale { fence: 5 });
    assert_eq!(write("r1", 7, 4).await, FencedWrite::Stale { fence: 5 });
    assert_eq!(read("r1", 5).await, FencedRead::Current { balance: 0 });
    assert_eq!(write("r1", 7, 5).await, FencedWrite::Accepted);
    assert_eq!(read("r1", 6).await, FencedRead::Current { balance: 7 });
    assert_eq!(write("r1", 8, 5).await, FencedWrite::Stale { fence: 6 });
    assert_eq!(store.balance("r1").await.unwrap(), 7);

    let big = u64::MAX - 1;
    assert_eq!(read("r2", big).await, FencedRead::Current { balance: 0 });
    assert_eq!(read("r2", big - 1).await, FencedRead::Stale { fence: big });
    assert_eq!(
        read("r2", u64::MAX).await,
        FencedRead::Current { balance: 0 }
    );
    assert_eq!(
        store.record("r2").await.unwrap(),
        demo::Record {
            balance: 0,
            fence: u64::MAX
        }
    );
}

/// In one namespace, an order's Idempotency-Key and an account id with the same text name two
/// different locks: the deposit locks `account:{id}`, and request material cannot forge that
/// prefix (a `:` in a header value is escaped).
async fn order_idempotency_key_does_not_block_the_account_with_that_id<F: DemoBackend>() {
    let fixture = F::start().await;
    let server = start(&fixture, DemoConfig::default()).await;
    let base = server.url();
    let client = reqwest::Client::new();
    let order = |key: &'static str| {
        client
            .post(format!("{base}/orders?hold_ms=800"))
            .header("idempotency-key", key)
            .send()
    };

    for key in ["42", "account:42"] {
        // An order in flight with that key; the account's deposit is not blocked by it.
        let in_flight = tokio::spawn(order(key));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let deposit = post(format!("{base}/accounts/42/deposit?amount=1")).await;
        assert_eq!(
            deposit.status(),
            StatusCode::OK,
            "POST /orders with Idempotency-Key {key:?} blocked POST /accounts/42/deposit"
        );
        assert_eq!(in_flight.await.unwrap().unwrap().status(), StatusCode::OK);
    }

    // And the other way round: a deposit in flight does not block an order keyed `42`.
    let in_flight = tokio::spawn(post(format!(
        "{base}/accounts/42/deposit?amount=1&hold_ms=800"
    )));
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Some(keys) = fixture.held_lock_keys().await {
        assert_eq!(keys, ["tower-lock:{account:42}"]);
    }
    let retry = client
        .post(format!("{base}/orders"))
        .header("idempotency-key", "42")
        .send()
        .await
        .unwrap();
    assert_eq!(
        retry.status(),
        StatusCode::OK,
        "POST /accounts/42/deposit blocked POST /orders with Idempotency-Key 42"
    );
    let deposit = answered(in_flight.await.unwrap(), StatusCode::OK).await;
    assert_eq!(deposit["balance"], 3);
}

/// The stream shares the account's lock (`account:{id}`): a deposit to the account waits for
/// the stream's body, and the stream's key is the deposit's.
async fn stream_and_deposit_share_the_account_lock<F: DemoBackend>() {
    let fixture = F::start().await;
    let server = start(&fixture, DemoConfig::default()).await;
    let base = server.url();
    let body = stream(&base, "7").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Some(keys) = fixture.held_lock_keys().await {
        assert_eq!(keys, ["tower-lock:{account:7}"]);
    }
    let during = post(format!("{base}/accounts/7/deposit?amount=1")).await;
    let problem = answered(during, StatusCode::CONFLICT).await;
    assert_eq!(problem["type"], "urn:tower-lock:lock-held");
    body.await.unwrap().unwrap();
}

async fn stream_holds_the_lock_until_the_body_is_sent<F: DemoBackend>() {
    let fixture = F::start().await;
    let server = start(&fixture, DemoConfig::default()).await;
    let base = server.url();
    let body = stream(&base, "s1").await;
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
    problem(missing, StatusCode::BAD_REQUEST).await;

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
    let problem = problem(retry, StatusCode::CONFLICT).await;
    assert_eq!(
        problem["title"],
        "A request is outstanding for this Idempotency-Key"
    );
    let first = first.await.unwrap().unwrap();
    let body = answered(first, StatusCode::OK).await;
    assert_eq!(body, serde_json::json!({"order": "order-1"}));
}

async fn long_hold_outlives_lock_ttl_safely<F: DemoBackend>() {
    let fixture = F::start().await;
    // LOCK_TTL_MS=300 with the default renewal: a 1.2 s deposit keeps its lock all along.
    let server = start(&fixture, leases(300, true)).await;
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
    let slow = answered(slow.await.unwrap(), StatusCode::OK).await;
    assert_eq!(slow["balance"], 10);
}

// The demo server's contract on one Redis and in process; on Cluster and Redlock it is checked
// by `every_backend` below.
suite!(
    redis_and_memory:
    deposit_contract,
    concurrent_burst_keeps_every_locked_deposit,
    stale_token_write_is_refused,
    stale_holder_write_after_newer_read_is_refused,
    fenced_read_raises_the_fence,
    order_idempotency_key_does_not_block_the_account_with_that_id,
    stream_and_deposit_share_the_account_lock,
    stream_holds_the_lock_until_the_body_is_sent,
    orders_follow_the_idempotency_key_preset,
    long_hold_outlives_lock_ttl_safely,
    queued_deposits_on_one_server,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_answers_503_with_retry_after() {
    let mut fixture = Redis::start().await;
    let server = start(&fixture, DemoConfig::default()).await;
    let base = server.url();
    assert_eq!(
        post(format!("{base}/accounts/x/deposit")).await.status(),
        StatusCode::OK
    );
    fixture.server.stop();
    let response = post(format!("{base}/accounts/x/deposit")).await;
    assert_eq!(response.headers()["retry-after"], "1");
    let problem = problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(problem["status"], 503);
    // The lock is taken before the balance store is touched: the layer answers.
    assert_eq!(problem["type"], "urn:tower-lock:backend-unavailable");
}

/// Issue 10: on every backend, 30 concurrent deposits on one account give one 200 and 29 409s;
/// 30 deposits on 30 accounts all give 200; and no lock key is left afterwards.
async fn thirty_deposits_on_one_account_admit_one_and_on_thirty_admit_all<F: DemoBackend>() {
    let fixture = F::start().await;
    let server = start(&fixture, DemoConfig::default()).await;
    let base = server.url();
    let client = reqwest::Client::new();
    let deposit = |account: String, hold_ms: u64| {
        let client = client.clone();
        let url = format!("{base}/accounts/{account}/deposit?amount=1&hold_ms={hold_ms}");
        tokio::spawn(async move { client.post(&url).send().await.unwrap().status() })
    };
    let same: Vec<_> = (0..30)
        .map(|_| deposit("shared".to_owned(), 1500))
        .collect();
    let mut statuses = Vec::new();
    for task in same {
        statuses.push(task.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let conflict = statuses
        .iter()
        .filter(|s| **s == StatusCode::CONFLICT)
        .count();
    assert_eq!((ok, conflict), (1, 29), "{statuses:?}");

    let distinct: Vec<_> = (0..30).map(|i| deposit(format!("a{i}"), 20)).collect();
    for task in distinct {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    // Redlock answers a release once a majority released; the other nodes follow at once.
    let none_left = async || {
        fixture
            .held_lock_keys()
            .await
            .is_none_or(|keys| keys.is_empty())
    };
    assert!(
        common::eventually(Duration::from_secs(2), none_left).await,
        "lock keys left: {:?}",
        fixture.held_lock_keys().await
    );
}

mod every_backend {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis() {
        thirty_deposits_on_one_account_admit_one_and_on_thirty_admit_all::<Redis>().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory() {
        thirty_deposits_on_one_account_admit_one_and_on_thirty_admit_all::<Memory>().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster() {
        thirty_deposits_on_one_account_admit_one_and_on_thirty_admit_all::<Cluster>().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redlock() {
        thirty_deposits_on_one_account_admit_one_and_on_thirty_admit_all::<Redlock>().await;
    }

    #[cfg(feature = "sentinel")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sentinel() {
        thirty_deposits_on_one_account_admit_one_and_on_thirty_admit_all::<
            common::sentinel::Sentinel,
        >()
        .await;
    }
}

/// The first log line names the Sentinel backend, its primary's name and its sentinels (with any
/// password masked).
#[test]
fn the_first_line_names_the_sentinel_backend() {
    let config = DemoConfig {
        sentinels: vec![
            "redis://127.0.0.1:26379/".to_owned(),
            "redis://:secret@127.0.0.1:26380/".to_owned(),
        ],
        sentinel_master: Some("mymaster".to_owned()),
        ..DemoConfig::default()
    };
    let line = config.describe_backend();
    assert!(
        line.starts_with(
            "backend=redis-sentinel master=mymaster sentinels=redis://127.0.0.1:26379/,"
        ),
        "{line}"
    );
    assert!(!line.contains("secret"), "{line}");
}

// ---------------------------------------------------------------------------------------------
// Issue 9: `POST /queued/accounts/{id}/deposit` waits for the account's lock (up to 10 s).

/// 60 concurrent deposits of 1 to one account through `/queued/…`, split between `servers`
/// (each with its own backend: its own connections, local queues and subscriber, as two
/// processes would have): all answered 200, each saw a different balance (one at a time), and
/// the final balance is exact.
async fn queued_deposits_are_all_served_one_at_a_time(bases: &[String]) {
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let client = client.clone();
            let url = format!(
                "{}/queued/accounts/q1/deposit?amount=1&hold_ms=10",
                bases[i % bases.len()]
            );
            tokio::spawn(async move { client.post(&url).send().await.unwrap() })
        })
        .collect();
    let mut balances = Vec::new();
    for task in tasks {
        let response = task.await.unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        balances.push(body["balance"].as_i64().unwrap());
    }
    balances.sort_unstable();
    assert_eq!(
        balances,
        (1..=60).collect::<Vec<_>>(),
        "two deposits saw the same balance"
    );
    assert_eq!(account(&bases[0], "q1").await["balance"], 60);
}

async fn queued_deposits_on_one_server<F: DemoBackend>() {
    let fixture = F::start().await;
    let server = start(&fixture, DemoConfig::default()).await;
    queued_deposits_are_all_served_one_at_a_time(&[server.url()]).await;
    if let Some(keys) = fixture.held_lock_keys().await {
        assert!(keys.is_empty(), "{keys:?}");
    }
}

/// Two demo servers on one Redis: waiters queue locally in each, and the release of either
/// wakes the other's head through Redis pub/sub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_deposits_from_two_servers_on_one_redis_are_all_served_one_at_a_time() {
    let fixture = Redis::start().await;
    let first = start(&fixture, DemoConfig::default()).await;
    let second = start(&fixture, DemoConfig::default()).await;
    queued_deposits_are_all_served_one_at_a_time(&[first.url(), second.url()]).await;
    assert!(fixture.held_lock_keys().await.unwrap().is_empty());
}

/// The same on Redis Cluster, whose waiters poll (no sharded subscriber yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_deposits_from_two_servers_on_one_cluster_are_all_served_one_at_a_time() {
    let fixture = Cluster::start().await;
    let first = start(&fixture, DemoConfig::default()).await;
    let second = start(&fixture, DemoConfig::default()).await;
    queued_deposits_are_all_served_one_at_a_time(&[first.url(), second.url()]).await;
}

/// Issue 12: the demo starts while Redis refuses it (it connects lazily), answers 503 saying the
/// store refused the connection, and 200 once Redis accepts it, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_while_redis_refuses_it_and_answers_200_once_redis_is_up() {
    let mut redis = common::RedisServer::start();
    redis.stop();
    let config = DemoConfig {
        redis_url: Some(redis.url()),
        ..DemoConfig::default()
    };
    let server = spawn(config).await.expect("the demo starts without Redis");
    let deposit = format!("{}/accounts/lazy/deposit?amount=1", server.url());
    let response = post(deposit.clone()).await;
    let problem = problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(problem["type"], "urn:tower-lock:backend-unavailable");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("refused"), "{detail}");

    redis.restart();
    let admitted = async || post(deposit.clone()).await.status() == StatusCode::OK;
    assert!(
        common::eventually(Duration::from_secs(10), admitted).await,
        "still refused 10 s after Redis came up"
    );
    assert_eq!(account(&server.url(), "lazy").await["balance"], 1);
}

#[test]
fn the_demo_listens_on_loopback_unless_told_otherwise() {
    use std::net::SocketAddr;
    let addr = |host, port| demo::listen_addr(host, port);
    assert_eq!(
        addr(None, None),
        Ok("127.0.0.1:3000".parse::<SocketAddr>().unwrap())
    );
    assert_eq!(
        addr(Some("0.0.0.0"), Some("8080")),
        Ok("0.0.0.0:8080".parse().unwrap())
    );
    assert_eq!(addr(Some("::1"), Some("1")), Ok("[::1]:1".parse().unwrap()));
    assert_eq!(addr(Some(""), None), Ok("127.0.0.1:3000".parse().unwrap()));
    assert!(
        addr(Some("example.com"), None)
            .unwrap_err()
            .contains("HOST")
    );
    assert!(addr(None, Some("http")).unwrap_err().contains("PORT"));
}

/// `REDIS_URL=rediss://…` with `REDIS_TLS_CA=path.pem`: the demo's locks and balances over TLS,
/// trusting the test's own CA.
#[cfg(feature = "tls-rustls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_over_tls_to_redis_trusting_the_ca_in_redis_tls_ca() {
    let redis = common::tls::TlsRedis::start(&[]);
    let config = DemoConfig {
        redis_url: Some(redis.url(None)),
        redis_tls_ca: Some(redis.pki.ca_file()),
        ..DemoConfig::default()
    };
    let server = spawn(config).await.expect("demo server");
    let deposit = format!("{}/accounts/tls/deposit?amount=3", server.url());
    answered(post(deposit).await, StatusCode::OK).await;
    assert_eq!(account(&server.url(), "tls").await["balance"], 3);

    let missing = DemoConfig {
        redis_url: Some(redis.url(None)),
        redis_tls_ca: Some("/nonexistent/ca.pem".into()),
        ..DemoConfig::default()
    };
    let error = spawn(missing)
        .await
        .err()
        .expect("a CA file that cannot be read");
    assert!(error.to_string().contains("REDIS_TLS_CA"), "{error}");
}

/// Issue 12 item 6 on the multi-node backends: `REDIS_CLUSTER_NODES=rediss://…` (locks and
/// balances in a TLS cluster), `REDLOCK_NODES=rediss://…` and (feature `sentinel`)
/// `REDIS_SENTINELS=rediss://…` with `REDIS_TLS_CA`: a same-key pair is a 200 and a 409, and
/// the deposit lands.
#[cfg(feature = "tls-rustls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_a_tls_cluster_redlock_and_sentinel_trusting_redis_tls_ca() {
    let cluster = common::tls::TlsCluster::start();
    let nodes = common::tls::TlsNodes::start(3);
    #[allow(unused_mut)]
    let mut configs = vec![
        DemoConfig {
            cluster_nodes: cluster.urls(None),
            redis_tls_ca: Some(cluster.pki.ca_file()),
            ..DemoConfig::default()
        },
        DemoConfig {
            redlock_nodes: nodes.urls(None),
            redis_tls_ca: Some(nodes.pki.ca_file()),
            ..DemoConfig::default()
        },
    ];
    // `REDIS_SENTINELS=rediss://…`: a TLS sentinel naming a TLS primary.
    #[cfg(feature = "sentinel")]
    let sentinel = common::tls::TlsSentinel::start();
    #[cfg(feature = "sentinel")]
    configs.push(DemoConfig {
        sentinels: vec![sentinel.url()],
        sentinel_master: Some(common::sentinel::MASTER.to_owned()),
        redis_tls_ca: Some(sentinel.primary.pki.ca_file()),
        ..DemoConfig::default()
    });
    for config in configs {
        let line = config.describe_backend();
        let server = spawn(config).await.expect("demo server over TLS");
        let base = server.url();
        let held = tokio::spawn(post(format!(
            "{base}/accounts/tls/deposit?amount=5&hold_ms=3000"
        )));
        // The second of the pair arrives while the first holds the lock (3 s).
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let second = post(format!("{base}/accounts/tls/deposit?amount=1")).await;
        let problem = problem(second, StatusCode::CONFLICT).await;
        assert_eq!(problem["type"], "urn:tower-lock:lock-held", "{line}");
        answered(held.await.unwrap(), StatusCode::OK).await;
        assert_eq!(account(&base, "tls").await["balance"], 5, "{line}");
    }
    // Without REDIS_TLS_CA the nodes' certificates are checked against the platform's roots,
    // which did not sign them: the demo does not start on a cluster it cannot trust.
    let untrusted = DemoConfig {
        cluster_nodes: cluster.urls(None),
        ..DemoConfig::default()
    };
    assert!(spawn(untrusted).await.is_err());
}
