//! Redis Cluster, through redis-rs's async cluster client.

use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{ConnectionInfo, FromRedisValue, IntoConnectionInfo, RedisError, Script, Value};

use super::commands::{Commands, RELEASE_SHARDED, Replication, with_fence};
use super::redis::warn_if_policy_evicts;
use super::tls::{self, Certificates};
use super::{
    Acquire, AcquireOptions, BackendError, BackendErrorKind, BackendFuture, Extend, Inspect,
    LockBackend, LockName, LockToken, Release, Wakeups,
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
    /// `WAIT` on the lock's primary after every acquire (see `wait_for_replicas`).
    replication: Option<Replication>,
    /// Waiters' wake-ups through one sharded subscriber (`None`: waiters poll).
    wakeups: Option<Wakeups>,
    /// Asks the nodes why, when the cluster client has no connection (`None`: built with
    /// [`RedisClusterBackend::new`], which has no nodes to ask).
    diagnosis: Option<Diagnosis>,
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
    ///
    /// Releases `SPUBLISH` on the lock's wake-up channel, but without a client to subscribe with
    /// (see [`RedisClusterBackend::wake_waiters_with`]) waiters of this backend poll.
    pub fn new(connection: ClusterConnection) -> Self {
        Self {
            // `SPUBLISH` for sharded pub/sub, in the lock's slot.
            commands: Commands::new(connection, &ACQUIRE).publishing(&RELEASE_SHARDED),
            replication: None,
            wakeups: None,
            diagnosis: None,
        }
    }

    /// Checks replication after every acquire: `WAIT replicas timeout` on the connection to the
    /// primary of the lock's slot (the one the acquire went to; not on every primary, as a plain
    /// `WAIT` through the cluster client would be). When fewer than `replicas` of that primary's
    /// replicas acknowledge the lock within `timeout`, the lock is released again and the
    /// acquisition fails as unavailable (the layer answers 503: fail-closed). Costs one more
    /// round trip per acquire, and as long as the replicas take to acknowledge (`timeout` when
    /// they are missing).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), redis::RedisError> {
    /// use std::time::Duration;
    ///
    /// let backend = tower_lock::RedisClusterBackend::connect(["redis://10.0.0.1:7000/"])
    ///     .await?
    ///     .wait_for_replicas(1, Duration::from_millis(100));
    /// # Ok(()) }
    /// ```
    ///
    /// It narrows the failover window: a lock acknowledged by a replica survives the loss of
    /// its primary if that replica is the one promoted (with one replica per primary it is).
    /// It is not consistency: replication stays asynchronous, a replica that acknowledged can
    /// still lose the lock (a restart without persistence, another replica promoted), renewals
    /// are not checked, and `WAIT` blocks the connection to that primary, which all requests to
    /// it share: keep `timeout` short. See
    /// [`RedisBackend::wait_for_replicas`](super::RedisBackend::wait_for_replicas).
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replication = Some(Replication { replicas, timeout });
        self
    }

    /// Wakes this backend's waiters (see [`Locks::lock`](crate::Locks::lock) and `wait` on
    /// layers) through one sharded subscriber: a cluster client of its own, built with
    /// `client` when a lock is first waited for (RESP3 and a push sender are added to it), which
    /// sends `SSUBSCRIBE tower-lock:{key}:wake` to the primary of each waited-for lock's slot.
    /// A watch counts only once its `SSUBSCRIBE` is answered; when a node's connection drops or
    /// a slot moves, waiters poll (bounded by the holder's lease) until it is subscribed again.
    /// [`RedisClusterBackend::from_nodes`] and [`RedisClusterBackend::connect`] do this already.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), redis::RedisError> {
    /// use tower_lock::RedisClusterBackend;
    ///
    /// let nodes = ["redis://10.0.0.1:7000/", "redis://10.0.0.2:7000/"];
    /// let connection = RedisClusterBackend::client_builder(nodes)
    ///     .password("secret")
    ///     .build()?
    ///     .get_async_connection()
    ///     .await?;
    /// let backend = RedisClusterBackend::new(connection).wake_waiters_with(move || {
    ///     RedisClusterBackend::client_builder(nodes).password("secret")
    /// });
    /// # Ok(()) }
    /// ```
    pub fn wake_waiters_with(
        mut self,
        client: impl Fn() -> ClusterClientBuilder + Send + Sync + 'static,
    ) -> Self {
        self.wakeups = Some(super::cluster_subscriber::pushed(Arc::new(client)));
        self
    }

    /// `wake_waiters_with` the default client settings for `nodes`.
    fn waking(self, nodes: Vec<ConnectionInfo>) -> Self {
        self.wake_waiters_with(move || Self::client_builder(nodes.clone()))
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
        let nodes = connection_infos(nodes)?;
        let diagnosis = Diagnosis::of(nodes.iter().cloned().map(redis::Client::open))?;
        Ok(Self::lazy(&Self::client_builder(nodes.clone()).build()?)
            .diagnosed(diagnosis)
            .waking(nodes))
    }

    fn diagnosed(mut self, diagnosis: Diagnosis) -> Self {
        self.diagnosis = Some(diagnosis);
        self
    }

    /// `call`'s outcome, with the nodes' own answer instead of the cluster client's "No
    /// connections found" when no node accepted a connection.
    fn diagnose<T: Send + 'static>(&self, call: BackendFuture<T>) -> BackendFuture<T> {
        let Some(diagnosis) = self.diagnosis.clone() else {
            return call;
        };
        Box::pin(async move {
            match call.await {
                Err(error) if error.to_string().contains(NO_CONNECTIONS) => {
                    Err(diagnosis.explain(error).await)
                }
                outcome => outcome,
            }
        })
    }

    /// A backend on `client`'s cluster, discovered in the background (as `from_nodes`).
    fn lazy(client: &ClusterClient) -> Self {
        let config = ClusterConfig::new()
            .set_connection_timeout(CONNECTION_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT);
        let backend = Self::new(client.get_pending_async_connection_with_config(config));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let mut connection = backend.commands.connection.clone();
            runtime.spawn(async move { warn_if_evicting(&mut connection).await });
        }
        backend
    }

    /// A backend on `client`'s cluster, discovered now (as `connect`).
    async fn connected(client: &ClusterClient) -> Result<Self, RedisError> {
        let mut connection = client.get_async_connection().await?;
        warn_if_evicting(&mut connection).await;
        Ok(Self::new(connection))
    }

    /// Like [`RedisClusterBackend::from_nodes`], but discovers the cluster now and fails if none
    /// of `nodes` can be reached.
    ///
    /// Warns (through `tracing`) if a primary runs with a `maxmemory-policy` that evicts, as
    /// [`RedisBackend::connect`](super::RedisBackend::connect) does.
    pub async fn connect<T: IntoConnectionInfo>(
        nodes: impl IntoIterator<Item = T>,
    ) -> Result<Self, RedisError> {
        let nodes = connection_infos(nodes)?;
        let diagnosis = Diagnosis::of(nodes.iter().cloned().map(redis::Client::open))?;
        Ok(
            Self::connected(&Self::client_builder(nodes.clone()).build()?)
                .await?
                .diagnosed(diagnosis)
                .waking(nodes),
        )
    }

    /// A backend for the cluster that `nodes` belong to, with more settings than
    /// [`RedisClusterBackend::from_nodes`] takes: a CA of your own for `rediss://` nodes, a
    /// client certificate. The same TLS options as
    /// [`RedisBackend::builder`](super::RedisBackend::builder), for every node of the cluster.
    ///
    /// ```no_run
    /// # #[cfg(feature = "tls-rustls")]
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let ca = std::fs::read("/etc/redis/ca.pem")?;
    /// let backend = tower_lock::RedisClusterBackend::builder([
    ///     "rediss://locks:secret@10.0.0.1:7000/",
    ///     "rediss://locks:secret@10.0.0.2:7000/",
    /// ])
    /// .trust_ca_pem(ca)
    /// .connect()
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub fn builder<S: AsRef<str>>(
        nodes: impl IntoIterator<Item = S>,
    ) -> RedisClusterBackendBuilder {
        RedisClusterBackendBuilder {
            nodes: nodes
                .into_iter()
                .map(|url| url.as_ref().to_owned())
                .collect(),
            certificates: None,
        }
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

/// Settings for a [`RedisClusterBackend`] beyond its nodes' URLs: from
/// [`RedisClusterBackend::builder`].
#[derive(Clone)]
pub struct RedisClusterBackendBuilder {
    /// May carry passwords: never printed.
    nodes: Vec<String>,
    certificates: Option<Certificates>,
}

impl std::fmt::Debug for RedisClusterBackendBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClusterBackendBuilder")
            .field("nodes", &self.nodes.len())
            .field("certificates", &self.certificates)
            .finish()
    }
}

impl RedisClusterBackendBuilder {
    /// Trusts the CA certificates in `pem` (one or more PEM blocks) for the `rediss://` nodes,
    /// instead of the platform's roots, as
    /// [`RedisBackendBuilder::trust_ca_pem`](super::RedisBackendBuilder::trust_ca_pem). Every
    /// node's certificate (those the cluster names later included) is checked against it.
    #[cfg(feature = "tls-rustls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls-rustls")))]
    pub fn trust_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.certificates.get_or_insert_default().root_cert = Some(pem.into());
        self
    }

    /// Presents the client certificate chain `cert` with its private key `key` (both PEM) to
    /// every node, for a cluster that requires mutual TLS (`tls-auth-clients yes`).
    #[cfg(feature = "tls-rustls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls-rustls")))]
    pub fn client_certificate_pem(
        mut self,
        cert: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Self {
        self.certificates.get_or_insert_default().client = Some((cert.into(), key.into()));
        self
    }

    /// The redis-rs cluster client settings these describe (those of
    /// [`RedisClusterBackend::client_builder`], with the certificates): for the application's
    /// own connections to the same cluster, with the same TLS trust. Refuses certificates for
    /// nodes that are not `rediss://`, and `rediss://` nodes without the `tls-rustls` feature.
    pub fn client_builder(&self) -> Result<ClusterClientBuilder, RedisError> {
        let tls = tls::check_urls(
            self.nodes.iter().map(String::as_str),
            self.certificates.as_ref(),
        )?;
        let builder = RedisClusterBackend::client_builder(self.nodes.iter().map(String::as_str));
        #[cfg(feature = "tls-rustls")]
        if let (true, Some(certificates)) = (tls, &self.certificates) {
            return Ok(builder.certs(certificates.to_redis()));
        }
        let _ = tls;
        Ok(builder)
    }

    /// The backend, discovering the cluster in the background, as
    /// [`RedisClusterBackend::from_nodes`]: it is built while the cluster refuses it, and its
    /// calls fail (saying why: refused, TLS, denied) until the cluster accepts it.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, as [`RedisClusterBackend::from_nodes`].
    pub fn build(self) -> Result<RedisClusterBackend, RedisError> {
        let diagnosis = self.diagnosis()?;
        Ok(RedisClusterBackend::lazy(&self.client_builder()?.build()?)
            .diagnosed(diagnosis)
            .wake_waiters_with(self.subscriber_client()))
    }

    /// One client per node, with the same TLS trust, for [`Diagnosis`].
    fn diagnosis(&self) -> Result<Diagnosis, RedisError> {
        let certificates = self.certificates.as_ref();
        Diagnosis::of(self.nodes.iter().map(|url| tls::client(url, certificates)))
    }

    /// The backend, with the cluster discovered now, as [`RedisClusterBackend::connect`]:
    /// fails if no node can be reached, refuses the credentials, or (`rediss://`) presents a
    /// certificate that is not trusted.
    pub async fn connect(self) -> Result<RedisClusterBackend, RedisError> {
        let diagnosis = self.diagnosis()?;
        Ok(
            RedisClusterBackend::connected(&self.client_builder()?.build()?)
                .await?
                .diagnosed(diagnosis)
                .wake_waiters_with(self.subscriber_client()),
        )
    }

    /// The client settings of the backend's sharded subscriber: these, with the same TLS trust
    /// ([`client_builder`](Self::client_builder) has accepted them once already).
    fn subscriber_client(&self) -> impl Fn() -> ClusterClientBuilder + Send + Sync + 'static {
        let settings = self.clone();
        move || {
            settings.client_builder().unwrap_or_else(|_| {
                RedisClusterBackend::client_builder(settings.nodes.iter().map(String::as_str))
            })
        }
    }
}

/// What redis-rs's cluster client answers when it has no connection to any node: it keeps the
/// cause (a refused connection, an untrusted certificate, a wrong password) to itself.
const NO_CONNECTIONS: &str = "No connections found";
/// How long the nodes' answer is reused before they are asked again.
const DIAGNOSIS_REUSED_FOR: Duration = Duration::from_secs(1);

/// Why no node accepts a connection, asked of the nodes themselves: one plain connection
/// attempt to each (with the cluster client's TLS trust and credentials), at most once a second
/// however many calls fail meanwhile, so that the 503's reason says refused, TLS or denied
/// rather than "No connections found".
#[derive(Clone)]
struct Diagnosis {
    nodes: Arc<[redis::Client]>,
    last: Arc<Mutex<Option<(Instant, BackendError)>>>,
}

impl Diagnosis {
    fn of(
        nodes: impl IntoIterator<Item = Result<redis::Client, RedisError>>,
    ) -> Result<Self, RedisError> {
        Ok(Self {
            nodes: nodes.into_iter().collect::<Result<_, _>>()?,
            last: Arc::default(),
        })
    }

    /// `error` (the cluster client's "no connections"), explained by the first node's refusal
    /// when every node refuses; `error` itself when a node accepts (the client will find it).
    async fn explain(&self, error: BackendError) -> BackendError {
        let reused = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .filter(|(at, _)| at.elapsed() < DIAGNOSIS_REUSED_FOR)
            .map(|(_, explained)| explained.clone());
        if let Some(explained) = reused {
            return explained;
        }
        let attempts = self.nodes.iter().map(|node| async move {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECTION_TIMEOUT))
                .set_response_timeout(Some(CONNECTION_TIMEOUT));
            node.get_multiplexed_async_connection_with_config(&config)
                .await
                .err()
        });
        let refusals = futures_util::future::join_all(attempts).await;
        let explained = match refusals.into_iter().collect::<Option<Vec<_>>>() {
            // Every node refused: the first one's reason is the cluster's.
            Some(refusals) => match refusals.into_iter().next() {
                Some(refusal) => {
                    let reason = super::failure::reason(&refusal);
                    BackendError::new(
                        BackendErrorKind::Unavailable,
                        format_args!("redis cluster: no node accepts a connection: {refusal}"),
                    )
                    .with_reason(reason)
                }
                None => error,
            },
            None => error,
        };
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Instant::now(), explained.clone()));
        explained
    }
}

/// `nodes` as connection settings.
fn connection_infos<T: IntoConnectionInfo>(
    nodes: impl IntoIterator<Item = T>,
) -> Result<Vec<ConnectionInfo>, RedisError> {
    nodes
        .into_iter()
        .map(IntoConnectionInfo::into_connection_info)
        .collect()
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
        // The cluster client resends a call whose connection dropped, and answers the last
        // attempt's error: a refusal then says nothing of an earlier send that may have landed.
        let acquire: BackendFuture<Acquire> = {
            let acquire = self.commands.acquire(name, token, options);
            Box::pin(async move { acquire.await.map_err(BackendError::maybe_sent) })
        };
        let Some(replication) = self.replication else {
            return self.diagnose(acquire);
        };
        let mut connection = self.commands.connection.clone();
        let route = Route::with_key(name.lock_key(), SlotAddr::Master);
        self.diagnose(self.commands.replication_checked(
            acquire,
            name,
            token,
            replication,
            move |wait| {
                Box::pin(async move {
                    let routing =
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                    let value = connection.route_command(wait, routing).await?;
                    Ok(i64::from_redis_value(value)?)
                })
            },
        ))
    }

    /// Compare-and-delete. A release resent after its first send landed finds the lock gone and
    /// answers [`Release::Expired`]: the lock is released all the same.
    fn release(&self, name: &LockName, token: LockToken) -> BackendFuture<Release> {
        self.diagnose(self.commands.release(name, token))
    }

    fn extend(&self, name: &LockName, token: LockToken, ttl: Duration) -> BackendFuture<Extend> {
        self.diagnose(self.commands.extend(name, token, ttl))
    }

    /// `PTTL` of the lock key on its primary.
    fn inspect(&self, name: &LockName) -> BackendFuture<Inspect> {
        self.diagnose(self.commands.inspect(name))
    }

    /// `DEL` of the lock key only: the fencing counter stays, so tokens keep growing.
    fn force_release(&self, name: &LockName) -> BackendFuture<bool> {
        self.diagnose(self.commands.force_release(name))
    }

    /// Pushed through one sharded subscriber: the release script `SPUBLISH`es on the lock's
    /// channel (`ns{key}:wake`, in the lock's slot, inside the script: no extra round trip).
    fn wakeups(&self) -> Option<Wakeups> {
        self.wakeups.clone()
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
