//! Fencing counters that go: a counter expires at its last token's time (µs) plus the lock's
//! TTL plus a second, so a new key's counter lives for the TTL plus a second (longer when it is
//! ahead of the Redis clock); tokens are `counter + 1` while it lives and the clock (`TIME` in
//! µs) once it has gone, and so they still grow per key after the counter has gone, while a
//! burst of distinct keys leaves nothing behind.

#[macro_use]
mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::redlock::Redlock;
use common::*;
use futures_util::StreamExt;
use tower_lock::backend::{Acquire, AcquireOptions, LockBackend, LockName, LockToken};

/// What the counter outlives the lock by (the backend's `FENCE_MARGIN_MS`).
const MARGIN: Duration = Duration::from_secs(1);

/// Takes `name`, retrying a round that fails or finds leftovers of a failed round (Redlock's
/// per-node timeouts are short with short TTLs, and this machine is shared): what these tests
/// pin is the tokens, not the availability.
async fn acquire<B: LockBackend>(backend: &B, name: &LockName, ttl: Duration) -> (LockToken, u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let token = LockToken::random();
        let outcome = backend.acquire(name, token, AcquireOptions::new(ttl)).await;
        match outcome {
            Ok(Acquire::Acquired { fencing_token }) => return (token, fencing_token),
            other if tokio::time::Instant::now() > deadline => {
                panic!("{name:?} could not be taken: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// The server's clock in µs (`TIME`).
async fn redis_micros(connection: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(connection).await.unwrap();
    seconds * 1_000_000 + micros
}

async fn pttl(connection: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(connection)
        .await
        .unwrap()
}

async fn dbsize(connection: &mut redis::aio::MultiplexedConnection) -> u64 {
    redis::cmd("DBSIZE").query_async(connection).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// On every backend.

/// Tokens grow from one holder to the next, also once the key has been idle long enough for
/// its counter to go.
async fn tokens_grow_after_the_key_was_idle_past_its_counters_life<F: Fixture>() {
    let fixture = F::start().await;
    let backend = fixture.backend();
    let name = lock_name("idle");
    let ttl = Duration::from_millis(300);
    let mut last = 0;
    for round in 0..3 {
        let (token, fencing_token) = acquire(&backend, &name, ttl).await;
        assert!(
            fencing_token > last,
            "round {round}: {fencing_token} after {last}"
        );
        last = fencing_token;
        backend.release(&name, token).await.unwrap();
        // Right away: the counter is still there.
        let (token, fencing_token) = acquire(&backend, &name, ttl).await;
        assert!(
            fencing_token > last,
            "round {round}: {fencing_token} after {last}"
        );
        last = fencing_token;
        backend.release(&name, token).await.unwrap();
        tokio::time::sleep(ttl + MARGIN + Duration::from_millis(300)).await;
    }
}

/// Tokens are drawn from the clock: at least the microseconds since 1970 when they were asked
/// for (all test servers run on this machine's clock).
async fn tokens_are_at_least_the_clock_in_microseconds<F: Fixture>() {
    let fixture = F::start().await;
    let backend = fixture.backend();
    let before = micros_now();
    let (_, fencing_token) = acquire(&backend, &lock_name("clock"), Duration::from_secs(1)).await;
    assert!(fencing_token >= before, "{fencing_token} < {before}");
    // And nowhere near running out: u64 holds µs for another half a million years.
    assert!(fencing_token < 1 << 53, "{fencing_token}");
}

suite!(
    tokens_grow_after_the_key_was_idle_past_its_counters_life,
    tokens_are_at_least_the_clock_in_microseconds,
);

// ---------------------------------------------------------------------------------------------
// One Redis.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counter_expires_a_second_after_the_locks_ttl() {
    let fixture = Redis::start().await;
    let mut connection = fixture.server.connection().await;
    let name = lock_name("expiring");
    let ttl = Duration::from_millis(500);
    let (token, _) = acquire(&fixture.backend, &name, ttl).await;
    let left = pttl(&mut connection, name.fence_key()).await;
    assert!(
        (1000..=1500).contains(&left),
        "the counter has {left} ms left"
    );
    // Released or not, it goes: the lock at its TTL, the counter a second later.
    fixture.backend.release(&name, token).await.unwrap();
    let gone = eventually(Duration::from_secs(10), async || {
        dbsize(&mut connection).await == 0
    })
    .await;
    assert!(gone, "{} keys left", dbsize(&mut connection).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_token_after_the_counter_has_gone_is_larger() {
    let fixture = Redis::start().await;
    let mut connection = fixture.server.connection().await;
    let name = lock_name("gone");
    let ttl = Duration::from_millis(50);
    let (_, first) = acquire(&fixture.backend, &name, ttl).await;
    // Not released: it expires, and then its counter does.
    let gone = eventually(Duration::from_secs(10), async || {
        pttl(&mut connection, name.fence_key()).await == -2
    })
    .await;
    assert!(gone, "the counter did not expire");
    let (_, second) = acquire(&fixture.backend, &name, ttl).await;
    assert!(second > first, "{second} after {first}");
}

/// A counter ahead of the server's clock (written back by Redlock from a node whose clock is
/// ahead, or handed out faster than one token per µs) lives until the clock has passed it: the
/// next token is the counter's successor, and the counter's expiry covers the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_ahead_of_the_clock_lives_until_the_clock_has_passed_it() {
    let fixture = Redis::start().await;
    let mut connection = fixture.server.connection().await;
    let name = lock_name("ahead");
    let ahead = redis_micros(&mut connection).await + 5_000_000;
    let _: () = redis::cmd("SET")
        .arg(name.fence_key())
        .arg(ahead)
        .query_async(&mut connection)
        .await
        .unwrap();
    let (_, fencing_token) = acquire(&fixture.backend, &name, Duration::from_millis(100)).await;
    assert_eq!(fencing_token, ahead + 1);
    let left = pttl(&mut connection, name.fence_key()).await;
    // 5 s ahead, plus the TTL and the margin, less the time this test took.
    assert!(left > 5_500, "the counter has {left} ms left");
    let stored: u64 = redis::cmd("GET")
        .arg(name.fence_key())
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(stored, ahead + 1, "the counter is stored exactly");
}

/// A counter left by an earlier version (a plain `INCR`, no expiry) is taken over: the clock
/// floor makes the next token the clock (`TIME` in µs, far above the small counter), stored
/// with an expiry computed from it (the token's time plus the TTL and the margin, issue 11), so
/// the counter does not stay without expiry; the token after it grows from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_without_expiry_gets_one_at_the_next_acquire() {
    let fixture = Redis::start().await;
    let mut connection = fixture.server.connection().await;
    let name = lock_name("legacy");
    let _: () = redis::cmd("SET")
        .arg(name.fence_key())
        .arg(33)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(pttl(&mut connection, name.fence_key()).await, -1);
    let clock = redis_micros(&mut connection).await;
    let (token, fencing_token) = acquire(&fixture.backend, &name, Duration::from_secs(1)).await;
    assert!(
        fencing_token >= clock,
        "{fencing_token}: not the clock floor (the CHANGELOG once said: the counter's successor)"
    );
    let left = pttl(&mut connection, name.fence_key()).await;
    assert!(
        left > 0 && left <= 2000,
        "the counter's expiry is not the token's time plus the TTL and the margin: PTTL {left}"
    );
    fixture.backend.release(&name, token).await.unwrap();
    let before = redis_micros(&mut connection).await;
    let (_, next) = acquire(&fixture.backend, &name, Duration::from_secs(1)).await;
    assert!(
        next > fencing_token && next >= before,
        "{next} after {fencing_token}"
    );
    assert!(pttl(&mut connection, name.fence_key()).await > 0);
}

/// Tokens near 2^53 (the end of Lua's exact integers) are handed out, stored and expired
/// exactly: the counter's successor, one by one, with no rounding in the script's number to
/// string conversions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_near_2_pow_53_are_exact() {
    let fixture = Redis::start().await;
    let mut connection = fixture.server.connection().await;
    let name = lock_name("huge");
    let start: u64 = (1 << 53) - 10;
    let _: () = redis::cmd("SET")
        .arg(name.fence_key())
        .arg(start)
        .query_async(&mut connection)
        .await
        .unwrap();
    for step in 1..=5 {
        let (token, fencing_token) =
            acquire(&fixture.backend, &name, Duration::from_millis(100)).await;
        assert_eq!(fencing_token, start + step);
        let stored: u64 = redis::cmd("GET")
            .arg(name.fence_key())
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(stored, start + step, "the counter is stored exactly");
        // It expires at the token's time (the year 2255) plus the TTL and the margin.
        let expires_at: i64 = redis::cmd("PEXPIRETIME")
            .arg(name.fence_key())
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(expires_at as u64, (start + step) / 1000 + 100 + 1000);
        fixture.backend.release(&name, token).await.unwrap();
    }
}

/// Without persistence a restarted Redis forgets its counters; the clock still puts the next
/// token above every earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_grow_across_a_restart_without_persistence() {
    let mut server = RedisServer::start();
    let name = lock_name("restarted");
    let mut last = 0;
    for round in 0..3 {
        let backend = tower_lock::RedisBackend::connect(&server.url())
            .await
            .unwrap();
        for _ in 0..5 {
            let (token, fencing_token) = acquire(&backend, &name, Duration::from_secs(5)).await;
            assert!(
                fencing_token > last,
                "round {round}: {fencing_token} after {last}"
            );
            last = fencing_token;
            backend.release(&name, token).await.unwrap();
        }
        server.restart();
    }
}

/// Ten thousand distinct keys, half released and half left to expire: after the TTL and the
/// counters' margin, nothing of them is left in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_10_000_distinct_keys_leaves_no_key_behind() {
    let fixture = Redis::start().await;
    let mut connection = fixture.server.connection().await;
    let ttl = Duration::from_millis(300);
    let backend = fixture.backend.clone();
    let acquired = futures_util::stream::iter(0..10_000)
        .map(|i| {
            let backend = backend.clone();
            async move {
                let name = lock_name(&format!("burst-{i}"));
                let (token, fencing_token) = acquire(&backend, &name, ttl).await;
                if i % 2 == 0 {
                    backend.release(&name, token).await.unwrap();
                }
                fencing_token
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<u64>>()
        .await;
    assert_eq!(acquired.len(), 10_000);
    // Every counter is there (some locks may have expired already, on a slow machine).
    assert!(dbsize(&mut connection).await >= 10_000);
    let empty = eventually(ttl + MARGIN + Duration::from_secs(10), async || {
        dbsize(&mut connection).await == 0
    })
    .await;
    assert!(empty, "{} keys left", dbsize(&mut connection).await);
}

// ---------------------------------------------------------------------------------------------
// Redlock.

/// A token written back from a node whose counter (or clock) is ahead keeps the written-back
/// counters alive until each node's own clock has passed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_write_back_keeps_the_counter_until_the_nodes_clock_passes_it() {
    let fixture = Redlock::start().await;
    let backend = fixture.backend();
    let name = lock_name("ahead");
    let ahead = micros_now() + 5_000_000;
    fixture.set_fence(0, &name, ahead).await;
    // Nodes 3 and 4 are held by someone else: the majority is nodes 0, 1 and 2.
    fixture.hold_on(3, &name, Duration::from_secs(30)).await;
    fixture.hold_on(4, &name, Duration::from_secs(30)).await;
    let (_, fencing_token) = acquire(&backend, &name, Duration::from_secs(2)).await;
    assert_eq!(fencing_token, ahead + 1);
    for node in 1..3 {
        let mut connection = fixture.node(node).await.unwrap();
        let stored: Option<u64> = redis::cmd("GET")
            .arg(name.fence_key())
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(stored, Some(ahead + 1), "node {node} was not raised");
        let left = pttl(&mut connection, name.fence_key()).await;
        assert!(left > 5_500, "node {node}'s counter has {left} ms left");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_burst_of_distinct_keys_leaves_no_key_on_any_node() {
    let fixture = Redlock::start().await;
    let backend = fixture.backend();
    let ttl = Duration::from_secs(1);
    let acquired = futures_util::stream::iter(0..2_000)
        .map(|i| {
            let backend = backend.clone();
            async move {
                let name = lock_name(&format!("burst-{i}"));
                let (token, _) = acquire(&backend, &name, ttl).await;
                if i % 2 == 0 {
                    backend.release(&name, token).await.unwrap();
                }
            }
        })
        .buffer_unordered(32)
        .count()
        .await;
    assert_eq!(acquired, 2_000);
    for node in 0..5 {
        let mut connection = fixture.node(node).await.unwrap();
        let empty = eventually(ttl + MARGIN + Duration::from_secs(10), async || {
            dbsize(&mut connection).await == 0
        })
        .await;
        assert!(
            empty,
            "node {node}: {} keys left",
            dbsize(&mut connection).await
        );
    }
}
