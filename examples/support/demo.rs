//! The demo application shared by `examples/server.rs`, `examples/contention.rs` and the tests.
//!
//! Include it with `#[path = "support/demo.rs"] mod demo;` (from an example) or
//! `#[path = "../examples/support/demo.rs"] mod demo;` (from a test).
//!
//! | route | lock | what it does |
//! |---|---|---|
//! | `POST /accounts/{id}/deposit?amount=A&hold_ms=H` | `account:{id}` | **fenced** read of the balance, sleep `H` ms, **fenced** write of `balance + A` |
//! | `POST /queued/accounts/{id}/deposit?amount=A&hold_ms=H` | `account:{id}`, waiting up to 10 s for it (`wait`) | the locked deposit; a contended request queues instead of getting 409 at once |
//! | `POST /unlocked/accounts/{id}/deposit?amount=A&hold_ms=H` | none | the same read–sleep–write, unfenced: loses updates under concurrency |
//! | `GET /accounts/{id}` | none | `{"account": id, "balance": b}` (0 when unknown) |
//! | `POST /orders?hold_ms=H` | on the `Idempotency-Key` header (preset) | 400 without the header, 409 while the same key is in flight, else 200 `{"order": key}` |
//! | `GET /stream/{id}?ms=M` | `account:{id}` (the deposit's lock), held until the body is sent | 5 text chunks spread over `M` ms (default 1000) |
//!
//! The deposit's read and write both carry the request's [`LockLease::fencing_token`]. The store
//! remembers per account the highest token a read or write carried; a read raises it to the
//! request's token, and a read or write with a smaller token is refused with **409**
//! `urn:tower-lock-demo:stale-fencing-token`. So once a newer holder has read the balance, a
//! holder whose lease lapsed can no longer write its stale sum over the newer one's.
//!
//! Lock conflicts (409 `urn:tower-lock:lock-held`), keys that cannot be built (400
//! `urn:tower-lock:invalid-lock-key`) and lock backend failures (503
//! `urn:tower-lock:backend-unavailable`) are answered by the [`LockLayer`]. The deposit handler
//! answers its own: 409 `urn:tower-lock-demo:stale-fencing-token`, 400
//! `urn:tower-lock-demo:invalid-query` (a query string that does not parse, or an amount that
//! would overflow the balance) and 503 `urn:tower-lock-demo:store-unavailable` (the balance
//! store failed).
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};
use serde::Deserialize;
use serde_json::json;
use tower_lock::key::KeyTemplate;
use tower_lock::{
    LockLayer, LockLease, MemoryBackend, RedisBackend, RedisClusterBackend, RedlockBackend,
    problem_response,
};

/// How long `POST /queued/accounts/{id}/deposit` waits for the account's lock.
pub const QUEUED_WAIT: Duration = Duration::from_secs(10);

/// Default prefix of the lock keys (the layer's default namespace).
pub const DEFAULT_NAMESPACE: &str = "tower-lock:";
/// Default prefix of the balance records in Redis: `tower-lock-demo:balance:{id}`.
pub const DEFAULT_BALANCE_PREFIX: &str = "tower-lock-demo:balance:";

/// The lock key template of the account routes (the deposit and the stream): `account:{id}`.
pub const ACCOUNT_KEY: &str = "account:{path.id}";

/// Problem type of a read or write refused by the fence.
pub const STALE_TOKEN_TYPE: &str = "urn:tower-lock-demo:stale-fencing-token";
/// Problem type of an invalid query string.
pub const INVALID_QUERY_TYPE: &str = "urn:tower-lock-demo:invalid-query";
/// Problem type of a balance store failure.
pub const STORE_UNAVAILABLE_TYPE: &str = "urn:tower-lock-demo:store-unavailable";

/// How the demo is set up.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// `None`: [`MemoryBackend`] and an in-process balance store (unless `cluster_nodes` or
    /// `redlock_nodes` is set). `Some(url)`: [`RedisBackend`] and balances in that Redis.
    pub redis_url: Option<String>,
    /// Not empty: [`RedisClusterBackend`] on the cluster these nodes belong to, and balances in
    /// that cluster.
    pub cluster_nodes: Vec<String>,
    /// Not empty: [`RedlockBackend`] over these independent primaries, and balances in process
    /// (no single node holds them).
    pub redlock_nodes: Vec<String>,
    /// Not empty: `RedisSentinelBackend` (feature `sentinel`) on the primary these sentinels
    /// name for `sentinel_master`, and balances in process.
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under (`REDIS_SENTINEL_MASTER`).
    pub sentinel_master: Option<String>,
    /// The lock lease (TTL); `None` keeps the layer's default (10 s).
    pub lock_ttl: Option<Duration>,
    /// Prefix of the lock keys (default `tower-lock:`).
    pub namespace: String,
    /// Prefix of the balance hashes in Redis (default `tower-lock-demo:balance:`).
    pub balance_prefix: String,
    /// Renew leases while requests run (default `true`). With `false` a lock lasts one TTL at
    /// most, so a slow deposit can outlive its lease and be refused by the fence.
    pub renew_lease: bool,
    /// A PEM file of CA certificates to trust for `rediss://` URLs (`redis_url`, and the nodes
    /// of `cluster_nodes` and `redlock_nodes`), instead of the platform's roots (`REDIS_TLS_CA`;
    /// needs the crate's `tls-rustls` feature); with `sentinels`, for `rediss://` sentinels and
    /// the primary they name, which is then reached over TLS).
    pub redis_tls_ca: Option<std::path::PathBuf>,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            cluster_nodes: Vec::new(),
            redlock_nodes: Vec::new(),
            sentinels: Vec::new(),
            sentinel_master: None,
            lock_ttl: None,
            namespace: DEFAULT_NAMESPACE.to_owned(),
            balance_prefix: DEFAULT_BALANCE_PREFIX.to_owned(),
            renew_lease: true,
            redis_tls_ca: None,
        }
    }
}

impl DemoConfig {
    /// From the environment: `REDIS_URL` (set and non-empty → Redis), `REDIS_CLUSTER_NODES`
    /// (`redis://h:p,redis://h:p,…` → Redis Cluster), `REDLOCK_NODES` (`redis://…,…` → Redlock;
    /// `REDIS_SENTINELS` (`redis://h:p,…` of sentinels, with `REDIS_SENTINEL_MASTER=name` →
    /// Sentinel; at most one of the four), `LOCK_TTL_MS` (lease in milliseconds),
    /// `LOCK_NO_RENEWAL=1` (do not renew leases).
    pub fn from_env() -> Result<Self, String> {
        let nodes = |name: &str| -> Vec<String> {
            std::env::var(name)
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let mut config = Self {
            redis_url: std::env::var("REDIS_URL")
                .ok()
                .filter(|url| !url.is_empty()),
            cluster_nodes: nodes("REDIS_CLUSTER_NODES"),
            redlock_nodes: nodes("REDLOCK_NODES"),
            sentinels: nodes("REDIS_SENTINELS"),
            sentinel_master: std::env::var("REDIS_SENTINEL_MASTER")
                .ok()
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty()),
            ..Self::default()
        };
        let chosen = usize::from(config.redis_url.is_some())
            + usize::from(!config.cluster_nodes.is_empty())
            + usize::from(!config.redlock_nodes.is_empty())
            + usize::from(!config.sentinels.is_empty());
        if chosen > 1 {
            return Err(
                "set at most one of REDIS_URL, REDIS_CLUSTER_NODES, REDLOCK_NODES and \
                        REDIS_SENTINELS"
                    .to_owned(),
            );
        }
        if config.sentinels.is_empty() != config.sentinel_master.is_none() {
            return Err(
                "REDIS_SENTINELS and REDIS_SENTINEL_MASTER go together: the sentinels, and the \
                 name they monitor the primary under"
                    .to_owned(),
            );
        }
        if !config.sentinels.is_empty() && !cfg!(feature = "sentinel") {
            return Err("REDIS_SENTINELS needs the `sentinel` feature: \
                        cargo run --features sentinel --example server"
                .to_owned());
        }
        if let Some(ms) = std::env::var("LOCK_TTL_MS").ok().filter(|v| !v.is_empty()) {
            let ms: u64 = ms
                .trim()
                .parse()
                .map_err(|_| format!("LOCK_TTL_MS must be a number of milliseconds, got {ms:?}"))?;
            config.lock_ttl = Some(Duration::from_millis(ms));
        }
        config.redis_tls_ca = std::env::var_os("REDIS_TLS_CA")
            .filter(|path| !path.is_empty())
            .map(std::path::PathBuf::from);
        if let Ok(value) = std::env::var("LOCK_NO_RENEWAL") {
            config.renew_lease = !matches!(value.trim(), "1" | "true" | "yes");
        }
        Ok(config)
    }

    /// One line saying which backend is used, e.g. `backend=memory (set REDIS_URL to use Redis)`
    /// or `backend=redis url=redis://127.0.0.1:6379/` (a password in the URL is masked).
    pub fn describe_backend(&self) -> String {
        let nodes = |nodes: &[String]| {
            nodes
                .iter()
                .map(|url| redact_url(url))
                .collect::<Vec<_>>()
                .join(",")
        };
        if !self.cluster_nodes.is_empty() {
            return format!("backend=redis-cluster nodes={}", nodes(&self.cluster_nodes));
        }
        if !self.redlock_nodes.is_empty() {
            return format!(
                "backend=redlock nodes={} (balances in process)",
                nodes(&self.redlock_nodes)
            );
        }
        if !self.sentinels.is_empty() {
            return format!(
                "backend=redis-sentinel master={} sentinels={} (balances in process)",
                self.sentinel_master.as_deref().unwrap_or_default(),
                nodes(&self.sentinels)
            );
        }
        match &self.redis_url {
            None => "backend=memory (set REDIS_URL to use Redis)".to_owned(),
            Some(url) => format!("backend=redis url={}", redact_url(url)),
        }
    }

    /// The lease settings, for logs.
    pub fn describe_lease(&self) -> String {
        let ttl = match self.lock_ttl {
            Some(ttl) => format!("{} ms (LOCK_TTL_MS)", ttl.as_millis()),
            None => "10000 ms (default)".to_owned(),
        };
        let renewal = if self.renew_lease {
            "renewed while the request runs"
        } else {
            "not renewed"
        };
        format!("lock ttl={ttl}, {renewal}")
    }
}

/// `redis://user:secret@host/` → `redis://user:***@host/`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let masked = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{scheme}://{masked}{}", &rest[at..])
}

/// One account's balance and the highest fencing token a read or write of it carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// The balance.
    pub balance: i64,
    /// The highest fencing token seen so far, by a fenced read or write (0: none).
    pub fence: u64,
}

/// The outcome of a fenced read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FencedRead {
    /// The balance; the record's fence is now at least the read's token, so a write with an
    /// older token can no longer land after this read.
    Current {
        /// The balance read.
        balance: i64,
    },
    /// Refused: a read or write with the larger token `fence` came first.
    Stale {
        /// The fence the record holds.
        fence: u64,
    },
}

/// The outcome of a fenced write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FencedWrite {
    /// Written; the record's fence is now the write's token.
    Accepted,
    /// Refused: a read or write with the larger token `fence` came first.
    Stale {
        /// The fence the record holds.
        fence: u64,
    },
}

/// The fence check both scripts start with: refuse `token` (the last argument) if it is below
/// the record's fence. Tokens are decimal strings without leading zeros, so comparing lengths,
/// then text, is exact for every `u64` (Lua numbers are doubles).
const FENCE_CHECK: &str = r"
local fence = redis.call('HGET', KEYS[1], 'fence') or '0'
local token = ARGV[#ARGV]
if #token < #fence or (#token == #fence and token < fence) then
  return {0, 0, fence}
end
";

/// `KEYS[1]` = the record, `ARGV` = token: raise the fence to the token and return the balance,
/// atomically: `{1, balance, token}`, or `{0, 0, fence}` when the token is stale.
static FENCED_READ: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(&format!(
        "{FENCE_CHECK}
redis.call('HSET', KEYS[1], 'fence', token)
return {{1, redis.call('HGET', KEYS[1], 'balance') or '0', token}}
"
    ))
});

/// `KEYS[1]` = the record, `ARGV` = balance, token: write the balance and raise the fence,
/// atomically: `{1, 0, token}`, or `{0, 0, fence}` when the token is stale.
static FENCED_WRITE: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(&format!(
        "{FENCE_CHECK}
redis.call('HSET', KEYS[1], 'balance', ARGV[1], 'fence', token)
return {{1, 0, token}}
"
    ))
});

/// Where balances live.
#[derive(Clone)]
pub enum Store {
    /// In this process.
    Memory(Arc<Mutex<HashMap<String, Record>>>),
    /// In Redis: one hash (`balance`, `fence`) per account under `prefix` + id.
    Redis {
        /// The shared connection.
        connection: StoreConnection,
        /// Key prefix, default `tower-lock-demo:balance:`.
        prefix: Arc<str>,
    },
}

/// A connection to one Redis or to a Redis Cluster.
#[derive(Clone)]
pub enum StoreConnection {
    /// One Redis.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for StoreConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Memory(_) => f.write_str("Store::Memory"),
            Self::Redis { prefix, .. } => write!(f, "Store::Redis({prefix:?})"),
        }
    }
}

impl Store {
    /// An empty in-process store.
    pub fn memory() -> Self {
        Self::Memory(Arc::default())
    }

    /// A store in the Redis at `url`; connects now.
    pub async fn redis(url: &str, prefix: &str) -> redis::RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let connection = client
            .get_connection_manager_with_config(RedisBackend::config())
            .await?;
        Ok(Self::Redis {
            connection: StoreConnection::Single(connection),
            prefix: prefix.into(),
        })
    }

    /// A store in the Redis `client` reaches; connects lazily, on the first request, and
    /// reconnects after failures, so this succeeds while Redis is down.
    pub fn redis_lazy(client: &redis::Client, prefix: &str) -> redis::RedisResult<Self> {
        Ok(Self::Redis {
            connection: StoreConnection::Single(
                client.get_connection_manager_lazy(RedisBackend::config())?,
            ),
            prefix: prefix.into(),
        })
    }

    /// A store in the Redis Cluster `cluster` describes (from
    /// [`RedisClusterBackend::client_builder`] or a backend builder's, with its TLS trust);
    /// connects now.
    pub async fn cluster(
        cluster: redis::cluster::ClusterClientBuilder,
        prefix: &str,
    ) -> redis::RedisResult<Self> {
        let connection = cluster.build()?.get_async_connection().await?;
        Ok(Self::Redis {
            connection: StoreConnection::Cluster(connection),
            prefix: prefix.into(),
        })
    }

    /// The Redis key of account `id`'s record (`None` for the in-process store).
    pub fn redis_key(&self, id: &str) -> Option<String> {
        match self {
            Self::Memory(_) => None,
            Self::Redis { prefix, .. } => Some(format!("{prefix}{id}")),
        }
    }

    fn map(
        map: &Mutex<HashMap<String, Record>>,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Record>> {
        map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Account `id`'s record (the default, all zero, when unknown).
    pub async fn record(&self, id: &str) -> redis::RedisResult<Record> {
        match self {
            Self::Memory(map) => Ok(Self::map(map).get(id).copied().unwrap_or_default()),
            Self::Redis { connection, prefix } => {
                let (balance, fence): (Option<i64>, Option<u64>) = redis::cmd("HMGET")
                    .arg(format!("{prefix}{id}"))
                    .arg("balance")
                    .arg("fence")
                    .query_async(&mut connection.clone())
                    .await?;
                Ok(Record {
                    balance: balance.unwrap_or(0),
                    fence: fence.unwrap_or(0),
                })
            }
        }
    }

    /// Account `id`'s balance (0 when unknown).
    pub async fn balance(&self, id: &str) -> redis::RedisResult<i64> {
        Ok(self.record(id).await?.balance)
    }

    /// Reads the balance if `token` is at least the highest token seen for `id`, and raises that
    /// fence to `token`, so that a write with an older token is refused from now on. Atomic in
    /// both stores.
    ///
    /// Fencing only the write is not enough for a read–modify–write: a holder whose lease lapsed
    /// after its read would still write (its token is the highest the record has seen), and the
    /// newer holder, which read the same balance, would then overwrite that deposit with its own
    /// stale sum. The record must see the newer token before the stale write lands.
    pub async fn read_fenced(&self, id: &str, token: u64) -> redis::RedisResult<FencedRead> {
        match self {
            Self::Memory(map) => {
                let mut map = Self::map(map);
                let record = map.entry(id.to_owned()).or_default();
                if token < record.fence {
                    return Ok(FencedRead::Stale {
                        fence: record.fence,
                    });
                }
                record.fence = token;
                Ok(FencedRead::Current {
                    balance: record.balance,
                })
            }
            Self::Redis { connection, prefix } => {
                let (accepted, balance, fence): (i64, i64, u64) = FENCED_READ
                    .key(format!("{prefix}{id}"))
                    .arg(token)
                    .invoke_async(&mut connection.clone())
                    .await?;
                Ok(if accepted == 1 {
                    FencedRead::Current { balance }
                } else {
                    FencedRead::Stale { fence }
                })
            }
        }
    }

    /// Sets the balance if `token` is at least the highest token seen for `id`, and remembers
    /// `token`. Atomic in both stores.
    pub async fn write_fenced(
        &self,
        id: &str,
        balance: i64,
        token: u64,
    ) -> redis::RedisResult<FencedWrite> {
        match self {
            Self::Memory(map) => {
                let mut map = Self::map(map);
                let record = map.entry(id.to_owned()).or_default();
                if token < record.fence {
                    return Ok(FencedWrite::Stale {
                        fence: record.fence,
                    });
                }
                *record = Record {
                    balance,
                    fence: token,
                };
                Ok(FencedWrite::Accepted)
            }
            Self::Redis { connection, prefix } => {
                let (accepted, _, fence): (i64, i64, u64) = FENCED_WRITE
                    .key(format!("{prefix}{id}"))
                    .arg(balance)
                    .arg(token)
                    .invoke_async(&mut connection.clone())
                    .await?;
                Ok(if accepted == 1 {
                    FencedWrite::Accepted
                } else {
                    FencedWrite::Stale { fence }
                })
            }
        }
    }

    /// Sets the balance without any fence check (the unlocked route).
    pub async fn write_unfenced(&self, id: &str, balance: i64) -> redis::RedisResult<()> {
        match self {
            Self::Memory(map) => {
                Self::map(map).entry(id.to_owned()).or_default().balance = balance;
                Ok(())
            }
            Self::Redis { connection, prefix } => {
                redis::cmd("HSET")
                    .arg(format!("{prefix}{id}"))
                    .arg("balance")
                    .arg(balance)
                    .exec_async(&mut connection.clone())
                    .await
            }
        }
    }
}

/// The demo router and its balance store.
pub struct Demo {
    /// The router with every route.
    pub router: Router,
    /// The balances the router reads and writes.
    pub store: Store,
}

/// The demo router. With `redis_url` it connects lazily: it starts while Redis refuses it, and
/// answers 503 until Redis accepts it. Fails on a Cluster or Redlock it cannot reach, a URL that
/// does not parse, or a `redis_tls_ca` it cannot read.
pub async fn app(config: DemoConfig) -> redis::RedisResult<Router> {
    Ok(build(config).await?.router)
}

/// The demo router and the store it uses.
pub async fn build(config: DemoConfig) -> redis::RedisResult<Demo> {
    let tls_ca = read_tls_ca(config.redis_tls_ca.as_deref())?;
    if !config.cluster_nodes.is_empty() {
        let cluster = RedisClusterBackend::builder(&config.cluster_nodes);
        #[cfg(feature = "tls-rustls")]
        let cluster = match &tls_ca {
            Some(pem) => cluster.trust_ca_pem(pem.clone()),
            None => cluster,
        };
        let backend = cluster.clone().connect().await?;
        let store = Store::cluster(cluster.client_builder()?, &config.balance_prefix).await?;
        return Ok(with_backend(backend, store, &config));
    }
    if !config.redlock_nodes.is_empty() {
        let redlock = RedlockBackend::builder(&config.redlock_nodes);
        #[cfg(feature = "tls-rustls")]
        let redlock = match &tls_ca {
            Some(pem) => redlock.trust_ca_pem(pem.clone()),
            None => redlock,
        };
        let backend = redlock.connect().await?;
        return Ok(with_backend(backend, Store::memory(), &config));
    }
    #[cfg(feature = "sentinel")]
    if let (false, Some(master)) = (config.sentinels.is_empty(), &config.sentinel_master) {
        // Balances in process: the store's connection does not follow a failover.
        let sentinel = tower_lock::RedisSentinelBackend::builder(&config.sentinels, master);
        #[cfg(feature = "tls-rustls")]
        let sentinel = match &tls_ca {
            Some(pem) => sentinel.trust_ca_pem(pem.clone()),
            None => sentinel,
        };
        let backend = sentinel.connect().await?;
        return Ok(with_backend(backend, Store::memory(), &config));
    }
    match &config.redis_url {
        None => Ok(with_backend(MemoryBackend::new(), Store::memory(), &config)),
        Some(url) => {
            let redis = redis_builder(url, tls_ca)?;
            let store = Store::redis_lazy(&redis.client()?, &config.balance_prefix)?;
            Ok(with_backend(redis.build()?, store, &config))
        }
    }
}

/// The settings of the demo's Redis: `url`, trusting the CA certificates `tls_ca` (PEM) when
/// given.
fn redis_builder(
    url: &str,
    tls_ca: Option<Vec<u8>>,
) -> redis::RedisResult<tower_lock::backend::RedisBackendBuilder> {
    let builder = RedisBackend::builder(url);
    #[cfg(feature = "tls-rustls")]
    if let Some(pem) = tls_ca {
        return Ok(builder.trust_ca_pem(pem));
    }
    let _ = tls_ca;
    Ok(builder)
}

/// The CA certificates (PEM) in the file `REDIS_TLS_CA` names, for every backend: `REDIS_URL`,
/// `REDIS_CLUSTER_NODES`, `REDLOCK_NODES` and `REDIS_SENTINELS` (`rediss://` URLs).
fn read_tls_ca(path: Option<&std::path::Path>) -> redis::RedisResult<Option<Vec<u8>>> {
    let Some(path) = path else {
        return Ok(None);
    };
    if !cfg!(feature = "tls-rustls") {
        return Err(redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "REDIS_TLS_CA needs TLS: run with `--features tls-rustls`",
        )));
    }
    std::fs::read(path).map(Some).map_err(|error| {
        redis::RedisError::from(std::io::Error::new(
            error.kind(),
            format!("REDIS_TLS_CA={}: {error}", path.display()),
        ))
    })
}

/// Where the demo listens: `HOST` (an IP address, default `127.0.0.1`, so the demo is not
/// reachable from other machines unless asked, e.g. `HOST=0.0.0.0`) and `PORT` (default 3000).
pub fn listen_addr(host: Option<&str>, port: Option<&str>) -> Result<SocketAddr, String> {
    let ip = match host.map(str::trim).filter(|host| !host.is_empty()) {
        None => std::net::IpAddr::from([127, 0, 0, 1]),
        Some(host) => host
            .parse()
            .map_err(|_| format!("HOST must be an IP address, got {host:?}"))?,
    };
    let port = match port {
        None => 3000,
        Some(port) => port
            .trim()
            .parse()
            .map_err(|_| format!("PORT must be a port number, got {port:?}"))?,
    };
    Ok(SocketAddr::new(ip, port))
}

/// The demo router on any lock backend and store.
pub fn with_backend<B: tower_lock::LockBackend>(
    backend: B,
    store: Store,
    config: &DemoConfig,
) -> Demo {
    // Every route that locks an account locks `account:{id}`: a prefix of its own, so that in
    // one namespace no other route's key (the Idempotency-Key preset's, say) can name the same
    // lock, and request material cannot forge it (a `:` in a value is escaped).
    let layer = |pattern: &str| {
        // With the crate's `axum` feature the template reads axum's `MatchedPath`; the explicit
        // pattern makes it work without the feature too.
        let key = KeyTemplate::parse(ACCOUNT_KEY)
            .and_then(|template| template.with_pattern(pattern))
            .unwrap_or_else(|error| panic!("the demo's key template is invalid: {error}"));
        let mut layer = LockLayer::new(backend.clone(), key).namespace(&config.namespace);
        if let Some(ttl) = config.lock_ttl {
            layer = layer.ttl(ttl);
        }
        if !config.renew_lease {
            layer = layer.no_renewal();
        }
        layer
    };

    let locked = Router::new()
        .route("/accounts/{id}/deposit", post(deposit))
        .route_layer(layer("/accounts/{id}/deposit"));
    // The same deposit, same lock, but a contended request waits (up to 10 s) for its turn.
    let queued = Router::new()
        .route("/queued/accounts/{id}/deposit", post(deposit))
        .route_layer(layer("/queued/accounts/{id}/deposit").wait(QUEUED_WAIT));
    let streaming = Router::new()
        .route("/stream/{id}", get(stream))
        .route_layer(layer("/stream/{id}").hold_through_body(true));
    let orders = Router::new().route(
        "/orders",
        post(order).route_layer(
            tower_lock::idempotency::layer(backend.clone()).namespace(&config.namespace),
        ),
    );
    let router = Router::new()
        .route("/unlocked/accounts/{id}/deposit", post(deposit_unlocked))
        .merge(orders)
        .route("/accounts/{id}", get(balance))
        .merge(locked)
        .merge(queued)
        .merge(streaming)
        .with_state(store.clone());
    Demo { router, store }
}

/// A demo server running on a task.
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its balances.
    pub store: Store,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Builds the demo and serves it on an ephemeral port of 127.0.0.1, on a task of the current
/// runtime. The server stops when the returned [`Running`] is dropped.
pub async fn spawn(config: DemoConfig) -> std::io::Result<Running> {
    let demo = build(config).await.map_err(std::io::Error::other)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, demo.router).await {
            eprintln!("demo server failed: {error}");
        }
    });
    Ok(Running {
        addr,
        store: demo.store,
        task,
    })
}

/// Waits `hold_ms`. Without it (or with 0) the handler only yields once: the read and the write
/// of a deposit stay apart, as the unlocked route's lost updates need, but the request does not
/// wait for the runtime timer's next millisecond tick, as `sleep(0)` would (up to 1 ms each).
async fn hold(hold_ms: Option<u64>) {
    match hold_ms.unwrap_or(0) {
        0 => tokio::task::yield_now().await,
        ms => tokio::time::sleep(Duration::from_millis(ms)).await,
    }
}

#[derive(Debug, Deserialize)]
struct DepositParams {
    amount: Option<i64>,
    hold_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct OrderParams {
    hold_ms: Option<u64>,
}

/// `POST /orders`: protected by the Idempotency-Key preset; holds `hold_ms`, then answers
/// `{"order": <the Idempotency-Key>}`.
async fn order(
    headers: axum::http::HeaderMap,
    params: Result<Query<OrderParams>, QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(params) => params,
        Err(rejection) => return invalid_query(&rejection),
    };
    hold(params.hold_ms).await;
    // The layer has already rejected requests without the header.
    let key = headers
        .get("idempotency-key")
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        .unwrap_or_default();
    Json(json!({ "order": key })).into_response()
}

#[derive(Debug, Deserialize)]
struct StreamParams {
    ms: Option<u64>,
}

fn problem(status: StatusCode, kind: &str, title: &str, detail: &str) -> Response {
    problem_response(status, kind, title, detail, None).map(axum::body::Body::from)
}

fn invalid_query(rejection: &QueryRejection) -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        INVALID_QUERY_TYPE,
        "Invalid query string",
        &rejection.body_text(),
    )
}

fn store_failed(error: &redis::RedisError) -> Response {
    tracing::error!(%error, "balance store failed");
    problem_response(
        StatusCode::SERVICE_UNAVAILABLE,
        STORE_UNAVAILABLE_TYPE,
        "The balance store is unavailable",
        "The balance could not be read or written.",
        Some(1),
    )
    .map(axum::body::Body::from)
}

fn overflow() -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        INVALID_QUERY_TYPE,
        "Invalid amount",
        "The deposit would overflow the balance.",
    )
}

/// 409 `urn:tower-lock-demo:stale-fencing-token`: the record has seen a newer token than this
/// request's, so its lock expired and a later holder used the account.
fn stale_token(token: u64, fence: u64, step: &str) -> Response {
    problem(
        StatusCode::CONFLICT,
        STALE_TOKEN_TYPE,
        "Stale fencing token",
        &format!(
            "This request's lock (fencing token {token}) expired before it {step} the balance; a \
             later holder has used fencing token {fence} since. The deposit was not applied."
        ),
    )
}

/// `POST /accounts/{id}/deposit`: fenced read, hold, fenced write.
async fn deposit(
    State(store): State<Store>,
    Path(id): Path<String>,
    lease: Option<Extension<LockLease>>,
    params: Result<Query<DepositParams>, QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(params) => params,
        Err(rejection) => return invalid_query(&rejection),
    };
    let Some(Extension(lease)) = lease else {
        // Only reachable if the layer let the request through unlocked (fail-open).
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "urn:tower-lock-demo:no-lease",
            "The request holds no lock",
            "The deposit route requires a lock lease, and the request has none.",
        );
    };
    let amount = params.amount.unwrap_or(1);
    let token = lease.fencing_token();

    // Deliberately not atomic: read, wait, write; both the read and the write are fenced.
    let current = match store.read_fenced(&id, token).await {
        Ok(FencedRead::Current { balance }) => balance,
        Ok(FencedRead::Stale { fence }) => return stale_token(token, fence, "read"),
        Err(error) => return store_failed(&error),
    };
    hold(params.hold_ms).await;
    let Some(new_balance) = current.checked_add(amount) else {
        return overflow();
    };
    match store.write_fenced(&id, new_balance, token).await {
        Ok(FencedWrite::Accepted) => Json(json!({
            "account": id,
            "balance": new_balance,
            "fencing_token": token,
        }))
        .into_response(),
        Ok(FencedWrite::Stale { fence }) => stale_token(token, fence, "wrote"),
        Err(error) => store_failed(&error),
    }
}

/// `POST /unlocked/accounts/{id}/deposit`: read, hold, plain write. Loses updates.
async fn deposit_unlocked(
    State(store): State<Store>,
    Path(id): Path<String>,
    params: Result<Query<DepositParams>, QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(params) => params,
        Err(rejection) => return invalid_query(&rejection),
    };
    let amount = params.amount.unwrap_or(1);
    let current = match store.balance(&id).await {
        Ok(balance) => balance,
        Err(error) => return store_failed(&error),
    };
    hold(params.hold_ms).await;
    let Some(new_balance) = current.checked_add(amount) else {
        return overflow();
    };
    match store.write_unfenced(&id, new_balance).await {
        Ok(()) => Json(json!({ "account": id, "balance": new_balance })).into_response(),
        Err(error) => store_failed(&error),
    }
}

/// `GET /accounts/{id}`.
async fn balance(State(store): State<Store>, Path(id): Path<String>) -> Response {
    match store.balance(&id).await {
        Ok(balance) => Json(json!({ "account": id, "balance": balance })).into_response(),
        Err(error) => store_failed(&error),
    }
}

/// Number of chunks `GET /stream/{id}` sends.
pub const STREAM_CHUNKS: u32 = 5;

/// `GET /stream/{id}?ms=M`: 5 chunks, the first at once and the last after `M` ms; the lock is
/// held until the last one is sent.
async fn stream(
    Path(id): Path<String>,
    lease: Option<Extension<LockLease>>,
    params: Result<Query<StreamParams>, QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(params) => params,
        Err(rejection) => return invalid_query(&rejection),
    };
    let total = Duration::from_millis(params.ms.unwrap_or(1000));
    let gap = total / (STREAM_CHUNKS - 1);
    let token = lease.map(|Extension(lease)| lease.fencing_token());
    let chunks = futures_util::stream::unfold(0u32, move |sent| {
        let id = id.clone();
        async move {
            if sent == STREAM_CHUNKS {
                return None;
            }
            if sent > 0 {
                tokio::time::sleep(gap).await;
            }
            let mut line = format!("account {id}: chunk {}/{STREAM_CHUNKS}", sent + 1);
            if let (0, Some(token)) = (sent, token) {
                line.push_str(&format!(" (lock held, fencing token {token})"));
            }
            line.push('\n');
            Some((Ok::<_, Infallible>(Bytes::from(line)), sent + 1))
        }
    });
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        axum::body::Body::from_stream(chunks),
    )
        .into_response()
}
