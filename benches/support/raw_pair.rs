//! The hand-rolled redis-rs lock the benches compare the layer with: `SET key token NX PX ttl`,
//! then a compare-and-delete script (`GET` = token → `DEL`), sent with `EVALSHA`. It is the safe
//! minimum the layer does. One definition for every bench, so that they all measure the same
//! pair.

use redis::Script;
use redis::aio::ConnectionLike;

/// The compare-and-delete a hand-rolled lock needs (the same check the layer's release does).
pub const COMPARE_AND_DELETE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Locks `key` with `token` for `ttl_ms`, then releases it with `release` (a [`Script`] of
/// [`COMPARE_AND_DELETE`]): `Ok(true)` when the lock was taken and then deleted, `Ok(false)`
/// when it was held or not deleted.
pub async fn lock_unlock(
    connection: &mut impl ConnectionLike,
    release: &Script,
    key: &str,
    token: &str,
    ttl_ms: u64,
) -> redis::RedisResult<bool> {
    let acquired: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(token)
        .arg("NX")
        .arg("PX")
        .arg(ttl_ms)
        .query_async(connection)
        .await?;
    if acquired.is_none() {
        return Ok(false);
    }
    let deleted: i64 = release.key(key).arg(token).invoke_async(connection).await?;
    Ok(deleted == 1)
}
