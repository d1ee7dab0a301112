//! The lock's commands on Redis, over any redis-rs async connection: what [`RedisBackend`] sends
//! to its primary and [`RedisClusterBackend`] to the primary of the lock's hash slot.
//!
//! [`RedisBackend`]: super::RedisBackend
//! [`RedisClusterBackend`]: super::RedisClusterBackend

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionLike;
use redis::{RedisError, Script, Value};

use super::{
    Acquire, AcquireOptions, BackendError, BackendErrorKind, BackendFuture, Extend, Inspect,
    LockName, LockToken, Release,
};

/// The lock's value: the holder's token (32 hex digits), `:`, and when its lease ends, in
/// milliseconds of the holder's wall clock. The deadline only tells another acquirer how long to
/// wait (`Retry-After`): ownership is decided by the token alone, and a clock that is off skews
/// that hint, never who holds the lock.
pub(super) fn lock_value(token: LockToken, ttl: Duration) -> String {
    let deadline = SystemTime::now()
        .checked_add(ttl)
        .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |since| since.as_millis());
    format!("{}:{deadline}", token.to_hex())
}

/// How long the holder whose lock value is `value` has left, by its deadline and this clock.
pub(super) fn remaining_from_value(value: &[u8]) -> Option<Duration> {
    let value = std::str::from_utf8(value).ok()?;
    let (_, deadline) = value.split_once(':')?;
    let deadline = UNIX_EPOCH.checked_add(Duration::from_millis(deadline.parse().ok()?))?;
    Some(
        deadline
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The acquire when it needs more than `SET NX PX GET`: with fencing, `SET NX PX` and, on
/// success, the fencing counter's `INCR`, atomically; on Redis before 7.0 (no `NX` with `GET`),
/// the same without fencing. One scalar back (a table costs Redis more than the `INCR`): the
/// fencing token (≥ 1), 0 for acquired without fencing, or `-3 - PTTL` for held (≤ -2).
pub(super) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[3] == '1' then
    return redis.call('INCR', KEYS[2])
  end
  return 0
end
return -3 - redis.call('PTTL', KEYS[1])
",
    )
});

/// Compare-and-delete by token (the value's first 32 characters): 1 released, 0 already gone,
/// -1 held by another token.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local holder = redis.call('GET', KEYS[1])
if not holder then return 0 end
if string.sub(holder, 1, 32) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return -1
",
    )
});

/// Compare-and-expire by token: the lease runs ARGV[2] ms from now, and the value carries the
/// new deadline (ARGV[3]). 1 extended, 0 gone or held by another token.
pub(super) static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local holder = redis.call('GET', KEYS[1])
if holder and string.sub(holder, 1, 32) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
  return 1
end
return 0
",
    )
});

/// Whether the lock whose value is `value` is held by `token` (its first 32 characters).
fn holds(value: &[u8], token: &str) -> bool {
    value.get(..32) == Some(token.as_bytes())
}

pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, i64::MAX as u64 / 2)
}

/// What the acquire script answered (see [`ACQUIRE`]).
pub(super) fn scripted_outcome(outcome: i64) -> Acquire {
    match u64::try_from(outcome) {
        Ok(fencing_token) => Acquire::Acquired { fencing_token },
        // `-3 - PTTL`: PTTL -1 is a key without expiry (set by someone else).
        Err(_) => Acquire::Held {
            remaining: u64::try_from(-3 - outcome).ok().map(Duration::from_millis),
        },
    }
}

pub(super) fn release_outcome(outcome: i64) -> Release {
    match outcome {
        1 => Release::Released,
        0 => Release::Expired,
        _ => Release::HeldByOther,
    }
}

pub(super) fn unavailable(error: RedisError) -> BackendError {
    let kind = if error.kind() == redis::ErrorKind::UnexpectedReturnType {
        BackendErrorKind::Protocol
    } else {
        BackendErrorKind::Unavailable
    };
    BackendError::new(kind, format_args!("redis: {error}"))
        .with_reason(super::failure::reason(&error))
}

/// The commands of one backend: its connection, its acquire script, and whether Redis has
/// refused `SET … NX … GET` (before 7.0), after which acquires go through the script.
#[derive(Clone)]
pub(super) struct Commands<C> {
    pub(super) connection: C,
    acquire: &'static Script,
    scripted_acquire: Arc<AtomicBool>,
}

impl<C> Commands<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Commands on `connection`, acquiring with `acquire` when a script is needed (it answers as
    /// [`ACQUIRE`] does).
    pub(super) fn new(connection: C, acquire: &'static Script) -> Self {
        Self {
            connection,
            acquire,
            scripted_acquire: Arc::default(),
        }
    }

    pub(super) fn acquire(
        &self,
        name: &LockName,
        token: LockToken,
        options: AcquireOptions,
    ) -> BackendFuture<Acquire> {
        let mut connection = self.connection.clone();
        let value = lock_value(token, options.ttl);
        let ttl = millis(options.ttl);
        if options.fencing || self.scripted_acquire.load(Ordering::Relaxed) {
            let mut invocation = self.acquire.key(name.lock_key());
            invocation
                .key(name.fence_key())
                .arg(value)
                .arg(ttl)
                .arg(u8::from(options.fencing));
            return Box::pin(async move {
                let outcome: i64 = invocation
                    .invoke_async(&mut connection)
                    .await
                    .map_err(unavailable)?;
                Ok(scripted_outcome(outcome))
            });
        }
        let mut command = redis::cmd("SET");
        command
            .arg(name.lock_key())
            .arg(&value)
            .arg("NX")
            .arg("PX")
            .arg(ttl)
            .arg("GET");
        let scripted = self.scripted_acquire.clone();
        let acquire = self.acquire;
        let name = name.clone();
        Box::pin(async move {
            match command.query_async::<Value>(&mut connection).await {
                // Nothing was there: the lock is ours.
                Ok(Value::Nil) => Ok(Acquire::Acquired { fencing_token: 0 }),
                // Our own value: a resent acquire whose first send landed.
                Ok(Value::BulkString(holder)) if holds(&holder, &value[..32]) => {
                    Ok(Acquire::Acquired { fencing_token: 0 })
                }
                Ok(Value::BulkString(holder)) => Ok(Acquire::Held {
                    remaining: remaining_from_value(&holder),
                }),
                Ok(other) => Err(BackendError::new(
                    BackendErrorKind::Protocol,
                    format_args!("redis: unexpected reply to SET NX GET: {other:?}"),
                )),
                // Redis before 7.0 refuses `NX` with `GET` (a syntax error: nothing was set).
                Err(error)
                    if error.code() == Some("ERR")
                        && error.to_string().contains("syntax error") =>
                {
                    scripted.store(true, Ordering::Relaxed);
                    let mut invocation = acquire.key(name.lock_key());
                    invocation
                        .key(name.fence_key())
                        .arg(value)
                        .arg(ttl)
                        .arg(0u8);
                    let outcome: i64 = invocation
                        .invoke_async(&mut connection)
                        .await
                        .map_err(unavailable)?;
                    Ok(scripted_outcome(outcome))
                }
                Err(error) => Err(unavailable(error)),
            }
        })
    }

    pub(super) fn release(&self, name: &LockName, token: LockToken) -> BackendFuture<Release> {
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

    pub(super) fn extend(
        &self,
        name: &LockName,
        token: LockToken,
        ttl: Duration,
    ) -> BackendFuture<Extend> {
        let mut connection = self.connection.clone();
        let mut invocation = EXTEND.key(name.lock_key());
        invocation
            .arg(token.to_hex())
            .arg(millis(ttl))
            .arg(lock_value(token, ttl));
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
    pub(super) fn inspect(&self, name: &LockName) -> BackendFuture<Inspect> {
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
    pub(super) fn force_release(&self, name: &LockName) -> BackendFuture<bool> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_held_by_the_token_it_starts_with() {
        let token = LockToken::random();
        let value = lock_value(token, Duration::from_secs(1));
        assert!(holds(value.as_bytes(), &token.to_hex()));
        assert!(!holds(value.as_bytes(), &LockToken::random().to_hex()));
        assert!(!holds(b"short", &token.to_hex()));
    }

    #[test]
    fn the_acquire_scripts_scalar_is_a_token_or_the_holders_pttl() {
        assert!(matches!(
            scripted_outcome(7),
            Acquire::Acquired { fencing_token: 7 }
        ));
        assert!(matches!(
            scripted_outcome(0),
            Acquire::Acquired { fencing_token: 0 }
        ));
        // -3 - PTTL: 1500 ms left, then no expiry (PTTL -1).
        assert!(matches!(
            scripted_outcome(-1503),
            Acquire::Held { remaining: Some(d) } if d == Duration::from_millis(1500)
        ));
        assert!(matches!(
            scripted_outcome(-3),
            Acquire::Held {
                remaining: Some(Duration::ZERO)
            }
        ));
        assert!(matches!(
            scripted_outcome(-2),
            Acquire::Held { remaining: None }
        ));
    }

    #[test]
    fn a_lock_value_carries_the_token_then_the_deadline() {
        let token = LockToken::random();
        let value = lock_value(token, Duration::from_secs(30));
        assert_eq!(&value[..32], token.to_hex());
        assert_eq!(&value[32..33], ":");
        let remaining = remaining_from_value(value.as_bytes()).unwrap();
        assert!(remaining <= Duration::from_secs(30) && remaining > Duration::from_secs(29));
        // Past deadlines, values of other writers, and garbage.
        let past = format!("{}:1", token.to_hex());
        assert_eq!(remaining_from_value(past.as_bytes()), Some(Duration::ZERO));
        assert_eq!(remaining_from_value(token.to_hex().as_bytes()), None);
        assert_eq!(remaining_from_value(b"x:not-a-number"), None);
        assert_eq!(remaining_from_value(b"x:99999999999999999999999"), None);
        assert_eq!(remaining_from_value(&[0xff, b':', b'1']), None);
    }
}
