//! Contention: N concurrent requests (default 1 000) on one key that another request holds,
//! through the layer on Redis (fencing on); the latency of their 409s. A hand-rolled
//! `SET NX PX` on a held key, N at once, is the reference: the same one round trip per refusal.
//!
//! Each round: a holder request enters the handler and waits there; the N requests are spawned
//! behind a barrier, each timed from the barrier to its response; then the holder is let go.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode};
use redis::aio::MultiplexedConnection;
use tokio::runtime::Runtime;
use tokio::sync::{Barrier, mpsc, watch};
use tokio::task::JoinHandle;
use tower::{ServiceBuilder, ServiceExt};
use tower_lock::key::Header;
use tower_lock::{LockBody, LockLayer, RedisBackend};

use crate::common::RedisServer;
use crate::probe::{self, CommandSplit, Monitor};
use crate::redis_path::{TTL, TaskKey, manager, request, token};
use crate::{Config, median, percentile};

#[derive(Clone, Debug, serde::Serialize)]
pub struct ContentionRound {
    pub requests: usize,
    pub conflicts: usize,
    /// Latency of the 409s (of the refused `SET`s for the reference), µs.
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// From the barrier to the last response, ms.
    pub wall_ms: f64,
    /// `INFO commandstats` calls per refusal (scripts' inner commands included).
    pub server_calls: f64,
    pub redis_cpu_us: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ContentionSeries {
    pub label: &'static str,
    pub rounds: Vec<ContentionRound>,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub conflicts_min: usize,
    pub server_calls: f64,
    pub redis_cpu_us: f64,
    /// Per refusal, from `MONITOR` (one untimed round).
    pub client_commands: BTreeMap<String, f64>,
    pub script_commands: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ContentionResult {
    pub requests: usize,
    pub layer: ContentionSeries,
    pub raw: ContentionSeries,
    pub noise: probe::NoiseReading,
}

type Handle = JoinHandle<(Duration, bool)>;

/// What a burst saw: the refusals' latencies and their count.
struct Burst {
    latencies: Vec<f64>,
    wall: Duration,
}

async fn collect(tasks: Vec<Handle>, start: Instant) -> Burst {
    let mut latencies = Vec::new();
    for task in tasks {
        let (latency, refused) = task.await.expect("contention task");
        if refused {
            latencies.push(latency.as_nanos() as f64 / 1e3);
        }
    }
    Burst {
        latencies,
        wall: start.elapsed(),
    }
}

/// One round through the layer, with a `MONITOR` attached to `monitor` if given.
fn layer_round(
    runtime: &Runtime,
    backend: &RedisBackend,
    control: &mut MultiplexedConnection,
    requests: usize,
    monitor: Option<u16>,
) -> (ContentionRound, Option<CommandSplit>) {
    let (gate, gate_rx) = watch::channel(false);
    let (entered_tx, mut entered) = mpsc::unbounded_channel::<()>();
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(backend.clone(), Header::new("x-key")))
        .service_fn(move |request: Request<()>| {
            let hold = request.headers().contains_key("x-hold");
            let mut gate = gate_rx.clone();
            let entered = entered_tx.clone();
            async move {
                if hold {
                    let _ = entered.send(());
                    let _ = gate.wait_for(|open| *open).await;
                }
                Ok::<_, Infallible>(Response::new(String::new()))
            }
        });
    let key = TaskKey::new("hot");
    let holder: JoinHandle<Result<Response<LockBody<String>>, Infallible>> = {
        let mut hold = request(&key);
        hold.headers_mut()
            .insert("x-hold", HeaderValue::from_static("1"));
        runtime.spawn(service.clone().oneshot(hold))
    };
    runtime
        .block_on(entered.recv())
        .expect("the holder entered its handler");

    let before = runtime.block_on(probe::redis_stats(control));
    let monitor = monitor.map(Monitor::attach);
    let burst = runtime.block_on(async {
        let barrier = Arc::new(Barrier::new(requests + 1));
        let tasks: Vec<Handle> = (0..requests)
            .map(|_| {
                let call = service.clone().oneshot(request(&key));
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    let start = Instant::now();
                    let response = call.await;
                    let refused = matches!(response, Ok(r) if r.status() == StatusCode::CONFLICT);
                    (start.elapsed(), refused)
                })
            })
            .collect();
        barrier.wait().await;
        collect(tasks, Instant::now()).await
    });
    let split = monitor.map(|m| m.finish(runtime, control));
    let after = runtime.block_on(probe::redis_stats(control));

    gate.send(true).expect("the holder waits");
    let held = runtime.block_on(holder).expect("holder task");
    assert!(
        matches!(held, Ok(ref r) if r.status() == StatusCode::OK),
        "the holder got its lock"
    );
    (round(requests, &burst, &before, &after), split)
}

/// One round of the reference: `SET NX PX` on a key that is already set.
fn raw_round(
    runtime: &Runtime,
    connection: &redis::aio::ConnectionManager,
    control: &mut MultiplexedConnection,
    requests: usize,
    monitor: Option<u16>,
) -> (ContentionRound, Option<CommandSplit>) {
    let key = TaskKey::new("hot").redis;
    let ttl = TTL.as_millis() as u64;
    runtime.block_on(async {
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg("holder")
            .arg("PX")
            .arg(ttl)
            .query_async(control)
            .await
            .expect("SET the holder");
    });
    let before = runtime.block_on(probe::redis_stats(control));
    let monitor = monitor.map(Monitor::attach);
    let burst = runtime.block_on(async {
        let barrier = Arc::new(Barrier::new(requests + 1));
        let tasks: Vec<Handle> = (0..requests)
            .map(|_| {
                let barrier = barrier.clone();
                let mut connection = connection.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    let start = Instant::now();
                    let set: Result<Option<String>, _> = redis::cmd("SET")
                        .arg(&key)
                        .arg(token())
                        .arg("NX")
                        .arg("PX")
                        .arg(ttl)
                        .query_async(&mut connection)
                        .await;
                    (start.elapsed(), matches!(set, Ok(None)))
                })
            })
            .collect();
        barrier.wait().await;
        collect(tasks, Instant::now()).await
    });
    let split = monitor.map(|m| m.finish(runtime, control));
    let after = runtime.block_on(probe::redis_stats(control));
    runtime.block_on(async {
        let _: i64 = redis::cmd("DEL")
            .arg(&key)
            .query_async(control)
            .await
            .expect("DEL the holder");
    });
    (round(requests, &burst, &before, &after), split)
}

fn round(
    requests: usize,
    burst: &Burst,
    before: &probe::RedisStats,
    after: &probe::RedisStats,
) -> ContentionRound {
    let refused = burst.latencies.len().max(1) as f64;
    ContentionRound {
        requests,
        conflicts: burst.latencies.len(),
        p50_us: percentile(&burst.latencies, 0.5).unwrap_or(f64::NAN),
        p99_us: percentile(&burst.latencies, 0.99).unwrap_or(f64::NAN),
        max_us: percentile(&burst.latencies, 1.0).unwrap_or(f64::NAN),
        wall_ms: burst.wall.as_secs_f64() * 1e3,
        server_calls: before.calls_since(after).values().sum::<u64>() as f64 / refused,
        redis_cpu_us: (after.cpu_seconds - before.cpu_seconds) * 1e6 / refused,
    }
}

fn series(
    label: &'static str,
    rounds: Vec<ContentionRound>,
    split: Option<CommandSplit>,
) -> ContentionSeries {
    let field = |f: fn(&ContentionRound) -> f64| {
        median(&rounds.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
    };
    let refused = rounds.first().map_or(1, |r| r.requests.max(1)) as f64;
    let per = |counts: BTreeMap<String, u64>| {
        counts
            .into_iter()
            .filter(|(name, _)| name != "echo")
            .map(|(name, n)| (name, n as f64 / refused))
            .collect()
    };
    let split = split.unwrap_or_default();
    ContentionSeries {
        label,
        p50_us: field(|r| r.p50_us),
        p99_us: field(|r| r.p99_us),
        max_us: field(|r| r.max_us),
        conflicts_min: rounds.iter().map(|r| r.conflicts).min().unwrap_or(0),
        server_calls: field(|r| r.server_calls),
        redis_cpu_us: field(|r| r.redis_cpu_us),
        client_commands: per(split.client),
        script_commands: per(split.script),
        rounds,
    }
}

pub fn run(config: &Config, runtime: &Runtime) -> ContentionResult {
    let server = RedisServer::start();
    let noise = probe::Noise::start(vec![server.pid()]);
    let url = server.url();
    let mut control = runtime.block_on(server.connection());
    let backend = runtime
        .block_on(RedisBackend::connect(&url))
        .expect("connect to the bench redis-server");
    let connection = runtime.block_on(manager(&url));
    let requests = config.contention;
    println!(
        "contention: {requests} concurrent requests on one held key × {} rounds",
        config.rounds
    );

    // Warm-up (script cache, renewal task), then the timed rounds, then one untimed round each
    // with MONITOR attached.
    layer_round(runtime, &backend, &mut control, requests.min(100), None);
    raw_round(runtime, &connection, &mut control, requests.min(100), None);
    let mut layer = Vec::new();
    let mut raw = Vec::new();
    for _ in 0..config.rounds {
        layer.push(layer_round(runtime, &backend, &mut control, requests, None).0);
        raw.push(raw_round(runtime, &connection, &mut control, requests, None).0);
    }
    let port = Some(server.port());
    let (_, layer_split) = layer_round(runtime, &backend, &mut control, requests, port);
    let (_, raw_split) = raw_round(runtime, &connection, &mut control, requests, port);

    ContentionResult {
        requests,
        layer: series(
            "LockLayer + RedisBackend (fencing on): 409s",
            layer,
            layer_split,
        ),
        raw: series("raw SET NX PX on a held key: refusals", raw, raw_split),
        noise: noise.finish(),
    }
}
