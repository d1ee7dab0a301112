//! The verification suite of issue 12: three verification server processes on one harness
//! Redis, each through its own fault-injecting proxy, driven by concurrent clients over real HTTP
//! on a few hot keys, one fault per scenario. Each scenario checks, per key: no overlapping
//! critical sections (except where the older holder was told its lease was lost), no lost
//! update of the non-atomic read–sleep–write counter, no lock left once the requests ended,
//! only 200/409/503 and no request past its client timeout; and prints its row of the table in
//! `RELIABILITY.md`.
//!
//! `TOWER_LOCK_SOAK=1` (see `scripts/soak`) repeats each fault until many more requests have
//! been sent. The machinery is in `tests/common/verify/`.

#[macro_use]
mod common;
#[path = "common/verify/mod.rs"]
mod verify;

use std::time::Duration;

use rand::Rng;
use verify::{Setup, World, default_load, target_requests};

/// Not a test: the body of a verification server process, started by the scenarios (which run
/// this binary again with `TOWER_LOCK_VERIFY_SERVER=1`). Does nothing when run on its own.
#[test]
#[ignore = "the verification server process; the scenarios start it"]
fn verification_server_process() {
    if std::env::var(verify::server::ROLE_VAR).is_ok_and(|v| v == "1") {
        verify::server::run_from_env();
    }
}

const CI_REQUESTS: u64 = 3_000;

async fn pause(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The checker itself: without the lock, the same load must show overlaps and lost updates
/// (so a passing scenario means something).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_lock_the_checker_sees_overlaps_and_lost_updates() {
    let world = World::start(Setup {
        unlocked: true,
        ..Setup::default()
    })
    .await;
    let row = world
        .run(
            "control: no lock at all",
            &default_load(),
            1_000,
            async |_| pause(500).await,
        )
        .await;
    assert!(row.overlaps.unexcused > 0, "{}", row.markdown());
    assert!(row.updates.lost > 0, "{}", row.markdown());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fault_no_overlap_no_lost_update_no_leak() {
    let world = World::start(Setup::default()).await;
    let requests = target_requests(CI_REQUESTS);
    let row = world
        .run("no fault", &default_load(), requests, async |_| {
            pause(1000).await
        })
        .await;
    row.assert_safe();
    assert_eq!(row.unavailable, 0, "{}", row.markdown());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sigkilled_and_restarted() {
    // AOF with fsync on every write: the counters and fencing counters survive the kill.
    let world = World::start(Setup {
        redis_args: vec!["--appendonly", "yes", "--appendfsync", "always"],
        ..Setup::default()
    })
    .await;
    let requests = target_requests(CI_REQUESTS);
    let row = world
        .run(
            "Redis SIGKILLed, restarted 500 ms later",
            &default_load(),
            requests,
            async |world| {
                pause(800).await;
                world.on_redis(|redis| redis.stop()).await;
                pause(500).await;
                world.on_redis(|redis| redis.restart()).await;
                world.fault_ended();
                pause(1500).await;
            },
        )
        .await;
    row.assert_safe();
}

async fn redis_paused(name: &str, ms: u64) {
    let world = World::start(Setup::default()).await;
    let requests = target_requests(CI_REQUESTS);
    let row = world
        .run(name, &default_load(), requests, async |world| {
            pause(800).await;
            world.on_redis(|redis| redis.pause()).await;
            pause(ms).await;
            world.on_redis(|redis| redis.resume()).await;
            world.fault_ended();
            pause(1500).await;
        })
        .await;
    row.assert_safe();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sigstopped_shorter_than_the_lease() {
    redis_paused("Redis SIGSTOPped 300 ms (lease 1 s)", 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sigstopped_longer_than_the_lease() {
    redis_paused("Redis SIGSTOPped 2.5 s (lease 1 s)", 2500).await;
}

async fn redis_debug_sleep(name: &str, seconds: f64) {
    let world = World::start(Setup::default()).await;
    let requests = target_requests(CI_REQUESTS);
    let row = world
        .run(name, &default_load(), requests, async |world| {
            pause(800).await;
            let mut admin = world.admin().await;
            let _: () = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(seconds)
                .query_async(&mut admin)
                .await
                .expect("DEBUG SLEEP");
            world.fault_ended();
            pause(1500).await;
        })
        .await;
    row.assert_safe();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_debug_sleep_shorter_than_the_lease() {
    redis_debug_sleep("Redis DEBUG SLEEP 0.3 s (lease 1 s)", 0.3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_debug_sleep_longer_than_the_lease() {
    redis_debug_sleep("Redis DEBUG SLEEP 2.5 s (lease 1 s)", 2.5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_of_the_servers_connections() {
    let world = World::start(Setup::default()).await;
    let requests = target_requests(CI_REQUESTS);
    let row = world
        .run(
            "CLIENT KILL of every server connection, 3 times",
            &default_load(),
            requests,
            async |world| {
                let mut admin = world.admin().await;
                for _ in 0..3 {
                    pause(500).await;
                    let _: i64 = redis::cmd("CLIENT")
                        .arg("KILL")
                        .arg("TYPE")
                        .arg("normal")
                        .arg("SKIPME")
                        .arg("yes")
                        .query_async(&mut admin)
                        .await
                        .expect("CLIENT KILL");
                    world.fault_ended();
                }
                pause(1000).await;
            },
        )
        .await;
    row.assert_safe();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_between_servers_and_redis() {
    let world = World::start(Setup::default()).await;
    let requests = target_requests(CI_REQUESTS);
    let row = world
        .run(
            "proxy latency 100 ms, then 700 ms (over the 500 ms acquire timeout)",
            &default_load(),
            requests,
            async |world| {
                pause(500).await;
                for latency in [100, 700] {
                    for proxy in &world.proxies {
                        proxy.set_latency(Duration::from_millis(latency));
                    }
                    pause(1500).await;
                }
                for proxy in &world.proxies {
                    proxy.set_latency(Duration::ZERO);
                }
                world.fault_ended();
                pause(1500).await;
            },
        )
        .await;
    row.assert_safe();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_blackholed_from_redis_longer_than_the_lease() {
    let world = World::start(Setup::default()).await;
    let requests = target_requests(CI_REQUESTS);
    let row = world
        .run(
            "server 0 blackholed from Redis 2.5 s (lease 1 s)",
            &default_load(),
            requests,
            async |world| {
                pause(800).await;
                world.proxies[0].set_blackhole(true);
                pause(2500).await;
                world.proxies[0].set_blackhole(false);
                world.fault_ended();
                pause(1500).await;
            },
        )
        .await;
    row.assert_safe();
}

/// Starts a request to `server` on a key of its own that holds `hold_ms`, and waits until its
/// lock is in Redis; the request's task, and the lock key.
async fn holding(
    world: &World,
    server: usize,
    hold_ms: u64,
) -> (tokio::task::JoinHandle<verify::load::Record>, String) {
    let key = format!("victim-{}", rand::rng().random::<u32>());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let url = world.servers[server].url(&format!("/incr/{key}?hold_ms={hold_ms}"));
    let start = world.start;
    let request =
        tokio::spawn(async move { verify::load::post(&client, server, &url, start).await });
    let lock = format!("{}{{counter:{key}}}", verify::server::NAMESPACE);
    assert!(
        common::eventually(Duration::from_secs(5), async || {
            world.lock_keys().await.contains(&lock)
        })
        .await,
        "server {server} never took {lock}"
    );
    (request, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sigkilled_mid_request_its_locks_free_at_ttl() {
    let world = World::start(Setup::default()).await;
    let ttl = world.setup.ttl;
    let requests = target_requests(CI_REQUESTS);
    let mut load = default_load();
    // Longer holds, so that the victim dies inside critical sections of the hot keys too.
    load.hold_ms = 20;
    let row = world
        .run(
            "server SIGKILLed mid-request",
            &load,
            requests,
            async |world| {
                pause(800).await;
                // In a soak, kill a new one each cycle, while at least two remain.
                let alive: Vec<usize> = (0..world.servers.len())
                    .filter(|&i| !world.servers[i].is_killed())
                    .collect();
                if alive.len() < 2 {
                    return pause(1000).await;
                }
                let victim = alive[rand::rng().random_range(0..alive.len())];
                let (request, key) = holding(world, victim, 10_000).await;
                world.victims.push(victim);
                world.servers[victim].kill();
                world.killed_at.insert(victim, verify::server::now_ns());
                let killed = tokio::time::Instant::now();
                world.extra.push(request.await.unwrap());
                // Its lock stays until its TTL (nobody renews it any more), then frees.
                let lock = format!("{}{{counter:{key}}}", verify::server::NAMESPACE);
                assert!(
                    common::eventually(ttl + Duration::from_secs(3), async || {
                        !world.lock_keys().await.contains(&lock)
                    })
                    .await,
                    "the killed server's lock outlived its TTL"
                );
                let freed = killed.elapsed();
                println!(
                    "the killed server's lock freed {} ms after the kill (TTL {} ms)",
                    freed.as_millis(),
                    ttl.as_millis()
                );
                assert!(
                    freed + Duration::from_millis(50) >= ttl / 2,
                    "freed long before its TTL: {freed:?}"
                );
                pause(500).await;
            },
        )
        .await;
    row.assert_safe();
    assert!(row.victim_failures > 0, "{}", row.markdown());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sigstopped_past_its_lease_is_fenced_off() {
    let world = World::start(Setup::default()).await;
    let requests = target_requests(CI_REQUESTS);
    let row = world
        .run(
            "server SIGSTOPped 2.5 s while holding (lease 1 s)",
            &default_load(),
            requests,
            async |world| {
                pause(500).await;
                // The victim takes a key of its own (no contention: admitted), and holds it.
                let victim = 2;
                let (held, key) = holding(world, victim, 1500).await;
                let start = world.start;
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(20))
                    .build()
                    .unwrap();
                world.servers[victim].pause();
                // Others take the key after the lease and use the counter.
                let contender = world.servers[0].url(&format!("/incr/{key}?hold_ms=1"));
                let deadline = tokio::time::Instant::now() + Duration::from_millis(2500);
                while tokio::time::Instant::now() < deadline {
                    let record = verify::load::post(&client, 0, &contender, start).await;
                    world.extra.push(record);
                    pause(50).await;
                }
                world.servers[victim].resume();
                world.fault_ended();
                // The victim's write is refused by the fence (409).
                let record = held.await.unwrap();
                assert_eq!(
                    record.outcome,
                    verify::load::Outcome::Status(409),
                    "{record:?}"
                );
                world.extra.push(record);
                world.require_refused_stale += 1;
                pause(1000).await;
            },
        )
        .await;
    row.assert_safe();
    assert!(row.overlaps.after_lost_lease >= 1, "{}", row.markdown());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_storm_releases_every_lock_promptly() {
    // A 30 s lease: locks that were only freed by their TTL would still be there.
    let world = World::start(Setup {
        ttl: Duration::from_secs(30),
        ..Setup::default()
    })
    .await;
    let requests = target_requests(CI_REQUESTS);
    let row = world
        .run(
            "client disconnect storm: 2 000 requests cancelled mid-flight (lease 30 s)",
            &default_load(),
            requests,
            async |world| {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(20))
                    .pool_max_idle_per_host(0)
                    .build()
                    .unwrap();
                for batch in 0..4 {
                    let mut inflight = tokio::task::JoinSet::new();
                    for i in 0..500 {
                        let server = i % world.servers.len();
                        let url = world.servers[server].url(&format!(
                            "/incr/storm-{batch}-{i}?hold_ms=20000"
                        ));
                        let client = client.clone();
                        inflight.spawn(async move { client.post(url).send().await });
                    }
                    // Wait until most of them hold their locks, then hang up on all of them.
                    let held = common::eventually(Duration::from_secs(10), async || {
                        world.lock_keys().await.len() >= 450
                    })
                    .await;
                    let holding = world.lock_keys().await.len();
                    inflight.abort_all();
                    world.cancelled += 500;
                    while inflight.join_next().await.is_some() {}
                    // On a loaded machine not all may hold yet: those still acquiring are
                    // cancelled mid-acquire, which must leave no lock either.
                    assert!(
                        held || holding >= 50,
                        "only {holding} of 500 storm requests held their lock"
                    );
                    let cancelled = tokio::time::Instant::now();
                    let gone = common::eventually(Duration::from_secs(5), async || {
                        world
                            .lock_keys()
                            .await
                            .iter()
                            .all(|k| !k.contains("storm-"))
                    })
                    .await;
                    let left = world.lock_keys().await;
                    assert!(
                        gone,
                        "{} storm locks still held 5 s after their clients hung up (lease 30 s): {:?}",
                        left.len(),
                        &left[..left.len().min(5)]
                    );
                    println!(
                        "storm batch {batch}: {holding} locks held, all released {} ms after the clients hung up",
                        cancelled.elapsed().as_millis()
                    );
                }
            },
        )
        .await;
    row.assert_safe();
}
