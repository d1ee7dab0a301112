//! A Redis primary with replicas under Sentinel: the primary is found through the sentinels and
//! found again after a failover.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, ConnectionInfo, IntoConnectionInfo, RedisError};
use tokio::time::Instant;

use super::commands::{ACQUIRE, Commands, Replication, is_replication_shortfall, unavailable};
use super::tls::{self, Certificates};
use super::{
    Acquire, AcquireOptions, BackendError, BackendErrorKind, BackendFuture, Extend, FailureReason,
    Inspect, LockBackend, LockName, LockToken, Release,
};

/// How long one connection attempt (to a sentinel or to the primary) may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_millis(500);
/// How long one call to the primary may take.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a whole discovery (sentinels asked, the primary's role checked, connected) may take.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed discovery, calls fail at once for this long instead of asking again.
const DISCOVERY_BACKOFF: Duration = Duration::from_millis(100);
/// How often the sentinels are asked whether the primary is still the one calls go to.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// Locks on the primary of a Redis replication group that Sentinel manages.
///
/// The primary is found by asking the sentinels for the group's primary (`SENTINEL MASTERS`)
/// and checking that the node named says it is one (`ROLE`), through redis-rs's
/// [`SentinelClient`]. All requests then share one multiplexed connection to it, and every call is
/// one round trip, as on [`RedisBackend`](super::RedisBackend) (same commands and scripts).
///
/// When a call fails (the primary died, or was demoted and answers `READONLY`), or when the
/// sentinels name another primary (they are asked every 500 ms, so that a failover that leaves
/// the old primary up is followed at once, not when the old primary is demoted up to 10 s
/// later), the connection is dropped and the next call asks the sentinels again: once they have
/// promoted a replica, locks are taken on it. Until then calls fail (503), at once for 100 ms
/// after each failed discovery. With `down-after-milliseconds 1000`, the tests measure locks
/// again 1.4–2.4 s after the primary is killed.
///
/// ```no_run
/// # async fn demo() -> Result<(), redis::RedisError> {
/// let backend = tower_lock::RedisSentinelBackend::connect(
///     ["redis://10.0.0.1:26379/", "redis://10.0.0.2:26379/", "redis://10.0.0.3:26379/"],
///     "mymaster",
/// )
/// .await?;
/// # Ok(()) }
/// ```
///
/// Replication is asynchronous: a lock acquired just before the primary fails may not have
/// reached the replica that is promoted, and another request can then take it while the first
/// still runs (its next renewal finds the lock gone and reports the lease lost).
/// [`RedisSentinelBackend::wait_for_replicas`] makes that window smaller, not closed; a primary
/// cut off from the sentinels but not from this client keeps granting locks until the sentinels
/// demote it. See the README's "Scaling out".
#[derive(Clone)]
pub struct RedisSentinelBackend {
    shared: Arc<Shared>,
    replication: Option<Replication>,
}

struct Shared {
    /// The group's name.
    master: String,
    /// The sentinels, for the watcher.
    sentinels: Vec<ConnectionInfo>,
    /// What TLS connections to the sentinels trust and present (`rediss://` sentinels).
    certificates: Option<Certificates>,
    /// Asks the sentinels; one discovery at a time.
    discovery: tokio::sync::Mutex<Discovery>,
    /// The primary calls go to, while it answers.
    primary: Mutex<Option<Primary>>,
}

struct Discovery {
    client: SentinelClient,
    /// The last failed discovery: when, and why.
    failed: Option<(Instant, String, FailureReason)>,
    /// How many primaries have been found.
    found: u64,
}

#[derive(Clone)]
struct Primary {
    commands: Commands<MultiplexedConnection>,
    /// Which discovery found it.
    generation: u64,
    /// `host:port`.
    address: Arc<str>,
}

impl std::fmt::Debug for RedisSentinelBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSentinelBackend")
            .field("master", &self.shared.master)
            .finish_non_exhaustive()
    }
}

impl RedisSentinelBackend {
    /// A backend for the primary of `master`, found through `sentinels` (`redis://host:port/`
    /// URLs of sentinels, not of Redis servers). Nothing is connected yet: the primary is found
    /// on the first lock, so this succeeds (and needs no runtime) even while the sentinels are
    /// down.
    pub fn from_sentinels<T: IntoConnectionInfo>(
        sentinels: impl IntoIterator<Item = T>,
        master: &str,
    ) -> Result<Self, RedisError> {
        Self::from_sentinels_with(sentinels, master, SentinelNodeConnectionInfo::default())
    }

    /// Like [`RedisSentinelBackend::from_sentinels`], with how to connect to the primary it
    /// finds: its password, user name, database or TLS mode (the sentinels' own credentials go
    /// in their URLs).
    ///
    /// ```no_run
    /// # fn demo() -> Result<(), redis::RedisError> {
    /// use redis::RedisConnectionInfo;
    /// use redis::sentinel::SentinelNodeConnectionInfo;
    ///
    /// let primary = SentinelNodeConnectionInfo::default()
    ///     .set_redis_connection_info(RedisConnectionInfo::default().set_password("secret"));
    /// let backend = tower_lock::RedisSentinelBackend::from_sentinels_with(
    ///     ["redis://10.0.0.1:26379/"],
    ///     "mymaster",
    ///     primary,
    /// )?;
    /// # Ok(()) }
    /// ```
    pub fn from_sentinels_with<T: IntoConnectionInfo>(
        sentinels: impl IntoIterator<Item = T>,
        master: &str,
        primary: SentinelNodeConnectionInfo,
    ) -> Result<Self, RedisError> {
        let sentinels = sentinels
            .into_iter()
            .map(IntoConnectionInfo::into_connection_info)
            .collect::<Result<Vec<_>, _>>()?;
        tls::check_urls(sentinels.iter().filter_map(tls_url), None)?;
        // A `String` without redis-rs's `tls-rustls` feature, any `AsRef<str>` with it (which
        // the dev-dependencies turn on).
        #[allow(clippy::unnecessary_to_owned)]
        let client = SentinelClient::build(
            sentinels.clone(),
            master.to_owned(),
            Some(primary),
            SentinelServerType::Master,
        )?;
        Ok(Self::with_client(client, sentinels, master, None))
    }

    /// A backend on the sentinels of `client`.
    fn with_client(
        client: SentinelClient,
        sentinels: Vec<ConnectionInfo>,
        master: &str,
        certificates: Option<Certificates>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                master: master.to_owned(),
                sentinels,
                certificates,
                discovery: tokio::sync::Mutex::new(Discovery {
                    client,
                    failed: None,
                    found: 0,
                }),
                primary: Mutex::new(None),
            }),
            replication: None,
        }
    }

    /// A backend for the primary of `master` found through `sentinels` (`redis://` or, with the
    /// `tls-rustls` feature, `rediss://` URLs of sentinels), with TLS settings: a CA of your own
    /// and a client certificate, for the `rediss://` sentinels and for the primary, which is then
    /// reached over TLS too (at the address the sentinels name: its TLS port).
    ///
    /// ```no_run
    /// # #[cfg(feature = "tls-rustls")]
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let ca = std::fs::read("/etc/redis/ca.pem")?;
    /// let backend = tower_lock::RedisSentinelBackend::builder(
    ///     ["rediss://10.0.0.1:26380/", "rediss://10.0.0.2:26380/"],
    ///     "mymaster",
    /// )
    /// .trust_ca_pem(ca)
    /// .connect()
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub fn builder<S: AsRef<str>>(
        sentinels: impl IntoIterator<Item = S>,
        master: &str,
    ) -> RedisSentinelBackendBuilder {
        RedisSentinelBackendBuilder {
            sentinels: sentinels
                .into_iter()
                .map(|url| url.as_ref().to_owned())
                .collect(),
            master: master.to_owned(),
            certificates: None,
        }
    }

    /// Like [`RedisSentinelBackend::from_sentinels`], but finds the primary now and fails if it
    /// cannot.
    pub async fn connect<T: IntoConnectionInfo>(
        sentinels: impl IntoIterator<Item = T>,
        master: &str,
    ) -> Result<Self, RedisError> {
        let backend = Self::from_sentinels(sentinels, master)?;
        backend.shared.primary().await.map_err(|error| {
            RedisError::from((
                redis::ErrorKind::Io,
                "no primary found through the sentinels",
                error.to_string(),
            ))
        })?;
        Ok(backend)
    }

    /// Checks replication after every acquire, as
    /// [`RedisBackend::wait_for_replicas`](super::RedisBackend::wait_for_replicas) does (read
    /// there what it buys and what it does not): `WAIT replicas timeout` on the primary, and
    /// fewer acknowledgements release the lock and fail the acquisition (503).
    ///
    /// ```no_run
    /// # fn demo() -> Result<(), redis::RedisError> {
    /// use std::time::Duration;
    ///
    /// let backend =
    ///     tower_lock::RedisSentinelBackend::from_sentinels(["redis://10.0.0.1:26379/"], "mymaster")?
    ///         .wait_for_replicas(1, Duration::from_millis(100));
    /// # Ok(()) }
    /// ```
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replication = Some(Replication { replicas, timeout });
        self
    }

    /// The address of the primary calls go to now, if one has been found (and not failed
    /// since).
    pub fn primary_address(&self) -> Option<String> {
        Some(self.shared.current()?.address.to_string())
    }

    /// Runs `call` on the primary (found first if need be); a failure that is not the
    /// replication check's forgets the primary, so that the next call looks for it again.
    fn on_primary<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Commands<MultiplexedConnection>) -> BackendFuture<T> + Send + 'static,
    ) -> BackendFuture<T> {
        let shared = self.shared.clone();
        let replication = self.replication;
        Box::pin(async move {
            let primary = shared.primary().await?;
            let outcome = match replication {
                None => call(&primary.commands).await,
                Some(_) => call(&primary.commands.clone().with_replication(replication)).await,
            };
            if let Err(error) = &outcome
                && !is_replication_shortfall(error)
            {
                shared.forget(primary.generation, error);
            }
            outcome
        })
    }
}

impl Shared {
    fn current(&self) -> Option<Primary> {
        self.primary
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The primary, found through the sentinels if there is none.
    async fn primary(self: &Arc<Self>) -> Result<Primary, BackendError> {
        if let Some(primary) = self.current() {
            return Ok(primary);
        }
        let mut discovery = self.discovery.lock().await;
        // Another call may have found it while this one waited.
        if let Some(primary) = self.current() {
            return Ok(primary);
        }
        if let Some((at, why, reason)) = &discovery.failed
            && at.elapsed() < DISCOVERY_BACKOFF
        {
            return Err(BackendError::new(
                BackendErrorKind::Unavailable,
                format_args!("redis sentinel: no primary for {}: {why}", self.master),
            )
            .with_reason(*reason));
        }
        let found = tokio::time::timeout(DISCOVERY_TIMEOUT, async {
            let client = discovery.client.async_get_client().await?;
            let address = client.get_connection_info().addr().to_string();
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECTION_TIMEOUT))
                .set_response_timeout(Some(RESPONSE_TIMEOUT));
            let connection = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            Ok::<_, RedisError>((address, connection))
        })
        .await;
        let why = match found {
            Ok(Ok((address, connection))) => {
                discovery.found = discovery.found.saturating_add(1);
                discovery.failed = None;
                let primary = Primary {
                    commands: Commands::new(connection, &ACQUIRE),
                    generation: discovery.found,
                    address: address.into(),
                };
                tracing::info!(
                    master = %self.master,
                    address = %primary.address,
                    generation = primary.generation,
                    "redis sentinel: locking on this primary"
                );
                *self
                    .primary
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(primary.clone());
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(watch(
                        Arc::downgrade(self),
                        primary.generation,
                        primary.address.clone(),
                    ));
                }
                return Ok(primary);
            }
            Ok(Err(error)) => {
                let error = unavailable(error);
                (error.to_string(), error.reason())
            }
            Err(_) => (
                format!("discovery took more than {DISCOVERY_TIMEOUT:?}"),
                FailureReason::TimedOut,
            ),
        };
        let (why, reason) = why;
        discovery.failed = Some((Instant::now(), why.clone(), reason));
        Err(BackendError::new(
            BackendErrorKind::Unavailable,
            format_args!("redis sentinel: no primary for {}: {why}", self.master),
        )
        .with_reason(reason))
    }

    /// Whether the primary of `generation` is still the one calls go to.
    fn is_current(&self, generation: u64) -> bool {
        self.current().is_some_and(|p| p.generation == generation)
    }

    /// Drops the primary of `generation` (if it is still the current one) because of `error`.
    fn forget(&self, generation: u64, error: &dyn std::fmt::Display) {
        let mut primary = self
            .primary
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if primary.as_ref().is_some_and(|p| p.generation == generation) {
            *primary = None;
            tracing::warn!(
                master = %self.master,
                generation,
                reason = %error,
                "redis sentinel: leaving this primary; asking the sentinels again"
            );
        }
    }
}

/// Asks the sentinels every [`WATCH_EVERY`] which node is the primary, while the one of
/// `generation` (on `address`) is current, and drops it as soon as a sentinel names another: a
/// failover that leaves the old primary up (a manual one, or a partition that heals) does not
/// make calls to it fail until the sentinels demote it (up to 10 s later, their `INFO` period),
/// and meanwhile it would grant locks that the new primary knows nothing of.
async fn watch(shared: Weak<Shared>, generation: u64, address: Arc<str>) {
    let sentinels = match shared.upgrade() {
        Some(shared) => shared.sentinels.clone(),
        None => return,
    };
    let mut connections: Vec<Option<MultiplexedConnection>> = vec![None; sentinels.len()];
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if !shared.is_current(generation) {
            return;
        }
        for (info, connection) in sentinels.iter().zip(connections.iter_mut()) {
            let named = tokio::time::timeout(
                CONNECTION_TIMEOUT,
                named_primary(
                    info,
                    shared.certificates.as_ref(),
                    connection,
                    &shared.master,
                ),
            )
            .await;
            match named {
                Ok(Ok(named)) => {
                    if named != *address {
                        shared.forget(
                            generation,
                            &format_args!("the sentinels name {named} as the primary now"),
                        );
                        return;
                    }
                    break;
                }
                // This sentinel is down or slow: ask the next one.
                Ok(Err(_)) | Err(_) => *connection = None,
            }
        }
    }
}

/// `host:port` of the primary of `master` as the sentinel of `info` names it.
async fn named_primary(
    info: &ConnectionInfo,
    certificates: Option<&Certificates>,
    connection: &mut Option<MultiplexedConnection>,
    master: &str,
) -> Result<String, RedisError> {
    if connection.is_none() {
        let client = sentinel_client(info, certificates)?;
        *connection = Some(client.get_multiplexed_async_connection().await?);
    }
    let Some(connection) = connection.as_mut() else {
        return Err(RedisError::from((redis::ErrorKind::Io, "no connection")));
    };
    let (host, port): (String, u16) = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(master)
        .query_async(connection)
        .await?;
    Ok(format!("{host}:{port}"))
}

/// A client for the sentinel of `info`, trusting `certificates` over TLS.
fn sentinel_client(
    info: &ConnectionInfo,
    certificates: Option<&Certificates>,
) -> Result<redis::Client, RedisError> {
    #[cfg(feature = "tls-rustls")]
    if let (Some(certificates), redis::ConnectionAddr::TcpTls { .. }) = (certificates, info.addr())
    {
        return redis::Client::build_with_tls(info.clone(), certificates.to_redis());
    }
    let _ = certificates;
    redis::Client::open(info.clone())
}

/// `"rediss://"` for a sentinel reached over TLS (for [`tls::check_urls`]).
fn tls_url(info: &ConnectionInfo) -> Option<&'static str> {
    matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }).then_some("rediss://")
}

/// Settings for a [`RedisSentinelBackend`] beyond its sentinels' URLs: from
/// [`RedisSentinelBackend::builder`].
#[derive(Clone)]
pub struct RedisSentinelBackendBuilder {
    /// May carry passwords: never printed.
    sentinels: Vec<String>,
    master: String,
    certificates: Option<Certificates>,
}

impl std::fmt::Debug for RedisSentinelBackendBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSentinelBackendBuilder")
            .field("sentinels", &self.sentinels.len())
            .field("master", &self.master)
            .field("certificates", &self.certificates)
            .finish()
    }
}

impl RedisSentinelBackendBuilder {
    /// Trusts the CA certificates in `pem` for the `rediss://` sentinels and for the primary
    /// (then reached over TLS), instead of the platform's roots.
    #[cfg(feature = "tls-rustls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls-rustls")))]
    pub fn trust_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.certificates.get_or_insert_default().root_cert = Some(pem.into());
        self
    }

    /// Presents the client certificate chain `cert` with its private key `key` (both PEM) to the
    /// `rediss://` sentinels and to the primary (then reached over TLS).
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

    /// The backend, finding the primary on the first lock, as
    /// [`RedisSentinelBackend::from_sentinels`]. The sentinels' credentials go in their URLs;
    /// with certificates, redis-rs takes one user and password for all sentinels (the first
    /// URL's), and the primary's credentials cannot be set yet (use
    /// [`RedisSentinelBackend::from_sentinels_with`] for those, without a CA of your own).
    pub fn build(self) -> Result<RedisSentinelBackend, RedisError> {
        let Some(certificates) = self.certificates else {
            let sentinels = self.sentinels.iter().map(String::as_str);
            return RedisSentinelBackend::from_sentinels(sentinels, &self.master);
        };
        let sentinels = self
            .sentinels
            .iter()
            .map(|url| url.as_str().into_connection_info())
            .collect::<Result<Vec<_>, _>>()?;
        tls::check_urls(["rediss://"], Some(&certificates))?;
        #[cfg(feature = "tls-rustls")]
        {
            use redis::sentinel::SentinelClientBuilder;
            let first = sentinels.first();
            let mut builder = SentinelClientBuilder::new(
                sentinels.iter().map(|info| info.addr().clone()),
                &self.master,
                SentinelServerType::Master,
            )?
            .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
            .set_client_to_redis_certificates(certificates.to_redis());
            if let Some(username) = first.and_then(|info| info.redis_settings().username()) {
                builder = builder.set_client_to_sentinel_username(username);
            }
            if let Some(password) = first.and_then(|info| info.redis_settings().password()) {
                builder = builder.set_client_to_sentinel_password(password);
            }
            if sentinels.iter().any(|info| tls_url(info).is_some()) {
                builder = builder.set_client_to_sentinel_certificates(certificates.to_redis());
            }
            let client = builder.build()?;
            Ok(RedisSentinelBackend::with_client(
                client,
                sentinels,
                &self.master,
                Some(certificates),
            ))
        }
        #[cfg(not(feature = "tls-rustls"))]
        {
            let _ = sentinels;
            unreachable_without_tls()
        }
    }

    /// The backend, with the primary found now, as [`RedisSentinelBackend::connect`].
    pub async fn connect(self) -> Result<RedisSentinelBackend, RedisError> {
        let backend = self.build()?;
        backend.shared.primary().await.map_err(|error| {
            RedisError::from((
                redis::ErrorKind::Io,
                "no primary found through the sentinels",
                error.to_string(),
            ))
        })?;
        Ok(backend)
    }
}

/// Certificates exist only with the `tls-rustls` feature.
#[cfg(not(feature = "tls-rustls"))]
fn unreachable_without_tls() -> Result<RedisSentinelBackend, RedisError> {
    Err(RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "TLS certificates need tower-lock's `tls-rustls` feature",
    )))
}

impl LockBackend for RedisSentinelBackend {
    fn acquire(
        &self,
        name: &LockName,
        token: LockToken,
        options: AcquireOptions,
    ) -> BackendFuture<Acquire> {
        let name = name.clone();
        self.on_primary(move |commands| commands.acquire(&name, token, options))
    }

    fn release(&self, name: &LockName, token: LockToken) -> BackendFuture<Release> {
        let name = name.clone();
        self.on_primary(move |commands| commands.release(&name, token))
    }

    fn extend(&self, name: &LockName, token: LockToken, ttl: Duration) -> BackendFuture<Extend> {
        let name = name.clone();
        self.on_primary(move |commands| commands.extend(&name, token, ttl))
    }

    /// `PTTL` of the lock key on the primary.
    fn inspect(&self, name: &LockName) -> BackendFuture<Inspect> {
        let name = name.clone();
        self.on_primary(move |commands| commands.inspect(&name))
    }

    /// `DEL` of the lock key only: the fencing counter stays, so tokens keep growing.
    fn force_release(&self, name: &LockName) -> BackendFuture<bool> {
        let name = name.clone();
        self.on_primary(move |commands| commands.force_release(&name))
    }
}
