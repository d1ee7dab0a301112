//! What one locked request costs, next to what a hand-rolled Redis lock and two bare round trips
//! cost on the same `redis-server`.
//!
//! | bench | what one iteration does |
//! |---|---|
//! | `baseline/redis_ping_x2` | two `PING`s on one connection: the floor for two round trips |
//! | `raw_redis/set_nx_px+del` | `SET key token NX PX 10000`, then a compare-and-delete script |
//! | `layer/redis` | one request through `LockLayer<RedisBackend>` (acquire + release) |
//! | `layer/redis_no_fencing` | the same with `.fencing(false)` (no `INCR` of the fence counter) |
//! | `rslock/lock+unlock` | the `rslock` crate's `lock` then `unlock` on the same server |
//! | `layer/memory` | one request through `LockLayer<MemoryBackend>` |
//! | `baseline/no_layer` | the same `service_fn`, without the layer |
//!
//! Every Redis bench has its own multiplexed connection to one `redis-server` that this bench
//! starts on a free loopback port (never the machine's 6379) and kills at the end. Each iteration
//! runs inside a task on a multi-thread runtime (2 workers), as a request does in a server.
//!
//! Criterion measures each bench in turn. Loopback round trips on a small shared VM are
//! bimodal, depending on whether the threads involved were awake (tens of µs apart per round
//! trip), and drift from one second to the next, so after criterion the same operations are also
//! measured *interleaved*: many rounds, each timing a short burst of every bench back to back
//! (rotating which goes first). The table at the end gives criterion's medians, the interleaved
//! bursts' p50, mean and p10..p90, and ratios of the interleaved means. The interleaved pass also
//! measures a diagnostic, `raw_redis/+task_wake`: the hand-rolled lock plus one message to
//! another task that waits for it, as the layer sends one per request to its renewal task.
//! `LOCK_BENCH_ROUNDS=N` sets the number of rounds (default 150, 0 skips the pass),
//! `LOCK_BENCH_WORKERS=N` the number of tokio workers.
//!
//! Run with `cargo bench --bench lock` (or `scripts/bench`); criterion's arguments pass through,
//! e.g. `cargo bench --bench lock -- layer/`.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/raw_pair.rs"]
mod raw_pair;

use std::convert::Infallible;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Bencher, Criterion};
use http::{Request, Response, StatusCode};
use redis::Script;
use redis::aio::ConnectionManager;
use tokio::runtime::Runtime;
use tower::{ServiceBuilder, ServiceExt};
use tower_lock::backend::LockToken;
use tower_lock::key::Header;
use tower_lock::{LockLayer, MemoryBackend, RedisBackend};

const KEY: &str = "bench";

const PING: &str = "baseline/redis_ping_x2";
const RAW: &str = "raw_redis/set_nx_px+del";
const LAYER_REDIS: &str = "layer/redis";
const LAYER_REDIS_NO_FENCING: &str = "layer/redis_no_fencing";
const RSLOCK: &str = "rslock/lock+unlock";
const RAW_WAKE: &str = "raw_redis/+task_wake";
const LAYER_MEMORY: &str = "layer/memory";
const NO_LAYER: &str = "baseline/no_layer";

fn request() -> Request<()> {
    Request::post("/orders")
        .header("x-key", KEY)
        .body(())
        .expect("valid request")
}

async fn handler(_request: Request<()>) -> Result<Response<String>, Infallible> {
    Ok(Response::new(String::new()))
}

/// A connection manager with the same settings as `RedisBackend`'s.
async fn manager(url: &str) -> ConnectionManager {
    redis::Client::open(url)
        .expect("redis url")
        .get_connection_manager_with_config(RedisBackend::config())
        .await
        .expect("connect to the bench redis-server")
}

/// Runs `op` `iters` times in a row inside one task spawned on the runtime (so that, as in a
/// server, the request runs on a worker thread, not on the thread blocked in `block_on`), and
/// returns the time the loop took.
fn burst<F, Fut>(runtime: &Runtime, op: &F, iters: u64) -> Duration
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future + Send + 'static,
{
    let op = op.clone();
    runtime.block_on(async move {
        tokio::spawn(async move {
            let start = Instant::now();
            for _ in 0..iters {
                black_box(op().await);
            }
            start.elapsed()
        })
        .await
        .expect("bench task")
    })
}

fn on_worker<F, Fut>(b: &mut Bencher<'_>, runtime: &Runtime, op: &F)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future + Send + 'static,
{
    b.iter_custom(|iters| burst(runtime, op, iters));
}

/// One bench of the interleaved pass: its name, its burst length, and a way to run a burst.
struct Interleaved<'a> {
    id: &'static str,
    iters: u64,
    run: Box<dyn Fn(u64) -> Duration + 'a>,
    /// Mean time per iteration of each round's burst, in ns.
    per_round: Vec<f64>,
}

impl<'a> Interleaved<'a> {
    fn new<F, Fut>(id: &'static str, iters: u64, runtime: &'a Runtime, op: &'a F) -> Self
    where
        F: Fn() -> Fut + Clone + Send + 'static,
        Fut: Future + Send + 'static,
    {
        Self {
            id,
            iters,
            run: Box::new(move |iters| burst(runtime, op, iters)),
            per_round: Vec::new(),
        }
    }
}

fn main() {
    let started = SystemTime::now();
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; without it (`cargo test --benches`) criterion runs each
    // bench once as a test, and the interleaved pass and the table are skipped.
    let benching = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--list");
    let rounds: usize = std::env::var("LOCK_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(150);

    let server = common::RedisServer::start();
    let url = server.url();
    let workers: usize = std::env::var("LOCK_BENCH_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("tokio runtime");

    // The floor: two round trips on one multiplexed connection.
    let ping = {
        let connection = runtime.block_on(manager(&url));
        move || {
            let mut connection = connection.clone();
            async move {
                let first: String = redis::cmd("PING")
                    .query_async(&mut connection)
                    .await
                    .expect("PING");
                let second: String = redis::cmd("PING")
                    .query_async(&mut connection)
                    .await
                    .expect("PING");
                (first, second)
            }
        }
    };

    // A hand-rolled lock: SET NX PX, then compare-and-delete (EVALSHA).
    let raw = {
        let connection = runtime.block_on(manager(&url));
        let release = Script::new(raw_pair::COMPARE_AND_DELETE);
        move || {
            let mut connection = connection.clone();
            let release = release.clone();
            async move {
                let token = LockToken::random().to_hex();
                let pair = raw_pair::lock_unlock(
                    &mut connection,
                    &release,
                    "raw-lock:{bench}",
                    &token,
                    10_000,
                );
                let locked_and_released = pair.await.expect("SET NX PX, then compare-and-delete");
                assert!(locked_and_released, "the raw lock was held, or not deleted");
            }
        }
    };

    // Diagnostic, interleaved pass only: the hand-rolled lock plus what the layer does once per
    // request to register the lease with its renewal task, one message on an unbounded channel to
    // a task waiting on it (here a task that only drains the channel).
    let raw_wake = {
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<u64>();
        runtime.spawn(async move {
            let mut total = 0_u64;
            while let Some(n) = receiver.recv().await {
                total = total.wrapping_add(n);
            }
            black_box(total)
        });
        let raw = raw.clone();
        move || {
            let acquire_release = raw();
            let sender = sender.clone();
            async move {
                sender.send(1).expect("the draining task runs");
                acquire_release.await
            }
        }
    };

    // The layer on Redis: acquire (one EVALSHA: SET NX PX, INCR of the fencing counter unless
    // fencing is off) and release (one EVALSHA: compare-and-delete), each awaited.
    let layer_redis = |fencing: bool| {
        let backend = runtime
            .block_on(RedisBackend::connect(&url))
            .expect("connect to the bench redis-server");
        let service = ServiceBuilder::new()
            .layer(LockLayer::new(backend, Header::new("x-key")).fencing(fencing))
            .service_fn(handler);
        move || {
            let service = service.clone();
            async move {
                let response = service.oneshot(request()).await.expect("infallible");
                assert_eq!(response.status(), StatusCode::OK);
                response
            }
        }
    };
    let layer_fenced = layer_redis(true);
    let layer_unfenced = layer_redis(false);

    // The peer crate: rslock's lock + unlock (SET NX PX, then an EVALSHA compare-and-delete).
    let rslock = {
        let manager = rslock::LockManager::new(vec![url.clone()]);
        move || {
            let manager = manager.clone();
            async move {
                let lock = manager
                    .lock("rslock:{bench}", Duration::from_secs(10))
                    .await
                    .expect("rslock lock");
                manager.unlock(&lock).await;
                lock.validity_time
            }
        }
    };

    // The pure in-process overhead: the layer on the in-memory backend, and no layer at all.
    let memory_backend = MemoryBackend::new();
    let layer_memory = {
        let service = ServiceBuilder::new()
            .layer(LockLayer::new(memory_backend.clone(), Header::new("x-key")))
            .service_fn(handler);
        move || {
            let service = service.clone();
            async move {
                let response = service.oneshot(request()).await.expect("infallible");
                assert_eq!(response.status(), StatusCode::OK);
                response
            }
        }
    };
    let no_layer = {
        let service = ServiceBuilder::new().service_fn(handler);
        move || service.oneshot(request())
    };

    let mut criterion = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(3))
        .nresamples(20_000)
        .configure_from_args();
    criterion.bench_function(PING, |b| on_worker(b, &runtime, &ping));
    criterion.bench_function(RAW, |b| on_worker(b, &runtime, &raw));
    criterion.bench_function(LAYER_REDIS, |b| on_worker(b, &runtime, &layer_fenced));
    criterion.bench_function(LAYER_REDIS_NO_FENCING, |b| {
        on_worker(b, &runtime, &layer_unfenced);
    });
    criterion.bench_function(RSLOCK, |b| on_worker(b, &runtime, &rslock));
    criterion.bench_function(LAYER_MEMORY, |b| on_worker(b, &runtime, &layer_memory));
    criterion.bench_function(NO_LAYER, |b| on_worker(b, &runtime, &no_layer));
    criterion.final_summary();
    assert_eq!(memory_backend.held(), 0, "every lock was released");

    if benching {
        let mut redis = vec![
            Interleaved::new(PING, 40, &runtime, &ping),
            Interleaved::new(RAW, 40, &runtime, &raw),
            Interleaved::new(LAYER_REDIS, 40, &runtime, &layer_fenced),
            Interleaved::new(LAYER_REDIS_NO_FENCING, 40, &runtime, &layer_unfenced),
            Interleaved::new(RSLOCK, 40, &runtime, &rslock),
            Interleaved::new(RAW_WAKE, 40, &runtime, &raw_wake),
        ];
        let mut local = vec![
            Interleaved::new(LAYER_MEMORY, 2_000, &runtime, &layer_memory),
            Interleaved::new(NO_LAYER, 20_000, &runtime, &no_layer),
        ];
        if rounds > 0 {
            println!("interleaved pass: {rounds} rounds, {workers} tokio worker(s)");
            interleave(&mut redis, rounds);
            interleave(&mut local, rounds);
        }
        redis.append(&mut local);
        summary(started, &redis);
    }
    drop(runtime);
    drop(server);
}

/// Runs `rounds` rounds of one burst per bench, rotating which goes first.
fn interleave(benches: &mut [Interleaved<'_>], rounds: usize) {
    for bench in benches.iter() {
        (bench.run)(bench.iters / 4); // warm-up
    }
    for round in 0..rounds {
        let count = benches.len();
        for i in 0..count {
            let bench = &mut benches[(round + i) % count];
            let took = (bench.run)(bench.iters);
            bench
                .per_round
                .push(took.as_nanos() as f64 / bench.iters as f64);
        }
    }
}

/// The `q` quantile (nearest rank) of `values`.
fn percentile(values: &[f64], q: f64) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let rank = ((sorted.len() - 1) as f64 * q).round() as usize;
    Some(sorted[rank])
}

/// Where criterion writes its results (the same search it does itself, minus `cargo metadata`).
fn criterion_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("criterion")
}

/// The median (ns) criterion estimated for `id`, if criterion measured it in this run.
fn criterion_median_ns(id: &str, since: SystemTime) -> Option<f64> {
    let path = criterion_home()
        .join(id.replace(['/', '?', '"', '\\', '*', '<', '>', ':', '|', '^'], "_"))
        .join("new")
        .join("estimates.json");
    let fresh = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .is_ok_and(|modified| modified >= since);
    if !fresh {
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let estimates: serde_json::Value = serde_json::from_str(&text).ok()?;
    estimates["median"]["point_estimate"].as_f64()
}

fn show(ns: Option<f64>) -> String {
    match ns {
        Some(ns) if ns.abs() >= 1_000.0 => format!("{:.1} µs", ns / 1_000.0),
        Some(ns) => format!("{ns:.0} ns"),
        None => String::from("-"),
    }
}

fn summary(since: SystemTime, benches: &[Interleaved<'_>]) {
    let find = |id: &str| benches.iter().find(|b| b.id == id);
    let mean = |b: &Interleaved<'_>| {
        (!b.per_round.is_empty())
            .then(|| b.per_round.iter().sum::<f64>() / b.per_round.len() as f64)
    };
    let ratio = |id: &str, base: &str| -> String {
        match (find(id).and_then(mean), find(base).and_then(mean)) {
            (Some(a), Some(b)) => format!("{:.2}x", a / b),
            _ => String::from("-"),
        }
    };

    let mut rows = vec![
        [
            "bench",
            "criterion p50",
            "interleaved p50",
            "mean",
            "p10..p90",
            "÷ ping x2",
            "÷ raw",
            "÷ no_layer",
        ]
        .map(String::from),
    ];
    for bench in benches {
        let local = bench.id == LAYER_MEMORY || bench.id == NO_LAYER;
        let range = match (
            percentile(&bench.per_round, 0.1),
            percentile(&bench.per_round, 0.9),
        ) {
            (Some(low), Some(high)) => format!("{}..{}", show(Some(low)), show(Some(high))),
            _ => String::from("-"),
        };
        let skip = || String::from("-");
        rows.push([
            bench.id.to_string(),
            show(criterion_median_ns(bench.id, since)),
            show(percentile(&bench.per_round, 0.5)),
            show(mean(bench)),
            range,
            if local { skip() } else { ratio(bench.id, PING) },
            if local { skip() } else { ratio(bench.id, RAW) },
            if local {
                ratio(bench.id, NO_LAYER)
            } else {
                skip()
            },
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();

    println!();
    println!("One run. criterion p50: criterion's median estimate (benches measured one after the");
    println!(
        "other). interleaved: the per-request time of each round's burst (p50, mean, p10..p90"
    );
    println!("over rounds); the ratios are of the interleaved means.");
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, &w))| {
                if c == 0 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        println!("{}", cells.join("  "));
    }
    let difference =
        |id: &str, base: &str| -> Option<f64> { Some(mean(find(id)?)? - mean(find(base)?)?) };
    println!();
    println!(
        "layer/redis - raw_redis:          {} per request (interleaved means)",
        show(difference(LAYER_REDIS, RAW))
    );
    println!(
        "layer/redis - redis_ping_x2:      {} per request",
        show(difference(LAYER_REDIS, PING))
    );
    println!(
        "raw_redis/+task_wake - raw_redis: {} per request",
        show(difference(RAW_WAKE, RAW))
    );
    println!(
        "layer/memory - baseline/no_layer: {} per request",
        show(difference(LAYER_MEMORY, NO_LAYER))
    );
}
