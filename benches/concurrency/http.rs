//! HTTP end to end: an axum server in this process with a locked route and an identical unlocked
//! one, under `wrk`; and the example server's own routes, the measurement issue 11 quotes.
//!
//! Routes of the bench's server (all `POST`; the handler answers `ok`): `/unlocked/{key}`,
//! `/locked/{key}` (the layer on Redis, fencing on, keyed by the path segment) and
//! `/locked-memory/{key}` (the layer on the in-memory backend). A handler that does nothing is the
//! worst case for the ratio; a handler usually talks to a store, so a second pair,
//! `/unlocked-read/{key}` and `/locked-read/{key}`, has a handler that first `GET`s a key from the
//! same Redis (one round trip on its own connection).
//!
//! The example server (`examples/server.rs`, built from `examples/support/demo.rs` and served in
//! this process) runs twice: in process (no `REDIS_URL`: `MemoryBackend` and in-process
//! balances) and on Redis (`REDIS_URL`: `RedisBackend`, fencing on, balances in the same Redis).
//! Its `POST /accounts/{id}/deposit?amount=1` (locked, with a fenced read and a fenced write of
//! the balance) is compared with `POST /unlocked/accounts/{id}/deposit?amount=1` (the same
//! handler with a plain read and write, no lock).
//!
//! A small Lua script makes wrk send each request to its own key (`{thread}-{counter mod 4096}`,
//! then the route's suffix), so requests do not contend: any non-2xx answer is counted and
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
use crate::demo::{self, DemoConfig};
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
  suffix = args[1] or ""
  counter = 0
end
function request()
  counter = (counter + 1) % 4096
  return wrk.format("POST", prefix .. counter .. suffix)
end
"#;

/// Which server a route is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Server {
    /// The bench's own router (below).
    Bench,
    /// The example server, in process (no `REDIS_URL`).
    DemoMemory,
    /// The example server on Redis (`REDIS_URL` set).
    DemoRedis,
}

/// One route under wrk.
pub struct Route {
    /// Its name in the results.
    pub route: &'static str,
    pub label: &'static str,
    /// Index of its unlocked twin in [`ROUTES`] (itself for an unlocked route).
    pub twin: usize,
    /// Whether its ratio to its twin is one of issue 11's HTTP targets (≥ 0.85).
    pub target: bool,
    server: Server,
    /// The path before the key; wrk appends `{thread}-{n}` and `suffix`.
    path: &'static str,
    suffix: &'static str,
}

const DEPOSIT: &str = "/deposit?amount=1";

pub const ROUTES: [Route; 9] = [
    Route {
        route: "unlocked",
        label: "empty handler, unlocked",
        twin: 0,
        target: false,
        server: Server::Bench,
        path: "/unlocked/",
        suffix: "",
    },
    Route {
        route: "locked",
        label: "empty handler, LockLayer + RedisBackend",
        twin: 0,
        target: true,
        server: Server::Bench,
        path: "/locked/",
        suffix: "",
    },
    Route {
        route: "locked-memory",
        label: "empty handler, LockLayer + MemoryBackend",
        twin: 0,
        target: false,
        server: Server::Bench,
        path: "/locked-memory/",
        suffix: "",
    },
    Route {
        route: "unlocked-read",
        label: "handler with one Redis GET, unlocked",
        twin: 3,
        target: false,
        server: Server::Bench,
        path: "/unlocked-read/",
        suffix: "",
    },
    Route {
        route: "locked-read",
        label: "handler with one Redis GET, LockLayer + RedisBackend",
        twin: 3,
        target: true,
        server: Server::Bench,
        path: "/locked-read/",
        suffix: "",
    },
    Route {
        route: "demo-memory-unlocked",
        label: "example server in process: POST /unlocked/accounts/{id}/deposit",
        twin: 5,
        target: false,
        server: Server::DemoMemory,
        path: "/unlocked/accounts/",
        suffix: DEPOSIT,
    },
    Route {
        route: "demo-memory-locked",
        label: "example server in process: POST /accounts/{id}/deposit (MemoryBackend)",
        twin: 5,
        target: true,
        server: Server::DemoMemory,
        path: "/accounts/",
        suffix: DEPOSIT,
    },
    Route {
        route: "demo-redis-unlocked",
        label: "example server on Redis: POST /unlocked/accounts/{id}/deposit",
        twin: 7,
        target: false,
        server: Server::DemoRedis,
        path: "/unlocked/accounts/",
        suffix: DEPOSIT,
    },
    Route {
        route: "demo-redis-locked",
        label: "example server on Redis: POST /accounts/{id}/deposit (RedisBackend, fenced store)",
        twin: 7,
        target: true,
        server: Server::DemoRedis,
        path: "/accounts/",
        suffix: DEPOSIT,
    },
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
    /// Whether its ratio is one of issue 11's HTTP targets.
    pub target: bool,
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

fn wrk_args(config: &Config, seconds: u64, script: &Path, url: &str, suffix: &str) -> Vec<String> {
    let mut args = vec![
        format!("-t{}", config.http_threads),
        format!("-c{}", config.http_connections),
        format!("-d{seconds}s"),
        "--latency".into(),
        "-s".into(),
        script.display().to_string(),
        url.into(),
    ];
    if !suffix.is_empty() {
        args.extend(["--".into(), suffix.into()]);
    }
    args
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
    let demo_memory = runtime
        .block_on(demo::spawn(DemoConfig::default()))
        .expect("start the example server in process");
    let demo_redis = runtime
        .block_on(demo::spawn(DemoConfig {
            redis_url: Some(redis.url()),
            ..DemoConfig::default()
        }))
        .expect("start the example server on Redis");
    let port_of = |server: Server| match server {
        Server::Bench => port,
        Server::DemoMemory => demo_memory.addr.port(),
        Server::DemoRedis => demo_redis.addr.port(),
    };

    std::fs::create_dir_all(&config.out).expect("create the output directory");
    let script = config.out.join("wrk-distinct-keys.lua");
    std::fs::write(&script, WRK_SCRIPT).expect("write the wrk script");
    let wrk_run = |seconds: u64, route: &Route, round: usize| -> WrkRun {
        let url = format!("http://127.0.0.1:{}{}", port_of(route.server), route.path);
        let out = Command::new(wrk)
            .args(wrk_args(config, seconds, &script, &url, route.suffix))
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

    for route in &ROUTES {
        wrk_run(1, route, 0);
    }
    let mut runs: Vec<Vec<WrkRun>> = vec![Vec::new(); ROUTES.len()];
    for round in 0..config.http_rounds {
        for i in 0..ROUTES.len() {
            let r = (round + i) % ROUTES.len();
            runs[r].push(wrk_run(config.http_secs, &ROUTES[r], round));
            // Let the sockets of the last run close before the next.
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    server.abort();
    drop((demo_memory, demo_redis));
    assert_eq!(memory.held(), 0, "every in-process lock was released");

    let routes = ROUTES
        .iter()
        .zip(&runs)
        .map(|(route, own)| {
            let unlocked = &runs[route.twin];
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
                route: route.route,
                label: route.label,
                target: route.target,
                baseline: ROUTES[route.twin].route,
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
        "",
    );
    args.pop();
    HttpResult {
        load_generator: wrk_version(wrk),
        command: format!(
            "wrk {} http://127.0.0.1:PORT/PATH/ [-- SUFFIX]",
            args.join(" ")
        ),
        seconds: config.http_secs,
        rounds: config.http_rounds,
        routes,
        noise: noise.finish(),
    }
}
