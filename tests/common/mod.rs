//! Test harness: real `redis-server` processes on free loopback ports, the two backends every
//! behaviour runs on ([`Fixture`], `suite!`), and what the suites share: requests, responses and
//! handlers ([`requests`]), a test backend around a real one ([`backends`]), captured logs
//! ([`logs`]).
//!
//! Each [`RedisServer`] runs its own `redis-server` (no persistence unless asked, its own temp
//! dir), waits for `PING`, and can be stopped, restarted on the same port, paused (`SIGSTOP`) and
//! resumed. It is killed when dropped. The machine's own Redis on 6379 is never used.
#![allow(dead_code, unused_macros)]

pub mod backends;
pub mod cluster;
pub mod logs;
pub mod redlock;
pub mod requests;
#[cfg(feature = "sentinel")]
pub mod sentinel;
pub mod tls;

// Not every suite (nor the benches, which include this file) uses them.
#[allow(unused_imports)]
pub use requests::*;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tower_lock::backend::{Acquire, AcquireOptions, LockName, LockToken};
use tower_lock::key::{Header, LockKey};
use tower_lock::{LockBackend, LockLayer, LockRoutes, MemoryBackend, RedisBackend};

pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    /// The options after `--port`, `--bind` and `--dir`, kept for `restart`.
    args: Vec<String>,
    child: Option<Child>,
}

/// What every server is started with: no persistence (later arguments override it).
const NO_PERSISTENCE: [&str; 4] = ["--save", "", "--appendonly", "no"];

impl RedisServer {
    /// A fresh server without persistence.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A fresh server with AOF persistence (`appendfsync always`), for restart tests.
    pub fn start_with_aof() -> Self {
        Self::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    /// A fresh server without persistence, configured further by `args`: `redis-server`
    /// command-line options (`["--maxmemory-policy", "allkeys-lru"]`), which take precedence.
    pub fn start_with(args: &[&str]) -> Self {
        Self::start_with_each(|| args.iter().map(|arg| arg.to_string()).collect())
    }

    /// As [`start_with`](Self::start_with), with the arguments of each attempt made by `args`:
    /// a port among them (`--tls-port`, whose cluster bus is that port + 10000) is picked again
    /// for the next attempt, so that a port another test took between its pick and the start
    /// does not fail every attempt. [`arg_port`](Self::arg_port) reads the one that was used.
    pub fn start_with_each(args: impl Fn() -> Vec<String>) -> Self {
        let mut last_error = String::new();
        for _ in 0..10 {
            let port = free_port();
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let dir = std::env::temp_dir().join(format!(
                "tower-lock-test-{}-{port}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).expect("create redis temp dir");
            let mut server = Self {
                port,
                dir,
                args: NO_PERSISTENCE
                    .iter()
                    .map(|s| s.to_string())
                    .chain(args())
                    .collect(),
                child: None,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(error) => last_error = error,
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    /// The port this server was started with for `flag` (`"--tls-port"`), if it was given one.
    pub fn arg_port(&self, flag: &str) -> Option<u16> {
        let at = self.args.iter().rposition(|arg| arg == flag)?;
        self.args.get(at + 1)?.parse().ok()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let mut child = Command::new(&binary)
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{binary}: {e} (install redis-server, or set REDIS_SERVER)"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("redis-server exited early: {status}"));
            }
            if ping(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err("redis-server did not answer PING within 10 s".into())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// Whether the process runs (it was not stopped, or was restarted since).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server (SIGKILL, after a SIGCONT in case it is paused). Nothing holds its port
    /// meanwhile: `restart` takes the same one again, retrying while it is not free yet.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory, with the same options (AOF files
    /// survive); panics if it does not answer within 10 s.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(error) if Instant::now() > deadline => panic!("restart failed: {error}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Freezes the process (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        signal(self.pid(), "-STOP");
    }

    /// Thaws a paused process (SIGCONT).
    pub fn resume(&self) {
        signal(self.pid(), "-CONT");
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("redis url")
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }

    /// Lock keys (not fencing counters) currently stored under
    /// `namespace`.
    pub async fn lock_keys(&self, namespace: &str) -> Vec<String> {
        let mut connection = self.connection().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{namespace}*"))
            .query_async(&mut connection)
            .await
            .expect("KEYS");
        keys.into_iter()
            .filter(|k| !k.ends_with(":fence"))
            .collect()
    }

    /// How many times `command` (lower case, e.g. `evalsha`) has been called on the server since
    /// it started (`INFO commandstats`); 0 if never.
    pub async fn command_calls(&self, command: &str) -> u64 {
        let mut connection = self.connection().await;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut connection)
            .await
            .expect("INFO");
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free loopback port")
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

fn signal(pid: u32, which: &str) {
    let status = Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {which} {pid} failed");
}

/// A runtime of `workers` threads, with I/O and time.
pub fn multi_thread(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

/// A runtime on the current thread (it runs only inside its `block_on`), with I/O and time.
pub fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Polls `check` every 20 ms until it is true (`true`) or `within` has passed (`false`).
pub async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub const NS: &str = "test-lock:";

/// A backend under test and a way to count the locks it holds.
pub trait Fixture: Sized + Send + Sync + 'static {
    type Backend: LockBackend;
    fn start() -> impl std::future::Future<Output = Self> + Send;
    fn backend(&self) -> Self::Backend;
    /// Another client of the same store (on Redis: its own connection).
    fn new_client(&self) -> Self::Backend;
    /// How many locks are held now (on Redis: lock keys in the test namespace [`NS`]).
    fn held(&self) -> impl std::future::Future<Output = usize> + Send;
    /// Deletes a lock behind its holder's back (Redis `DEL`).
    fn delete(&self, name: &LockName) -> impl std::future::Future<Output = ()> + Send;
}

pub struct Redis {
    pub server: RedisServer,
    pub backend: RedisBackend,
}

impl Fixture for Redis {
    type Backend = RedisBackend;
    async fn start() -> Self {
        let server = RedisServer::start();
        let backend = RedisBackend::connect(&server.url()).await.unwrap();
        Self { server, backend }
    }
    fn backend(&self) -> RedisBackend {
        self.backend.clone()
    }
    fn new_client(&self) -> RedisBackend {
        RedisBackend::from_url(&self.server.url()).unwrap()
    }
    async fn held(&self) -> usize {
        self.server.lock_keys(NS).await.len()
    }
    async fn delete(&self, name: &LockName) {
        let mut connection = self.server.connection().await;
        let _: i64 = redis::cmd("DEL")
            .arg(name.lock_key())
            .query_async(&mut connection)
            .await
            .unwrap();
    }
}

pub struct Memory(pub MemoryBackend);

impl Fixture for Memory {
    type Backend = MemoryBackend;
    async fn start() -> Self {
        Self(MemoryBackend::new())
    }
    fn backend(&self) -> MemoryBackend {
        self.0.clone()
    }
    fn new_client(&self) -> MemoryBackend {
        self.0.clone()
    }
    async fn held(&self) -> usize {
        self.0.held()
    }
    async fn delete(&self, name: &LockName) {
        self.0.remove(name);
    }
}

/// The layer the suites use: keyed by the `x-key` header, in the test namespace.
pub fn layer<F: Fixture>(fixture: &F) -> LockLayer<Header, F::Backend> {
    layer_on(fixture.backend())
}

/// The same layer on another backend (a wrapper of the fixture's).
pub fn layer_on<B: LockBackend>(backend: B) -> LockLayer<Header, B> {
    LockLayer::new(backend, Header::new("x-key")).namespace(NS)
}

/// A route table on the fixture's backend, in the test namespace.
pub fn table<F: Fixture>(fixture: &F) -> LockRoutes<F::Backend> {
    LockRoutes::new(fixture.backend()).defaults(|layer| layer.namespace(NS))
}

/// The name [`layer`] gives the lock of `key`.
pub fn lock_name(key: &str) -> LockName {
    layer_on(MemoryBackend::new()).lock_name(&LockKey::new(key))
}

/// Another holder takes `name` behind the layer's back (a 30 s lease); panics if it is held.
pub async fn take_over<F: Fixture>(fixture: &F, name: &LockName) {
    let acquired = fixture
        .backend()
        .acquire(
            name,
            LockToken::random(),
            AcquireOptions::new(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    assert!(matches!(acquired, Acquire::Acquired { .. }), "{acquired:?}");
}

/// Waits until `n` locks are held.
pub async fn until_held<F: Fixture>(fixture: &F, n: usize) {
    assert!(
        eventually(Duration::from_secs(5), async || fixture.held().await == n).await,
        "expected {n} held locks, found {}",
        fixture.held().await
    );
}

/// Runs each behaviour once per backend: `suite!(test_a, test_b)` makes the tests
/// `redis_backend::test_a`, `memory_backend::test_a`, `cluster_backend::test_a`,
/// `redlock_backend::test_a` and, with the `sentinel` feature, `sentinel_backend::test_a` (on a
/// two-worker runtime), calling the including file's
/// `async fn test_a<F: Fixture>()` with each backend's fixture. `suite!(redis_and_memory: …)`
/// runs them on one Redis and in process only; `suite!(pushed: …)` on the backends that push
/// wake-ups to waiters (one Redis, in process, Cluster).
macro_rules! suite {
    (redis_and_memory: $($test:ident),* $(,)?) => {
        suite!(@on {
            redis_backend: crate::common::Redis;
            memory_backend: crate::common::Memory;
        } $($test),*);
    };
    (pushed: $($test:ident),* $(,)?) => {
        suite!(@on {
            redis_backend: crate::common::Redis;
            memory_backend: crate::common::Memory;
            cluster_backend: crate::common::cluster::Cluster;
        } $($test),*);
    };
    ($($test:ident),* $(,)?) => {
        suite!(@on {
            redis_backend: crate::common::Redis;
            memory_backend: crate::common::Memory;
            cluster_backend: crate::common::cluster::Cluster;
            redlock_backend: crate::common::redlock::Redlock;
        } $($test),*);
        // With the `sentinel` feature, on a Sentinel-managed primary too.
        #[cfg(feature = "sentinel")]
        suite!(@on {
            sentinel_backend: crate::common::sentinel::Sentinel;
        } $($test),*);
    };
    (@on { } $($test:ident),*) => {};
    (@on { $module:ident: $fixture:path; $($rest:tt)* } $($test:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test::<$fixture>().await;
                }
            )*
        }
        suite!(@on { $($rest)* } $($test),*);
    };
}

/// The same for behaviours that run their own runtimes: `blocking_suite!(name => case)` makes
/// the plain tests `name::redis_backend`, `name::memory_backend`, `name::cluster_backend` and
/// `name::redlock_backend`, calling the including file's `fn case<F: Fixture>()` with each
/// backend's fixture.
macro_rules! blocking_suite {
    ($($name:ident => $case:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn redis_backend() {
                    super::$case::<crate::common::Redis>();
                }

                #[test]
                fn memory_backend() {
                    super::$case::<crate::common::Memory>();
                }

                #[test]
                fn cluster_backend() {
                    super::$case::<crate::common::cluster::Cluster>();
                }

                #[test]
                fn redlock_backend() {
                    super::$case::<crate::common::redlock::Redlock>();
                }

                #[cfg(feature = "sentinel")]
                #[test]
                fn sentinel_backend() {
                    super::$case::<crate::common::sentinel::Sentinel>();
                }
            }
        )*
    };
}
