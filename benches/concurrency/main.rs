//! The concurrency benchmark suite of issue 11: the layer under load, next to what a hand-rolled
//! lock costs. `scripts/bench concurrency` (or `cargo bench --bench concurrency`) runs it all.
//!
//! | section | what it measures |
//! |---|---|
//! | `redis` | lock + unlock pairs per second on distinct keys at concurrency 1, 16, 64, 256: the layer (fencing on, off), the engine, a raw redis-rs pair (`SET NX PX` + compare-and-delete script), rslock 0.10, naive `SETNX` + `DEL`; interleaved rounds, medians, ratios; Redis CPU (`INFO cpu`) and commands (`INFO commandstats`, and a `MONITOR` pass that tells client commands from script-internal ones) per pair; client CPU and allocations per pair |
//! | `inproc` | ns and allocations per request: bare `service_fn`, the layer on `MemoryBackend`, tower's `ConcurrencyLimit` |
//! | `contention` | 1 000 concurrent requests on one held key through the layer on Redis: p50/p99 of the 409s |
//! | `http` | an axum server with locked routes and identical unlocked twins under `wrk` (an empty handler, and one that reads Redis), and the example server's locked and unlocked deposit routes (in process and on Redis): throughput, p99, ratios |
//! | `memory` | RSS of a fresh process after 100 k and 1 M requests through the layer (`MemoryBackend`) |
//! | `backends` | opt-in (`scripts/bench backends`, not in a run without sections): acquire + release pairs per second and acquire p50/p99 on one Redis, Cluster, Redlock 3 and 5 (and 5 with one node paused), Sentinel (with `--features sentinel`), in the same run; `BENCH_BACKEND_OPS` (default 5000) pairs per cell per round |
//!
//! Name sections to run only those: `cargo bench --bench concurrency -- redis http`. Every Redis
//! figure comes from `redis-server` processes the bench starts on free loopback ports (never the
//! machine's 6379). The report (markdown), the raw results (JSON) and the plot (SVG) are written
//! to `target/bench-concurrency/` (`BENCH_OUT` to change it).
//!
//! Environment (defaults keep the whole run to about 3 minutes on 2 cores):
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `BENCH_OPS` | 20000 | lock + unlock pairs per contender per concurrency per round (the figures: 100000) |
//! | `BENCH_ROUNDS` | 5 | interleaved rounds (Redis path, in process, contention) |
//! | `BENCH_CONCURRENCY` | 1,16,64,256 | the Redis path's concurrency levels |
//! | `BENCH_WORKERS` | cores | tokio worker threads |
//! | `BENCH_CALIBRATION_OPS` | 1000 | pairs per contender in the untimed `MONITOR` + allocation pass |
//! | `BENCH_INPROC_OPS` | 200000 | requests per in-process contender per round |
//! | `BENCH_CONTENTION` | 1000 | concurrent requests on the held key |
//! | `BENCH_HTTP_SECS`, `BENCH_HTTP_ROUNDS` | 4, 3 | length of each wrk run, rounds |
//! | `BENCH_HTTP_THREADS`, `BENCH_HTTP_CONNECTIONS` | 2, 64 | `wrk -t`, `wrk -c` |
//! | `BENCH_MEMORY` | 100000,1000000 | request counts at which RSS is read |
//! | `BENCH_WRK` | `wrk` | the load generator binary |
//!
//! Without `--bench` (as `cargo test --benches` runs it) every size is tiny: a smoke test.

#[path = "../../tests/common/mod.rs"]
mod common;

#[path = "../../examples/support/demo.rs"]
mod demo;
#[path = "../support/raw_pair.rs"]
mod raw_pair;

mod alloc;
mod backends;
mod contention;
mod http;
mod inproc;
mod memory;
mod probe;
mod redis_path;
mod report;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

#[global_allocator]
static ALLOCATOR: alloc::CountingAllocator = alloc::CountingAllocator;

pub const SECTIONS: [&str; 5] = ["redis", "inproc", "contention", "http", "memory"];
/// Sections that run only when named.
pub const OPT_IN_SECTIONS: [&str; 1] = ["backends"];

pub struct Config {
    pub smoke: bool,
    pub sections: Vec<String>,
    pub ops: u64,
    pub rounds: usize,
    pub concurrency: Vec<usize>,
    pub workers: usize,
    pub calibration_ops: u64,
    pub inproc_ops: u64,
    pub contention: usize,
    pub http_secs: u64,
    pub http_rounds: usize,
    pub http_threads: usize,
    pub http_connections: usize,
    pub memory_steps: Vec<u64>,
    pub out: PathBuf,
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a valid value")),
        Err(_) => default,
    }
}

fn env_list<T: std::str::FromStr>(name: &str, default: &str) -> Vec<T> {
    let text = std::env::var(name).unwrap_or_else(|_| default.into());
    text.split(',')
        .map(|part| {
            part.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}={text:?}: {part:?} is not a valid value"))
        })
        .collect()
}

impl Config {
    fn from_env(args: &[String]) -> Self {
        // `cargo bench` passes `--bench`; `cargo test --benches` does not.
        let smoke = !args.iter().any(|a| a == "--bench");
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let mut sections: Vec<String> = args
            .iter()
            .skip(1)
            .filter(|a| !a.starts_with('-'))
            .cloned()
            .collect();
        for section in &sections {
            assert!(
                SECTIONS.contains(&section.as_str()) || OPT_IN_SECTIONS.contains(&section.as_str()),
                "unknown section {section:?}; the sections are {SECTIONS:?} and, when named, \
                 {OPT_IN_SECTIONS:?}"
            );
        }
        if sections.is_empty() {
            sections = SECTIONS.iter().map(|s| s.to_string()).collect();
        }
        let out = std::env::var_os("BENCH_OUT").map_or_else(
            || {
                std::env::var_os("CARGO_TARGET_DIR")
                    .map_or_else(
                        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"),
                        PathBuf::from,
                    )
                    .join("bench-concurrency")
            },
            PathBuf::from,
        );
        let config = Self {
            smoke,
            sections,
            ops: env("BENCH_OPS", 20_000),
            rounds: env("BENCH_ROUNDS", 5),
            concurrency: env_list("BENCH_CONCURRENCY", "1,16,64,256"),
            workers: env("BENCH_WORKERS", cores),
            calibration_ops: env("BENCH_CALIBRATION_OPS", 1_000),
            inproc_ops: env("BENCH_INPROC_OPS", 200_000),
            contention: env("BENCH_CONTENTION", 1_000),
            http_secs: env("BENCH_HTTP_SECS", 4),
            http_rounds: env("BENCH_HTTP_ROUNDS", 3),
            http_threads: env("BENCH_HTTP_THREADS", 2),
            http_connections: env("BENCH_HTTP_CONNECTIONS", 64),
            memory_steps: env_list("BENCH_MEMORY", "100000,1000000"),
            out,
        };
        assert!(
            config.ops > 0 && config.rounds > 0,
            "BENCH_OPS and BENCH_ROUNDS must be > 0"
        );
        assert!(
            config.concurrency.iter().all(|&c| c > 0),
            "BENCH_CONCURRENCY levels must be > 0"
        );
        if smoke {
            Self {
                ops: 200,
                rounds: 1,
                calibration_ops: 50,
                inproc_ops: 2_000,
                contention: 50,
                http_secs: 1,
                http_rounds: 1,
                memory_steps: vec![2_000, 4_000],
                out: config.out.join("smoke"),
                ..config
            }
        } else {
            config
        }
    }

    /// The `BENCH_*` settings of this run, as a command prefix.
    fn describe(&self) -> String {
        let mut vars: Vec<String> = std::env::vars()
            .filter(|(name, _)| name.starts_with("BENCH_") && name != "BENCH_OUT")
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        vars.sort();
        vars.push("scripts/bench concurrency".into());
        let named: Vec<&String> = self
            .sections
            .iter()
            .filter(|_| self.sections.len() < SECTIONS.len())
            .collect();
        for section in named {
            vars.push(section.clone());
        }
        vars.join(" ")
    }
}

/// The median of `values` (mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    })
}

/// The `q` quantile of `values` (nearest rank); `None` when empty.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The machine and the build the figures come from.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Machine {
    pub nproc: String,
    pub cpu: String,
    pub kernel: String,
    pub redis_server: String,
    pub rustc: String,
    pub commit: String,
    pub date: String,
    pub loadavg_at_start: String,
}

impl Machine {
    fn read() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_default();
        let redis = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let dirty =
            !command_output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
        Self {
            nproc: command_output("nproc", &[]),
            cpu,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            redis_server: command_output(&redis, &["--version"]),
            rustc: command_output("rustc", &["--version"]),
            commit: command_output("git", &["rev-parse", "--short", "HEAD"])
                + if dirty {
                    " (with uncommitted changes)"
                } else {
                    ""
                },
            date: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            loadavg_at_start: std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

#[derive(Debug, serde::Serialize)]
pub struct Results {
    pub command: String,
    pub smoke: bool,
    pub machine: Machine,
    pub seconds: f64,
    pub redis: Option<redis_path::RedisPathResult>,
    pub inproc: Option<inproc::InprocResult>,
    pub contention: Option<contention::ContentionResult>,
    pub http: Option<http::HttpResult>,
    /// Why the HTTP section did not run, when it did not.
    pub http_skipped: Option<String>,
    pub memory: Option<memory::MemorySection>,
    pub backends: Option<backends::BackendsResult>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == memory::CHILD_FLAG) {
        memory::child(&args);
        return;
    }
    if args.iter().any(|a| a == "--list") {
        // `cargo bench -- --list` / `cargo test --benches -- --list`: nothing to list.
        return;
    }
    let started = Instant::now();
    let config = Config::from_env(&args);
    let machine = Machine::read();
    println!(
        "concurrency bench{}: {} cores, load average {}, sections {:?}",
        if config.smoke {
            " (smoke run: tiny sizes)"
        } else {
            ""
        },
        machine.nproc,
        machine.loadavg_at_start,
        config.sections
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let wants = |section: &str| config.sections.iter().any(|s| s == section);

    let mut results = Results {
        command: config.describe(),
        smoke: config.smoke,
        machine,
        seconds: 0.0,
        redis: None,
        inproc: None,
        contention: None,
        http: None,
        http_skipped: None,
        memory: None,
        backends: None,
    };
    if wants("redis") {
        results.redis = Some(redis_path::run(&config, &runtime));
    }
    if wants("inproc") {
        results.inproc = Some(inproc::run(&config, &runtime));
    }
    if wants("contention") {
        results.contention = Some(contention::run(&config, &runtime));
    }
    if wants("http") {
        match http::find_wrk() {
            Some(wrk) => results.http = Some(http::run(&config, &runtime, &wrk)),
            None => {
                let why = "wrk not found (install it: `apt-get install wrk`, or set BENCH_WRK)";
                println!("http: skipped: {why}");
                results.http_skipped = Some(why.into());
            }
        }
    }
    if wants("memory") {
        results.memory = Some(memory::run(&config));
    }
    if wants("backends") {
        results.backends = Some(backends::run(&config, &runtime));
    }
    drop(runtime);
    results.seconds = started.elapsed().as_secs_f64();

    let mut markdown = report::markdown(&results);
    if let Some(backends) = &results.backends {
        markdown.push('\n');
        markdown.push_str(&backends::markdown(backends));
    }
    println!();
    println!("{markdown}");
    std::fs::create_dir_all(&config.out).expect("create the output directory");
    let write = |name: &str, contents: &str| {
        let path = config.out.join(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        println!("wrote {}", path.display());
    };
    write("report.md", &markdown);
    write(
        "results.json",
        &serde_json::to_string_pretty(&results).expect("JSON"),
    );
    if let Some(redis) = &results.redis {
        write(
            "throughput.svg",
            &report::throughput_svg(redis, &results.machine, report::quiet(&results)),
        );
    }
}
