//! The verification suite's machinery (issue 12): a [`World`] of the lock backend's harness
//! Redis nodes ([`Backend`]: one Redis, Redlock's independent primaries, or a Redis Cluster with
//! replicas), a fault-injecting [`proxy::Proxy`] per server and node (not on a Cluster, whose
//! client follows the addresses the nodes announce), 2–3 verification server processes
//! ([`fleet`], [`server`]), clients over real HTTP ([`load`]), and the checkers ([`check`])
//! that turn a run into one row of the reliability table ([`Row`]).
//!
//! Short by default (CI); `TOWER_LOCK_SOAK=1` repeats each scenario's fault cycle until
//! `TOWER_LOCK_SOAK_REQUESTS` requests (default 100 000) have been sent, and
//! `TOWER_LOCK_VERIFY_TABLE=path` appends each scenario's row to `path` (`scripts/soak`).
#![allow(dead_code)]

pub mod check;
pub mod fleet;
pub mod load;
pub mod proxy;
pub mod server;

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::common::RedisServer;
use crate::common::cluster::RedisCluster;
use fleet::{ServerConfig, ServerProcess};
use load::{Load, Outcome, Record};
use proxy::Proxy;

/// Whether this is a soak run.
pub fn soak() -> bool {
    std::env::var("TOWER_LOCK_SOAK").is_ok_and(|v| v == "1")
}

/// Requests each scenario sends at least: a few thousand in CI, `TOWER_LOCK_SOAK_REQUESTS`
/// (default 100 000) in a soak.
pub fn target_requests(ci: u64) -> u64 {
    if soak() {
        std::env::var("TOWER_LOCK_SOAK_REQUESTS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(100_000)
    } else {
        ci
    }
}

/// The lock backend the servers use, and the harness nodes it runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// One Redis (`RedisBackend`), which also holds the counters.
    Single,
    /// `RedlockBackend` over this many independent primaries; the counters in a Redis of their
    /// own.
    Redlock(usize),
    /// `RedisClusterBackend` on a cluster of 3 primaries with one replica each, with this
    /// `cluster-node-timeout` (ms); the counters in a Redis of their own.
    Cluster(u64),
}

/// How a world is set up.
#[derive(Clone, Debug)]
pub struct Setup {
    pub servers: usize,
    pub ttl: Duration,
    /// Extra `redis-server` options (AOF for the restart scenario, the DEBUG command), for the
    /// single Redis and the Redlock nodes.
    pub redis_args: Vec<&'static str>,
    pub unlocked: bool,
    pub backend: Backend,
    /// How long the final leak check waits for the lock keys to go; by default a lease and
    /// 3 s (for those of killed holders). Shorter than the lease, it catches locks that only
    /// their TTL would have freed.
    pub leak_grace: Option<Duration>,
    /// The recovery [`Row::assert_safe`] allows after each fault.
    pub recovery_bound: Duration,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            servers: 3,
            ttl: Duration::from_millis(1000),
            redis_args: vec!["--enable-debug-command", "yes"],
            unlocked: false,
            backend: Backend::Single,
            leak_grace: None,
            recovery_bound: Duration::from_secs(5),
        }
    }
}

/// The lock backend's harness nodes.
pub enum Nodes {
    /// One Redis, or Redlock's independent primaries.
    Plain(Vec<RedisServer>),
    Cluster(RedisCluster),
}

impl Nodes {
    pub fn servers(&self) -> &[RedisServer] {
        match self {
            Self::Plain(servers) => servers,
            Self::Cluster(cluster) => &cluster.nodes,
        }
    }

    pub fn servers_mut(&mut self) -> &mut [RedisServer] {
        match self {
            Self::Plain(servers) => servers,
            Self::Cluster(cluster) => &mut cluster.nodes,
        }
    }

    /// The cluster; panics on other backends.
    pub fn cluster(&self) -> &RedisCluster {
        match self {
            Self::Cluster(cluster) => cluster,
            Self::Plain(_) => panic!("not a cluster world"),
        }
    }
}

/// The default load: 24 clients on 3 hot keys, a 3 ms hold, a 10 s client timeout.
pub fn default_load() -> Load {
    Load {
        clients: 24,
        keys: vec!["hot-a".into(), "hot-b".into(), "hot-c".into()],
        hold_ms: 3,
        timeout: Duration::from_secs(10),
    }
}

/// The lock backend's nodes, the store, the proxies and the servers, timed from `start`.
pub struct World {
    pub setup: Setup,
    pub nodes: Arc<tokio::sync::Mutex<Nodes>>,
    /// The nodes' direct URLs, in the order of [`Nodes::servers`] (ports survive restarts).
    pub node_urls: Vec<String>,
    /// The counters' Redis when it is not the lock's (multi-node backends).
    store: Option<RedisServer>,
    pub store_url: String,
    /// `proxies[server][node]`: server `server`'s way to node `node` (none on a Cluster).
    pub proxies: Vec<Vec<Proxy>>,
    pub servers: Vec<ServerProcess>,
    /// Hot keys for [`World::load`]: on a Cluster, one per primary.
    pub hot_keys: Vec<String>,
    /// The keys of the running load ([`load::Record::key`] indexes them).
    pub load_keys: Vec<String>,
    pub start: Instant,
    pub dir: PathBuf,
    /// When a fault ended (Redis back, proxy healed …), from `start`, and the load keys it
    /// affected (`None`: all of them).
    pub fault_ends: Vec<(Duration, Option<Vec<String>>)>,
    /// Servers killed, and when (system clock ns, for the histories).
    pub killed_at: HashMap<usize, u128>,
    /// Servers whose connection failures are expected (killed or frozen on purpose).
    pub victims: Vec<usize>,
    /// Extra requests the scenario made itself (the storm's), and their records.
    pub extra: Vec<Record>,
    /// Requests the scenario sent and cancelled itself (the storm's), which have no record.
    pub cancelled: u64,
    /// Lease-lost and stale-write figures a scenario requires at least.
    pub require_refused_stale: u64,
}

impl World {
    pub async fn start(setup: Setup) -> Self {
        let (nodes, store) = tokio::task::spawn_blocking({
            let (args, backend) = (setup.redis_args.clone(), setup.backend);
            move || match backend {
                Backend::Single => (Nodes::Plain(vec![RedisServer::start_with(&args)]), None),
                Backend::Redlock(n) => (
                    Nodes::Plain((0..n).map(|_| RedisServer::start_with(&args)).collect()),
                    Some(RedisServer::start()),
                ),
                Backend::Cluster(node_timeout_ms) => (
                    Nodes::Cluster(RedisCluster::start(3, 1, node_timeout_ms)),
                    Some(RedisServer::start()),
                ),
            }
        })
        .await
        .expect("start redis");
        let node_urls: Vec<String> = nodes.servers().iter().map(RedisServer::url).collect();
        let ports: Vec<u16> = nodes.servers().iter().map(RedisServer::port).collect();
        let store_url = store
            .as_ref()
            .map_or_else(|| node_urls[0].clone(), RedisServer::url);
        let dir = std::env::temp_dir().join(format!(
            "tower-lock-verify-{}-{}",
            std::process::id(),
            ports[0]
        ));
        std::fs::create_dir_all(&dir).expect("scenario dir");
        let mut proxies: Vec<Vec<Proxy>> = Vec::new();
        for _ in 0..setup.servers {
            let mut mine = Vec::new();
            if !matches!(setup.backend, Backend::Cluster(_)) {
                for &port in &ports {
                    mine.push(Proxy::start(port).await);
                }
            }
            proxies.push(mine);
        }
        let (lock_backend, lock_urls): (&'static str, Vec<String>) = match setup.backend {
            Backend::Single => ("redis", proxies.iter().map(|p| p[0].url()).collect()),
            Backend::Redlock(_) => (
                "redlock",
                proxies
                    .iter()
                    .map(|p| p.iter().map(Proxy::url).collect::<Vec<_>>().join(","))
                    .collect(),
            ),
            Backend::Cluster(_) => ("cluster", vec![node_urls.join(","); setup.servers]),
        };
        let hot_keys = match &nodes {
            Nodes::Cluster(cluster) => spread_keys(cluster).await,
            Nodes::Plain(_) => default_load().keys,
        };
        let servers: Vec<ServerProcess> = tokio::task::spawn_blocking({
            let (dir, setup, store_url) = (dir.clone(), setup.clone(), store_url.clone());
            move || {
                lock_urls
                    .into_iter()
                    .enumerate()
                    .map(|(index, lock_url)| {
                        let config = ServerConfig {
                            lock_backend,
                            lock_url,
                            store_url: store_url.clone(),
                            ttl: setup.ttl,
                            unlocked: setup.unlocked,
                        };
                        ServerProcess::start(index, &dir, &config)
                    })
                    .collect()
            }
        })
        .await
        .expect("start servers");
        warm_up(&servers).await;
        Self {
            setup,
            nodes: Arc::new(tokio::sync::Mutex::new(nodes)),
            node_urls,
            store,
            store_url,
            proxies,
            servers,
            hot_keys,
            load_keys: Vec::new(),
            start: Instant::now(),
            dir,
            fault_ends: Vec::new(),
            killed_at: HashMap::new(),
            victims: Vec::new(),
            extra: Vec::new(),
            cancelled: 0,
            require_refused_stale: 0,
        }
    }

    pub fn bases(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.url("")).collect()
    }

    pub fn start_load(&self, load: &Load) -> load::Running {
        load::start(load, self.bases(), self.start)
    }

    /// The default load on [`World::hot_keys`].
    pub fn load(&self) -> Load {
        Load {
            keys: self.hot_keys.clone(),
            ..default_load()
        }
    }

    /// Marks the end of a fault: recovery is measured from here.
    pub fn fault_ended(&mut self) {
        self.fault_ends.push((self.start.elapsed(), None));
    }

    /// Marks the end of (or, for a fault the backend heals on its own, the moment of) a fault
    /// that affects only the load keys `keys`: recovery is measured from here, on those keys.
    pub fn fault_ended_for(&mut self, keys: Vec<String>) {
        self.fault_ends.push((self.start.elapsed(), Some(keys)));
    }

    /// Runs a blocking operation on the (single) Redis process (stop, restart, pause, resume).
    pub async fn on_redis(&self, operation: impl FnOnce(&mut RedisServer) + Send + 'static) {
        self.on_node(0, operation).await;
    }

    /// Runs a blocking operation on the lock backend's node `i`.
    pub async fn on_node(
        &self,
        i: usize,
        operation: impl FnOnce(&mut RedisServer) + Send + 'static,
    ) {
        let nodes = self.nodes.clone();
        tokio::task::spawn_blocking(move || operation(&mut nodes.blocking_lock().servers_mut()[i]))
            .await
            .expect("redis operation");
    }

    /// Runs a blocking operation on the cluster (a Cluster world only).
    pub async fn on_cluster<T: Send + 'static>(
        &self,
        operation: impl FnOnce(&mut RedisCluster) -> T + Send + 'static,
    ) -> T {
        let nodes = self.nodes.clone();
        tokio::task::spawn_blocking(move || match &mut *nodes.blocking_lock() {
            Nodes::Cluster(cluster) => operation(cluster),
            Nodes::Plain(_) => panic!("not a cluster world"),
        })
        .await
        .expect("cluster operation")
    }

    /// The servers' warnings so far (their stderr), each kind once with its count, without
    /// timestamps and lock ids: why they answered 503, say.
    pub fn warnings(&self) -> String {
        let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
        for server in &self.servers {
            let path = self.dir.join(format!("server-{}.stderr", server.index));
            let text = std::fs::read_to_string(path).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains("WARN")) {
                let message = line.split_once("WARN").map_or(line, |(_, m)| m);
                let message: Vec<&str> = message
                    .split(' ')
                    .filter(|w| !w.starts_with("lock="))
                    .collect();
                *counts.entry(message.join(" ")).or_default() += 1;
            }
        }
        counts
            .into_iter()
            .map(|(message, n)| format!("{n} ×{message}\n"))
            .collect()
    }

    /// An admin connection to the harness Redis (node 0, direct, not through a proxy), without
    /// a response timeout (`DEBUG SLEEP` answers when it is over).
    pub async fn admin(&self) -> redis::aio::MultiplexedConnection {
        connect(&self.node_urls[0], None)
            .await
            .expect("admin connection")
    }

    /// An admin connection to node `i` (direct), or `None` if it does not answer within 1 s
    /// (stopped, paused); calls on it time out after 2 s.
    pub async fn node_admin(&self, i: usize) -> Option<redis::aio::MultiplexedConnection> {
        let connecting = connect(&self.node_urls[i], Some(Duration::from_secs(2)));
        let mut connection = tokio::time::timeout(Duration::from_secs(1), connecting)
            .await
            .ok()?
            .ok()?;
        let ping = redis::cmd("PING");
        let pong = ping.query_async::<String>(&mut connection);
        tokio::time::timeout(Duration::from_secs(1), pong)
            .await
            .ok()?
            .ok()?;
        Some(connection)
    }

    /// Lock keys of the verification servers (not fencing counters) on every node that answers
    /// (each key once).
    pub async fn lock_keys(&self) -> Vec<String> {
        let mut all = Vec::new();
        for i in 0..self.node_urls.len() {
            all.extend(self.lock_keys_on(i).await.unwrap_or_default());
        }
        all.sort();
        all.dedup();
        all
    }

    /// Lock keys (not fencing counters) on node `i`; `None` if it does not answer.
    pub async fn lock_keys_on(&self, i: usize) -> Option<Vec<String>> {
        let mut admin = self.node_admin(i).await?;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", server::NAMESPACE))
            .query_async(&mut admin)
            .await
            .ok()?;
        Some(
            keys.into_iter()
                .filter(|k| !k.ends_with(":fence"))
                .collect(),
        )
    }

    /// The counters: key → value.
    pub async fn counters(&self) -> HashMap<String, u64> {
        let mut admin = connect(&self.store_url, None)
            .await
            .expect("store connection");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", server::DATA_PREFIX))
            .query_async(&mut admin)
            .await
            .expect("KEYS");
        let mut counters = HashMap::new();
        for key in keys {
            let value: Option<u64> = redis::cmd("HGET")
                .arg(&key)
                .arg("value")
                .query_async(&mut admin)
                .await
                .expect("HGET");
            let name = key.trim_start_matches(server::DATA_PREFIX).to_owned();
            counters.insert(name, value.unwrap_or(0));
        }
        counters
    }

    /// Drives `cycle` (one round of the scenario's fault) under `load` until at least
    /// `requests` have been sent (one cycle in CI; repeated in a soak), then checks everything.
    pub async fn run(
        mut self,
        name: &str,
        load: &Load,
        requests: u64,
        mut cycle: impl AsyncFnMut(&mut World),
    ) -> Row {
        self.load_keys = load.keys.clone();
        let running = self.start_load(load);
        loop {
            cycle(&mut self).await;
            if running.sent() >= requests {
                break;
            }
            if !soak() {
                // The rest of the requests without faults; bounded, should the load stall.
                let deadline = Instant::now() + Duration::from_secs(60);
                while running.sent() < requests && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                break;
            }
        }
        let records = running.finish().await;
        self.finish(name, records).await
    }

    /// Stops nothing: waits for the locks to go (at most a lease and 3 s), then checks.
    pub async fn finish(mut self, name: &str, mut records: Vec<Record>) -> Row {
        records.append(&mut self.extra);
        let ended = self.start.elapsed();
        let grace = (self.setup.leak_grace).unwrap_or(self.setup.ttl + Duration::from_secs(3));
        let deadline = std::time::Instant::now() + grace;
        let mut leaked = self.lock_keys().await;
        let mut reported = false;
        while !leaked.is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            leaked = self.lock_keys().await;
            // Locks still there 3 s after the end: where they are, to tell a minority of nodes
            // from a majority.
            if !reported && !leaked.is_empty() && self.start.elapsed() > ended + LINGERING {
                reported = true;
                let mut per_node = Vec::new();
                for i in 0..self.node_urls.len() {
                    per_node.push(self.lock_keys_on(i).await);
                }
                println!(
                    "locks still held {LINGERING:?} after the requests ended, per node: {per_node:?}"
                );
            }
        }
        let locks_gone_after = self.start.elapsed().saturating_sub(ended);
        // Let every section's history line be written (a frozen server is resumed by now).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let histories: Vec<PathBuf> = self.servers.iter().map(|s| s.history.clone()).collect();
        let sections = check::sections(&histories);
        let overlaps = check::overlaps(&sections, &self.killed_at);
        let counters = self.counters().await;
        let updates = check::updates(&sections, &counters);

        let mut row = Row {
            name: name.to_owned(),
            requests: records.len() as u64 + self.cancelled,
            admitted: sections.len() as u64,
            leaked: leaked.len() as u64,
            leaked_keys: leaked,
            locks_gone_after,
            overlaps,
            updates,
            require_refused_stale: self.require_refused_stale,
            recovery_bound: self.setup.recovery_bound,
            ..Row::default()
        };
        for record in &records {
            let latency = record.finished.saturating_sub(record.sent);
            match record.outcome {
                Outcome::Status(200) => row.ok += 1,
                Outcome::Status(409) => row.conflict += 1,
                Outcome::Status(503) => {
                    row.unavailable += 1;
                    row.first_503 = Some(
                        row.first_503
                            .map_or(record.sent, |t: Duration| t.min(record.sent)),
                    );
                    row.last_503 = row.last_503.max(record.finished);
                    row.max_503_latency = row.max_503_latency.max(latency);
                }
                Outcome::Status(other) => {
                    row.other += 1;
                    row.other_statuses.push(other);
                }
                Outcome::TimedOut => row.timed_out += 1,
                Outcome::ConnectionFailed if self.victims.contains(&record.server) => {
                    row.victim_failures += 1
                }
                Outcome::ConnectionFailed => row.connection_failures += 1,
            }
            row.max_latency = row.max_latency.max(latency);
        }
        let recoveries: Vec<Option<Duration>> = self
            .fault_ends
            .iter()
            .map(|(end, keys)| {
                // Only the load's requests on the keys the fault affected, if it named them.
                let affected: Vec<Record> = records
                    .iter()
                    .filter(|r| {
                        keys.as_ref().is_none_or(|keys| {
                            r.key.is_some_and(|k| keys.contains(&self.load_keys[k]))
                        })
                    })
                    .copied()
                    .collect();
                recovery(&affected, *end, self.servers.len(), &self.victims)
            })
            .collect();
        row.recovery = recoveries.iter().flatten().copied().max();
        row.unrecovered = recoveries.iter().any(Option::is_none);
        row.publish();
        row
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Thaw anything a failed scenario left frozen, so that the processes can be killed.
        for server in &self.servers {
            server.resume();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "verification: histories and server logs kept in {}",
                self.dir.display()
            );
        }
    }
}

/// A connection to `url` with this response timeout.
async fn connect(
    url: &str,
    response_timeout: Option<Duration>,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(response_timeout);
    redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// Hot keys whose locks land on the cluster's primaries, one on each (`hot-<n>`).
async fn spread_keys(cluster: &RedisCluster) -> Vec<String> {
    let primaries = cluster.primaries().await;
    let mut keys = Vec::new();
    let mut covered = Vec::new();
    for n in 0.. {
        let key = format!("hot-{n}");
        let slot = cluster.slot(&lock_key(&key)).await;
        let primary = cluster.primary_of_slot(slot).await;
        if !covered.contains(&primary) {
            covered.push(primary);
            keys.push(key);
        }
        if covered.len() == primaries.len() {
            break;
        }
    }
    keys
}

/// The lock key of the load's key `key`.
pub fn lock_key(key: &str) -> String {
    format!("{}{{counter:{key}}}", server::NAMESPACE)
}

/// How long after the requests end a lock still held is reported, with its nodes.
const LINGERING: Duration = Duration::from_secs(3);

/// Waits until every server has answered one request other than 503 (their Redis connections
/// are opened lazily, by the first request), at most 20 s.
async fn warm_up(servers: &[ServerProcess]) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    for server in servers {
        let url = server.url(&format!("/incr/warm-up-{}", server.index));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let answered = client.post(&url).send().await;
            if answered.is_ok_and(|r| r.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// From `end`, how long until every live server answered something other than 503 to a
/// request sent after `end`; `None` if one never did.
fn recovery(
    records: &[Record],
    end: Duration,
    servers: usize,
    victims: &[usize],
) -> Option<Duration> {
    let mut worst = Duration::ZERO;
    for server in (0..servers).filter(|s| !victims.contains(s)) {
        let first = records
            .iter()
            .filter(|r| r.server == server && r.sent >= end)
            .filter(|r| matches!(r.outcome, Outcome::Status(status) if status != 503))
            .map(|r| r.finished)
            .min()?;
        worst = worst.max(first.saturating_sub(end));
    }
    Some(worst)
}

/// One scenario's figures.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub name: String,
    /// Requests sent (the load's, the scenario's own, and those it cancelled).
    pub requests: u64,
    /// Requests that entered the handler (held the lock).
    pub admitted: u64,
    pub ok: u64,
    pub conflict: u64,
    pub unavailable: u64,
    pub other: u64,
    pub other_statuses: Vec<u16>,
    pub timed_out: u64,
    pub connection_failures: u64,
    pub victim_failures: u64,
    pub overlaps: check::Overlaps,
    pub updates: check::Updates,
    pub leaked: u64,
    pub leaked_keys: Vec<String>,
    pub locks_gone_after: Duration,
    pub recovery: Option<Duration>,
    pub unrecovered: bool,
    pub max_latency: Duration,
    pub max_503_latency: Duration,
    /// When the first 503'd request was sent and the last one answered, from the start.
    pub first_503: Option<Duration>,
    pub last_503: Duration,
    pub require_refused_stale: u64,
    /// The recovery [`Row::assert_safe`] allows (the setup's).
    pub recovery_bound: Duration,
}

/// The Markdown header of the table [`Row::markdown`] writes rows of.
pub const TABLE_HEADER: &str = "| scenario | requests | admitted | 200 | 409 | 503 | other / hung / conn. failed | overlaps (after a lost lease) | stale writes refused | lost updates | leaked locks | recovery | max 503 latency |\n|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|";

impl Row {
    pub fn markdown(&self) -> String {
        let recovery = match (self.recovery, self.unrecovered) {
            (_, true) => "never".to_owned(),
            (Some(d), false) => format!("{} ms", d.as_millis()),
            (None, false) => "–".to_owned(),
        };
        format!(
            "| {} | {} | {} | {} | {} | {} | {} / {} / {}{} | {} ({}) | {} | {} | {} | {} | {} ms |",
            self.name,
            self.requests,
            self.admitted,
            self.ok,
            self.conflict,
            self.unavailable,
            self.other,
            self.timed_out,
            self.connection_failures,
            if self.victim_failures > 0 {
                format!(" (+{} to the victim)", self.victim_failures)
            } else {
                String::new()
            },
            self.overlaps.unexcused,
            self.overlaps.after_lost_lease,
            self.updates.refused_stale,
            self.updates.lost + self.updates.phantom,
            self.leaked,
            recovery,
            self.max_503_latency.as_millis(),
        )
    }

    /// Prints the row (and appends it to `TOWER_LOCK_VERIFY_TABLE` if set).
    fn publish(&self) {
        println!("{TABLE_HEADER}\n{}", self.markdown());
        println!("details: {self:?}");
        let table = std::env::var("TOWER_LOCK_VERIFY_TABLE").ok();
        let file = table.and_then(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
        });
        if let Some(mut file) = file {
            let _ = writeln!(file, "{}", self.markdown());
        }
    }

    /// What every scenario must show: only 200/409/503, no hang, no unexcused overlap, no lost
    /// or phantom update, no leaked lock, work done, recovery after every fault (generous bound:
    /// the figure is in the table), 503s bounded by the configured timeouts.
    pub fn assert_safe(&self) {
        let context = self.markdown();
        assert_eq!(
            self.other, 0,
            "unexpected statuses {:?}: {context}",
            self.other_statuses
        );
        assert_eq!(
            self.timed_out, 0,
            "requests hung past the client timeout: {context}"
        );
        assert_eq!(
            self.connection_failures, 0,
            "connection failures to healthy servers: {context}"
        );
        assert_eq!(
            self.overlaps.unexcused, 0,
            "overlapping critical sections: {:?}: {context}",
            self.overlaps.examples
        );
        assert_eq!(
            self.updates.lost, 0,
            "lost updates: {:?}: {context}",
            self.updates
        );
        assert_eq!(
            self.updates.phantom, 0,
            "phantom updates: {:?}: {context}",
            self.updates
        );
        assert_eq!(
            self.leaked, 0,
            "leaked locks {:?}: {context}",
            self.leaked_keys
        );
        assert!(self.ok > 0, "nothing was admitted: {context}");
        assert!(
            !self.unrecovered,
            "a server never recovered after a fault: {context}"
        );
        if let Some(recovery) = self.recovery {
            assert!(recovery < self.recovery_bound, "slow recovery: {context}");
        }
        assert!(
            self.max_503_latency < Duration::from_secs(6),
            "a 503 took longer than the timeouts allow: {context}"
        );
        assert!(
            self.updates.refused_stale >= self.require_refused_stale,
            "expected at least {} stale writes refused by the fence: {context}",
            self.require_refused_stale
        );
    }
}
