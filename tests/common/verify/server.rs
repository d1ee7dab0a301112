//! The verification server: one process of the fleet the scenarios drive (started by
//! [`fleet`](super::fleet) as a re-run of the test binary itself, so no separate binary has to be
//! built first).
//!
//! `POST /incr/{key}?hold_ms=H` is locked on `counter:{key}` by a [`LockLayer`] on its own
//! [`RedisBackend`] (at `VERIFY_LOCK_URL`, usually a fault-injecting proxy in front of the
//! harness Redis). Its handler is a deliberately non-atomic read–sleep–write of a counter kept in
//! the harness Redis (at `VERIFY_STORE_URL`, direct): the hash `verify:data:{key}` with fields
//! `value` and `fence`. Both the read and the write carry the request's fencing token and are
//! refused, atomically in a Lua script, when the hash has seen a larger one; a read raises the
//! fence to its token, so a holder whose lease lapsed cannot write once a newer holder has read.
//!
//! Every admitted request appends two lines to the process's history file (`VERIFY_HISTORY`),
//! each with one `write` call, so that they survive the process being SIGKILLed:
//!
//! ```text
//! E <pid> <seq> <key> <token> <enter_ns>
//! X <pid> <seq> <key> <token> <enter_ns> <exit_ns> <outcome> <lease_lost 0|1>
//! ```
//!
//! `outcome` is `written`, `stale-read`, `stale-write` (the fence refused it), `read-failed`
//! (nothing written), `write-failed` (the write's effect is unknown) or `cancelled` (the
//! handler's future was dropped, the client having gone away: the effect of a write in flight
//! is unknown). Times are the system
//! clock in nanoseconds, which all processes of one machine share. After a refused write the
//! handler waits (at most two leases) for the lease-lost signal before recording it.
//!
//! Answers: 200 `{"token": t}` when written, 409 when the fence refused it (or the layer found
//! the lock held), 503 when the store failed (or the layer could not reach Redis).
//!
//! Environment: `VERIFY_LOCK_URL`, `VERIFY_STORE_URL`, `VERIFY_HISTORY`, `VERIFY_TTL_MS`
//! (lease, default 1000), `VERIFY_UNLOCKED=1` (no lock at all, token 0: the checker's own test
//! that it sees overlaps and lost updates), `VERIFY_LOCK_BACKEND`: `redis` (the default: a
//! [`RedisBackend`] on `VERIFY_LOCK_URL`), `redlock` (a [`RedlockBackend`] over the
//! comma-separated `VERIFY_LOCK_URL`s, as the example server reads `REDLOCK_NODES`) or `cluster`
//! (a [`RedisClusterBackend`] on the cluster the comma-separated `VERIFY_LOCK_URL`s belong to, as
//! the example reads `REDIS_CLUSTER_NODES`). The store is always one plain Redis.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use redis::Script;
use redis::aio::ConnectionManager;
use serde::Deserialize;
use tower_lock::key::KeyTemplate;
use tower_lock::{LockLayer, LockLease, RedisBackend, RedisClusterBackend, RedlockBackend};

/// The environment variable that turns a run of the test binary into a verification server.
pub const ROLE_VAR: &str = "TOWER_LOCK_VERIFY_SERVER";
/// What the server prints, followed by its address, once it listens.
pub const LISTENING: &str = "VERIFY-LISTENING ";
/// The lock namespace of the verification server.
pub const NAMESPACE: &str = "verify-lock:";
/// Prefix of the counter hashes in the store.
pub const DATA_PREFIX: &str = "verify:data:";

/// `KEYS[1]` = the hash, `ARGV[1]` = token: refuse a token below the fence, else raise the fence
/// and return the value: `{1, value}` or `{0, fence}`.
const FENCED_READ: &str = r"
local fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
local token = tonumber(ARGV[1])
if token < fence then return {0, fence} end
redis.call('HSET', KEYS[1], 'fence', ARGV[1])
return {1, tonumber(redis.call('HGET', KEYS[1], 'value') or '0')}
";

/// `KEYS[1]` = the hash, `ARGV[1]` = new value, `ARGV[2]` = token: `{1, 0}` written, or
/// `{0, fence}` refused.
const FENCED_WRITE: &str = r"
local fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
local token = tonumber(ARGV[2])
if token < fence then return {0, fence} end
redis.call('HSET', KEYS[1], 'value', ARGV[1], 'fence', ARGV[2])
return {1, 0}
";

#[derive(Clone)]
struct App {
    store: ConnectionManager,
    history: Arc<History>,
    ttl: Duration,
    read: Arc<Script>,
    write: Arc<Script>,
}

struct History {
    file: Mutex<File>,
    next: std::sync::atomic::AtomicU64,
    pid: u32,
}

impl History {
    fn line(&self, line: String) {
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        // One write per line; a failure here would only hide history, so it is reported.
        if let Err(error) = file.write_all(line.as_bytes()) {
            eprintln!("verify-server: history write failed: {error}");
        }
    }
}

/// Nanoseconds since the Unix epoch (the system clock every process on the machine shares).
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// An entered section: its X line is written when it finishes, or as `cancelled` (the effect
/// of a write in flight unknown) when the handler's future is dropped (the client went away).
struct Section {
    history: Arc<History>,
    /// `X pid seq key token enter`.
    head: String,
    done: bool,
}

impl Section {
    fn finish(&mut self, exit: u128, outcome: &str, lost: bool) {
        self.done = true;
        let head = &self.head;
        self.history
            .line(format!("{head} {exit} {outcome} {}\n", u8::from(lost)));
    }
}

impl Drop for Section {
    fn drop(&mut self) {
        if !self.done {
            self.finish(now_ns(), "cancelled", false);
        }
    }
}

#[derive(Deserialize)]
struct Params {
    hold_ms: Option<u64>,
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("verify-server: {name} is not set"))
}

/// Runs the server until the process is killed, or its standard input closes (the test that
/// started it is gone: no orphan keeps serving).
pub fn run_from_env() {
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        while matches!(std::io::Read::read(&mut std::io::stdin(), &mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(serve());
}

async fn serve() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let ttl = Duration::from_millis(
        std::env::var("VERIFY_TTL_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(1000),
    );
    let unlocked = std::env::var("VERIFY_UNLOCKED").is_ok_and(|v| v == "1");
    let store_config = RedisBackend::config().set_response_timeout(Some(Duration::from_secs(1)));
    let store = redis::Client::open(env("VERIFY_STORE_URL"))
        .expect("store url")
        .get_connection_manager_with_config(store_config)
        .await
        .expect("connect to the store");
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(env("VERIFY_HISTORY"))
        .expect("open history");
    let app = App {
        store,
        history: Arc::new(History {
            file: Mutex::new(file),
            next: 0.into(),
            pid: std::process::id(),
        }),
        ttl,
        read: Arc::new(Script::new(FENCED_READ)),
        write: Arc::new(Script::new(FENCED_WRITE)),
    };
    let route = post(incr);
    let route = if unlocked {
        route
    } else {
        let key = KeyTemplate::parse("counter:{path.key}")
            .and_then(|t| t.with_pattern("/incr/{key}"))
            .expect("template");
        let urls = env("VERIFY_LOCK_URL");
        let urls: Vec<&str> = urls.split(',').filter(|u| !u.is_empty()).collect();
        // The same layer on whichever backend.
        macro_rules! locked {
            ($backend:expr) => {
                route.route_layer(LockLayer::new($backend, key).namespace(NAMESPACE).ttl(ttl))
            };
        }
        match std::env::var("VERIFY_LOCK_BACKEND").as_deref() {
            Ok("redlock") => locked!(
                RedlockBackend::connect(&urls)
                    .await
                    .expect("connect to the Redlock nodes")
            ),
            Ok("cluster") => locked!(
                RedisClusterBackend::connect(urls.iter().copied())
                    .await
                    .expect("connect to the cluster")
            ),
            _ => locked!(RedisBackend::from_url(urls[0]).expect("lock url")),
        }
    };
    let router = Router::new().route("/incr/{key}", route).with_state(app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!("{LISTENING}{}", listener.local_addr().expect("addr"));
    let _ = std::io::stdout().flush();
    axum::serve(listener, router).await.expect("serve");
}

async fn incr(
    State(app): State<App>,
    Path(key): Path<String>,
    Query(params): Query<Params>,
    lease: Option<Extension<LockLease>>,
) -> Response {
    let lease = lease.map(|Extension(lease)| lease);
    let token = lease.as_ref().map_or(0, LockLease::fencing_token);
    let seq = app
        .history
        .next
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pid = app.history.pid;
    let enter = now_ns();
    app.history
        .line(format!("E {pid} {seq} {key} {token} {enter}\n"));
    let mut section = Section {
        history: app.history.clone(),
        head: format!("X {pid} {seq} {key} {token} {enter}"),
        done: false,
    };

    let hash = format!("{DATA_PREFIX}{key}");
    let mut store = app.store.clone();
    let (outcome, status) = 'section: {
        let read: Result<(i64, i64), _> = app
            .read
            .key(&hash)
            .arg(token)
            .invoke_async(&mut store)
            .await;
        let value = match read {
            Ok((1, value)) => value,
            Ok(_) => break 'section ("stale-read", StatusCode::CONFLICT),
            Err(_) => break 'section ("read-failed", StatusCode::SERVICE_UNAVAILABLE),
        };
        tokio::time::sleep(Duration::from_millis(params.hold_ms.unwrap_or(0))).await;
        let write: Result<(i64, i64), _> = app
            .write
            .key(&hash)
            .arg(value.saturating_add(1))
            .arg(token)
            .invoke_async(&mut store)
            .await;
        match write {
            Ok((1, _)) => ("written", StatusCode::OK),
            Ok(_) => ("stale-write", StatusCode::CONFLICT),
            Err(_) => ("write-failed", StatusCode::SERVICE_UNAVAILABLE),
        }
    };
    let exit = now_ns();
    let lost = match &lease {
        None => false,
        Some(lease) => {
            if outcome.starts_with("stale") {
                // The fence refused us, so a newer holder exists: our lease must be reported
                // lost, at the latest when its validity runs out.
                let _ = tokio::time::timeout(app.ttl.saturating_mul(2), lease.lost()).await;
            }
            lease.is_lost()
        }
    };
    section.finish(exit, outcome, lost);
    (
        status,
        format!("{{\"token\":{token},\"outcome\":\"{outcome}\"}}"),
    )
        .into_response()
}
