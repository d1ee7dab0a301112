//! In process: what the layer costs a request on the in-memory backend, next to the bare
//! `service_fn` and to tower's `ConcurrencyLimit` (another layer that holds something per
//! request), in ns and in allocations per request.
//!
//! Each contender runs its requests one after the other in one task on the multi-thread runtime
//! (as a request runs in a server), each request built the same way (a `POST` with an `x-key`
//! header). Timed rounds are interleaved; allocations are counted in a separate pass.

use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;
use tokio::runtime::Runtime;
use tower::{ServiceBuilder, ServiceExt};
use tower_lock::key::Header;
use tower_lock::{LockLayer, MemoryBackend};

use crate::alloc::Counter;
use crate::redis_path::{TaskKey, handler, request};
use crate::{Config, median, probe};

type Run = Box<dyn Fn(&Runtime, u64) -> (f64, u64)>;

/// Runs `ops` requests in a row in one spawned task; returns (ns per request, failures).
fn runner<F, Fut>(op: F) -> Run
where
    F: Fn(Arc<TaskKey>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let key = Arc::new(TaskKey::new("inproc"));
    Box::new(move |runtime, ops| {
        let op = op.clone();
        let key = key.clone();
        runtime.block_on(async move {
            tokio::spawn(async move {
                let start = Instant::now();
                let mut failures = 0;
                for _ in 0..ops {
                    if !op(key.clone()).await {
                        failures += 1;
                    }
                }
                (start.elapsed().as_nanos() as f64 / ops as f64, failures)
            })
            .await
            .expect("bench task")
        })
    })
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct InprocContender {
    pub id: &'static str,
    pub label: &'static str,
    pub ns_per_request: Vec<f64>,
    pub ns_median: f64,
    pub allocations: f64,
    pub allocated_bytes: f64,
    pub failures: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct InprocResult {
    pub ops: u64,
    pub rounds: usize,
    pub contenders: Vec<InprocContender>,
    pub noise: probe::NoiseReading,
}

pub fn run(config: &Config, runtime: &Runtime) -> InprocResult {
    let noise = probe::Noise::start(Vec::new());
    let backend = MemoryBackend::new();
    let bare = {
        let service = ServiceBuilder::new().service_fn(handler);
        runner(move |key: Arc<TaskKey>| {
            let call = service.oneshot(request(&key));
            async move { matches!(call.await, Ok(response) if response.status() == StatusCode::OK) }
        })
    };
    let layer = {
        let service = ServiceBuilder::new()
            .layer(LockLayer::new(backend.clone(), Header::new("x-key")))
            .service_fn(handler);
        runner(move |key: Arc<TaskKey>| {
            let call = service.clone().oneshot(request(&key));
            async move { matches!(call.await, Ok(response) if response.status() == StatusCode::OK) }
        })
    };
    let limit = {
        let service = ServiceBuilder::new()
            .concurrency_limit(1024)
            .service_fn(handler);
        runner(move |key: Arc<TaskKey>| {
            let call = service.clone().oneshot(request(&key));
            async move { matches!(call.await, Ok(response) if response.status() == StatusCode::OK) }
        })
    };
    let contenders: Vec<(&'static str, &'static str, Run)> = vec![
        ("bare", "bare service_fn", bare),
        ("layer_memory", "LockLayer + MemoryBackend", layer),
        ("concurrency_limit", "tower ConcurrencyLimit", limit),
    ];
    println!(
        "in process: {} contenders × {} rounds × {} requests",
        contenders.len(),
        config.rounds,
        config.inproc_ops
    );

    for (_, _, run) in &contenders {
        run(runtime, config.inproc_ops / 10 + 1);
    }
    let mut timings = vec![Vec::new(); contenders.len()];
    let mut failures = vec![0; contenders.len()];
    for round in 0..config.rounds {
        for i in 0..contenders.len() {
            let c = (round + i) % contenders.len();
            let (ns, failed) = (contenders[c].2)(runtime, config.inproc_ops);
            timings[c].push(ns);
            failures[c] += failed;
        }
    }

    let ops = (config.inproc_ops / 10).max(1_000);
    let results = contenders
        .iter()
        .enumerate()
        .map(|(c, (id, label, run))| {
            let counter = Counter::start();
            let (_, failed) = run(runtime, ops);
            let allocs = counter.read();
            drop(counter);
            InprocContender {
                id,
                label,
                ns_median: median(&timings[c]).unwrap_or(f64::NAN),
                ns_per_request: timings[c].clone(),
                allocations: allocs.allocations as f64 / ops as f64,
                allocated_bytes: allocs.allocated_bytes as f64 / ops as f64,
                failures: failures[c] + failed,
            }
        })
        .collect();
    assert_eq!(backend.held(), 0, "every in-process lock was released");
    InprocResult {
        ops: config.inproc_ops,
        rounds: config.rounds,
        contenders: results,
        noise: noise.finish(),
    }
}
