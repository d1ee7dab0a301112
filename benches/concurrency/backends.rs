//! The `backends` section (opt-in: `scripts/bench backends`, or `cargo bench --bench concurrency
//! -- backends`): every multi-node backend of issue 10 next to one Redis, in the same run.
//! Acquire (with fencing) + release pairs per second on distinct keys at each concurrency level,
//! and the p50/p99 of the acquires, through `LockBackend` directly (the engine's cost; the layer
//! adds the same on every backend). Contenders: one Redis, Redis Cluster (3 primaries), Redlock
//! over 3 and 5 nodes, Redlock over 5 with one node paused (SIGSTOP), and, with the `sentinel`
//! feature, a Sentinel-managed primary (with and without `wait_for_replicas(1, 100 ms)`).
//!
//! `BENCH_BACKEND_OPS` (default 5000) pairs per contender per level per round; `BENCH_ROUNDS`
//! interleaved rounds; `BENCH_CONCURRENCY` levels. Every server is started here on free loopback
//! ports.

use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tower_lock::LockBackend;
use tower_lock::backend::{Acquire, AcquireOptions, LockToken};

use crate::common::cluster::RedisCluster;
use crate::common::redlock::Redlock;
use crate::common::{RedisServer, lock_name};
use crate::{Config, median, percentile};

/// One contender's figures at one concurrency level (medians over rounds; latencies over every
/// acquire of every round).
#[derive(Debug, serde::Serialize)]
pub struct BackendCell {
    pub backend: String,
    pub concurrency: usize,
    pub pairs_per_sec: f64,
    pub acquire_p50_us: f64,
    pub acquire_p99_us: f64,
    pub failures: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct BackendsResult {
    pub ops: u64,
    pub rounds: usize,
    pub cells: Vec<BackendCell>,
}

/// One round at one level: pairs per second, acquire latencies (µs), failed pairs.
type Measure = Box<dyn Fn(&Runtime, usize, u64, usize) -> (f64, Vec<f64>, u64)>;

fn measure_on<B: LockBackend + Clone>(backend: B) -> Measure {
    Box::new(move |runtime, concurrency, ops, round| {
        let backend = backend.clone();
        runtime.block_on(async move {
            let started = Instant::now();
            let tasks: Vec<_> = (0..concurrency)
                .map(|task| {
                    let backend = backend.clone();
                    let share = ops / concurrency as u64
                        + u64::from((task as u64) < ops % concurrency as u64);
                    tokio::spawn(async move {
                        let name = lock_name(&format!("backends:r{round}:c{concurrency}:t{task}"));
                        let mut latencies = Vec::with_capacity(share as usize);
                        let mut failures = 0;
                        for _ in 0..share {
                            let token = LockToken::random();
                            let before = Instant::now();
                            let acquired = backend
                                .acquire(&name, token, AcquireOptions::new(Duration::from_secs(10)))
                                .await;
                            latencies.push(before.elapsed().as_secs_f64() * 1e6);
                            match acquired {
                                Ok(Acquire::Acquired { .. }) => {
                                    if backend.release(&name, token).await.is_err() {
                                        failures += 1;
                                    }
                                }
                                _ => failures += 1,
                            }
                        }
                        (latencies, failures)
                    })
                })
                .collect();
            let mut latencies = Vec::new();
            let mut failures = 0;
            for task in tasks {
                let (mut some, failed) = task.await.expect("bench task");
                latencies.append(&mut some);
                failures += failed;
            }
            let seconds = started.elapsed().as_secs_f64();
            (ops as f64 / seconds, latencies, failures)
        })
    })
}

/// One contender's samples at one level: throughput per round, acquire latencies (µs), failures.
type Samples = (Vec<f64>, Vec<f64>, u64);

/// What keeps a contender's servers up while it is measured.
type Keep = Box<dyn std::any::Any>;

fn contenders(runtime: &Runtime) -> Vec<(String, Measure, Keep)> {
    let mut contenders: Vec<(String, Measure, Keep)> = Vec::new();

    let single = RedisServer::start();
    let backend = runtime
        .block_on(tower_lock::RedisBackend::connect(&single.url()))
        .expect("one Redis");
    contenders.push(("one Redis".into(), measure_on(backend), Box::new(single)));

    let cluster = RedisCluster::start(3, 0, 5000);
    let backend = runtime.block_on(cluster.backend());
    contenders.push((
        "Cluster, 3 primaries".into(),
        measure_on(backend),
        Box::new(cluster),
    ));

    for nodes in [3, 5] {
        let redlock = runtime.block_on(Redlock::with_nodes(nodes));
        let backend = redlock.backend.clone();
        contenders.push((
            format!("Redlock, {nodes} nodes"),
            measure_on(backend),
            Box::new(redlock),
        ));
    }
    let redlock = runtime.block_on(Redlock::with_nodes(5));
    redlock.servers[4].pause();
    let backend = redlock.backend.clone();
    contenders.push((
        "Redlock, 5 nodes, 1 paused".into(),
        measure_on(backend),
        Box::new(PausedRedlock(redlock)),
    ));

    #[cfg(feature = "sentinel")]
    {
        let group = std::sync::Arc::new(crate::common::sentinel::SentinelGroup::start());
        let backend = runtime.block_on(group.backend());
        contenders.push((
            "Sentinel".into(),
            measure_on(backend.clone()),
            Box::new(group.clone()),
        ));
        let checked = tower_lock::RedisSentinelBackend::from_sentinels(
            group.sentinel_urls(),
            crate::common::sentinel::MASTER,
        )
        .expect("sentinel backend")
        .wait_for_replicas(1, Duration::from_millis(100));
        contenders.push((
            "Sentinel + WAIT 1".into(),
            measure_on(checked),
            Box::new(group),
        ));
    }
    contenders
}

/// A Redlock fixture with a paused node, resumed before its servers are stopped.
struct PausedRedlock(Redlock);

impl Drop for PausedRedlock {
    fn drop(&mut self) {
        self.0.servers[4].resume();
    }
}

pub fn run(config: &Config, runtime: &Runtime) -> BackendsResult {
    let ops: u64 = if config.smoke {
        100
    } else {
        crate::env("BENCH_BACKEND_OPS", 5_000)
    };
    let contenders = contenders(runtime);
    // samples[contender][level]
    let mut samples: Vec<Vec<Samples>> = contenders
        .iter()
        .map(|_| {
            config
                .concurrency
                .iter()
                .map(|_| (Vec::new(), Vec::new(), 0))
                .collect()
        })
        .collect();
    for round in 0..config.rounds {
        for (level, &concurrency) in config.concurrency.iter().enumerate() {
            // Interleaved: every contender once per level per round.
            for (c, (name, measure, _)) in contenders.iter().enumerate() {
                let (rate, mut latencies, failures) = measure(runtime, concurrency, ops, round);
                println!(
                    "backends: round {round} concurrency {concurrency:>3} {name:<28} {rate:>9.0} pairs/s"
                );
                let cell = &mut samples[c][level];
                cell.0.push(rate);
                cell.1.append(&mut latencies);
                cell.2 += failures;
            }
        }
    }
    let mut cells = Vec::new();
    for ((name, _, _), per_level) in contenders.iter().zip(samples) {
        for (&concurrency, (rates, latencies, failures)) in config.concurrency.iter().zip(per_level)
        {
            cells.push(BackendCell {
                backend: name.clone(),
                concurrency,
                pairs_per_sec: median(&rates).unwrap_or(0.0),
                acquire_p50_us: percentile(&latencies, 0.5).unwrap_or(0.0),
                acquire_p99_us: percentile(&latencies, 0.99).unwrap_or(0.0),
                failures,
            });
        }
    }
    drop(contenders);
    BackendsResult {
        ops,
        rounds: config.rounds,
        cells,
    }
}

/// The section's markdown table.
pub fn markdown(result: &BackendsResult) -> String {
    let mut out = format!(
        "### Backends (acquire with fencing + release, {} pairs per cell per round, median of {} \
         rounds)\n\n| backend | concurrency | pairs/s | acquire p50 µs | acquire p99 µs | failed |\n\
         |---|---:|---:|---:|---:|---:|\n",
        result.ops, result.rounds
    );
    for cell in &result.cells {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {} |\n",
            cell.backend,
            cell.concurrency,
            cell.pairs_per_sec,
            cell.acquire_p50_us,
            cell.acquire_p99_us,
            cell.failures
        ));
    }
    out
}
