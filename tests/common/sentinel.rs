//! Redis Sentinel for the tests: [`SentinelGroup`] (a primary, a replica and three sentinels on
//! loopback ports, all their own `redis-server` processes) and the [`Sentinel`] fixture, which
//! borrows a group from a per-process pool so that the suites do not start five processes per
//! test.
//!
//! The primary and the replica are [`RedisServer`]s (stop, pause, restart). Sentinels run
//! `redis-server sentinel.conf --sentinel` (Sentinel needs a config file it can rewrite), with
//! `down-after-milliseconds 1000`, a quorum of 2 and a short failover timeout. A watchdog shell
//! per group kills its processes when the test process exits, however it exits: pooled groups
//! live in a `static`, which is never dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tower_lock::RedisSentinelBackend;
use tower_lock::backend::LockName;

use super::{Fixture, NS, RedisServer, free_port, ping};

/// The name the sentinels monitor the group under.
pub const MASTER: &str = "tower-lock-test";

/// One `redis-server … --sentinel` process.
pub struct SentinelProcess {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl SentinelProcess {
    /// A sentinel on a free port monitoring `primary_port` as [`MASTER`].
    fn start(primary_port: u16) -> Self {
        Self::start_configured(primary_port, 2, String::new)
    }

    /// A sentinel monitoring `primary_port` with `quorum`, `extra()` appended to its config (TLS
    /// settings, say). `extra` runs again for each attempt: a port it names (`tls-port`) is
    /// picked again when an attempt fails.
    pub fn start_configured(primary_port: u16, quorum: u32, extra: impl Fn() -> String) -> Self {
        let mut last_error = String::new();
        for _ in 0..10 {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!(
                "tower-lock-sentinel-{}-{port}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ));
            std::fs::create_dir_all(&dir).expect("create sentinel temp dir");
            let config = dir.join("sentinel.conf");
            std::fs::write(
                &config,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                     sentinel monitor {MASTER} 127.0.0.1 {primary_port} {quorum}\n\
                     sentinel down-after-milliseconds {MASTER} 1000\n\
                     sentinel failover-timeout {MASTER} 3000\n\
                     sentinel parallel-syncs {MASTER} 1\n{extra}",
                    dir = dir.display(),
                    extra = extra(),
                ),
            )
            .expect("write sentinel.conf");
            let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
            let mut child = Command::new(&binary)
                .arg(&config)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server --sentinel");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_error = format!("sentinel exited early: {status}");
                    break;
                }
                if ping(port) {
                    return Self { port, dir, child };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = "sentinel did not answer PING within 10 s".into();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        panic!("could not start a sentinel: {last_error}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A primary, its replica and three sentinels watching them.
pub struct SentinelGroup {
    /// `servers[0]` starts as the primary, `servers[1]` as its replica; after a failover the
    /// roles may be swapped (see [`SentinelGroup::primary_port`]).
    pub servers: Vec<RedisServer>,
    pub sentinels: Vec<SentinelProcess>,
    watchdog: Child,
}

impl SentinelGroup {
    /// Starts the group and waits until the replica is in sync and every sentinel knows it.
    pub fn start() -> Self {
        let primary = RedisServer::start();
        let replica =
            RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port().to_string()]);
        let sentinels: Vec<SentinelProcess> = (0..3)
            .map(|_| SentinelProcess::start(primary.port()))
            .collect();
        let watchdog = watchdog(&[&primary, &replica], &sentinels);
        let group = Self {
            servers: vec![primary, replica],
            sentinels,
            watchdog,
        };
        group.wait_until_ready(Duration::from_secs(30));
        group
    }

    /// Waits until the replica's link is up and every sentinel sees the primary, its replica and
    /// the two other sentinels (so that it can reach the quorum and be elected); panics after
    /// `within`.
    fn wait_until_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let replica_up = self.servers[1]
                .client()
                .get_connection()
                .ok()
                .and_then(|mut c| {
                    redis::cmd("INFO")
                        .arg("replication")
                        .query::<String>(&mut c)
                        .ok()
                })
                .is_some_and(|info| info.contains("master_link_status:up"));
            let sentinels_ready = self.sentinels.iter().all(|sentinel| {
                let Some(mut connection) = redis::Client::open(sentinel.url())
                    .ok()
                    .and_then(|c| c.get_connection().ok())
                else {
                    return false;
                };
                let master: Vec<String> = redis::cmd("SENTINEL")
                    .arg("MASTER")
                    .arg(MASTER)
                    .query(&mut connection)
                    .unwrap_or_default();
                let field = |name: &str| {
                    master
                        .iter()
                        .position(|f| f == name)
                        .and_then(|i| master.get(i + 1))
                        .cloned()
                        .unwrap_or_default()
                };
                field("num-slaves") == "1" && field("num-other-sentinels") == "2"
            });
            if replica_up && sentinels_ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sentinel group not ready within {within:?} (replica up: {replica_up})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The sentinels' URLs.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(SentinelProcess::url).collect()
    }

    /// A backend on this group, connected now.
    pub async fn backend(&self) -> RedisSentinelBackend {
        RedisSentinelBackend::connect(self.sentinel_urls(), MASTER)
            .await
            .expect("a Sentinel backend on the test group")
    }

    /// The port the sentinels name as the primary now (`SENTINEL GET-MASTER-ADDR-BY-NAME` on the
    /// first sentinel that answers).
    pub async fn primary_port(&self) -> Option<u16> {
        for sentinel in &self.sentinels {
            let Ok(client) = redis::Client::open(sentinel.url()) else {
                continue;
            };
            let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
                continue;
            };
            let address: Result<(String, u16), _> = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER)
                .query_async(&mut connection)
                .await;
            if let Ok((_, port)) = address {
                return Some(port);
            }
        }
        None
    }

    /// The server on `port`.
    pub fn server(&self, port: u16) -> &RedisServer {
        self.servers.iter().find(|s| s.port() == port).unwrap()
    }

    /// The server the sentinels name as the primary.
    pub async fn primary(&self) -> &RedisServer {
        let port = self.primary_port().await.expect("a sentinel answers");
        self.server(port)
    }

    /// Lock keys (not fencing counters) under `prefix` on the primary.
    pub async fn lock_keys(&self, prefix: &str) -> Vec<String> {
        self.primary().await.lock_keys(prefix).await
    }

    /// Empties the primary (the replica follows).
    pub async fn flush(&self) {
        let mut connection = self.primary().await.connection().await;
        let () = redis::cmd("FLUSHALL")
            .query_async(&mut connection)
            .await
            .expect("FLUSHALL");
    }
}

impl Drop for SentinelGroup {
    fn drop(&mut self) {
        // The processes drop (and stop) themselves; the watchdog must not kill their pids later.
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}

/// A shell that waits for its stdin to close (this process exiting, or the group dropping it),
/// then kills the group's processes and removes their directories.
fn watchdog(servers: &[&RedisServer], sentinels: &[SentinelProcess]) -> Child {
    let pids: Vec<String> = servers
        .iter()
        .map(|s| s.pid().to_string())
        .chain(sentinels.iter().map(|s| s.child.id().to_string()))
        .collect();
    let dirs: Vec<String> = servers
        .iter()
        .map(|s| format!("'{}'", s.dir.display()))
        .chain(sentinels.iter().map(|s| format!("'{}'", s.dir.display())))
        .collect();
    let script = format!(
        "read _; kill -CONT {pids} 2>/dev/null; kill -9 {pids} 2>/dev/null; sleep 0.2; rm -rf {dirs}",
        pids = pids.join(" "),
        dirs = dirs.join(" ")
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the sentinel group watchdog")
}

/// Groups free for a [`Sentinel`] fixture to borrow.
static POOL: Mutex<Vec<SentinelGroup>> = Mutex::new(Vec::new());

/// A pooled group: emptied when borrowed, returned to the pool when dropped (unless its test
/// panicked).
pub struct Pooled(Option<SentinelGroup>);

impl Pooled {
    pub async fn take() -> Self {
        let pooled = POOL.lock().unwrap().pop();
        let group = match pooled {
            Some(group) => group,
            None => tokio::task::spawn_blocking(SentinelGroup::start)
                .await
                .expect("start a sentinel group"),
        };
        group.flush().await;
        Self(Some(group))
    }
}

impl std::ops::Deref for Pooled {
    type Target = SentinelGroup;
    fn deref(&self) -> &SentinelGroup {
        self.0.as_ref().unwrap()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(group) = self.0.take()
            && !std::thread::panicking()
            && let Ok(mut pool) = POOL.lock()
        {
            pool.push(group);
        }
    }
}

/// The Sentinel backend as a suite fixture: a pooled group, emptied for each test.
pub struct Sentinel {
    pub group: Pooled,
    pub backend: RedisSentinelBackend,
}

impl Fixture for Sentinel {
    type Backend = RedisSentinelBackend;
    async fn start() -> Self {
        let group = Pooled::take().await;
        let backend = group.backend().await;
        Self { group, backend }
    }
    fn backend(&self) -> RedisSentinelBackend {
        self.backend.clone()
    }
    fn new_client(&self) -> RedisSentinelBackend {
        RedisSentinelBackend::from_sentinels(self.group.sentinel_urls(), MASTER).unwrap()
    }
    async fn held(&self) -> usize {
        self.group.lock_keys(NS).await.len()
    }
    async fn delete(&self, name: &LockName) {
        let mut connection = self.group.primary().await.connection().await;
        let _: i64 = redis::cmd("DEL")
            .arg(name.lock_key())
            .query_async(&mut connection)
            .await
            .unwrap();
    }
}
