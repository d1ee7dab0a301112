//! One Redis primary, reached through one shared multiplexed connection.

use std::time::Duration;

use redis::RedisError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::commands::{ACQUIRE, Commands, RELEASE, Replication};
use super::tls::{self, Certificates};
use super::{
    Acquire, AcquireOptions, BackendFuture, Extend, Inspect, LockBackend, LockName, LockToken,
    Release, Wakeups,
};

/// Locks on one Redis primary.
///
/// All requests share one multiplexed connection ([`ConnectionManager`]), which reconnects on its
/// own after Redis restarts; no connection is opened per request. Every call is one round trip:
/// an acquire is a plain `SET NX PX GET` without fencing (the `GET` gives a refused acquire the
/// holder's deadline), or one `EVALSHA` that also hands out the next fencing token; release and
/// renewal are one `EVALSHA` each (compare-and-delete, compare-and-expire).
///
/// ```no_run
/// # async fn demo() -> Result<(), redis::RedisError> {
/// let backend = tower_lock::RedisBackend::from_url("redis://127.0.0.1:6379/")?;
/// # Ok(()) }
/// ```
///
/// A lock on a single primary is not safe across a failover to a replica that had not yet received
/// it: see the README's "What a Redis lock does not guarantee".
#[derive(Clone)]
pub struct RedisBackend {
    commands: Commands<ConnectionManager>,
    /// Waiters' wake-ups through one shared subscriber connection (`None`: waiters poll).
    wakeups: Option<Wakeups>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend").finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// A backend on an existing connection manager.
    ///
    /// Releases of locks that a waiter has marked publish on the lock's wake-up channel, but
    /// without a client to subscribe with (see [`RedisBackend::wake_waiters_with`]) waiters of
    /// this backend poll.
    pub fn new(connection: ConnectionManager) -> Self {
        Self {
            commands: Commands::new(connection, &ACQUIRE).publishing(&RELEASE),
            wakeups: None,
        }
    }

    /// Wakes this backend's waiters (see [`Locks::lock`](crate::Locks::lock) and `wait` on
    /// layers) through one subscriber connection opened with `client` when a lock is first
    /// waited for, subscribed to the channels of the locks waited for (`SUBSCRIBE
    /// tower-lock:{key}:wake`), and re-opened when lost (waiters poll meanwhile).
    /// [`RedisBackend::from_url`] and [`RedisBackend::connect`] do this already.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), redis::RedisError> {
    /// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
    /// let connection = client.get_connection_manager().await?;
    /// let backend = tower_lock::RedisBackend::new(connection).wake_waiters_with(client);
    /// # Ok(()) }
    /// ```
    pub fn wake_waiters_with(mut self, client: redis::Client) -> Self {
        self.wakeups = Some(super::subscriber::pushed(client));
        self
    }

    /// A backend for `url` (`redis://host:port/db`, or `rediss://` for TLS with the
    /// `tls-rustls` feature). The connection is opened lazily, on the first lock, and re-opened
    /// after failures, so this succeeds even while Redis is down.
    ///
    /// It also checks the eviction policy in the background, as [`RedisBackend::connect`] does.
    /// [`RedisBackend::builder`] adds a CA of your own for TLS.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime: redis-rs starts the connection's task here. Build the backend
    /// inside your runtime (in `main` under `#[tokio::main]`, say), as you build the router.
    pub fn from_url(url: &str) -> Result<Self, RedisError> {
        Self::builder(url).build()
    }

    /// Like [`RedisBackend::from_url`], but connects now and fails if Redis cannot be reached.
    ///
    /// Warns (through `tracing`) if Redis runs with a `maxmemory-policy` that evicts: `allkeys-*`
    /// may evict fencing counters (handing out a token again) and locks, `volatile-*` locks.
    pub async fn connect(url: &str) -> Result<Self, RedisError> {
        Self::builder(url).connect().await
    }

    /// A backend for `url` with more settings than [`RedisBackend::from_url`] takes: a CA of
    /// your own for `rediss://`, a client certificate, connection settings.
    ///
    /// ```no_run
    /// # #[cfg(feature = "tls-rustls")]
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let ca = std::fs::read("/etc/redis/ca.pem")?;
    /// let backend = tower_lock::RedisBackend::builder("rediss://locks:secret@redis.internal:6380/")
    ///     .trust_ca_pem(ca)
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn builder(url: &str) -> RedisBackendBuilder {
        RedisBackendBuilder {
            url: url.to_owned(),
            config: Self::config(),
            certificates: None,
        }
    }

    /// The connection settings `from_url` and `connect` use: a short connect timeout and quick,
    /// bounded reconnect back-off, because a lock that waits seconds for Redis is worse than a 503.
    pub fn config() -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(500))
            .set_number_of_retries(3)
    }

    /// The shared connection, for backends built on this one (Redlock's fencing write-back).
    pub(super) fn connection(&self) -> ConnectionManager {
        self.commands.connection.clone()
    }

    /// Checks replication after every acquire: `WAIT replicas timeout` on the same connection.
    /// When fewer than `replicas` replicas acknowledge the lock within `timeout`, the lock is
    /// released again and the acquisition fails as unavailable (the layer answers 503:
    /// fail-closed). Costs one more round trip per acquire, and as long as the replicas take to
    /// acknowledge (`timeout` when they are missing).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), redis::RedisError> {
    /// use std::time::Duration;
    ///
    /// let backend = tower_lock::RedisBackend::connect("redis://10.0.0.1:6379/")
    ///     .await?
    ///     .wait_for_replicas(1, Duration::from_millis(100));
    /// # Ok(()) }
    /// ```
    ///
    /// What `WAIT` buys: a lock acknowledged by `replicas` replicas survives the loss of the
    /// primary if one of those replicas is promoted, which Sentinel prefers (the most up-to-date
    /// replica) but does not promise. What it does not: Redis replication stays asynchronous, so
    /// `WAIT` is not consistency. A replica that acknowledged can still lose the lock (it
    /// restarts without persistence, or another replica is promoted), and a primary cut off from
    /// the sentinels keeps granting locks until it is demoted. Renewals are not checked. `WAIT`
    /// blocks the connection it runs on, which all requests share: keep `timeout` short (tens of
    /// milliseconds), since while replicas are missing every acquire waits for it.
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.commands = self
            .commands
            .with_replication(Some(Replication { replicas, timeout }));
        self
    }
}

/// Settings for a [`RedisBackend`] beyond its URL: from [`RedisBackend::builder`].
///
/// A Redlock over TLS nodes is built from such backends with
/// [`RedlockBackend::new`](super::RedlockBackend::new).
#[derive(Clone)]
pub struct RedisBackendBuilder {
    /// May carry a password: never printed.
    url: String,
    config: ConnectionManagerConfig,
    certificates: Option<Certificates>,
}

impl std::fmt::Debug for RedisBackendBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackendBuilder")
            .field("certificates", &self.certificates)
            .finish_non_exhaustive()
    }
}

impl RedisBackendBuilder {
    /// Trusts the CA certificates in `pem` (one or more PEM blocks) for `rediss://`, instead of
    /// the platform's roots: for a Redis whose certificate your own CA signed.
    #[cfg(feature = "tls-rustls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls-rustls")))]
    pub fn trust_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.certificates.get_or_insert_default().root_cert = Some(pem.into());
        self
    }

    /// Presents the client certificate chain `cert` with its private key `key` (both PEM), for
    /// a Redis that requires mutual TLS (`tls-auth-clients yes`).
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

    /// Replaces the connection settings (default: [`RedisBackend::config`]).
    pub fn connection_config(mut self, config: ConnectionManagerConfig) -> Self {
        self.config = config;
        self
    }

    /// The redis-rs client these settings describe: for the application's own connections to
    /// the same Redis, with the same TLS trust.
    pub fn client(&self) -> Result<redis::Client, RedisError> {
        tls::client(&self.url, self.certificates.as_ref())
    }

    /// The backend, connecting lazily, as [`RedisBackend::from_url`]: it is built while Redis
    /// refuses it, and its calls fail (saying why) until Redis accepts it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_lock::backend::{AcquireOptions, FailureReason, LockBackend, LockToken};
    /// use tower_lock::{LockLayer, RedisBackend, key::Header};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// // Nothing listens on port 1 of the loopback interface.
    /// let backend = RedisBackend::builder("redis://127.0.0.1:1/").build().unwrap();
    /// let layer = LockLayer::new(backend.clone(), Header::new("x-key"));
    /// let name = layer.lock_name(&tower_lock::key::LockKey::new("k"));
    /// let options = AcquireOptions::new(Duration::from_secs(1));
    /// let error = backend.acquire(&name, LockToken::random(), options).await.unwrap_err();
    /// assert_eq!(error.reason(), FailureReason::Refused);
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, as [`RedisBackend::from_url`].
    pub fn build(self) -> Result<RedisBackend, RedisError> {
        let client = self.client()?;
        let backend = RedisBackend::new(client.get_connection_manager_lazy(self.config)?)
            .wake_waiters_with(client);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let mut connection = backend.commands.connection.clone();
            runtime.spawn(async move { warn_if_evicting(&mut connection).await });
        }
        Ok(backend)
    }

    /// The backend, connected now, as [`RedisBackend::connect`]: fails if Redis cannot be
    /// reached, refuses the credentials, or (`rediss://`) its certificate is not trusted.
    pub async fn connect(self) -> Result<RedisBackend, RedisError> {
        let client = self.client()?;
        let mut connection = client
            .get_connection_manager_with_config(self.config)
            .await?;
        warn_if_evicting(&mut connection).await;
        Ok(RedisBackend::new(connection).wake_waiters_with(client))
    }
}

/// Warns if Redis may evict our keys: any evicting policy can drop a held lock, or a fencing
/// counter before its expiry (which matters only when it is ahead of the clock). Errors (an ACL that denies
/// `INFO`, a server not reachable yet) are ignored: this is advice, not a precondition.
async fn warn_if_evicting(connection: &mut ConnectionManager) {
    let Ok(info) = redis::cmd("INFO")
        .arg("memory")
        .query_async::<String>(connection)
        .await
    else {
        return;
    };
    warn_if_policy_evicts(&info);
}

/// Warns if `info` (the reply of `INFO memory`) names an evicting `maxmemory-policy`.
pub(super) fn warn_if_policy_evicts(info: &str) {
    let policy = info
        .lines()
        .find_map(|line| line.strip_prefix("maxmemory_policy:"))
        .map(str::trim);
    match policy {
        Some(policy) if policy.starts_with("allkeys-") => tracing::warn!(
            maxmemory_policy = policy,
            "Redis may evict any key under memory pressure: held locks (two holders) and fencing \
             counters can disappear; use `noeviction`"
        ),
        Some(policy) if policy.starts_with("volatile-") => tracing::warn!(
            maxmemory_policy = policy,
            "Redis may evict keys with an expiry under memory pressure: held locks (two holders) \
             can disappear; use `noeviction`"
        ),
        _ => {}
    }
}

impl RedisBackend {
    /// The acquire as a node of a Redlock round sends it: exactly once (see
    /// `Commands::acquire_once`).
    pub(super) fn acquire_once(
        &self,
        name: &LockName,
        token: LockToken,
        options: AcquireOptions,
    ) -> BackendFuture<Acquire> {
        self.commands
            .acquire_once(name, token, options, &super::commands::ACQUIRE_SOURCE)
    }
}

impl LockBackend for RedisBackend {
    fn acquire(
        &self,
        name: &LockName,
        token: LockToken,
        options: AcquireOptions,
    ) -> BackendFuture<Acquire> {
        self.commands.acquire(name, token, options)
    }

    fn release(&self, name: &LockName, token: LockToken) -> BackendFuture<Release> {
        self.commands.release(name, token)
    }

    fn extend(&self, name: &LockName, token: LockToken, ttl: Duration) -> BackendFuture<Extend> {
        self.commands.extend(name, token, ttl)
    }

    /// `PTTL` of the lock key: -2 free, -1 held without expiry, else the holder's remaining lease.
    fn inspect(&self, name: &LockName) -> BackendFuture<Inspect> {
        self.commands.inspect(name)
    }

    /// `DEL` of the lock key only: the fencing counter stays, so tokens keep growing.
    fn force_release(&self, name: &LockName) -> BackendFuture<bool> {
        self.commands.force_release(name)
    }

    /// Pushed through one shared subscriber connection: a waiter's attempt marks the held lock
    /// (inside the acquire script), and the release script of a marked lock publishes on the
    /// lock's channel (`PUBLISH ns{key}:wake`, inside the script: no extra round trip).
    fn wakeups(&self) -> Option<Wakeups> {
        self.wakeups.clone()
    }
}
