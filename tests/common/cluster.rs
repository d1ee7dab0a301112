//! Redis Cluster for the tests: [`RedisCluster`] (its own `redis-server --cluster-enabled yes`
//! processes, joined by `redis-cli --cluster create`) and the [`Cluster`] fixture, which borrows
//! one from a per-process pool so that the suites do not pay for a cluster start (about 2 s) per
//! test.
//!
//! Every node is a [`RedisServer`] (so it can be stopped, paused and restarted like one). A
//! watchdog shell per cluster kills its nodes when the test process exits, however it exits: the
//! pooled clusters live in a `static`, which is never dropped.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::cluster::ClusterClient;
use tower_lock::RedisClusterBackend;
use tower_lock::backend::LockName;

use super::{Fixture, NS, RedisServer};

/// A running Redis Cluster on loopback ports.
pub struct RedisCluster {
    /// Every node, in the order given to `redis-cli --cluster create` (which makes the first
    /// `primaries` of them the primaries).
    pub nodes: Vec<RedisServer>,
    watchdog: Child,
}

/// One node's line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub port: u16,
    pub primary: bool,
    pub failed: bool,
    /// Slot ranges, inclusive.
    pub slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    /// `primaries` primaries with `replicas` replicas each. `node_timeout_ms` is
    /// `cluster-node-timeout`: how long a node may be unreachable before a replica replaces it.
    pub fn start(primaries: usize, replicas: usize, node_timeout_ms: u64) -> Self {
        Self::start_inner(
            primaries,
            replicas,
            node_timeout_ms,
            |_| Vec::new(),
            &[],
            false,
        )
    }

    /// A cluster whose nodes listen for TLS on the `--tls-port` `node_args` gives them besides
    /// their plain harness port (a new one for each attempt to start a node), talk TLS to one
    /// another (`node_args` must say `--tls-cluster yes` and give the certificates), and are
    /// joined by `redis-cli` over TLS, on their TLS ports (`cli_args`: `--tls --cacert …`).
    pub fn start_tls(
        primaries: usize,
        node_args: impl Fn(usize) -> Vec<String>,
        cli_args: &[String],
    ) -> Self {
        Self::start_inner(primaries, 0, 5000, node_args, cli_args, true)
    }

    fn start_inner(
        primaries: usize,
        replicas: usize,
        node_timeout_ms: u64,
        node_args: impl Fn(usize) -> Vec<String>,
        cli_args: &[String],
        over_tls: bool,
    ) -> Self {
        let timeout = node_timeout_ms.to_string();
        let nodes: Vec<RedisServer> = (0..primaries * (1 + replicas))
            .map(|i| {
                // `node_args` runs again for each attempt: a TLS port of its own is new each time.
                RedisServer::start_with_each(|| {
                    let mut args: Vec<String> = [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        &timeout,
                        // A replica always may take over, however long its link was down.
                        "--cluster-replica-validity-factor",
                        "0",
                    ]
                    .iter()
                    .map(|arg| arg.to_string())
                    .collect();
                    args.extend(node_args(i));
                    args
                })
            })
            .collect();
        let watchdog = watchdog(&nodes);
        let cluster = Self { nodes, watchdog };
        let mut create = Command::new("redis-cli");
        create.args(cli_args).arg("--cluster").arg("create");
        for node in &cluster.nodes {
            let port = if over_tls {
                node.arg_port("--tls-port")
                    .expect("a TLS node has a --tls-port")
            } else {
                node.port()
            };
            create.arg(format!("127.0.0.1:{port}"));
        }
        let output = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        cluster.wait_until_ok(Duration::from_secs(20));
        cluster
    }

    /// Waits until every running node says `cluster_state:ok`, knows every node, and every
    /// replica's link to its primary is up; panics after `within`.
    pub fn wait_until_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let live: Vec<&RedisServer> = self.nodes.iter().filter(|n| running(n)).collect();
        loop {
            let ready = live.iter().all(|node| {
                let Ok(mut connection) = node.client().get_connection() else {
                    return false;
                };
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut connection)
                    .unwrap_or_default();
                let replication: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut connection)
                    .unwrap_or_default();
                let known = info
                    .lines()
                    .find_map(|l| l.strip_prefix("cluster_known_nodes:"))
                    .and_then(|n| n.trim().parse::<usize>().ok());
                info.contains("cluster_state:ok")
                    && known >= Some(live.len())
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"))
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ok within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis://` URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// A backend on this cluster, connected now.
    pub async fn backend(&self) -> RedisClusterBackend {
        RedisClusterBackend::connect(self.urls()).await.unwrap()
    }

    /// A plain cluster connection (not the crate's), for looking behind the backend's back.
    pub async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        ClusterClient::new(self.running_urls())
            .unwrap()
            .get_async_connection()
            .await
            .expect("connect to test cluster")
    }

    fn running_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| running(n))
            .map(RedisServer::url)
            .collect()
    }

    /// The node on `port`.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes.iter().find(|n| n.port() == port).unwrap()
    }

    /// The node on `port`, to stop or pause it.
    pub fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes.iter_mut().find(|n| n.port() == port).unwrap()
    }

    /// `CLUSTER NODES` as seen by the first running node.
    pub async fn topology(&self) -> Vec<NodeInfo> {
        let node = self.nodes.iter().find(|n| running(n)).unwrap();
        let mut connection = node.connection().await;
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut connection)
            .await
            .expect("CLUSTER NODES");
        text.lines().filter_map(parse_node_line).collect()
    }

    /// Ports of the primaries that serve slots and are not failed.
    pub async fn primaries(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .topology()
            .await
            .into_iter()
            .filter(|n| n.primary && !n.failed && !n.slots.is_empty())
            .map(|n| n.port)
            .collect();
        ports.sort_unstable();
        ports
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub async fn slot(&self, key: &str) -> u16 {
        let node = self.nodes.iter().find(|n| running(n)).unwrap();
        let mut connection = node.connection().await;
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut connection)
            .await
            .expect("CLUSTER KEYSLOT")
    }

    /// The port of the (live) primary serving `slot`, as the first running node sees it; waits
    /// up to 5 s for one (during a failover, or while gossip catches up, there may be none).
    pub async fn primary_of_slot(&self, slot: u16) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let primary = self.topology().await.into_iter().find(|n| {
                n.primary && !n.failed && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
            });
            match primary {
                Some(node) => return node.port,
                None if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                None => panic!("no live primary serves slot {slot}"),
            }
        }
    }

    /// Keys under `prefix` on each live primary, by port (fencing counters included).
    pub async fn keys_by_primary(&self, prefix: &str) -> HashMap<u16, Vec<String>> {
        let mut keys = HashMap::new();
        for port in self.primaries().await {
            let mut connection = self.node(port).connection().await;
            let found: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}*"))
                .query_async(&mut connection)
                .await
                .expect("KEYS");
            keys.insert(port, found);
        }
        keys
    }

    /// Lock keys (not fencing counters) under `prefix`, on every live primary.
    pub async fn lock_keys(&self, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .keys_by_primary(prefix)
            .await
            .into_values()
            .flatten()
            .filter(|k| !k.ends_with(":fence"))
            .collect();
        keys.sort();
        keys
    }

    /// Empties every live node's data (`FLUSHALL` on the primaries; replicas follow).
    pub async fn flush(&self) {
        for port in self.primaries().await {
            let mut connection = self.node(port).connection().await;
            let () = redis::cmd("FLUSHALL")
                .query_async(&mut connection)
                .await
                .expect("FLUSHALL");
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // The nodes drop (and stop) themselves; the watchdog must not kill their pids later.
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}

/// A shell that waits for its stdin to close (this process exiting, or the cluster dropping it),
/// then kills the nodes and removes their directories.
fn watchdog(nodes: &[RedisServer]) -> Child {
    let pids: Vec<String> = nodes.iter().map(|n| n.pid().to_string()).collect();
    let dirs: Vec<String> = nodes
        .iter()
        .map(|n| format!("'{}'", n.dir.display()))
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
        .expect("start the cluster watchdog")
}

/// Whether `node` runs (it was not stopped).
fn running(node: &RedisServer) -> bool {
    node.child.is_some()
}

fn parse_node_line(line: &str) -> Option<NodeInfo> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let address = fields.get(1)?;
    let port = address
        .split('@')
        .next()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()?;
    let flags = fields.get(2)?;
    let slots = fields
        .iter()
        .skip(8)
        .filter(|f| !f.starts_with('['))
        .filter_map(|range| match range.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => range.parse().ok().map(|s| (s, s)),
        })
        .collect();
    Some(NodeInfo {
        port,
        primary: flags.split(',').any(|f| f == "master"),
        // `fail?` is one node's suspicion; `fail` the cluster's verdict.
        failed: flags.split(',').any(|f| f == "fail"),
        slots,
    })
}

/// Clusters of 3 primaries without replicas, free for a [`Cluster`] fixture to borrow.
static POOL: Mutex<Vec<RedisCluster>> = Mutex::new(Vec::new());

/// A pooled cluster of 3 primaries: emptied when borrowed, returned to the pool when dropped
/// (unless its test panicked).
pub struct Pooled(Option<RedisCluster>);

impl Pooled {
    pub async fn take() -> Self {
        let pooled = POOL.lock().unwrap().pop();
        // No replicas, so a slow node is never replaced: a long node timeout keeps a busy machine
        // from marking one failed.
        let cluster = pooled.unwrap_or_else(|| RedisCluster::start(3, 0, 5000));
        cluster.flush().await;
        Self(Some(cluster))
    }
}

impl std::ops::Deref for Pooled {
    type Target = RedisCluster;
    fn deref(&self) -> &RedisCluster {
        self.0.as_ref().unwrap()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // A cluster whose test failed may be in any state: stop it rather than lend it again.
        if let Some(cluster) = self.0.take()
            && !std::thread::panicking()
            && let Ok(mut pool) = POOL.lock()
        {
            pool.push(cluster);
        }
    }
}

/// The cluster backend as a suite fixture: a pooled cluster of 3 primaries, emptied for each
/// test.
pub struct Cluster {
    pub cluster: Pooled,
    pub backend: RedisClusterBackend,
}

impl Fixture for Cluster {
    type Backend = RedisClusterBackend;
    async fn start() -> Self {
        let cluster = Pooled::take().await;
        let backend = cluster.backend().await;
        Self { cluster, backend }
    }
    fn backend(&self) -> RedisClusterBackend {
        self.backend.clone()
    }
    fn new_client(&self) -> RedisClusterBackend {
        RedisClusterBackend::from_nodes(self.cluster.urls()).unwrap()
    }
    async fn held(&self) -> usize {
        self.cluster.lock_keys(NS).await.len()
    }
    async fn delete(&self, name: &LockName) {
        let mut connection = self.cluster.connection().await;
        let _: i64 = redis::cmd("DEL")
            .arg(name.lock_key())
            .query_async(&mut connection)
            .await
            .unwrap();
    }
}
