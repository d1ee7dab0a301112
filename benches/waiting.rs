//! Waiting for a held lock (issue 9): `scripts/bench waiting`.
//!
//! - **Handoff latency**: from the holder's release call to the next waiter holding the lock,
//!   median and p99, with the waiter in the same backend ("one process") and in another backend
//!   on its own runtime and thread, with its own connections and subscriber ("two processes").
//! - **Redis commands per handoff** with 1, 10 and 100 waiters on one key, counted at the server
//!   by `MONITOR` (client commands only: what scripts run inside is not counted), subscriber
//!   commands (`SUBSCRIBE`/`UNSUBSCRIBE`) included.
//! - **Queue throughput**: 100 concurrent requests on one key through a layer with `wait`, 1 ms
//!   handler; total time against the ideal 100 ms.
//!
//! Environment: `BENCH_HANDOFFS` (handoffs per latency measure, default 200).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;
#[path = "concurrency/probe.rs"]
#[allow(dead_code)]
mod probe;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_lock::key::{Header, LockKey};
use tower_lock::{LockBackend, LockLayer, Locks, MemoryBackend, RedisBackend};

use common::RedisServer;

const NS: &str = "bench-wait:";

fn handoffs() -> usize {
    std::env::var("BENCH_HANDOFFS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200)
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    println!(
        "{label:<48} median {:>8.1} us   p99 {:>8.1} us   ({} handoffs)",
        percentile(&samples, 0.5).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        samples.len()
    );
}

/// Handoffs from a holder on `holder` to a waiter on `waiter` (each on its own runtime): the
/// time from the release call to the waiter holding the lock.
fn handoff_latency<B: LockBackend>(
    holder: (&Runtime, Locks<B>),
    waiter: (&Runtime, Locks<B>),
    n: usize,
) -> Vec<Duration> {
    let key = LockKey::new("handoff");
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let lock = holder.0.block_on(holder.1.try_lock(&key)).unwrap();
        let (locks, key2) = (waiter.1.clone(), key.clone());
        let waiting = waiter.0.spawn(async move {
            let lock = locks.lock(&key2, Duration::from_secs(10)).await.unwrap();
            let at = Instant::now();
            lock.release().await.unwrap();
            at
        });
        // Let the waiter try, fail and listen.
        std::thread::sleep(Duration::from_millis(15));
        let released = Instant::now();
        holder.0.block_on(lock.release()).unwrap();
        let acquired = waiter.0.block_on(waiting).unwrap();
        samples.push(acquired.saturating_duration_since(released));
    }
    samples
}

fn latency(server: &RedisServer) {
    println!("\n## Handoff latency (release call -> next waiter holds the lock)\n");
    let n = handoffs();
    let (a, b) = (runtime(), runtime());
    let memory = MemoryBackend::new();
    let one = Locks::new(memory)
        .namespace(NS)
        .ttl(Duration::from_secs(30));
    report(
        "memory, one process",
        handoff_latency((&a, one.clone()), (&b, one), n),
    );
    let backend = a.block_on(RedisBackend::connect(&server.url())).unwrap();
    let one = Locks::new(backend)
        .namespace(NS)
        .ttl(Duration::from_secs(30));
    report(
        "redis, waiter in the same process",
        handoff_latency((&a, one.clone()), (&b, one), n),
    );
    let other = b.block_on(RedisBackend::connect(&server.url())).unwrap();
    let two = Locks::new(other).namespace(NS).ttl(Duration::from_secs(30));
    let first = Locks::new(a.block_on(RedisBackend::connect(&server.url())).unwrap())
        .namespace(NS)
        .ttl(Duration::from_secs(30));
    report(
        "redis, waiter in another process (own backend)",
        handoff_latency((&a, first), (&b, two), n),
    );
}

/// Client commands per handoff with `waiters` waiters on one key, counted by `MONITOR`.
fn commands_per_handoff(server: &RedisServer, runtime: &Runtime, waiters: usize) {
    let backend = runtime
        .block_on(RedisBackend::connect(&server.url()))
        .unwrap();
    let locks = Locks::new(backend)
        .namespace(NS)
        .ttl(Duration::from_secs(30));
    let key = LockKey::new(format!("commands-{waiters}"));
    let mut control = runtime.block_on(server.connection());
    let monitor = probe::Monitor::attach(server.port());
    let first = runtime.block_on(locks.try_lock(&key)).unwrap();
    let tasks: Vec<_> = (0..waiters)
        .map(|_| {
            let (locks, key) = (locks.clone(), key.clone());
            runtime.spawn(async move {
                let lock = locks.lock(&key, Duration::from_secs(60)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
                lock.release().await.unwrap();
            })
        })
        .collect();
    // Every waiter queued (the head has tried and listens).
    std::thread::sleep(Duration::from_millis(100));
    runtime.block_on(first.release()).unwrap();
    for task in tasks {
        runtime.block_on(task).unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    let split = monitor.finish(runtime, &mut control);
    let total: u64 = split.client.values().sum();
    // The handoffs: `waiters` (each waiter is handed the lock once).
    let commands: Vec<String> = split
        .client
        .iter()
        .map(|(command, n)| format!("{command} {n}"))
        .collect();
    println!(
        "{waiters:>3} waiters: {:>5.2} client commands per handoff ({total} in all: {})",
        total as f64 / waiters as f64,
        commands.join(", ")
    );
}

fn commands(server: &RedisServer) {
    println!("\n## Redis commands per handoff (MONITOR, client commands, one process)\n");
    let runtime = runtime();
    for waiters in [1, 10, 100] {
        commands_per_handoff(server, &runtime, waiters);
    }
}

/// 100 concurrent requests on one key through a layer waiting up to 30 s, 1 ms handler.
fn throughput_on<B: LockBackend>(label: &str, backend: B, runtime: &Runtime) {
    let service = ServiceBuilder::new()
        .layer(
            LockLayer::new(backend, Header::new("x-key"))
                .namespace(NS)
                .wait(Duration::from_secs(30)),
        )
        .service(tower::service_fn(|_request: http::Request<()>| async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
        }));
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let ok = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        runtime.block_on(async {
            let tasks: Vec<_> = (0..100)
                .map(|_| {
                    let mut service = service.clone();
                    let ok = ok.clone();
                    tokio::spawn(async move {
                        let request = http::Request::post("/")
                            .header("x-key", "hot")
                            .body(())
                            .unwrap();
                        let response = service.ready().await.unwrap().call(request).await.unwrap();
                        if response.status() == http::StatusCode::OK {
                            ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
        });
        assert_eq!(ok.load(std::sync::atomic::Ordering::Relaxed), 100);
        rounds.push(started.elapsed());
    }
    rounds.sort_unstable();
    let median = rounds[1];
    println!(
        "{label:<10} 100 requests in {:>7.1} ms (median of 3; ideal 100 ms: {:.2}x; per request {:.2} ms)",
        median.as_secs_f64() * 1e3,
        median.as_secs_f64() / 0.1,
        median.as_secs_f64() * 10.0,
    );
}

fn throughput(server: &RedisServer) {
    println!("\n## Queue throughput (100 concurrent requests, one key, 1 ms handler)\n");
    let runtime = runtime();
    throughput_on("memory", MemoryBackend::new(), &runtime);
    let backend = runtime
        .block_on(RedisBackend::connect(&server.url()))
        .unwrap();
    throughput_on("redis", backend, &runtime);
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        return;
    }
    let server = RedisServer::start();
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average {}", load.trim());
    }
    latency(&server);
    commands(&server);
    throughput(&server);
}
