//! One Redis primary, reached through one shared multiplexed connection.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

use super::{
    Acquire, AcquireOptions, BackendError, BackendErrorKind, BackendFuture, Extend, LockBackend,
    LockName, LockToken, Release,
};

/// `SET NX PX`; on success bump the fencing counter (when ARGV[3] is 1), else report the holder's
/// PTTL. One round trip.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
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
    pub fn from_url(url: &str) -> Result<Self, RedisError> {
        let client = redis::Client::open(url)?;
        Ok(Self::new(
            client.get_connection_manager_lazy(Self::config())?,
        ))
    }

    /// Like [`RedisBackend::from_url`], but connects now and fails if Redis cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, RedisError> {
        let client = redis::Client::open(url)?;
        Ok(Self::new(
            client
                .get_connection_manager_with_config(Self::config())
                .await?,
        ))
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

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, i64::MAX as u64 / 2)
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
            Ok(match outcome {
                1 => Release::Released,
                0 => Release::Expired,
                _ => Release::HeldByOther,
            })
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
}
