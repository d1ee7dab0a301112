//! Redis Cluster, through redis-rs's async cluster client.

use std::sync::LazyLock;
use std::time::Duration;

use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{IntoConnectionInfo, RedisError, Script, Value};

use super::commands::{Commands, RELEASE_SHARDED, with_fence};
use super::redis::warn_if_policy_evicts;
use super::{
    Acquire, AcquireOptions, BackendFuture, Extend, Inspect, LockBackend, LockName, LockToken,
    Release,
};

/// The acquire of [`RedisBackend`](super::RedisBackend)'s script, made idempotent for its token:
/// the cluster client resends a command whose connection dropped before the reply came (and
/// after a failover), so an acquire can reach Redis twice. Its second run finds the lock held by
/// its own token and answers as the first did (the fencing counter's current value, which nobody
/// else can have bumped while we hold the lock, and which lives at least a second longer than
/// the lock's TTL), instead of "held" by ourselves — a 409 for the
/// request and a lock nobody releases until its TTL runs out.
///
/// A waiter's acquire (ARGV[4]) marks a held lock as waited for, as on one Redis.
///
/// One scalar back: the fencing token (≥ 1), 0 for acquired without fencing, or `-3 - PTTL` for
/// held (≤ -2).
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&with_fence(
        r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[3] ~= '1' then return 0 end
NEXT_FENCE
  return token
end
local holder = redis.call('GET', KEYS[1])
if holder and string.sub(holder, 1, 32) == string.sub(ARGV[1], 1, 32) then
  if ARGV[3] == '1' then
    return tonumber(redis.call('GET', KEYS[2]) or '0')
  end
  return 0
end
if ARGV[4] then
MARK_WAITED
end
return -3 - redis.call('PTTL', KEYS[1])
",
    ))
});

/// Locks on a Redis Cluster.
///
/// One [`ClusterConnection`] (a multiplexed connection per node, shared by all requests) routes
/// every call to the primary of its lock's hash slot and follows the cluster on its own:
/// `MOVED`/`ASK` redirections, slot migrations, a failover that promotes a replica, nodes that
/// restart. A lock and its fencing counter share a hash slot (`namespace{key}` and
/// `namespace{key}:fence`, see [`LockName`]; request material cannot put a `{` or `}` in a key),
/// so each call is one round trip to one primary, as on a single Redis: `SET NX PX GET` for an
/// acquire without fencing, one `EVALSHA` otherwise, and for release and renewal. A node that has
/// not seen a script yet (a new or promoted one) answers `NOSCRIPT`; the script is then loaded on
/// every node and the call sent again.
///
/// ```no_run
/// # async fn demo() -> Result<(), redis::RedisError> {
/// let backend = tower_lock::RedisClusterBackend::connect([
///     "redis://10.0.0.1:7000/",
///     "redis://10.0.0.2:7000/",
/// ])
/// .await?;
/// # Ok(()) }
/// ```
///
/// Redis Cluster replicates asynchronously: a lock acquired on a primary that fails before its
/// replica received it is lost in the failover, and another request can take it on the promoted
/// replica while the first still runs (its next renewal finds the lock gone and reports the lease
/// lost). See the README's "Scaling out".
#[derive(Clone)]
pub struct RedisClusterBackend {
    commands: Commands<ClusterConnection>,
}

impl std::fmt::Debug for RedisClusterBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClusterBackend")
            .finish_non_exhaustive()
    }
}

/// How long one connection attempt to a node may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_millis(500);
/// How long one call may take, retries and redirections included.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

impl RedisClusterBackend {
    /// A backend on an existing cluster connection (one built from
    /// [`RedisClusterBackend::client_builder`], say, with credentials or TLS added).
    pub fn new(connection: ClusterConnection) -> Self {
        Self {
            // `SPUBLISH` for sharded pub/sub; nothing subscribes yet (see `wakeups`).
            commands: Commands::new(connection, &ACQUIRE).publishing(&RELEASE_SHARDED),
        }
    }

    /// A backend for the cluster that `nodes` (`redis://host:port/` URLs, one reachable node is
    /// enough) belong to. The cluster's topology is discovered in the background, so this succeeds
    /// even while the cluster is down; calls fail until it can be reached.
    ///
    /// It also checks the primaries' eviction policy in the background, as
    /// [`RedisClusterBackend::connect`] does.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime: redis-rs starts the connection's task here. Build the backend
    /// inside your runtime, as you build the router.
    pub fn from_nodes<T: IntoConnectionInfo>(
        nodes: impl IntoIterator<Item = T>,
    ) -> Result<Self, RedisError> {
        let client = Self::client_builder(nodes).build()?;
        let config = ClusterConfig::new()
            .set_connection_timeout(CONNECTION_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT);
        let backend = Self::new(client.get_pending_async_connection_with_config(config));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let mut connection = backend.commands.connection.clone();
            runtime.spawn(async move { warn_if_evicting(&mut connection).await });
        }
        Ok(backend)
    }

    /// Like [`RedisClusterBackend::from_nodes`], but discovers the cluster now and fails if none
    /// of `nodes` can be reached.
    ///
    /// Warns (through `tracing`) if a primary runs with a `maxmemory-policy` that evicts, as
    /// [`RedisBackend::connect`](super::RedisBackend::connect) does.
    pub async fn connect<T: IntoConnectionInfo>(
        nodes: impl IntoIterator<Item = T>,
    ) -> Result<Self, RedisError> {
        let mut connection = Self::client_builder(nodes)
            .build()?
            .get_async_connection()
            .await?;
        warn_if_evicting(&mut connection).await;
        Ok(Self::new(connection))
    }

    /// The cluster client settings `from_nodes` and `connect` use: short connect and response
    /// timeouts (2 s for a call, retries and redirections included) and a few quick retries, because
    /// a lock that waits seconds for Redis is worse than a 503.
    pub fn client_builder<T: IntoConnectionInfo>(
        nodes: impl IntoIterator<Item = T>,
    ) -> ClusterClientBuilder {
        // For `rediss://` nodes: rustls needs a crypto provider before the first handshake.
        #[cfg(feature = "tls-rustls")]
        super::tls::install_crypto_provider();
        ClusterClientBuilder::new(nodes)
            .connection_timeout(CONNECTION_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(5)
            .min_retry_wait(10)
            .max_retry_wait(500)
    }
}

/// [`warn_if_policy_evicts`] for every primary (`INFO` goes to all of them).
async fn warn_if_evicting(connection: &mut ClusterConnection) {
    let Ok(info) = redis::cmd("INFO")
        .arg("memory")
        .query_async::<Value>(connection)
        .await
    else {
        return;
    };
    let mut replies = Vec::new();
    collect_strings(info, &mut replies);
    for reply in replies {
        warn_if_policy_evicts(&reply);
    }
}

/// Every string in `value` (`INFO` on a cluster answers one per node, in a map).
fn collect_strings(value: Value, into: &mut Vec<String>) {
    match value {
        Value::BulkString(bytes) => into.push(String::from_utf8_lossy(&bytes).into_owned()),
        Value::SimpleString(text) | Value::VerbatimString { text, .. } => into.push(text),
        Value::Array(values) | Value::Set(values) => {
            for value in values {
                collect_strings(value, into);
            }
        }
        Value::Map(pairs) => {
            for (_, value) in pairs {
                collect_strings(value, into);
            }
        }
        _ => {}
    }
}

impl LockBackend for RedisClusterBackend {
    fn acquire(
        &self,
        name: &LockName,
        token: LockToken,
        options: AcquireOptions,
    ) -> BackendFuture<Acquire> {
        self.commands.acquire(name, token, options)
    }

    /// Compare-and-delete. A release resent after its first send landed finds the lock gone and
    /// answers [`Release::Expired`]: the lock is released all the same.
    fn release(&self, name: &LockName, token: LockToken) -> BackendFuture<Release> {
        self.commands.release(name, token)
    }

    fn extend(&self, name: &LockName, token: LockToken, ttl: Duration) -> BackendFuture<Extend> {
        self.commands.extend(name, token, ttl)
    }

    /// `PTTL` of the lock key on its primary.
    fn inspect(&self, name: &LockName) -> BackendFuture<Inspect> {
        self.commands.inspect(name)
    }

    /// `DEL` of the lock key only: the fencing counter stays, so tokens keep growing.
    fn force_release(&self, name: &LockName) -> BackendFuture<bool> {
        self.commands.force_release(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_replies_of_every_node_are_collected() {
        let reply = Value::Map(vec![
            (
                Value::SimpleString("127.0.0.1:7000".into()),
                Value::VerbatimString {
                    format: redis::VerbatimFormat::Text,
                    text: "maxmemory_policy:noeviction".into(),
                },
            ),
            (
                Value::SimpleString("127.0.0.1:7001".into()),
                Value::BulkString(b"maxmemory_policy:allkeys-lru".to_vec()),
            ),
        ]);
        let mut strings = Vec::new();
        collect_strings(reply, &mut strings);
        assert_eq!(
            strings,
            [
                "maxmemory_policy:noeviction",
                "maxmemory_policy:allkeys-lru"
            ]
        );
    }
}
