//! What keeping N locks alive costs: memory per in-flight lock, renewals per second, CPU per
//! renewal, and how many tasks do the renewing.
//!
//! Each scenario holds N concurrent requests inside their handlers for a few seconds, with a short
//! TTL (default 300 ms, so the layer renews every 100 ms), and measures over that window:
//!
//! - process RSS growth per in-flight request (`VmRSS` of `/proc/self/status`);
//! - `extend` calls, counted by a [`LockBackend`] wrapper that also records which tokio task made
//!   each call (all should come from the layer's one renewal task);
//! - the process's CPU time (sum of `/proc/self/task/*/schedstat`, ns), and on Redis also the
//!   server's;
//! - tokio's count of alive tasks (the N request tasks, plus the renewal task).
//!
//! The baseline (`idle`) is the same N requests on the same handler without the layer, so
//! "lock's own" figures are the scenario minus the baseline. Every scenario runs in a fresh child
//! process (this binary re-executed) so that one scenario's freed memory does not hide the next
//! one's growth.
//!
//! Run with `cargo bench --bench renewal` (or `scripts/bench`). Options, after `--`:
//! `--hold-secs S` (default 3), `--ttl-ms T` (default 300), `--sizes 1,1000,10000`,
//! `--redis-size 1000` (0 skips Redis). Unknown arguments (criterion's) are ignored.

#[path = "../tests/common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_lock::backend::{
    Acquire, AcquireOptions, BackendFuture, Extend, LockName, LockToken, Release,
};
use tower_lock::key::Header;
use tower_lock::{LockBackend, LockLayer, LockLease, MemoryBackend, RedisBackend};

// ---------------------------------------------------------------------------------------------
// The counting backend.

#[derive(Default)]
struct Stats {
    acquires: AtomicU64,
    releases: AtomicU64,
    extends: AtomicU64,
    /// The task that made the first `extend` call.
    renewal_task: OnceLock<Option<tokio::task::Id>>,
    /// `extend` calls made from any other task (or from outside a task).
    extends_elsewhere: AtomicU64,
}

/// Delegates to `inner`, counting calls.
#[derive(Clone)]
struct Counting<B> {
    inner: B,
    stats: Arc<Stats>,
}

impl<B: LockBackend> LockBackend for Counting<B> {
    fn acquire(
        &self,
        name: &LockName,
        token: LockToken,
        options: AcquireOptions,
    ) -> BackendFuture<Acquire> {
        self.stats.acquires.fetch_add(1, Ordering::Relaxed);
        self.inner.acquire(name, token, options)
    }

    fn release(&self, name: &LockName, token: LockToken) -> BackendFuture<Release> {
        self.stats.releases.fetch_add(1, Ordering::Relaxed);
        self.inner.release(name, token)
    }

    fn extend(&self, name: &LockName, token: LockToken, ttl: Duration) -> BackendFuture<Extend> {
        self.stats.extends.fetch_add(1, Ordering::Relaxed);
        let task = tokio::task::try_id();
        if *self.stats.renewal_task.get_or_init(|| task) != task || task.is_none() {
            self.stats.extends_elsewhere.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.extend(name, token, ttl)
    }
}

// ---------------------------------------------------------------------------------------------
// /proc readings.

/// Resident set size of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// CPU time of every live thread of process `pid` ("self" for this one), in ns, from
/// `/proc/PID/task/*/schedstat` (first field: time spent on the CPU).
fn cpu_ns(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// One scenario, in a child process.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// No layer: N requests parked in the handler.
    Idle,
    /// `LockLayer<MemoryBackend>`.
    Memory,
    /// `LockLayer<RedisBackend>`.
    Redis,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Idle => "idle",
            Kind::Memory => "memory",
            Kind::Redis => "redis",
        }
    }

    fn parse(name: &str) -> Self {
        match name {
            "idle" => Kind::Idle,
            "memory" => Kind::Memory,
            "redis" => Kind::Redis,
            other => panic!("unknown scenario {other}"),
        }
    }
}

struct Scenario {
    kind: Kind,
    n: usize,
    hold: Duration,
    ttl: Duration,
    redis_url: String,
    redis_pid: String,
}

/// What the handlers share: the signal to return, and counters.
#[derive(Clone, Default)]
struct Parked {
    release: CancellationToken,
    entered: Arc<AtomicUsize>,
    with_lease: Arc<AtomicUsize>,
    lost: Arc<AtomicUsize>,
}

impl Parked {
    /// A handler that waits for `release`, then reports whether its lease was lost.
    async fn handle(self, request: Request<()>) -> Result<Response<String>, Infallible> {
        let lease = request.extensions().get::<LockLease>().cloned();
        if lease.is_some() {
            self.with_lease.fetch_add(1, Ordering::Relaxed);
        }
        self.entered.fetch_add(1, Ordering::Relaxed);
        self.release.cancelled().await;
        if lease.is_some_and(|lease| lease.is_lost()) {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Response::new(String::new()))
    }
}

fn request(i: usize) -> Request<()> {
    Request::post("/jobs")
        .header("x-key", format!("job-{i}"))
        .body(())
        .expect("valid request")
}

/// Key=value pairs, printed on one `RESULT` line for the parent.
type Report = Vec<(&'static str, String)>;

fn child(scenario: &Scenario) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let report = runtime.block_on(measure(scenario));
    let line: Vec<String> = report.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("RESULT {}", line.join(" "));
}

async fn measure(scenario: &Scenario) -> Report {
    let stats = Arc::new(Stats::default());
    let parked = Parked::default();
    let handler = {
        let parked = parked.clone();
        tower::service_fn(move |request| parked.clone().handle(request))
    };
    let memory = MemoryBackend::new();
    match scenario.kind {
        Kind::Idle => hold(scenario, handler, &stats, &parked, || None).await,
        Kind::Memory => {
            let backend = Counting {
                inner: memory.clone(),
                stats: stats.clone(),
            };
            let service = ServiceBuilder::new()
                .layer(layer(backend, scenario.ttl))
                .service(handler);
            hold(scenario, service, &stats, &parked, || Some(memory.held())).await
        }
        Kind::Redis => {
            let redis = RedisBackend::connect(&scenario.redis_url)
                .await
                .expect("connect to the bench redis-server");
            let backend = Counting {
                inner: redis,
                stats: stats.clone(),
            };
            let service = ServiceBuilder::new()
                .layer(layer(backend, scenario.ttl))
                .service(handler);
            hold(scenario, service, &stats, &parked, || None).await
        }
    }
}

/// The layer under test: short TTL, no fencing counters (keys are one-off).
fn layer<B: LockBackend>(backend: B, ttl: Duration) -> LockLayer<Header, B> {
    LockLayer::new(backend, Header::new("x-key"))
        .ttl(ttl)
        .fencing(false)
}

/// Parks `scenario.n` requests in the handler, holds them for `scenario.hold`, releases them.
async fn hold<S, B>(
    scenario: &Scenario,
    service: S,
    stats: &Stats,
    parked: &Parked,
    held: impl Fn() -> Option<usize>,
) -> Report
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    let metrics = tokio::runtime::Handle::current().metrics();
    let n = scenario.n;
    // Let the runtime settle (worker threads started, their arenas touched).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let tasks_before = metrics.num_alive_tasks();
    let rss_before = rss_kib();

    let started = Instant::now();
    let mut requests = Vec::with_capacity(n);
    for i in 0..n {
        let service = service.clone();
        requests.push(tokio::spawn(async move {
            service.oneshot(request(i)).await.map(|r| r.status())
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while parked.entered.load(Ordering::Relaxed) < n {
        assert!(Instant::now() < deadline, "requests did not all get in");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all_in = started.elapsed();

    // The window: N requests in flight, their leases renewed.
    let rss_held_start = rss_kib();
    let extends_start = stats.extends.load(Ordering::Relaxed);
    let cpu_start = cpu_ns("self");
    let server_cpu_start = cpu_ns(&scenario.redis_pid);
    let window = Instant::now();
    tokio::time::sleep(scenario.hold).await;
    let window = window.elapsed();
    let cpu = cpu_ns("self") - cpu_start;
    let server_cpu = cpu_ns(&scenario.redis_pid).saturating_sub(server_cpu_start);
    let extends = stats.extends.load(Ordering::Relaxed) - extends_start;
    let rss_held = rss_kib();
    let tasks_held = metrics.num_alive_tasks();
    let held_now = held();

    parked.release.cancel();
    let mut ok = 0;
    for request in requests {
        if request.await.expect("request task").expect("infallible") == StatusCode::OK {
            ok += 1;
        }
    }

    let mut report: Report = vec![
        ("kind", scenario.kind.name().into()),
        ("n", n.to_string()),
        ("ok", ok.to_string()),
        ("all_in_ms", format!("{:.1}", all_in.as_secs_f64() * 1e3)),
        ("window_s", format!("{:.3}", window.as_secs_f64())),
        ("rss_before_kib", rss_before.to_string()),
        ("rss_held_start_kib", rss_held_start.to_string()),
        ("rss_held_kib", rss_held.to_string()),
        ("cpu_ns", cpu.to_string()),
        ("server_cpu_ns", server_cpu.to_string()),
        ("extends", extends.to_string()),
        (
            "extends_total",
            stats.extends.load(Ordering::Relaxed).to_string(),
        ),
        (
            "extends_elsewhere",
            stats.extends_elsewhere.load(Ordering::Relaxed).to_string(),
        ),
        (
            "acquires",
            stats.acquires.load(Ordering::Relaxed).to_string(),
        ),
        (
            "releases",
            stats.releases.load(Ordering::Relaxed).to_string(),
        ),
        (
            "with_lease",
            parked.with_lease.load(Ordering::Relaxed).to_string(),
        ),
        ("lost", parked.lost.load(Ordering::Relaxed).to_string()),
        ("tasks_before", tasks_before.to_string()),
        ("tasks_held", tasks_held.to_string()),
    ];
    if let Some(held) = held_now {
        report.push(("backend_held", held.to_string()));
    }
    report
}

// ---------------------------------------------------------------------------------------------
// The parent: runs each scenario in a child, prints the table.

struct Options {
    hold: Duration,
    ttl: Duration,
    sizes: Vec<usize>,
    redis_size: usize,
}

fn options(args: &[String]) -> Options {
    let mut options = Options {
        hold: Duration::from_secs(3),
        ttl: Duration::from_millis(300),
        sizes: vec![1, 1_000, 10_000],
        redis_size: 1_000,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--hold-secs" => {
                options.hold = Duration::from_secs_f64(value().parse().expect("--hold-secs S"));
            }
            "--ttl-ms" => options.ttl = Duration::from_millis(value().parse().expect("--ttl-ms T")),
            "--sizes" => {
                options.sizes = value()
                    .split(',')
                    .map(|n| n.trim().parse().expect("--sizes 1,1000,10000"))
                    .collect();
            }
            "--redis-size" => options.redis_size = value().parse().expect("--redis-size N"),
            "--bench" => {}
            other => eprintln!("renewal: ignoring argument {other:?}"),
        }
    }
    options
}

type Results = Vec<(String, String)>;

fn get(result: &Results, key: &str) -> f64 {
    result
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn run_child(kind: Kind, n: usize, options: &Options, url: &str, pid: &str) -> Results {
    let exe = std::env::current_exe().expect("current exe");
    let output = Command::new(exe)
        .args(["--scenario", kind.name(), &n.to_string()])
        .args(["--hold-secs", &options.hold.as_secs_f64().to_string()])
        .args(["--ttl-ms", &options.ttl.as_millis().to_string()])
        .args(["--redis", url, pid])
        .output()
        .expect("run scenario");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "scenario {kind:?} {n} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix("RESULT "))
        .expect("scenario printed a RESULT line");
    line.split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Prints rows with right-aligned columns (the first left-aligned).
fn print_table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|row| row.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, &width))| {
                if c == 0 {
                    format!("{cell:<width$}")
                } else {
                    format!("{cell:>width$}")
                }
            })
            .collect();
        println!("{}", cells.join("  "));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--scenario") {
        let options = options(&args[3..7]);
        let scenario = Scenario {
            kind: Kind::parse(&args[1]),
            n: args[2].parse().expect("scenario size"),
            hold: options.hold,
            ttl: options.ttl,
            redis_url: args[8].clone(),
            redis_pid: args[9].clone(),
        };
        child(&scenario);
        return;
    }

    let mut options = options(&args);
    // `cargo bench` passes `--bench`; without it (`cargo test --benches`), a quick smoke run.
    if !args.iter().any(|a| a == "--bench") {
        options.hold = Duration::from_millis(500);
        options.sizes = vec![10];
        options.redis_size = options.redis_size.min(10);
    }
    let server = (options.redis_size > 0).then(common::RedisServer::start);
    let (url, pid) = server
        .as_ref()
        .map_or((String::new(), String::from("0")), |s| {
            (s.url(), s.pid().to_string())
        });
    let every = options.ttl / 3;
    println!(
        "renewal: TTL {:?} (renewed every {every:?}), {:?} window per scenario, 2 tokio workers, \
         fencing off; each scenario in its own process",
        options.ttl, options.hold
    );

    let mut rows = Vec::new();
    let mut sizes = options.sizes.clone();
    if options.redis_size > 0 && !sizes.contains(&options.redis_size) {
        sizes.push(options.redis_size);
    }
    for &n in &sizes {
        let idle = run_child(Kind::Idle, n, &options, &url, &pid);
        let mut kinds = Vec::new();
        if options.sizes.contains(&n) {
            kinds.push(Kind::Memory);
        }
        if options.redis_size == n {
            kinds.push(Kind::Redis);
        }
        for kind in kinds {
            let locked = run_child(kind, n, &options, &url, &pid);
            rows.push((kind, n, idle.clone(), locked));
        }
    }

    let mut table = vec![vec![
        "backend".to_string(),
        "N".into(),
        "idle B/req".into(),
        "lock B/req".into(),
        "lock own B".into(),
        "extends/s".into(),
        "expected/s".into(),
        "+tasks".into(),
        "elsewhere".into(),
        "CPU/renewal".into(),
        "server/renewal".into(),
        "idle CPU%".into(),
        "lock CPU%".into(),
        "lost".into(),
    ]];
    let mut problems = Vec::new();
    for (kind, n, idle, locked) in &rows {
        let n = *n;
        // RSS growth per request; meaningless (page-sized noise) for a handful of requests.
        let per_request = |r: &Results| {
            (n >= 100)
                .then(|| (get(r, "rss_held_kib") - get(r, "rss_before_kib")) * 1024.0 / n as f64)
        };
        let bytes = |b: Option<f64>| b.map_or_else(|| String::from("-"), |b| format!("{b:.0}"));
        let (idle_bytes, lock_bytes) = (per_request(idle), per_request(locked));
        let window = get(locked, "window_s");
        let extends = get(locked, "extends");
        let cpu_idle_rate = get(idle, "cpu_ns") / get(idle, "window_s");
        let per_renewal = (get(locked, "cpu_ns") - cpu_idle_rate * window) / extends;
        let server_per_renewal = if *kind == Kind::Redis {
            format!("{:.2} µs", get(locked, "server_cpu_ns") / extends / 1e3)
        } else {
            String::from("-")
        };
        // Tasks alive in the window beyond the N request tasks and those alive before them.
        let extra_tasks = get(locked, "tasks_held") - get(locked, "tasks_before") - n as f64;
        table.push(vec![
            kind.name().to_string(),
            n.to_string(),
            bytes(idle_bytes),
            bytes(lock_bytes),
            bytes(lock_bytes.zip(idle_bytes).map(|(l, i)| l - i)),
            format!("{:.0}", extends / window),
            format!("{:.0}", n as f64 / every.as_secs_f64()),
            format!("{extra_tasks:+.0}"),
            format!("{}", get(locked, "extends_elsewhere")),
            format!("{:.2} µs", per_renewal / 1e3),
            server_per_renewal,
            format!("{:.1}", cpu_idle_rate / 1e9 * 100.0),
            format!("{:.1}", get(locked, "cpu_ns") / window / 1e9 * 100.0),
            format!("{}", get(locked, "lost")),
        ]);
        let answered = get(locked, "ok") as usize == n && get(idle, "ok") as usize == n;
        if !answered || get(locked, "with_lease") as usize != n {
            problems.push(format!(
                "{} N={n}: not every request was locked and answered 200: {locked:?}",
                kind.name()
            ));
        }
        if let Some((_, held)) = locked.iter().find(|(k, _)| k == "backend_held")
            && held.parse::<usize>().ok() != Some(n)
        {
            problems.push(format!(
                "{} N={n}: the backend held {held} locks during the window",
                kind.name()
            ));
        }
    }
    println!();
    print_table(&table);
    for problem in &problems {
        println!("!! {problem}");
    }
    println!();
    for line in [
        "idle / lock B/req: RSS growth (end of the window minus before the requests) / N, without",
        "  and with the layer; lock own B = the difference (- for N < 100: page-sized noise). An",
        "  upper bound: it includes memory the allocator kept from the acquire burst.",
        "extends/s: extend calls in the window / its length; expected/s = N / renewal interval",
        "  (renewals are re-armed after each extend completes, so a little under).",
        "+tasks: tokio tasks alive in the window beyond the N request tasks and those alive before",
        "  them (the Redis connection's driver): the one renewal task of the layer.",
        "elsewhere: extend calls not made from the task that made the first one (0: one task",
        "  renews every lease).",
        "CPU/renewal: (this process's CPU in the window minus the idle baseline's) / extends;",
        "  server/renewal: redis-server's CPU in the window / extends. CPU%: of one core.",
        "lost: leases the handlers found lost when released (0: renewal kept up).",
    ] {
        println!("{line}");
    }
    drop(server);
    if !problems.is_empty() {
        std::process::exit(1);
    }
}
