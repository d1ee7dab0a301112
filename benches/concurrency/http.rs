//! HTTP end to end: an axum server in this process with a locked route and an identical unlocked
//! one, under `wrk`.
//!
//! Routes (all `POST`; the handler answers `ok`): `/unlocked/{key}`, `/locked/{key}` (the layer on
//! Redis, fencing on, keyed by the path segment) and `/locked-memory/{key}` (the layer on the
//! in-memory backend). A handler that does nothing is the worst case for the ratio; a handler
//! usually talks to a store, so a second pair, `/unlocked-read/{key}` and `/locked-read/{key}`,
//! has a handler that first `GET`s a key from the same Redis (one round trip on its own
//! connection). A small Lua script makes wrk send each request to its own key
//! (`{thread}-{counter mod 4096}`), so requests do not contend: any non-2xx answer is counted and
//! reported.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use http::StatusCode;
use tokio::runtime::Runtime;
use tower_lock::key::PathSegment;
use tower_lock::{LockLayer, MemoryBackend, RedisBackend};

use crate::common::RedisServer;
use crate::redis_path::manager;
use crate::{Config, median, probe};

/// Gives each wrk thread its own key prefix and each request its own key within a window of 4096.
const WRK_SCRIPT: &str = r#"
local threads = 0
function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end
function init(args)
  prefix = wrk.path .. id .. "-"
  counter = 0
end
function request()
  counter = (counter + 1) % 4096
  return wrk.format("POST", prefix .. counter)
end
"#;

/// (route, label, index of the unlocked twin in this table).
pub const ROUTES: [(&str, &str, usize); 5] = [
    ("unlocked", "empty handler, unlocked", 0),
    ("locked", "empty handler, LockLayer + RedisBackend", 0),
    (
        "locked-memory",
        "empty handler, LockLayer + MemoryBackend",
        0,
    ),
    ("unlocked-read", "handler with one Redis GET, unlocked", 3),
    (
        "locked-read",
        "handler with one Redis GET, LockLayer + RedisBackend",
        3,
    ),
];

#[derive(Clone, Debug, serde::Serialize)]
pub struct WrkRun {
    pub round: usize,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RouteResult {
    pub route: &'static str,
    pub label: &'static str,
    pub runs: Vec<WrkRun>,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
    /// Its unlocked twin.
    pub baseline: &'static str,
    /// Median over rounds of this route's throughput over its unlocked twin's in that round.
    pub vs_unlocked: Option<f64>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct HttpResult {
    pub load_generator: String,
    pub command: String,
    pub seconds: u64,
    pub rounds: usize,
    pub routes: Vec<RouteResult>,
    pub noise: probe::NoiseReading,
}

async fn ok() -> &'static str {
    "ok"
}

/// `wrk` from `BENCH_WRK` or `PATH`, if it runs.
pub fn find_wrk() -> Option<String> {
    let wrk = std::env::var("BENCH_WRK").unwrap_or_else(|_| "wrk".into());
    let out = Command::new(&wrk).arg("-v").output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    text.contains("wrk").then_some(wrk)
}

pub fn wrk_version(wrk: &str) -> String {
    Command::new(wrk)
        .arg("-v")
        .output()
        .ok()
        .map(|out| {
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

/// `1.23ms`, `456.00us`, `1.01s` → ms.
fn duration_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60e3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e3)
    } else {
        return None;
    };
    number.trim().parse::<f64>().ok().map(|n| n * scale)
}

fn parse_wrk(round: usize, output: &str) -> Option<WrkRun> {
    let mut run = WrkRun {
        round,
        per_second: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        requests: 0,
        non_2xx: 0,
        socket_errors: 0,
    };
    for line in output.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            run.per_second = rest.trim().parse().ok()?;
        } else if let Some(rest) = line.strip_prefix("50%") {
            run.p50_ms = duration_ms(rest)?;
        } else if let Some(rest) = line.strip_prefix("99%") {
            run.p99_ms = duration_ms(rest)?;
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            run.non_2xx = rest.trim().parse().ok()?;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            run.socket_errors = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        } else if line.contains(" requests in ") {
            run.requests = line.split_whitespace().next()?.parse().ok()?;
        }
    }
    run.per_second.is_finite().then_some(run)
}

fn wrk_args(config: &Config, seconds: u64, script: &Path, url: &str) -> Vec<String> {
    vec![
        format!("-t{}", config.http_threads),
        format!("-c{}", config.http_connections),
        format!("-d{seconds}s"),
        "--latency".into(),
        "-s".into(),
        script.display().to_string(),
        url.into(),
    ]
}

pub fn run(config: &Config, runtime: &Runtime, wrk: &str) -> HttpResult {
    let redis = RedisServer::start();
    let noise = probe::Noise::start(vec![redis.pid()]);
    let backend = runtime
        .block_on(RedisBackend::connect(&redis.url()))
        .expect("connect to the bench redis-server");
    let memory = MemoryBackend::new();
    let store = runtime.block_on(manager(&redis.url()));
    let read = move || {
        let mut store = store.clone();
        async move {
            let value: Result<Option<String>, _> = redis::cmd("GET")
                .arg("bench:store")
                .query_async(&mut store)
                .await;
            match value {
                Ok(_) => (StatusCode::OK, "ok"),
                Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store failed"),
            }
        }
    };
    let app = Router::new()
        .route("/unlocked/{key}", post(ok))
        .route(
            "/locked/{key}",
            post(ok).route_layer(LockLayer::new(backend.clone(), PathSegment::new(1))),
        )
        .route(
            "/locked-memory/{key}",
            post(ok).route_layer(LockLayer::new(memory.clone(), PathSegment::new(1))),
        )
        .route("/unlocked-read/{key}", post(read.clone()))
        .route(
            "/locked-read/{key}",
            post(read).route_layer(LockLayer::new(backend, PathSegment::new(1))),
        );
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the bench server");
    let port = listener.local_addr().expect("local address").port();
    let server = runtime.spawn(async move { axum::serve(listener, app).await });

    std::fs::create_dir_all(&config.out).expect("create the output directory");
    let script = config.out.join("wrk-distinct-keys.lua");
    std::fs::write(&script, WRK_SCRIPT).expect("write the wrk script");
    let url = |route: &str| format!("http://127.0.0.1:{port}/{route}/");
    let wrk_run = |seconds: u64, route: &str, round: usize| -> WrkRun {
        let out = Command::new(wrk)
            .args(wrk_args(config, seconds, &script, &url(route)))
            .output()
            .expect("run wrk");
        let text = String::from_utf8_lossy(&out.stdout);
        parse_wrk(round, &text).unwrap_or_else(|| {
            panic!(
                "could not read wrk's output:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    println!(
        "http: {} routes × {} rounds × {} s of wrk -t{} -c{}",
        ROUTES.len(),
        config.http_rounds,
        config.http_secs,
        config.http_threads,
        config.http_connections
    );

    for (route, _, _) in ROUTES {
        wrk_run(1, route, 0);
    }
    let mut runs: Vec<Vec<WrkRun>> = vec![Vec::new(); ROUTES.len()];
    for round in 0..config.http_rounds {
        for i in 0..ROUTES.len() {
            let r = (round + i) % ROUTES.len();
            runs[r].push(wrk_run(config.http_secs, ROUTES[r].0, round));
            // Let the sockets of the last run close before the next.
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    server.abort();
    assert_eq!(memory.held(), 0, "every in-process lock was released");

    let routes = ROUTES
        .iter()
        .zip(&runs)
        .map(|(&(route, label, twin), own)| {
            let unlocked = &runs[twin];
            let runs = own.clone();
            let field = |f: fn(&WrkRun) -> f64| {
                median(&runs.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
            };
            let ratios: Vec<f64> = runs
                .iter()
                .filter_map(|run| {
                    let base = unlocked.iter().find(|u| u.round == run.round)?;
                    Some(run.per_second / base.per_second)
                })
                .collect();
            RouteResult {
                route,
                label,
                baseline: ROUTES[twin].0,
                per_second: field(|r| r.per_second),
                p50_ms: field(|r| r.p50_ms),
                p99_ms: field(|r| r.p99_ms),
                non_2xx: runs.iter().map(|r| r.non_2xx).sum(),
                socket_errors: runs.iter().map(|r| r.socket_errors).sum(),
                vs_unlocked: median(&ratios),
                runs,
            }
        })
        .collect();
    let mut args = wrk_args(
        config,
        config.http_secs,
        Path::new("wrk-distinct-keys.lua"),
        "",
    );
    args.pop();
    HttpResult {
        load_generator: wrk_version(wrk),
        command: format!("wrk {} http://127.0.0.1:PORT/ROUTE/", args.join(" ")),
        seconds: config.http_secs,
        rounds: config.http_rounds,
        routes,
        noise: noise.finish(),
    }
}
