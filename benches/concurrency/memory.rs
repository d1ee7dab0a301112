//! Memory: RSS of a fresh process (this binary re-executed) after 100 k and 1 M requests through
//! the layer on the in-memory backend, each request on its own key, 64 at a time; and the heap
//! still allocated (allocated minus freed bytes, from the counting allocator) since warm-up.

use std::process::Command;
use std::time::Instant;

use http::{HeaderValue, Method, Request, StatusCode};
use tower::{ServiceBuilder, ServiceExt};
use tower_lock::key::Header;
use tower_lock::{LockLayer, MemoryBackend};

use crate::alloc::Counter;
use crate::redis_path::{X_KEY, handler};
use crate::{Config, probe};

pub const CHILD_FLAG: &str = "--memory-child";
const RESULT_PREFIX: &str = "MEMORY-RESULT ";
const CONCURRENCY: u64 = 64;
const WARM_UP: u64 = 10_000;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MemoryStep {
    pub requests: u64,
    pub rss_kib: u64,
    /// Heap allocated and not freed since the warm-up, bytes.
    pub heap_growth_bytes: i64,
    /// Locks the backend still holds (should be 0).
    pub held: usize,
    pub per_second: f64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MemoryResult {
    pub backend: String,
    pub concurrency: u64,
    pub warm_up: u64,
    pub rss_after_warm_up_kib: u64,
    pub steps: Vec<MemoryStep>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct MemorySection {
    pub result: MemoryResult,
    pub noise: probe::NoiseReading,
}

/// In the parent: runs the child and reads its result.
pub fn run(config: &Config) -> MemorySection {
    let noise = probe::Noise::start(Vec::new());
    let steps: Vec<String> = config.memory_steps.iter().map(u64::to_string).collect();
    println!(
        "memory: a fresh process, RSS after {} requests",
        steps.join(", ")
    );
    let out = Command::new(std::env::current_exe().expect("this bench's path"))
        .arg(CHILD_FLAG)
        .arg(steps.join(","))
        .arg(config.workers.to_string())
        .output()
        .expect("run the memory child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result = stdout
        .lines()
        .find_map(|line| line.strip_prefix(RESULT_PREFIX))
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_else(|| {
            panic!(
                "the memory child failed ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    MemorySection {
        result,
        noise: noise.finish(),
    }
}

/// In the child: `--memory-child STEPS WORKERS`.
pub fn child(args: &[String]) {
    let position = args
        .iter()
        .position(|a| a == CHILD_FLAG)
        .expect("child flag");
    let steps: Vec<u64> = args
        .get(position + 1)
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_default();
    let workers: usize = args
        .get(position + 2)
        .and_then(|w| w.parse().ok())
        .unwrap_or(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let backend = MemoryBackend::new();
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(backend.clone(), Header::new("x-key")))
        .service_fn(handler);

    // `first..last` requests, 64 tasks, each request on its own key.
    let run = |first: u64, last: u64| {
        let service = service.clone();
        runtime.block_on(async move {
            let tasks: Vec<_> = (0..CONCURRENCY)
                .map(|task| {
                    let service = service.clone();
                    tokio::spawn(async move {
                        let mut i = first + task;
                        while i < last {
                            let mut request = Request::new(());
                            *request.method_mut() = Method::POST;
                            let key = HeaderValue::try_from(format!("m{i}")).expect("ASCII");
                            request.headers_mut().insert(X_KEY, key);
                            let response = service.clone().oneshot(request).await;
                            assert!(matches!(response, Ok(r) if r.status() == StatusCode::OK));
                            i += CONCURRENCY;
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("memory task");
            }
        });
    };

    run(0, WARM_UP);
    let rss_after_warm_up_kib = probe::rss_kib();
    let counter = Counter::start();
    let mut done = WARM_UP;
    let mut results = Vec::new();
    for &step in &steps {
        let start = Instant::now();
        let last = WARM_UP + step;
        run(done, last);
        let per_second = (last - done) as f64 / start.elapsed().as_secs_f64();
        done = last;
        results.push(MemoryStep {
            requests: step,
            rss_kib: probe::rss_kib(),
            heap_growth_bytes: counter.read().net_bytes(),
            held: backend.held(),
            per_second,
        });
    }
    drop(counter);
    let result = MemoryResult {
        backend: "MemoryBackend".into(),
        concurrency: CONCURRENCY,
        warm_up: WARM_UP,
        rss_after_warm_up_kib,
        steps: results,
    };
    println!(
        "{RESULT_PREFIX}{}",
        serde_json::to_string(&result).expect("JSON")
    );
}
