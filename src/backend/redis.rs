//! One Redis primary, reached through one shared multiplexed connection.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

use super::{
    Acquire, AcquireOptions, BackendError, BackendErrorKind, BackendFuture, Extend, Inspect,
    LockBackend, LockName, LockToken, Release,
};

/// `SET NX PX`; on success bump the fencing counter (when ARGV[3] is 1), else report the holder's
/// PTTL. One round trip. An acquire whose clean-up already ran (its tombstone KEYS[3] exists:
/// it reached Redis after the clean-up, e.g. on a socket that broke while Redis was stalled)
/// takes nothing; nobody waits for its answer.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {0, -3}
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[3] == '1' then
    return {1, redis.call('INCR', KEYS[2])}
  end
  return {1, 0}
end
return {0, redis.call('PTTL', KEYS[1])}
",
    )
});

/// Compare-and-delete: 1 released, 0 already gone, -1 held by another token.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
if holder then return -1 end
return 0
",
    )
});

/// The clean-up of an acquire whose outcome is unknown: compare-and-delete (1 released, 0 gone,
/// -1 held by another token) and, when the lock was not ours, a tombstone (KEYS[2], for ARGV[2]
/// ms) that keeps our acquire, should it still arrive, from taking the lock.
static RELEASE_ABANDONED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
if holder then return -1 end
return 0
",
    )
});

/// How long a tombstone outlives the clean-up that wrote it: an abandoned acquire that reaches
/// Redis later than this (Redis stalled for longer) could still take the lock for one TTL.
fn tombstone_ttl(ttl: Duration) -> Duration {
    ttl.saturating_mul(10).max(Duration::from_secs(60))
}

/// The tombstone of `token`'s acquire of `name`: same hash tag, so the same Cluster slot.
fn tombstone_key(name: &LockName, token: LockToken) -> String {
    format!("{}:abandoned:{}", name.lock_key(), token.to_hex())
}

/// Compare-and-expire: 1 extended, 0 gone or held by another token.
static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
",
    )
});

/// Locks on one Redis primary.
///
/// All requests share one multiplexed connection ([`ConnectionManager`]), which reconnects on its
/// own after Redis restarts; no connection is opened per request. Acquire, release and extend are
/// each one `EVALSHA` round trip.
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
    connection: ConnectionManager,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend").finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// A backend on an existing connection manager.
    pub fn new(connection: ConnectionManager) -> Self {
        Self { connection }
    }

    /// A backend for `url` (`redis://host:port/db`). The connection is opened lazily, on the first
    /// lock, and re-opened after failures, so this succeeds even while Redis is down.
    ///
    /// It also checks the eviction policy in the background, as [`RedisBackend::connect`] does.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime: redis-rs starts the connection's task here. Build the backend
    /// inside your runtime (in `main` under `#[tokio::main]`, say), as you build the router.
    pub fn from_url(url: &str) -> Result<Self, RedisError> {
        let client = redis::Client::open(url)?;
        let backend = Self::new(client.get_connection_manager_lazy(Self::config())?);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let mut connection = backend.connection.clone();
            runtime.spawn(async move { warn_if_evicting(&mut connection).await });
        }
        Ok(backend)
    }

    /// Like [`RedisBackend::from_url`], but connects now and fails if Redis cannot be reached.
    ///
    /// Warns (through `tracing`) if Redis runs with a `maxmemory-policy` that evicts: `allkeys-*`
    /// may evict fencing counters (handing out a token again) and locks, `volatile-*` locks.
    pub async fn connect(url: &str) -> Result<Self, RedisError> {
        let client = redis::Client::open(url)?;
        let mut connection = client
            .get_connection_manager_with_config(Self::config())
            .await?;
        warn_if_evicting(&mut connection).await;
        Ok(Self::new(connection))
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
}

/// Warns if Redis may evict our keys: fencing counters have no expiry, so an `allkeys-*` policy
/// can drop one and hand out its tokens again; locks have one, so any evicting policy can drop a
/// held lock. Errors (an ACL that denies
/// `INFO`, a server not reachable yet) are ignored: this is advice, not a precondition.
async fn warn_if_evicting(connection: &mut ConnectionManager) {
    let Ok(info) = redis::cmd("INFO")
        .arg("memory")
        .query_async::<String>(connection)
        .await
    else {
        return;
    };
    let policy = info
        .lines()
        .find_map(|line| line.strip_prefix("maxmemory_policy:"))
        .map(str::trim);
    match policy {
        Some(policy) if policy.starts_with("allkeys-") => tracing::warn!(
            maxmemory_policy = policy,
            "Redis may evict any key under memory pressure: fencing counters (tokens handed out \
             again) and held locks (two holders) can disappear; use `noeviction`"
        ),
        Some(policy) if policy.starts_with("volatile-") => tracing::warn!(
            maxmemory_policy = policy,
            "Redis may evict keys with an expiry under memory pressure: held locks (two holders) \
             can disappear; use `noeviction`"
        ),
        _ => {}
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, i64::MAX as u64 / 2)
}

fn release_outcome(outcome: i64) -> Release {
    match outcome {
        1 => Release::Released,
        0 => Release::Expired,
        _ => Release::HeldByOther,
    }
}

fn unavailable(error: RedisError) -> BackendError {
    let kind = if error.kind() == redis::ErrorKind::UnexpectedReturnType {
        BackendErrorKind::Protocol
    } else {
        BackendErrorKind::Unavailable
    };
    BackendError::new(kind, format_args!("redis: {error}"))
}

impl LockBackend for RedisBackend {
    fn acquire(
        &self,
        name: &LockName,
        token: LockToken,
        options: AcquireOptions,
    ) -> BackendFuture<Acquire> {
        let mut connection = self.connection.clone();
        let mut invocation = ACQUIRE.key(name.lock_key());
        invocation
            .key(name.fence_key())
            .key(tombstone_key(name, token))
            .arg(token.to_hex())
            .arg(millis(options.ttl))
            .arg(u8::from(options.fencing));
        Box::pin(async move {
            let (acquired, value): (i64, i64) = invocation
                .invoke_async(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok(match acquired {
                1 => Acquire::Acquired {
                    fencing_token: u64::try_from(value).unwrap_or(0),
                },
                _ => Acquire::Held {
                    // PTTL is -1 for a key without expiry (set by someone else).
                    remaining: u64::try_from(value).ok().map(Duration::from_millis),
                },
            })
        })
    }

    fn release(&self, name: &LockName, token: LockToken) -> BackendFuture<Release> {
        let mut connection = self.connection.clone();
        let mut invocation = RELEASE.key(name.lock_key());
        invocation.arg(token.to_hex());
        Box::pin(async move {
            let outcome: i64 = invocation
                .invoke_async(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok(release_outcome(outcome))
        })
    }

    fn release_abandoned(
        &self,
        name: &LockName,
        token: LockToken,
        ttl: Duration,
    ) -> BackendFuture<Release> {
        let mut connection = self.connection.clone();
        let mut invocation = RELEASE_ABANDONED.key(name.lock_key());
        invocation
            .key(tombstone_key(name, token))
            .arg(token.to_hex())
            .arg(millis(tombstone_ttl(ttl)));
        Box::pin(async move {
            let outcome: i64 = invocation
                .invoke_async(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok(release_outcome(outcome))
        })
    }

    fn extend(&self, name: &LockName, token: LockToken, ttl: Duration) -> BackendFuture<Extend> {
        let mut connection = self.connection.clone();
        let mut invocation = EXTEND.key(name.lock_key());
        invocation.arg(token.to_hex()).arg(millis(ttl));
        Box::pin(async move {
            let outcome: i64 = invocation
                .invoke_async(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok(if outcome == 1 {
                Extend::Extended
            } else {
                Extend::Lost
            })
        })
    }

    /// `PTTL` of the lock key: -2 free, -1 held without expiry, else the holder's remaining lease.
    fn inspect(&self, name: &LockName) -> BackendFuture<Inspect> {
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("PTTL");
        command.arg(name.lock_key());
        Box::pin(async move {
            let pttl: i64 = command
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok(match pttl {
                -2 => Inspect::Free,
                _ => Inspect::Held {
                    remaining: u64::try_from(pttl).ok().map(Duration::from_millis),
                },
            })
        })
    }

    /// `DEL` of the lock key only: the fencing counter stays, so tokens keep growing.
    fn force_release(&self, name: &LockName) -> BackendFuture<bool> {
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("DEL");
        command.arg(name.lock_key());
        Box::pin(async move {
            let deleted: i64 = command
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok(deleted > 0)
        })
    }
}
