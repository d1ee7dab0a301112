//! Client work per lock + unlock pair in a form that load does not change: a fixed number of
//! pairs through one contender, on a current-thread runtime, to be counted by
//! `valgrind --tool=callgrind` (instructions) and by a counting allocator (allocations).
//!
//! `benches/instructions.sh` runs every contender twice (N and 3N pairs) under callgrind and
//! prints the difference per pair, which cancels start-up (runtime, connection, redis-server
//! start); with `SERVER=1` it also counts the redis-server's instructions the same way.
//!
//! ```text
//! cargo bench --bench instructions --no-run
//! target/release/deps/instructions-* --bench MODE OPS [CONCURRENCY]
//! ```
//!
//! | mode | one pair is |
//! |---|---|
//! | `raw` | `SET key token NX PX` then `EVALSHA` compare-and-delete, by hand on a `ConnectionManager` |
//! | `raw-mux` | the same on a `MultiplexedConnection` (what rslock uses), same timeouts: no `ConnectionManager` (no reconnects) |
//! | `rslock` | rslock 0.10's `lock` + `unlock` (`SET NX PX`, then its own compare-and-delete `EVALSHA`) |
//! | `naive` | `SETNX` then `DEL` (unsafe: the floor) |
//! | `engine` | `Locks::try_lock` + `release` on `RedisBackend`, fencing on |
//! | `engine-off` | the same, fencing off |
//! | `layer-on`, `layer-off` | one request through `LockLayer` + `RedisBackend` (`oneshot`) |
//! | `bare`, `memory` | in process: the bare `service_fn`, the layer on `MemoryBackend` |
//! | `http-unlocked`, `http-memory`, `http-redis` | one `POST /ROUTE/{key}` to an axum server in this process, over a kept-alive loopback connection, answered `ok` by an empty handler: unlocked, or behind `route_layer(LockLayer)` on the memory or Redis backend (the client's own work counts too, the same in all three) |
//!
//! Each of the CONCURRENCY tasks (default 1) runs its share one after the other on its own key.
//! Without `--bench` (as `cargo test --benches` runs it) every mode runs 50 pairs: a smoke test.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/raw_pair.rs"]
mod raw_pair;

#[path = "concurrency/alloc.rs"]
#[allow(dead_code)]
mod alloc;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use redis::Script;
use redis::aio::ConnectionLike;
use tokio::runtime::Runtime;
use tower::{ServiceBuilder, ServiceExt};
use tower_lock::backend::Release;
use tower_lock::key::{Header, LockKey};
use tower_lock::{LockLayer, Locks, MemoryBackend, RedisBackend};

use crate::common::RedisServer;

#[global_allocator]
static ALLOCATOR: alloc::CountingAllocator = alloc::CountingAllocator;

const X_KEY: HeaderName = HeaderName::from_static("x-key");
const TTL: Duration = Duration::from_secs(10);
const MODES: [&str; 13] = [
    "raw",
    "raw-mux",
    "rslock",
    "naive",
    "engine",
    "engine-off",
    "layer-on",
    "layer-off",
    "bare",
    "memory",
    "http-unlocked",
    "http-memory",
    "http-redis",
];

struct Key {
    header: HeaderValue,
    lock: LockKey,
    redis: String,
}

impl Key {
    fn new(text: &str) -> Self {
        Self {
            header: HeaderValue::from_str(text).expect("ASCII key"),
            lock: LockKey::new(text),
            redis: format!("bench:{{{text}}}"),
        }
    }
}

async fn handler(_request: Request<()>) -> Result<Response<String>, Infallible> {
    Ok(Response::new(String::new()))
}

fn request(key: &Key) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = Method::POST;
    request.headers_mut().insert(X_KEY, key.header.clone());
    request
}

type Op = Arc<dyn Fn(Arc<Key>) -> std::pin::Pin<Box<dyn Future<Output = bool>>>>;

fn op<F, Fut>(f: F) -> Op
where
    F: Fn(Arc<Key>) -> Fut + 'static,
    Fut: Future<Output = bool> + 'static,
{
    Arc::new(move |key| Box::pin(f(key)))
}

/// The hand-rolled pair ([`raw_pair::lock_unlock`]) on `connection`.
fn raw<C: ConnectionLike + Clone + 'static>(connection: C) -> Op {
    let release = Script::new(raw_pair::COMPARE_AND_DELETE);
    let ttl = TTL.as_millis() as u64;
    op(move |key: Arc<Key>| {
        let mut connection = connection.clone();
        let release = release.clone();
        async move {
            let token = format!("{:032x}", rand::random::<u128>());
            let pair = raw_pair::lock_unlock(&mut connection, &release, &key.redis, &token, ttl);
            matches!(pair.await, Ok(true))
        }
    })
}

/// The pair of `mode`, built on `server` when it needs Redis.
fn build(mode: &str, runtime: &Runtime, server: Option<&RedisServer>) -> Op {
    let url = || server.expect("a redis-server").url();
    let layer = |fencing: bool| {
        let backend = runtime
            .block_on(RedisBackend::connect(&url()))
            .expect("connect");
        let service = ServiceBuilder::new()
            .layer(LockLayer::new(backend, Header::new("x-key")).fencing(fencing))
            .service_fn(handler);
        op(move |key: Arc<Key>| {
            let call = service.clone().oneshot(request(&key));
            async move { matches!(call.await, Ok(r) if r.status() == StatusCode::OK) }
        })
    };
    let engine = |fencing: bool| {
        let backend = runtime
            .block_on(RedisBackend::connect(&url()))
            .expect("connect");
        let mut locks = Locks::new(backend);
        if !fencing {
            locks = locks.fencing(false);
        }
        let locks = Arc::new(locks);
        op(move |key: Arc<Key>| {
            let locks = locks.clone();
            async move {
                match locks.try_lock(&key.lock).await {
                    Ok(lock) => matches!(lock.release().await, Ok(Release::Released)),
                    Err(_) => false,
                }
            }
        })
    };
    match mode {
        "layer-on" => layer(true),
        "layer-off" => layer(false),
        "engine" => engine(true),
        "engine-off" => engine(false),
        "raw" => {
            let connection = runtime.block_on(async {
                redis::Client::open(url())
                    .expect("url")
                    .get_connection_manager_with_config(RedisBackend::config())
                    .await
                    .expect("connect")
            });
            raw(connection)
        }
        "raw-mux" => {
            let connection = runtime.block_on(async {
                redis::Client::open(url())
                    .expect("url")
                    .get_multiplexed_async_connection_with_config(
                        &redis::AsyncConnectionConfig::new()
                            .set_connection_timeout(Some(std::time::Duration::from_millis(500)))
                            .set_response_timeout(Some(std::time::Duration::from_secs(2))),
                    )
                    .await
                    .expect("connect")
            });
            raw(connection)
        }
        "rslock" => {
            let manager = rslock::LockManager::new(vec![url()]);
            op(move |key: Arc<Key>| {
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
        }
        "naive" => {
            let connection = runtime.block_on(async {
                redis::Client::open(url())
                    .expect("url")
                    .get_connection_manager_with_config(RedisBackend::config())
                    .await
                    .expect("connect")
            });
            op(move |key: Arc<Key>| {
                let mut connection = connection.clone();
                async move {
                    let set: Result<i64, _> = redis::cmd("SETNX")
                        .arg(&key.redis)
                        .arg(1)
                        .query_async(&mut connection)
                        .await;
                    let deleted: Result<i64, _> = redis::cmd("DEL")
                        .arg(&key.redis)
                        .query_async(&mut connection)
                        .await;
                    matches!((set, deleted), (Ok(1), Ok(1)))
                }
            })
        }
        "bare" => {
            let service = ServiceBuilder::new().service_fn(handler);
            op(move |key: Arc<Key>| {
                let call = service.oneshot(request(&key));
                async move { matches!(call.await, Ok(r) if r.status() == StatusCode::OK) }
            })
        }
        "memory" => {
            let service = ServiceBuilder::new()
                .layer(LockLayer::new(MemoryBackend::new(), Header::new("x-key")))
                .service_fn(handler);
            op(move |key: Arc<Key>| {
                let call = service.clone().oneshot(request(&key));
                async move { matches!(call.await, Ok(r) if r.status() == StatusCode::OK) }
            })
        }
        "http-unlocked" | "http-memory" | "http-redis" => http(mode, runtime, server),
        other => panic!("unknown mode {other:?}; the modes are {MODES:?}"),
    }
}

/// An axum server on a loopback port with the route of `mode`, and a client op that sends one
/// request over a kept-alive connection (one per task) and reads the whole response.
fn http(mode: &str, runtime: &Runtime, server: Option<&RedisServer>) -> Op {
    use axum::Router;
    use axum::routing::post;
    use std::cell::RefCell;
    use std::rc::Rc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower_lock::key::PathSegment;

    async fn ok() -> &'static str {
        "ok"
    }
    let route = match mode {
        "http-unlocked" => post(ok),
        "http-memory" => {
            post(ok).route_layer(LockLayer::new(MemoryBackend::new(), PathSegment::new(1)))
        }
        _ => {
            let url = server.expect("a redis-server").url();
            let backend = runtime
                .block_on(RedisBackend::connect(&url))
                .expect("connect");
            post(ok).route_layer(LockLayer::new(backend, PathSegment::new(1)))
        }
    };
    let app = Router::new().route("/r/{key}", route);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let address = listener.local_addr().expect("address");
    runtime.spawn(async move { axum::serve(listener, app).await });
    let idle: Rc<RefCell<Vec<tokio::net::TcpStream>>> = Rc::default();
    op(move |key: Arc<Key>| {
        let idle = idle.clone();
        async move {
            let pooled = idle.borrow_mut().pop();
            let mut stream = match pooled {
                Some(stream) => stream,
                None => tokio::net::TcpStream::connect(address)
                    .await
                    .expect("connect"),
            };
            let request = format!(
                "POST /r/{} HTTP/1.1\r\nhost: bench\r\ncontent-length: 0\r\n\r\n",
                key.header.to_str().unwrap_or_default()
            );
            if stream.write_all(request.as_bytes()).await.is_err() {
                return false;
            }
            // Read the head, then as many body bytes as it announces.
            let mut response = Vec::with_capacity(256);
            let mut chunk = [0u8; 512];
            loop {
                let Ok(n) = stream.read(&mut chunk).await else {
                    return false;
                };
                if n == 0 {
                    return false;
                }
                response.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&response);
                if let Some(end) = text.find("\r\n\r\n") {
                    let length: usize = text[..end]
                        .lines()
                        .find_map(|line| {
                            let (name, value) = line.split_once(':')?;
                            name.eq_ignore_ascii_case("content-length")
                                .then(|| value.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if response.len() >= end + 4 + length {
                        break;
                    }
                }
            }
            let ok = response.starts_with(b"HTTP/1.1 200");
            idle.borrow_mut().push(stream);
            ok
        }
    })
}

/// Runs `ops` pairs as `concurrency` local tasks, each on its own key; the failures.
fn run(runtime: &Runtime, op: &Op, ops: u64, concurrency: usize, tag: &str) -> u64 {
    let local = tokio::task::LocalSet::new();
    local.block_on(runtime, async {
        let tasks: Vec<_> = (0..concurrency)
            .map(|task| {
                let key = Arc::new(Key::new(&format!("{tag}-t{task}")));
                let share =
                    ops / concurrency as u64 + u64::from((task as u64) < ops % concurrency as u64);
                let op = op.clone();
                tokio::task::spawn_local(async move {
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
        failures
    })
}

/// Asks `server` to shut down and waits until it is gone, so that a redis-server run under
/// callgrind writes its counts (a SIGKILL, which the harness sends on drop, would lose them).
fn shut_down(runtime: &Runtime, server: &RedisServer) {
    runtime.block_on(async {
        let mut connection = server.connection().await;
        let _: Result<(), _> = redis::cmd("SHUTDOWN")
            .arg("NOSAVE")
            .query_async(&mut connection)
            .await;
    });
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", server.port())).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // callgrind writes its file after the sockets close.
    std::thread::sleep(Duration::from_secs(3));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let positional: Vec<&String> = args
        .iter()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let runtime = common::current_thread();
    if smoke {
        let server = RedisServer::start();
        for mode in MODES {
            let op = build(mode, &runtime, Some(&server));
            let failures = run(&runtime, &op, 50, 2, mode);
            assert_eq!(failures, 0, "{mode}: failed pairs");
        }
        println!("instructions: smoke run of {MODES:?} passed");
        return;
    }
    let mode = positional.first().map_or("layer-off", |m| m.as_str());
    let ops: u64 = positional.get(1).map_or(1000, |n| n.parse().expect("OPS"));
    let concurrency: usize = positional
        .get(2)
        .map_or(1, |n| n.parse().expect("CONCURRENCY"));
    let in_process = matches!(mode, "bare" | "memory" | "http-unlocked" | "http-memory");
    let server = (!in_process).then(RedisServer::start);
    let op = build(mode, &runtime, server.as_ref());
    // Warm-up: connection, script cache, the renewal task, the allocator's pools.
    let mut failures = run(&runtime, &op, 200, concurrency, "warm");
    let counter = alloc::Counter::start();
    failures += run(&runtime, &op, ops, concurrency, "run");
    let allocs = counter.read();
    drop(counter);
    println!(
        "{mode}: {ops} pairs at concurrency {concurrency}, {failures} failed; {:.1} allocations, \
         {:.0} bytes per pair",
        allocs.allocations as f64 / ops as f64,
        allocs.allocated_bytes as f64 / ops as f64
    );
    if let Some(server) = &server
        && std::env::var_os("INSTRUCTIONS_SHUTDOWN").is_some()
    {
        shut_down(&runtime, server);
    }
}
