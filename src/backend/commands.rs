//! The lock's commands on Redis, over any redis-rs async connection: what [`RedisBackend`] sends
//! to its primary and [`RedisClusterBackend`] to the primary of the lock's hash slot.
//!
//! [`RedisBackend`]: super::RedisBackend
//! [`RedisClusterBackend`]: super::RedisClusterBackend

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionLike;
use redis::{
    Cmd, ErrorKind, FromRedisValue, RedisError, RedisFuture, RedisResult, Script, ServerErrorKind,
    Value,
};

use super::{
    Acquire, AcquireOptions, BackendError, BackendErrorKind, BackendFuture, Extend, Inspect,
    LockName, LockToken, Release,
};

/// The lock's value: the holder's token (32 hex digits), `:`, and when its lease ends, in
/// milliseconds of the holder's wall clock. The deadline only tells another acquirer how long to
/// wait (`Retry-After`): ownership is decided by the token alone, and a clock that is off skews
/// that hint, never who holds the lock.
///
/// A waiter marks the lock it waits for by turning the `:` into `;` ([`WAITED`], written by the
/// waiting acquire, see [`ACQUIRE`]); renewals keep the mark ([`EXTEND`]) and only a marked lock's
/// release publishes a wake-up ([`RELEASE`]).
pub(super) fn lock_value(token: LockToken, ttl: Duration) -> LockValue {
    let deadline = SystemTime::now()
        .checked_add(ttl)
        .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        });
    LockValue::new(token, deadline)
}

/// A lock value ([`lock_value`]) on the stack: 32 hex digits, `:`, at most 20 decimal digits.
/// Built per acquire and per renewal, so it costs no allocation.
#[derive(Clone, Copy)]
pub(super) struct LockValue {
    bytes: [u8; 53],
    len: usize,
}

impl LockValue {
    fn new(token: LockToken, deadline: u64) -> Self {
        let mut bytes = [0u8; 53];
        bytes[..32].copy_from_slice(&token.hex());
        bytes[32] = b':';
        // The deadline's digits, written from the last one (u64::MAX has 20).
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        let mut rest = deadline;
        loop {
            start -= 1;
            digits[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        let len = 33 + digits.len() - start;
        bytes[33..len].copy_from_slice(&digits[start..]);
        Self { bytes, len }
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The holder's token: the first 32 bytes.
    fn token(&self) -> &[u8] {
        &self.bytes[..32]
    }
}

/// A connection the commands go out on: [`ConnectionLike`], with the way to send one command
/// that costs the least on it. By default that is `req_packed_command`, which boxes its future;
/// a [`ConnectionManager`] sends through its own `send_packed_command`, whose future stays
/// inside the caller's (one allocation, and its poll through a pointer, fewer per command, two
/// commands per lock and unlock pair). The same bytes go out, and the same answer comes back.
///
/// [`ConnectionManager`]: redis::aio::ConnectionManager
pub(super) trait Connection: ConnectionLike + Clone + Send + Sync + 'static {
    /// Sends `command` and reads its answer, as `req_packed_command` does.
    fn send<'a>(
        &'a mut self,
        command: &'a Cmd,
    ) -> impl Future<Output = RedisResult<Value>> + Send + 'a {
        self.req_packed_command(command)
    }
}

impl Connection for redis::aio::ConnectionManager {
    fn send<'a>(
        &'a mut self,
        command: &'a Cmd,
    ) -> impl Future<Output = RedisResult<Value>> + Send + 'a {
        self.send_packed_command(command)
    }
}

impl Connection for redis::aio::MultiplexedConnection {}

impl Connection for redis::cluster_async::ClusterConnection {}

/// `command`'s answer on `connection`, as `Cmd::query_async` gives it, but sent with
/// [`Connection::send`].
async fn query<T: FromRedisValue>(
    command: &Cmd,
    connection: &mut impl Connection,
) -> RedisResult<T> {
    let value = connection.send(command).await?;
    Ok(redis::from_redis_value(value.extract_error()?)?)
}

/// One `EVALSHA` of `script` with `keys` keys, built straight into one command: what
/// `Script::key(..).arg(..).invoke_async` sends, without its vector per key and per argument and
/// the copy from those into a command. Keys and arguments follow with `arg`.
fn evalsha(script: &Script, keys: usize) -> Cmd {
    let mut command = Cmd::with_capacity(8, 160);
    command.arg("EVALSHA").arg(script.get_hash()).arg(keys);
    command
}

/// Sends `command`, an [`evalsha`] of `script`. If Redis does not know the script (`NOSCRIPT`:
/// its first use on this server, or after a restart, a failover or `SCRIPT FLUSH`), loads it and
/// sends the command again, as redis-rs's `invoke_async` does.
async fn invoke<T: FromRedisValue>(
    script: &Script,
    command: &Cmd,
    connection: &mut impl Connection,
) -> RedisResult<T> {
    match query(command, connection).await {
        Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.load_async(connection).await?;
            command.query_async(connection).await
        }
        result => result,
    }
}

/// Sends `command`, an `EVALSHA` of the script whose Lua is `source`, once: with `SCRIPT LOAD`
/// of `source` before it, in the same send, until the server is known to have the script
/// (`loaded`). A `NOSCRIPT` (the server lost its scripts) is answered as it is, and the next
/// call loads the script again: nothing is sent after an answer (see
/// [`Commands::acquire_once`]).
async fn invoke_once<T: FromRedisValue>(
    source: &str,
    loaded: &AtomicBool,
    command: Cmd,
    connection: &mut impl ConnectionLike,
) -> RedisResult<T> {
    let result = if loaded.load(Ordering::Relaxed) {
        command.query_async(connection).await
    } else {
        let mut pipeline = redis::pipe();
        pipeline.cmd("SCRIPT").arg("LOAD").arg(source).ignore();
        pipeline.add_command(command);
        pipeline
            .query_async::<(T,)>(connection)
            .await
            .map(|(answer,)| answer)
    };
    match &result {
        Ok(_) => loaded.store(true, Ordering::Relaxed),
        Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            loaded.store(false, Ordering::Relaxed);
        }
        Err(_) => {}
    }
    result
}

/// The separator of a lock value that a waiter has marked (`token;deadline`): its release
/// publishes a wake-up. Unmarked values have `:`.
pub(super) const WAITED: u8 = b';';

/// How long the holder whose lock value is `value` has left, by its deadline and this clock
/// (marked by a waiter or not).
pub(super) fn remaining_from_value(value: &[u8]) -> Option<Duration> {
    let value = std::str::from_utf8(value).ok()?;
    let (_, deadline) = value.split_once([':', char::from(WAITED)])?;
    let deadline = UNIX_EPOCH.checked_add(Duration::from_millis(deadline.parse().ok()?))?;
    Some(
        deadline
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// How much longer than the lock's TTL a fencing counter lives after the acquire that wrote it
/// (see [`NEXT_FENCE`]), in milliseconds.
pub(super) const FENCE_MARGIN_MS: u64 = 1000;

/// Lua (a statement list, written in place of `NEXT_FENCE` by [`with_fence`]) handing out the
/// next fencing token of the lock's counter `KEYS[2]` for a lock of `ARGV[2]` ms, in `token`:
/// the larger of the counter plus one (if it exists) and this server's clock in µs (`TIME`).
/// It stores the token with `SET KEYS[2] token PXAT at`, expiring at the absolute time `at =
/// floor(token / 1000) + ttl + FENCE_MARGIN_MS` ms, computed from the token alone: `TIME`,
/// `GET` and `SET` of the counter, inside the acquire's one script, atomically with it. Written
/// inline, not as a Lua function: a function definition is a closure allocated at every run of
/// the script.
///
/// The clock floor is not only for a counter that has gone: replication is asynchronous, so a
/// replica promoted in a failover (Cluster, Sentinel) may lack the last increments of a counter
/// that still exists there. Tokens drawn from it are still larger than the lost ones, because
/// the clock has moved on since (by the failover's seconds) and those tokens were at most the
/// clock of their time plus the number handed out faster than one per µs. Without the floor
/// (the counter plus one whenever it exists) a second holder after a failover got the very
/// token of the holder whose lock was lost (`a_lock_the_replica_had_not_received_is_lost_in_a_
/// failover_and_its_lease_reports_it`, tests/cluster.rs).
///
/// Why tokens strictly grow per key (while the Redis server's clock does not step back):
///
/// - *While it exists, the counter is at least every token handed out for its key*: every token
///   is stored in it, and it only grows while it exists (`+ 1`; Redlock raises it, never lowers
///   it).
/// - *Every write leaves the counter `C` expiring at `at` with `at * 1000 > C + margin`* (µs),
///   since `at = floor(C / 1000) + ttl + margin` and `ttl >= 1` ms. Redis expires a key once its
///   clock is past `at`: so when a counter has expired, the clock has passed every token it held,
///   and with it every earlier one, by the margin.
/// - So the next token is larger than every earlier one: `C + 1` while the counter exists, the
///   clock (past `C`) once it has expired. A counter whose `at` is already past when written (one
///   left without expiry by an earlier version, or one far behind the clock) goes at once, which
///   is the same case: the clock has passed it.
///
/// An idle key's counter goes `ttl + margin` after the acquire that created it (later when its
/// tokens run ahead of the clock: handed out faster than one per µs, or written back by Redlock
/// from a node whose clock is ahead).
///
/// Numbers stay below 2^53 (µs since 1970 until the year 2255), exact in Lua's doubles; they are
/// written with `%d`, never Lua's `tostring` (which would round to 14 digits). `PXAT` needs
/// Redis 6.2. Only `GET`, `SET` and `TIME` are called, commands the README's ACL allows.
const NEXT_FENCE: &str = r"
  local now = redis.call('TIME')
  local token = now[1] * 1000000 + now[2]
  local counter = redis.call('GET', KEYS[2])
  if counter and counter + 1 > token then token = counter + 1 end
  redis.call('SET', KEYS[2], string.format('%d', token), 'PXAT',
    string.format('%d', math.floor(token / 1000) + ARGV[2] + FENCE_MARGIN_MS))";

/// Lua (a statement, written in place of `MARK_WAITED` by [`with_fence`]) marking the lock
/// `KEYS[1]` as waited for: its value's `:` (byte 33) becomes [`WAITED`], its expiry unchanged
/// (`KEEPTTL`). A value already marked, or not ours (no `:` there), is left alone.
const MARK_WAITED: &str = r"
  local holder = redis.call('GET', KEYS[1])
  if holder and string.byte(holder, 33) == 58 then
    redis.call('SET', KEYS[1], string.sub(holder, 1, 32) .. ';' .. string.sub(holder, 34),
      'KEEPTTL')
  end";

/// `body` with [`NEXT_FENCE`] and [`MARK_WAITED`] written in for those names, and the margin
/// ([`FENCE_MARGIN_MS`]) for `FENCE_MARGIN_MS`.
pub(super) fn with_fence(body: &str) -> String {
    body.replace("NEXT_FENCE", NEXT_FENCE)
        .replace("MARK_WAITED", MARK_WAITED)
        .replace("FENCE_MARGIN_MS", &FENCE_MARGIN_MS.to_string())
}

/// The acquire when it needs more than `SET NX PX GET`: with fencing, `SET NX PX` and, on
/// success, the next fencing token ([`NEXT_FENCE`]: `TIME`, and `GET` and `SET … PXAT` of the
/// counter), atomically; on Redis before 7.0 (no `NX` with `GET`), the
/// same without fencing; and for a waiter (ARGV[4] present), the same, and if the lock is held,
/// the mark that someone waits ([`WAITED`] in place of the value's `:`, with `SET … KEEPTTL`:
/// the expiry stays), so that its release publishes. Marking in the acquire itself leaves no gap in
/// which the holder could release unmarked after the waiter found it held. One scalar back (a
/// table costs Redis more): the fencing token (≥ 1), 0 for acquired without fencing, or
/// `-3 - PTTL` for held (≤ -2).
pub(super) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| Script::new(&ACQUIRE_SOURCE));

/// The Lua of [`ACQUIRE`], which [`Commands::acquire_once`] loads in the same send as its first
/// `EVALSHA`.
pub(super) static ACQUIRE_SOURCE: LazyLock<String> = LazyLock::new(|| {
    with_fence(
        r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[3] ~= '1' then return 0 end
NEXT_FENCE
  return token
end
if ARGV[4] then
MARK_WAITED
end
return -3 - redis.call('PTTL', KEYS[1])
",
    )
});

/// Compare-and-delete by token (the value's first 32 characters): 1 released, 0 already gone,
/// -1 held by another token. The release of a lock that a waiter has marked ([`WAITED`]) also
/// publishes on the lock's wake-up channel, `KEYS[1]:wake` (in the lock's hash slot), with
/// `PUBLISH_COMMAND` (`PUBLISH`, or `SPUBLISH` on a cluster), to wake waiters; an unmarked one
/// publishes nothing (nobody waits). `pcall`, so that a server without that command (`SPUBLISH`
/// before Redis 7) still releases. The command is written into the script rather than sent as an
/// argument: one argument fewer per release (about 2 k Redis instructions, BENCHMARKS.md).
const RELEASE_SCRIPT: &str = r"
local holder = redis.call('GET', KEYS[1])
if not holder then return 0 end
if string.sub(holder, 1, 32) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if string.byte(holder, 33) == 59 then
    redis.pcall('PUBLISH_COMMAND', KEYS[1] .. ':wake', '')
  end
  return 1
end
return -1
";

/// The release ([`RELEASE_SCRIPT`]) publishing with `PUBLISH`: one Redis, Sentinel, Redlock's
/// nodes (whose locks nobody marks).
pub(super) static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&RELEASE_SCRIPT.replace("PUBLISH_COMMAND", "PUBLISH")));

/// The release ([`RELEASE_SCRIPT`]) publishing with `SPUBLISH` (sharded pub/sub): a cluster.
pub(super) static RELEASE_SHARDED: LazyLock<Script> =
    LazyLock::new(|| Script::new(&RELEASE_SCRIPT.replace("PUBLISH_COMMAND", "SPUBLISH")));

/// Compare-and-expire by token: the lease runs ARGV[2] ms from now, and the value carries the
/// new deadline (ARGV[3]), and keeps a waiter's mark ([`WAITED`]). 1 extended, 0 gone or held
/// by another token.
pub(super) static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local holder = redis.call('GET', KEYS[1])
if holder and string.sub(holder, 1, 32) == ARGV[1] then
  local value = ARGV[3]
  if string.byte(holder, 33) == 59 then value = ARGV[1] .. ';' .. string.sub(value, 34) end
  redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
  return 1
end
return 0
",
    )
});

/// Whether the lock whose value is `value` is held by `token` (its first 32 characters).
fn holds(value: &[u8], token: &[u8]) -> bool {
    value.get(..32) == Some(token)
}

pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, i64::MAX as u64 / 2)
}

/// The acquire `script` (answering as [`ACQUIRE`] does) for `name`, as one `EVALSHA`; `mark`:
/// a waiter's, which marks a held lock as waited for.
fn scripted_acquire(
    script: &Script,
    name: &LockName,
    value: &LockValue,
    ttl: u64,
    fencing: bool,
    mark: bool,
) -> Cmd {
    let mut command = evalsha(script, 2);
    command
        .arg(name.lock_key())
        .arg(name.fence_key())
        .arg(value.as_bytes())
        .arg(ttl)
        .arg(u8::from(fencing));
    if mark {
        command.arg(1);
    }
    command
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
    let failure = BackendError::new(kind, format_args!("redis: {error}"))
        .with_reason(super::failure::reason(&error));
    // Refused while connecting: the command never went out (one connection, no resend; the
    // cluster client, which resends, clears this, see `RedisClusterBackend::acquire`).
    if error.is_connection_refusal() {
        failure.unsent()
    } else {
        failure
    }
}

/// The replication check after an acquire: `WAIT replicas timeout` (see
/// [`RedisBackend::wait_for_replicas`](super::RedisBackend::wait_for_replicas)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Replication {
    pub(super) replicas: u32,
    pub(super) timeout: Duration,
}

/// How an acquire that fewer replicas acknowledged than asked for fails: its message starts so.
const REPLICATION_SHORTFALL: &str = "redis: replication check failed";

/// Whether `error` is an acquire refused by the replication check (the primary answered: it is
/// not a reason to look for another one).
#[cfg_attr(not(feature = "sentinel"), allow(dead_code))]
pub(super) fn is_replication_shortfall(error: &BackendError) -> bool {
    error.to_string().starts_with(REPLICATION_SHORTFALL)
}

/// The commands of one backend: its connection, its acquire script, whether Redis has refused
/// `SET … NX … GET` (before 7.0), after which acquires go through the script, and the
/// replication check after an acquire, if any.
#[derive(Clone)]
pub(super) struct Commands<C> {
    pub(super) connection: C,
    acquire: &'static Script,
    scripted_acquire: Arc<AtomicBool>,
    /// Whether the server is known to have the acquire script ([`Commands::acquire_once`]).
    acquire_loaded: Arc<AtomicBool>,
    /// The release script ([`RELEASE`], or [`RELEASE_SHARDED`] on a cluster).
    release: &'static Script,
    /// Whether waiters mark the locks they wait for, so that their release publishes.
    publishes: bool,
    replication: Option<Replication>,
}

impl<C> Commands<C>
where
    C: Connection,
{
    /// Commands on `connection`, acquiring with `acquire` when a script is needed (it answers as
    /// [`ACQUIRE`] does).
    pub(super) fn new(connection: C, acquire: &'static Script) -> Self {
        Self {
            connection,
            acquire,
            scripted_acquire: Arc::default(),
            acquire_loaded: Arc::default(),
            release: &RELEASE,
            publishes: false,
            replication: None,
        }
    }

    /// Waiters mark the locks they wait for, and releases of marked locks publish on the lock's
    /// wake-up channel with `release` ([`RELEASE`]: `PUBLISH` on one Redis; [`RELEASE_SHARDED`]:
    /// `SPUBLISH` on a cluster), inside the release script: no extra round trip.
    pub(super) fn publishing(mut self, release: &'static Script) -> Self {
        self.release = release;
        self.publishes = true;
        self
    }

    /// The same commands, with `WAIT` after every acquire (`None`: without).
    pub(super) fn with_replication(mut self, replication: Option<Replication>) -> Self {
        self.replication = replication;
        self
    }

    /// The acquire, then, if it took the lock and a replication check is set, `WAIT replicas
    /// timeout` on the same connection (it waits for this connection's writes, ours included).
    /// Fewer acknowledgements, or an error: the lock is released (compare-and-delete) and the
    /// acquire fails as unavailable.
    pub(super) fn acquire(
        &self,
        name: &LockName,
        token: LockToken,
        options: AcquireOptions,
    ) -> BackendFuture<Acquire> {
        self.checked(self.acquire_sent(name, token, options, None), name, token)
    }

    /// `acquire` with the replication check, if one is set.
    fn checked(
        &self,
        acquire: BackendFuture<Acquire>,
        name: &LockName,
        token: LockToken,
    ) -> BackendFuture<Acquire> {
        let Some(replication) = self.replication else {
            return acquire;
        };
        let connection = self.connection.clone();
        self.replication_checked(acquire, name, token, replication, move |wait| {
            let mut connection = connection;
            Box::pin(async move { wait.query_async::<i64>(&mut connection).await })
        })
    }

    /// `acquire`, then, if it took the lock, the `WAIT` command that `send` sends (on the
    /// connection of the acquire's node): fewer acknowledgements than `replication` asks, or an
    /// error, release the lock (compare-and-delete) and fail the acquire as unavailable.
    pub(super) fn replication_checked(
        &self,
        acquire: BackendFuture<Acquire>,
        name: &LockName,
        token: LockToken,
        Replication { replicas, timeout }: Replication,
        send: impl FnOnce(Cmd) -> RedisFuture<'static, i64> + Send + 'static,
    ) -> BackendFuture<Acquire> {
        let release = self.release(name, token);
        Box::pin(async move {
            let outcome = acquire.await?;
            if !matches!(outcome, Acquire::Acquired { .. }) {
                return Ok(outcome);
            }
            let mut wait = redis::cmd("WAIT");
            wait.arg(replicas).arg(millis(timeout));
            let acknowledged = send(wait).await;
            let failure = match acknowledged {
                Ok(count) if count >= i64::from(replicas) => return Ok(outcome),
                Ok(count) => {
                    format!("{count} of {replicas} replicas acknowledged within {timeout:?}")
                }
                Err(error) => format!("WAIT: {error}"),
            };
            // Fail closed: the lock is not ours unless enough replicas have it. If this release
            // fails too, the key expires with its TTL.
            let released = release.await;
            tracing::warn!(
                released = ?released,
                "lock refused: {failure}"
            );
            Err(BackendError::new(
                BackendErrorKind::Unavailable,
                format_args!("{REPLICATION_SHORTFALL}: {failure}"),
            ))
        })
    }

    /// The acquire as one command sent exactly once (then the replication check, if set), for a
    /// node of a Redlock round. A round may finish before a slow node answers, and its release (of
    /// a failed round, or the holder's) then follows the acquire on that node's connection:
    /// that order only holds if nothing is sent after the answer. So the acquire is never sent
    /// again after a `NOSCRIPT`, as [`acquire`](Self::acquire) does: until the server is known
    /// to have the script (`source`, the Lua of this backend's acquire script), `SCRIPT LOAD`
    /// goes out with the `EVALSHA`, in one send; a server that then answers `NOSCRIPT`
    /// (restarted empty, `SCRIPT FLUSH`) fails this round, and the next round loads the script
    /// again. Resent, the acquire could land after the release and leave the lock on that node
    /// until its TTL (the verification suite's Redlock scenarios found it so).
    pub(super) fn acquire_once(
        &self,
        name: &LockName,
        token: LockToken,
        options: AcquireOptions,
        source: &'static str,
    ) -> BackendFuture<Acquire> {
        self.checked(
            self.acquire_sent(name, token, options, Some(source)),
            name,
            token,
        )
    }

    /// The acquire without the replication check; `once` (the acquire script's Lua): see
    /// [`acquire_once`](Self::acquire_once).
    fn acquire_sent(
        &self,
        name: &LockName,
        token: LockToken,
        options: AcquireOptions,
        once: Option<&'static str>,
    ) -> BackendFuture<Acquire> {
        let mut connection = self.connection.clone();
        let value = lock_value(token, options.ttl);
        let ttl = millis(options.ttl);
        let script = self.acquire;
        // A waiter marks a held lock, so that its release publishes; only where releases
        // publish at all.
        let mark = options.waiting && self.publishes;
        if options.fencing || mark || self.scripted_acquire.load(Ordering::Relaxed) {
            let command = scripted_acquire(script, name, &value, ttl, options.fencing, mark);
            let loaded = self.acquire_loaded.clone();
            return Box::pin(async move {
                let outcome: i64 = match once {
                    Some(source) => invoke_once(source, &loaded, command, &mut connection).await,
                    None => invoke(script, &command, &mut connection).await,
                }
                .map_err(unavailable)?;
                Ok(scripted_outcome(outcome))
            });
        }
        let mut command = Cmd::with_capacity(7, 128);
        command
            .arg("SET")
            .arg(name.lock_key())
            .arg(value.as_bytes())
            .arg("NX")
            .arg("PX")
            .arg(ttl)
            .arg("GET");
        let scripted = self.scripted_acquire.clone();
        let name = name.clone();
        Box::pin(async move {
            match query::<Value>(&command, &mut connection).await {
                // Nothing was there: the lock is ours.
                Ok(Value::Nil) => Ok(Acquire::Acquired { fencing_token: 0 }),
                // Our own value: a resent acquire whose first send landed.
                Ok(Value::BulkString(holder)) if holds(&holder, value.token()) => {
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
                    if once.is_some() {
                        // Nothing was set; the next round goes through the script.
                        return Err(unavailable(error));
                    }
                    let command = scripted_acquire(script, &name, &value, ttl, false, false);
                    let outcome: i64 = invoke(script, &command, &mut connection)
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
        let release = self.release;
        let mut command = evalsha(release, 1);
        command.arg(name.lock_key()).arg(&token.hex()[..]);
        Box::pin(async move {
            let outcome: i64 = invoke(release, &command, &mut connection)
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
        let mut command = evalsha(&EXTEND, 1);
        command
            .arg(name.lock_key())
            .arg(&token.hex()[..])
            .arg(millis(ttl))
            .arg(lock_value(token, ttl).as_bytes());
        Box::pin(async move {
            let outcome: i64 = invoke(&EXTEND, &command, &mut connection)
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

    /// `DEL` of the lock key only: the fencing counter stays (until it expires), so tokens keep
    /// growing.
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
        assert!(holds(value.as_bytes(), &token.hex()));
        assert!(!holds(value.as_bytes(), &LockToken::random().hex()));
        assert!(!holds(b"short", &token.hex()));
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
    fn a_lock_value_writes_its_deadline_in_decimal_whatever_its_length() {
        let token = LockToken::random();
        for deadline in [0, 7, 10, 1_780_000_000_123, u64::MAX / 7, u64::MAX] {
            let value = LockValue::new(token, deadline);
            assert_eq!(
                value.as_bytes(),
                format!("{}:{deadline}", token.to_hex()).as_bytes()
            );
            assert_eq!(value.token(), token.hex());
        }
    }

    #[test]
    fn a_lock_value_carries_the_token_then_the_deadline() {
        let token = LockToken::random();
        let value = lock_value(token, Duration::from_secs(30));
        let value = std::str::from_utf8(value.as_bytes()).unwrap();
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
        // Marked by a waiter (`;` for `:`): the same deadline.
        let marked = value.replacen(':', ";", 1);
        let remaining = remaining_from_value(marked.as_bytes()).unwrap();
        assert!(remaining <= Duration::from_secs(30) && remaining > Duration::from_secs(29));
    }
}
