//! Contention demo: 50 concurrent read–sleep–write deposits at one account, through the locked
//! route and through the unlocked one.
//!
//! ```text
//! cargo run --example contention                                    # in-process locks
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example contention  # locks and balances in Redis
//! ```
//!
//! The locked route answers 409 while another deposit holds the account; each client then waits
//! 10–30 ms and retries (at most 200 times), so every deposit lands once and none is lost. The
//! unlocked route accepts all of them at once, and concurrent writes overwrite each other.

#[path = "support/demo.rs"]
mod demo;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::StatusCode;

const CLIENTS: usize = 50;
const AMOUNT: i64 = 1;
const HOLD_MS: u64 = 20;
const MAX_RETRIES: u32 = 200;

#[derive(Default)]
struct Tally {
    requests: u64,
    ok: u64,
    conflicts: u64,
    other: u64,
    gave_up: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.ok += other.ok;
        self.conflicts += other.conflicts;
        self.other += other.other;
        self.gave_up += other.gave_up;
    }
}

/// One client's deposit: retried after a short pause on 409 when `retry` is set.
async fn deposit(client: reqwest::Client, url: String, retry: bool) -> Tally {
    let mut tally = Tally::default();
    for _ in 0..=MAX_RETRIES {
        tally.requests += 1;
        match client.post(&url).send().await {
            Ok(response) if response.status() == StatusCode::OK => {
                tally.ok += 1;
                return tally;
            }
            Ok(response) if response.status() == StatusCode::CONFLICT => {
                tally.conflicts += 1;
                if !retry {
                    return tally;
                }
                // The 409 carries `Retry-After` (whole seconds, the holder's remaining lease);
                // for a 20 ms critical section a short, jittered pause is the better choice.
                let pause = rand::random_range(10..=30);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            Ok(response) => {
                tally.other += 1;
                eprintln!("unexpected {} from {url}", response.status());
                return tally;
            }
            Err(error) => {
                tally.other += 1;
                eprintln!("request to {url} failed: {error}");
                return tally;
            }
        }
    }
    tally.gave_up += 1;
    tally
}

async fn run(
    client: &reqwest::Client,
    base: &str,
    route: &str,
    account: &str,
    retry: bool,
) -> (Tally, i64, Duration) {
    let started = Instant::now();
    let url = format!("{base}{route}/accounts/{account}/deposit?amount={AMOUNT}&hold_ms={HOLD_MS}");
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(deposit(client.clone(), url.clone(), retry)))
        .collect();
    let mut tally = Tally::default();
    for handle in clients {
        tally.add(&handle.await.expect("client task panicked"));
    }
    let elapsed = started.elapsed();
    let balance: serde_json::Value = client
        .get(format!("{base}/accounts/{account}"))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .expect("GET balance")
        .json()
        .await
        .expect("balance JSON");
    let balance = balance["balance"].as_i64().expect("balance is a number");
    (tally, balance, elapsed)
}

#[tokio::main]
async fn main() {
    let config = demo::DemoConfig {
        redis_url: std::env::var("REDIS_URL")
            .ok()
            .filter(|url| !url.is_empty()),
        ..demo::DemoConfig::default()
    };
    println!("tower-lock contention demo: {}", config.describe_backend());
    let server = match demo::spawn(config).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("cannot start the demo app: {error}");
            std::process::exit(1);
        }
    };
    let base = server.url();
    println!(
        "demo app on {base}; {CLIENTS} concurrent deposits of {AMOUNT} (hold_ms={HOLD_MS}) per route\n"
    );

    // Fresh accounts per run, so a shared Redis starts them at 0.
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
        .to_string();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .expect("HTTP client");

    let expected = CLIENTS as i64 * AMOUNT;
    let locked = run(&client, &base, "", &format!("locked-{run_id}"), true).await;
    let unlocked = run(
        &client,
        &base,
        "/unlocked",
        &format!("unlocked-{run_id}"),
        false,
    )
    .await;

    println!(
        "{:<38} | {:>8} | {:>4} | {:>19} | {:>13} | {:>8} | {:>12} | {:>7}",
        "route",
        "requests",
        "200s",
        "409s (retries seen)",
        "final balance",
        "expected",
        "lost updates",
        "time"
    );
    println!("{}", "-".repeat(38 + 8 + 4 + 19 + 13 + 8 + 12 + 7 + 7 * 3));
    let rows = [
        ("POST /accounts/{id}/deposit", &locked),
        ("POST /unlocked/accounts/{id}/deposit", &unlocked),
    ];
    for (route, (tally, balance, elapsed)) in rows {
        println!(
            "{:<38} | {:>8} | {:>4} | {:>19} | {:>13} | {:>8} | {:>12} | {:>5}ms",
            route,
            tally.requests,
            tally.ok,
            tally.conflicts,
            balance,
            expected,
            expected - balance,
            elapsed.as_millis()
        );
    }
    let (locked_tally, locked_balance, _) = &locked;
    let (_, unlocked_balance, _) = &unlocked;
    println!();
    let locked_lost = expected - locked_balance;
    if locked_lost == 0 && locked_tally.gave_up + locked_tally.other == 0 {
        println!("locked: all {expected} deposits landed, none lost (409s were retried).");
    } else {
        println!(
            "locked: {locked_lost} deposit(s) missing; {} client(s) gave up after {MAX_RETRIES} \
             retries, {} failed otherwise",
            locked_tally.gave_up, locked_tally.other
        );
    }
    println!(
        "unlocked: {} of {expected} deposits were overwritten by concurrent read-sleep-write \
         handlers.",
        expected - unlocked_balance
    );
    if locked_lost != 0 {
        std::process::exit(1);
    }
}
