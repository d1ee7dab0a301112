//! [`Redlock`]: a [`Fixture`] of N independent `redis-server` primaries (5 by default) under one
//! [`RedlockBackend`], and what the Redlock tests read and write on the nodes behind its back.
//!
//! Nodes can be stopped, restarted, paused and resumed through `servers[i]`; the readers here
//! skip a node that does not answer within 200 ms (stopped or paused).

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tower_lock::RedlockBackend;
use tower_lock::backend::{LockName, LockToken};

use super::{Fixture, NS, RedisServer};

pub struct Redlock {
    pub servers: Vec<RedisServer>,
    pub backend: RedlockBackend,
}

/// How long a reader waits for a node before it counts it as down.
const NODE_PATIENCE: Duration = Duration::from_millis(200);

impl Redlock {
    /// `n` fresh servers and a backend connected to them.
    pub async fn with_nodes(n: usize) -> Self {
        let servers: Vec<RedisServer> = (0..n).map(|_| RedisServer::start()).collect();
        let backend = RedlockBackend::connect(servers.iter().map(RedisServer::url))
            .await
            .expect("a Redlock backend over the test servers");
        Self { servers, backend }
    }

    /// The nodes' URLs, in order.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(RedisServer::url).collect()
    }

    /// A connection to node `i`, or `None` if it does not answer (stopped or paused).
    pub async fn node(&self, i: usize) -> Option<MultiplexedConnection> {
        let client = self.servers[i].client();
        let mut connection =
            tokio::time::timeout(NODE_PATIENCE, client.get_multiplexed_async_connection())
                .await
                .ok()?
                .ok()?;
        let ping = redis::cmd("PING");
        let pong = ping.query_async::<String>(&mut connection);
        tokio::time::timeout(NODE_PATIENCE, pong).await.ok()?.ok()?;
        Some(connection)
    }

    /// The lock keys (not fencing counters) in the test namespace on each node; `None` for a
    /// node that does not answer.
    pub async fn keys_per_node(&self) -> Vec<Option<Vec<String>>> {
        let mut per_node = Vec::new();
        for i in 0..self.servers.len() {
            per_node.push(match self.node(i).await {
                Some(mut connection) => {
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(format!("{NS}*"))
                        .query_async(&mut connection)
                        .await
                        .expect("KEYS");
                    Some(
                        keys.into_iter()
                            .filter(|k| !k.ends_with(":fence"))
                            .collect(),
                    )
                }
                None => None,
            });
        }
        per_node
    }

    /// Distinct lock keys on the nodes that answer, whichever number of nodes has them.
    pub async fn leftovers(&self) -> usize {
        let mut keys: Vec<String> = self
            .keys_per_node()
            .await
            .into_iter()
            .flatten()
            .flatten()
            .collect();
        keys.sort();
        keys.dedup();
        keys.len()
    }

    /// The nodes (by index) on which `name` is locked now.
    pub async fn nodes_holding(&self, name: &LockName) -> Vec<usize> {
        let mut holding = Vec::new();
        for i in 0..self.servers.len() {
            if let Some(mut connection) = self.node(i).await {
                let exists: i64 = redis::cmd("EXISTS")
                    .arg(name.lock_key())
                    .query_async(&mut connection)
                    .await
                    .expect("EXISTS");
                if exists == 1 {
                    holding.push(i);
                }
            }
        }
        holding
    }

    /// Waits (up to 5 s) until no node holds `name`: a release returns once a majority has
    /// released, and the other nodes' releases finish in the background.
    pub async fn until_released(&self, name: &LockName) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let holding = self.nodes_holding(name).await;
            if holding.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nodes {holding:?} still hold {name:?} 5 s after its release"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Deletes `name`'s lock on the nodes `nodes` (behind its holder's back).
    pub async fn delete_on(&self, name: &LockName, nodes: impl IntoIterator<Item = usize>) {
        for i in nodes {
            let mut connection = self.node(i).await.expect("node answers");
            let _: i64 = redis::cmd("DEL")
                .arg(name.lock_key())
                .query_async(&mut connection)
                .await
                .unwrap();
        }
    }

    /// Another holder (a random token) takes `name` on node `i` directly, for `ttl`.
    pub async fn hold_on(&self, i: usize, name: &LockName, ttl: Duration) {
        let mut connection = self.node(i).await.expect("node answers");
        let value = format!("{}:0", LockToken::random().to_hex());
        let set: Option<String> = redis::cmd("SET")
            .arg(name.lock_key())
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(set.is_some(), "node {i} already held {name:?}");
    }

    /// Sets `name`'s fencing counter on node `i` to `value`.
    pub async fn set_fence(&self, i: usize, name: &LockName, value: u64) {
        let mut connection = self.node(i).await.expect("node answers");
        let _: () = redis::cmd("SET")
            .arg(name.fence_key())
            .arg(value)
            .query_async(&mut connection)
            .await
            .unwrap();
    }

    /// `name`'s fencing counter on node `i` (0 when it has none).
    pub async fn fence(&self, i: usize, name: &LockName) -> u64 {
        let mut connection = self.node(i).await.expect("node answers");
        let value: Option<u64> = redis::cmd("GET")
            .arg(name.fence_key())
            .query_async(&mut connection)
            .await
            .unwrap();
        value.unwrap_or(0)
    }
}

impl Fixture for Redlock {
    type Backend = RedlockBackend;

    async fn start() -> Self {
        Self::with_nodes(5).await
    }

    fn backend(&self) -> RedlockBackend {
        self.backend.clone()
    }

    fn new_client(&self) -> RedlockBackend {
        RedlockBackend::from_urls(self.urls()).expect("a Redlock backend over the test servers")
    }

    /// Locks held in Redlock's sense: lock keys on a majority of the nodes. A release returns
    /// once a majority has released (the other nodes' releases follow, ahead of this client's
    /// next call on them); [`Redlock::leftovers`] counts what is left on any node.
    async fn held(&self) -> usize {
        let quorum = self.servers.len() / 2 + 1;
        let mut keys: Vec<String> = self
            .keys_per_node()
            .await
            .into_iter()
            .flatten()
            .flatten()
            .collect();
        keys.sort();
        let mut held = 0;
        for run in keys.chunk_by(|a, b| a == b) {
            if run.len() >= quorum {
                held += 1;
            }
        }
        held
    }

    /// `DEL` on every node that answers.
    async fn delete(&self, name: &LockName) {
        for i in 0..self.servers.len() {
            if self.node(i).await.is_some() {
                self.delete_on(name, [i]).await;
            }
        }
    }
}
