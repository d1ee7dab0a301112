//! The Redis path: lock + unlock pairs on distinct keys at several concurrencies, for the layer
//! (fencing on and off), the engine, a hand-rolled redis-rs lock, rslock and a naive `SETNX`/`DEL`.
//!
//! Each contender has its own `redis-server` (so `INFO` deltas are its own) and one multiplexed
//! connection to it, as the layer has. At concurrency C, C tasks each run their share of the ops
//! one after the other, each on its own key (`c{C}-t{task}`); a round runs every contender once
//! at every concurrency, in an order that rotates from round to round.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use redis::Script;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use tokio::runtime::Runtime;
use tower::{ServiceBuilder, ServiceExt};
use tower_lock::backend::Release;
use tower_lock::key::{Header, LockKey};
use tower_lock::{LockLayer, Locks, RedisBackend};

use crate::alloc::Counter;
use crate::common::RedisServer;
use crate::probe::{self, CommandSplit, Monitor, RedisStats};
use crate::raw_pair::{COMPARE_AND_DELETE, lock_unlock};
use crate::{Config, median};

pub const X_KEY: HeaderName = HeaderName::from_static("x-key");

/// The lock lease every contender asks for.
pub const TTL: Duration = Duration::from_secs(10);

/// One task's key, in the form each contender takes it.
pub struct TaskKey {
    /// For the layer: the `x-key` header.
    pub header: HeaderValue,
    /// For the engine.
    pub lock: LockKey,
    /// For the hand-rolled locks and rslock: the Redis key itself, hash-tagged as the layer's.
    pub redis: String,
}

impl TaskKey {
    pub fn new(text: &str) -> Self {
        Self {
            header: HeaderValue::from_str(text).expect("ASCII key"),
            lock: LockKey::new(text),
            redis: format!("bench:{{{text}}}"),
        }
    }
}

pub async fn handler(_request: Request<()>) -> Result<Response<String>, Infallible> {
    Ok(Response::new(String::new()))
}

/// A request for the layer, locked on `key`.
pub fn request(key: &TaskKey) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = Method::POST;
    request.headers_mut().insert(X_KEY, key.header.clone());
    request
}

/// A random 128-bit token in hex, as a hand-rolled lock would make one.
pub fn token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A connection manager with the layer's settings.
pub async fn manager(url: &str) -> ConnectionManager {
    redis::Client::open(url)
        .expect("redis url")
        .get_connection_manager_with_config(RedisBackend::config())
        .await
        .expect("connect to the bench redis-server")
}

/// How long a run took and how many of its operations failed (not acquired, not released, an
/// error): any failure makes the run's figures suspect and is reported.
pub struct Outcome {
    pub elapsed: Duration,
    pub failures: u64,
}

type Run = Box<dyn Fn(&Runtime, usize, u64) -> Outcome>;

/// Runs `ops` operations as `concurrency` tasks, each on its own key, and times the lot.
fn runner<F, Fut>(op: F) -> Run
where
    F: Fn(Arc<TaskKey>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    Box::new(move |runtime, concurrency, ops| {
        let keys: Vec<Arc<TaskKey>> = (0..concurrency)
            .map(|task| Arc::new(TaskKey::new(&format!("c{concurrency}-t{task}"))))
            .collect();
        let op = op.clone();
        runtime.block_on(async move {
            let start = Instant::now();
            let tasks: Vec<_> = keys
                .into_iter()
                .enumerate()
                .map(|(task, key)| {
                    let share = ops / concurrency as u64
                        + u64::from((task as u64) < ops % concurrency as u64);
                    let op = op.clone();
                    tokio::spawn(async move {
                        let mut failures = 0;
                        for _ in 0..share {
                            if !op(key.clone()).await {
                                failures += 1;
                            }
                        }
                        failures
                    })
                })
                .collect();
            let mut failures = 0;
            for task in tasks {
                failures += task.await.expect("bench task");
            }
            Outcome {
                elapsed: start.elapsed(),
                failures,
            }
        })
    })
}

pub struct Contender {
    pub id: &'static str,
    pub label: &'static str,
    /// The plot's legend.
    pub short: &'static str,
    server: RedisServer,
    control: MultiplexedConnection,
    run: Run,
}

/// One timed run of one contender at one concurrency.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Sample {
    pub round: usize,
    pub ops: u64,
    pub seconds: f64,
    pub per_second: f64,
    /// Redis `used_cpu_sys + used_cpu_user` per operation, µs.
    pub redis_cpu_us: f64,
    /// This process's CPU per operation (all threads), µs.
    pub client_cpu_us: f64,
    /// `INFO commandstats` calls per operation (scripts' inner commands included).
    pub server_calls: f64,
    pub failures: u64,
}

/// The untimed pass of one contender: where its commands come from and what it allocates.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Calibration {
    pub ops: u64,
    pub concurrency: usize,
    /// Per operation, from `MONITOR`.
    pub client_commands: BTreeMap<String, f64>,
    pub script_commands: BTreeMap<String, f64>,
    /// Per operation, whole process (the task running the loop included).
    pub allocations: f64,
    pub allocated_bytes: f64,
    pub failures: u64,
}

impl Contender {
    fn new(
        (id, label, short): (&'static str, &'static str, &'static str),
        runtime: &Runtime,
        build: impl FnOnce(&str) -> Run,
    ) -> Self {
        let server = RedisServer::start();
        let control = runtime.block_on(server.connection());
        let run = build(&server.url());
        Self {
            id,
            label,
            short,
            server,
            control,
            run,
        }
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    fn stats(&mut self, runtime: &Runtime) -> RedisStats {
        runtime.block_on(probe::redis_stats(&mut self.control))
    }

    pub fn warm_up(&self, runtime: &Runtime, concurrency: usize, ops: u64) -> u64 {
        (self.run)(runtime, concurrency, ops).failures
    }

    pub fn measure(
        &mut self,
        runtime: &Runtime,
        round: usize,
        concurrency: usize,
        ops: u64,
    ) -> Sample {
        let before = self.stats(runtime);
        let cpu = probe::process_cpu_ns();
        let outcome = (self.run)(runtime, concurrency, ops);
        let client_cpu_ns = probe::process_cpu_ns().saturating_sub(cpu);
        let after = self.stats(runtime);
        let ops_f = ops as f64;
        let seconds = outcome.elapsed.as_secs_f64();
        Sample {
            round,
            ops,
            seconds,
            per_second: ops_f / seconds,
            redis_cpu_us: (after.cpu_seconds - before.cpu_seconds) * 1e6 / ops_f,
            client_cpu_us: client_cpu_ns as f64 / 1e3 / ops_f,
            server_calls: before.calls_since(&after).values().sum::<u64>() as f64 / ops_f,
            failures: outcome.failures,
        }
    }

    pub fn calibrate(&mut self, runtime: &Runtime, concurrency: usize, ops: u64) -> Calibration {
        let monitor = Monitor::attach(self.server.port());
        let counter = Counter::start();
        let outcome = (self.run)(runtime, concurrency, ops);
        let allocs = counter.read();
        drop(counter);
        let CommandSplit { client, script } = monitor.finish(runtime, &mut self.control);
        let per_op = |counts: BTreeMap<String, u64>| {
            counts
                .into_iter()
                .filter(|(name, _)| name != "echo")
                .map(|(name, n)| (name, n as f64 / ops as f64))
                .collect()
        };
        Calibration {
            ops,
            concurrency,
            client_commands: per_op(client),
            script_commands: per_op(script),
            allocations: allocs.allocations as f64 / ops as f64,
            allocated_bytes: allocs.allocated_bytes as f64 / ops as f64,
            failures: outcome.failures,
        }
    }
}

/// Every contender of the Redis path, each on its own fresh `redis-server`.
pub fn contenders(runtime: &Runtime) -> Vec<Contender> {
    let layer = |fencing: bool| {
        move |url: &str| {
            let backend = runtime
                .block_on(RedisBackend::connect(url))
                .expect("connect to the bench redis-server");
            let service = ServiceBuilder::new()
                .layer(LockLayer::new(backend, Header::new("x-key")).fencing(fencing))
                .service_fn(handler);
            runner(move |key: Arc<TaskKey>| {
                let call = service.clone().oneshot(request(&key));
                async move { matches!(call.await, Ok(response) if response.status() == StatusCode::OK) }
            })
        }
    };
    vec![
        Contender::new(
            (
                "layer",
                "LockLayer + RedisBackend (fencing on)",
                "LockLayer, fencing on",
            ),
            runtime,
            layer(true),
        ),
        Contender::new(
            (
                "layer_no_fencing",
                "LockLayer + RedisBackend (fencing off)",
                "LockLayer, fencing off",
            ),
            runtime,
            layer(false),
        ),
        Contender::new(
            (
                "engine",
                "Locks::try_lock + release (fencing on)",
                "Locks engine, fencing on",
            ),
            runtime,
            |url| {
                let backend = runtime
                    .block_on(RedisBackend::connect(url))
                    .expect("connect to the bench redis-server");
                let locks = Arc::new(Locks::new(backend));
                runner(move |key: Arc<TaskKey>| {
                    let locks = locks.clone();
                    async move {
                        match locks.try_lock(&key.lock).await {
                            Ok(lock) => matches!(lock.release().await, Ok(Release::Released)),
                            Err(_) => false,
                        }
                    }
                })
            },
        ),
        Contender::new(
            (
                "raw",
                "raw redis-rs: SET NX PX + compare-and-delete script",
                "raw redis-rs pair",
            ),
            runtime,
            |url| {
                let connection = runtime.block_on(manager(url));
                let release = Script::new(COMPARE_AND_DELETE);
                let ttl = TTL.as_millis() as u64;
                runner(move |key: Arc<TaskKey>| {
                    let mut connection = connection.clone();
                    let release = release.clone();
                    async move {
                        let token = token();
                        let pair = lock_unlock(&mut connection, &release, &key.redis, &token, ttl);
                        matches!(pair.await, Ok(true))
                    }
                })
            },
        ),
        Contender::new(
            ("rslock", "rslock 0.10: lock + unlock", "rslock 0.10"),
            runtime,
            |url| {
                let manager = rslock::LockManager::new(vec![url.to_string()]);
                runner(move |key: Arc<TaskKey>| {
                    let manager = manager.clone();
                    async move {
                        match manager.lock(key.redis.as_bytes(), TTL).await {
                            Ok(lock) => {
                                manager.unlock(&lock).await;
                                true
                            }
                            Err(_) => false,
                        }
                    }
                })
            },
        ),
        Contender::new(
            (
                "naive",
                "naive SETNX + DEL (unsafe: the floor)",
                "naive SETNX + DEL (unsafe)",
            ),
            runtime,
            |url| {
                let connection = runtime.block_on(manager(url));
                runner(move |key: Arc<TaskKey>| {
                    let mut connection = connection.clone();
                    async move {
                        let set: Result<i64, _> = redis::cmd("SETNX")
                            .arg(&key.redis)
                            .arg(1)
                            .query_async(&mut connection)
                            .await;
                        if !matches!(set, Ok(1)) {
                            return false;
                        }
                        let deleted: Result<i64, _> = redis::cmd("DEL")
                            .arg(&key.redis)
                            .query_async(&mut connection)
                            .await;
                        matches!(deleted, Ok(1))
                    }
                })
            },
        ),
    ]
}

/// The figures of one contender at one concurrency.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Cell {
    pub concurrency: usize,
    pub samples: Vec<Sample>,
    pub per_second: f64,
    pub per_second_min: f64,
    pub per_second_max: f64,
    pub redis_cpu_us: f64,
    pub client_cpu_us: f64,
    pub server_calls: f64,
    pub failures: u64,
    /// Medians over rounds of this contender's throughput divided by the raw pair's / rslock's
    /// in the same round.
    pub vs_raw: Option<f64>,
    pub vs_rslock: Option<f64>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ContenderResult {
    pub id: &'static str,
    pub label: &'static str,
    pub short: &'static str,
    pub cells: Vec<Cell>,
    pub calibration: Calibration,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RedisPathResult {
    pub ops: u64,
    pub rounds: usize,
    pub workers: usize,
    pub concurrency: Vec<usize>,
    pub contenders: Vec<ContenderResult>,
    pub noise: probe::NoiseReading,
}

pub fn run(config: &Config, runtime: &Runtime) -> RedisPathResult {
    let mut contenders = contenders(runtime);
    let noise = probe::Noise::start(contenders.iter().map(Contender::pid).collect());
    let levels = &config.concurrency;
    println!(
        "redis path: {} contenders × concurrency {levels:?} × {} rounds × {} ops",
        contenders.len(),
        config.rounds,
        config.ops
    );

    // Warm-up: connections, script caches, the layer's renewal task.
    for contender in &contenders {
        for &concurrency in levels {
            contender.warm_up(
                runtime,
                concurrency,
                (config.ops / 10).max(concurrency as u64),
            );
        }
    }

    // samples[contender][level]
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); levels.len()]; contenders.len()];
    let count = contenders.len();
    for round in 0..config.rounds {
        let started = Instant::now();
        for (level, &concurrency) in levels.iter().enumerate() {
            for i in 0..count {
                let c = (round + level + i) % count;
                let sample = contenders[c].measure(runtime, round, concurrency, config.ops);
                samples[c][level].push(sample);
            }
        }
        println!(
            "  round {}/{} ({:.1} s)",
            round + 1,
            config.rounds,
            started.elapsed().as_secs_f64()
        );
    }

    let index = |id: &str| contenders.iter().position(|c| c.id == id);
    let (raw, rslock) = (index("raw"), index("rslock"));
    let ratio = |c: usize, base: Option<usize>, level: usize| -> Option<f64> {
        let base = &samples[base?][level];
        let ratios: Vec<f64> = samples[c][level]
            .iter()
            .filter_map(|s| {
                let b = base.iter().find(|b| b.round == s.round)?;
                Some(s.per_second / b.per_second)
            })
            .collect();
        median(&ratios)
    };

    let mut results = Vec::new();
    for (c, contender) in contenders.iter_mut().enumerate() {
        let cells = levels
            .iter()
            .enumerate()
            .map(|(level, &concurrency)| {
                let s = &samples[c][level];
                let field = |f: fn(&Sample) -> f64| s.iter().map(f).collect::<Vec<f64>>();
                let per_second = field(|s| s.per_second);
                Cell {
                    concurrency,
                    samples: s.clone(),
                    per_second: median(&per_second).unwrap_or(f64::NAN),
                    per_second_min: per_second.iter().copied().fold(f64::INFINITY, f64::min),
                    per_second_max: per_second.iter().copied().fold(0.0, f64::max),
                    redis_cpu_us: median(&field(|s| s.redis_cpu_us)).unwrap_or(f64::NAN),
                    client_cpu_us: median(&field(|s| s.client_cpu_us)).unwrap_or(f64::NAN),
                    server_calls: median(&field(|s| s.server_calls)).unwrap_or(f64::NAN),
                    failures: s.iter().map(|s| s.failures).sum(),
                    vs_raw: ratio(c, raw, level),
                    vs_rslock: ratio(c, rslock, level),
                }
            })
            .collect();
        let calibration = contender.calibrate(runtime, 16, config.calibration_ops);
        results.push(ContenderResult {
            id: contender.id,
            label: contender.label,
            short: contender.short,
            cells,
            calibration,
        });
    }

    RedisPathResult {
        ops: config.ops,
        rounds: config.rounds,
        workers: config.workers,
        concurrency: levels.clone(),
        contenders: results,
        noise: noise.finish(),
    }
}
