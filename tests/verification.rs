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
use verify::{Backend, Setup, World, default_load, target_requests};

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

/// Kills every client connection of the node `admin` is connected to, except `admin` itself.
async fn kill_client_connections(admin: &mut impl redis::aio::ConnectionLike) {
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(admin)
        .await
        .expect("CLIENT KILL");
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
                    kill_client_connections(&mut admin).await;
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
                    for proxy in world.proxies.iter().flatten() {
                        proxy.set_latency(Duration::from_millis(latency));
                    }
                    pause(1500).await;
                }
                for proxy in world.proxies.iter().flatten() {
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
                world.proxies[0][0].set_blackhole(true);
                pause(2500).await;
                world.proxies[0][0].set_blackhole(false);
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
    holding_key(world, server, hold_ms, key).await
}

/// [`holding`] on a given key.
async fn holding_key(
    world: &World,
    server: usize,
    hold_ms: u64,
    key: String,
) -> (tokio::task::JoinHandle<verify::load::Record>, String) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let url = world.servers[server].url(&format!("/incr/{key}?hold_ms={hold_ms}"));
    let start = world.start;
    let request =
        tokio::spawn(async move { verify::load::post(&client, server, &url, start).await });
    let lock = verify::lock_key(&key);
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

// ---------------------------------------------------------------------------------------------
// The multi-node backends (issue 10) under the same load, checks and table: the servers lock on
// Redlock's independent primaries or on a Redis Cluster; their counters live in a Redis of their
// own, outside the faults (the store is not what is under test).

/// Requests per multi-node scenario in CI (their worlds cost more to start).
const MULTI_CI_REQUESTS: u64 = 2_000;

/// Posts to `key` (hold 1 ms) through `servers` in turn, every 50 ms, until `done` is true or
/// `within` has passed; the records go to the scenario's extra requests.
async fn contend(
    world: &mut World,
    servers: &[usize],
    key: &str,
    within: Duration,
    mut done: impl FnMut() -> bool,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let deadline = tokio::time::Instant::now() + within;
    let mut turn = 0;
    while tokio::time::Instant::now() < deadline && !done() {
        let server = servers[turn % servers.len()];
        turn += 1;
        let url = world.servers[server].url(&format!("/incr/{key}?hold_ms=1"));
        let record = verify::load::post(&client, server, &url, world.start).await;
        world.extra.push(record);
        pause(50).await;
    }
}

/// Sends `n` requests one after another on keys of their own (no contention) through every
/// server in turn; their latencies, sorted. Each must be admitted (at most one in ten may be a
/// 503 on a starved machine).
async fn solo_latencies(world: &mut World, n: usize) -> Vec<Duration> {
    let mut refused = 0;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut latencies = Vec::new();
    for i in 0..n {
        let server = i % world.servers.len();
        let key = format!("solo-{}", rand::rng().random::<u32>());
        let url = world.servers[server].url(&format!("/incr/{key}?hold_ms=0"));
        let record = verify::load::post(&client, server, &url, world.start).await;
        assert!(
            matches!(record.outcome, verify::load::Outcome::Status(200 | 503)),
            "{record:?}"
        );
        latencies.push(record.finished.saturating_sub(record.sent));
        if record.outcome == verify::load::Outcome::Status(503) {
            refused += 1;
        }
        world.extra.push(record);
    }
    assert!(
        refused * 10 <= n,
        "{refused} of {n} solo requests answered 503"
    );
    latencies.sort();
    latencies
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Redlock over 5 independent primaries (`RedlockBackend`), each server reaching each node
/// through a proxy of its own.
mod redlock {
    use super::*;

    /// A 2 s lease: the per-node timeout is a fifth of it, 400 ms. (With a 1 s lease, 200 ms,
    /// this suite's loaded 2-core VM answered a few percent 503 without any fault: every node
    /// call of a round timing out at once while the processes starved.)
    fn setup() -> Setup {
        Setup {
            backend: Backend::Redlock(5),
            ttl: Duration::from_secs(2),
            ..Setup::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_fault_no_overlap_no_lost_update_no_leak() {
        let world = World::start(setup()).await;
        let load = world.load();
        let requests = target_requests(MULTI_CI_REQUESTS);
        let row = world
            .run(
                "Redlock (5 nodes): no fault",
                &load,
                requests,
                async |world| {
                    pause(1000).await;
                    println!("server warnings so far:\n{}", world.warnings());
                },
            )
            .await;
        row.assert_safe();
        // Not zero as on one Redis: on the starved 2-core VM a few acquires (two rounds over five
        // nodes, in a debug build) miss the 500 ms acquire timeout (0.3–1.6 % seen).
        assert!(
            row.unavailable * 20 <= row.requests,
            "more than 5% 503s without a fault: {}",
            row.markdown()
        );
    }

    /// Two nodes die (SIGKILL, no persistence) while a request holds a lock past its lease
    /// (hold 5 s), and come back empty after more than a lease (Redlock's delayed restart: a node restarted
    /// sooner could let a second majority form while a holder's lock lives on the others). The
    /// holder keeps its lock on the three that remain (renewal needs a majority), contenders get
    /// 409, and the hot keys keep being locked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_of_five_nodes_sigkilled_and_restarted() {
        let world = World::start(setup()).await;
        let load = world.load();
        let requests = target_requests(MULTI_CI_REQUESTS);
        let mut round = 0;
        let row = world
            .run(
                "Redlock: 2 of 5 nodes SIGKILLed, restarted empty 2.5 s later (lease 2 s)",
                &load,
                requests,
                async |world| {
                    pause(800).await;
                    let (held, key) = holding(world, 0, 5000).await;
                    let down = [(2 * round) % 5, (2 * round + 1) % 5];
                    round += 1;
                    for node in down {
                        world.on_node(node, |n| n.stop()).await;
                    }
                    contend(world, &[1, 2], &key, Duration::from_millis(2500), || false).await;
                    for node in down {
                        world.on_node(node, |n| n.restart()).await;
                    }
                    world.fault_ended();
                    contend(world, &[1, 2], &key, Duration::from_secs(10), || {
                        held.is_finished()
                    })
                    .await;
                    let record = held.await.unwrap();
                    println!("holder across the kills: {record:?}");
                    world.extra.push(record);
                    pause(1000).await;
                },
            )
            .await;
        row.assert_safe();
    }

    /// Three of five nodes unavailable at once, each in its own way: node 0 SIGKILLed (refused),
    /// node 1 blackholed from every server (bytes held, delivered when it heals), node 2
    /// SIGSTOPped (its queue is served when it thaws). Every request answers 503 within 2 s;
    /// requests on keys of their own leave no lock on the nodes that answer, nor on the others
    /// once they are back (their held acquires are followed by the clean-up); then locking
    /// resumes. A 10 s lease, so that a lock left behind would outlive the checks. (The final
    /// leak check waits for the lease: a hot key's lock is usually left on the restarted node 0
    /// until its TTL — a finding, see RELIABILITY.md — and on a starved machine an acquire
    /// abandoned at its timeout whose clean-up also times out leaves its lock to the TTL, as the
    /// library warns. The run prints where a lock still held 3 s after the end is, and when the
    /// last one went.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_of_five_unavailable_one_paused_answer_503_then_recover() {
        let world = World::start(Setup {
            ttl: Duration::from_secs(10),
            ..setup()
        })
        .await;
        let load = world.load();
        let requests = target_requests(MULTI_CI_REQUESTS);
        let row = world
            .run(
                "Redlock: 3 of 5 nodes unavailable 2 s (one SIGKILLed, one blackholed, one SIGSTOPped; lease 10 s)",
                &load,
                requests,
                async |world| {
                    pause(800).await;
                    world.on_node(0, |n| n.stop()).await;
                    for proxies in &world.proxies {
                        proxies[1].set_blackhole(true);
                    }
                    world.on_node(2, |n| n.pause()).await;
                    let client = reqwest::Client::builder()
                        .timeout(Duration::from_secs(20))
                        .build()
                        .unwrap();
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                    let mut turn = 0;
                    while tokio::time::Instant::now() < deadline {
                        let server = turn % world.servers.len();
                        turn += 1;
                        let key = format!("outage-{}", rand::rng().random::<u32>());
                        let url = world.servers[server].url(&format!("/incr/{key}?hold_ms=1"));
                        let record = verify::load::post(&client, server, &url, world.start).await;
                        let latency = record.finished.saturating_sub(record.sent);
                        assert_eq!(
                            record.outcome,
                            verify::load::Outcome::Status(503),
                            "{record:?}"
                        );
                        assert!(latency < Duration::from_secs(2), "{record:?}");
                        world.extra.push(record);
                    }
                    let outage_locks = async |world: &World, nodes: &[usize]| {
                        let mut found = Vec::new();
                        for &i in nodes {
                            let keys = world.lock_keys_on(i).await.unwrap_or_default();
                            found.extend(keys.into_iter().filter(|k| k.contains("outage-")));
                        }
                        found
                    };
                    let clean = common::eventually(Duration::from_secs(2), async || {
                        outage_locks(world, &[3, 4]).await.is_empty()
                    })
                    .await;
                    assert!(
                        clean,
                        "failed rounds left locks on the live nodes: {:?}",
                        outage_locks(world, &[3, 4]).await
                    );
                    world.on_node(0, |n| n.restart()).await;
                    for proxies in &world.proxies {
                        proxies[1].set_blackhole(false);
                    }
                    world.on_node(2, |n| n.resume()).await;
                    world.fault_ended();
                    let all = [0, 1, 2, 3, 4];
                    let clean = common::eventually(Duration::from_secs(3), async || {
                        outage_locks(world, &all).await.is_empty()
                    })
                    .await;
                    assert!(
                        clean,
                        "failed rounds left locks once the nodes were back: {:?}",
                        outage_locks(world, &all).await
                    );
                    pause(1500).await;
                },
            )
            .await;
        println!(
            "the last lock went {} ms after the requests ended (lease 10 s)",
            row.locks_gone_after.as_millis()
        );
        row.assert_safe();
        assert!(row.unavailable > 0, "{}", row.markdown());
        assert!(
            row.max_503_latency < Duration::from_secs(2),
            "a 503 took 2 s or more: {}",
            row.markdown()
        );
    }

    /// One node slow for every server: 150 ms each way (within the 400 ms per-node timeout of a
    /// 2 s lease), then 500 ms (past it). A majority of fast nodes decides every round, so
    /// requests are still admitted and do not wait for the slow node.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_slow_node_still_admits_with_bounded_latency() {
        let world = World::start(setup()).await;
        let load = world.load();
        let requests = target_requests(MULTI_CI_REQUESTS);
        let row = world
            .run(
                "Redlock: node 4 slow, 150 ms then 500 ms each way (node timeout 400 ms)",
                &load,
                requests,
                async |world| {
                    pause(500).await;
                    let baseline = solo_latencies(world, 20).await;
                    let mut report = format!(
                        "redlock solo request latency: no fault p50 {:?} p99 {:?}",
                        percentile(&baseline, 0.5),
                        percentile(&baseline, 0.99)
                    );
                    for latency in [150, 500] {
                        for proxies in &world.proxies {
                            proxies[4].set_latency(Duration::from_millis(latency));
                        }
                        let slow = solo_latencies(world, 20).await;
                        report += &format!(
                            "; node 4 +{latency} ms each way: p50 {:?} p99 {:?}",
                            percentile(&slow, 0.5),
                            percentile(&slow, 0.99)
                        );
                        // Waiting for the slow node's answers would take its round trip (1 s at
                        // 500 ms each way) in each of the acquire, fencing and release rounds.
                        assert!(percentile(&slow, 0.5) < Duration::from_secs(1), "{report}");
                    }
                    println!("{report}");
                    for proxies in &world.proxies {
                        proxies[4].set_latency(Duration::ZERO);
                    }
                    world.fault_ended();
                    pause(1000).await;
                    println!("server warnings:\n{}", world.warnings());
                },
            )
            .await;
        row.assert_safe();
        // Rare 503s only (a round's calls all late on the starved VM: the warnings say why; 1.3 %
        // at a load average of 22).
        assert!(
            row.unavailable * 20 <= row.requests,
            "more than 5% 503s with one slow node: {}",
            row.markdown()
        );
    }
}

/// Redis Cluster (`RedisClusterBackend`) of 3 primaries with a replica each; hot keys one per
/// primary. The servers reach the nodes directly (the cluster client follows the addresses the
/// nodes announce, which a proxy would have to rewrite).
mod cluster {
    use super::*;

    fn setup(node_timeout_ms: u64) -> Setup {
        Setup {
            backend: Backend::Cluster(node_timeout_ms),
            ..Setup::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_fault_no_overlap_no_lost_update_no_leak() {
        // A long node timeout: a node slow on a busy machine is not failed over.
        let world = World::start(setup(5000)).await;
        let load = world.load();
        let requests = target_requests(MULTI_CI_REQUESTS);
        let row = world
            .run(
                "Cluster (3 primaries + 3 replicas): no fault",
                &load,
                requests,
                async |_| pause(1000).await,
            )
            .await;
        row.assert_safe();
        assert_eq!(row.unavailable, 0, "{}", row.markdown());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_kill_on_every_node() {
        let world = World::start(setup(5000)).await;
        let load = world.load();
        let requests = target_requests(MULTI_CI_REQUESTS);
        let row = world
            .run(
                "Cluster: CLIENT KILL of every server connection on every node, 3 times",
                &load,
                requests,
                async |world| {
                    for _ in 0..3 {
                        pause(500).await;
                        for i in 0..world.node_urls.len() {
                            let Some(mut admin) = world.node_admin(i).await else {
                                continue;
                            };
                            kill_client_connections(&mut admin).await;
                        }
                        world.fault_ended();
                    }
                    pause(1000).await;
                },
            )
            .await;
        row.assert_safe();
    }

    /// The live primary serving `slot` other than `not`, if the topology names one.
    async fn other_primary(world: &World, slot: u16, not: u16) -> Option<u16> {
        let nodes = world.nodes.lock().await;
        let topology = nodes.cluster().topology().await;
        topology
            .into_iter()
            .find(|n| {
                n.primary
                    && !n.failed
                    && n.port != not
                    && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
            })
            .map(|n| n.port)
    }

    /// The primary of a hot key SIGKILLed (no persistence) while a request holds a lock on it
    /// past its lease (hold 4 s, lease 1 s); its replica is promoted (node timeout 1 s).
    /// Contenders take the holder's key once the slot is served again: the holder's renewals
    /// failed meanwhile, so its lease is reported lost and the fence refuses its write; every
    /// overlap must be such a one. Recovery is measured from the kill, on that hot key. The
    /// killed node is restarted afterwards (it rejoins as a replica), ready for the next cycle.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn primary_sigkilled_replica_promoted() {
        let world = World::start(Setup {
            recovery_bound: Duration::from_secs(20),
            ..setup(1000)
        })
        .await;
        let load = world.load();
        let requests = target_requests(MULTI_CI_REQUESTS);
        let mut round = 0;
        let row = world
            .run(
                "Cluster: a primary SIGKILLed, its replica promoted (node timeout 1 s; recovery from the kill)",
                &load,
                requests,
                async |world| {
                    pause(800).await;
                    let hot = world.hot_keys[round % world.hot_keys.len()].clone();
                    round += 1;
                    let (slot, doomed, victim) = {
                        let nodes = world.nodes.lock().await;
                        let cluster = nodes.cluster();
                        let slot = cluster.slot(&verify::lock_key(&hot)).await;
                        let doomed = cluster.primary_of_slot(slot).await;
                        let mut victim = String::new();
                        for n in 0.. {
                            victim = format!("victim-{round}-{n}");
                            let victim_slot = cluster.slot(&verify::lock_key(&victim)).await;
                            if cluster.primary_of_slot(victim_slot).await == doomed {
                                break;
                            }
                        }
                        (slot, doomed, victim)
                    };
                    let index = world
                        .node_urls
                        .iter()
                        .position(|u| u.contains(&format!(":{doomed}/")))
                        .expect("the doomed primary is a node");
                    let (held, victim) = holding_key(world, 0, 4000, victim).await;
                    // Let the replica receive the lock (the usual case; a lock taken just before
                    // a kill can be lost with it, and then the lease-lost signal must fire).
                    pause(100).await;
                    let killed = tokio::time::Instant::now();
                    world.on_node(index, |n| n.stop()).await;
                    world.fault_ended_for(vec![hot.clone()]);
                    contend(world, &[1, 2], &victim, Duration::from_secs(20), || {
                        held.is_finished()
                    })
                    .await;
                    let mut promoted = None;
                    while killed.elapsed() < Duration::from_secs(20) {
                        if other_primary(world, slot, doomed).await.is_some() {
                            promoted = Some(killed.elapsed());
                            break;
                        }
                        pause(50).await;
                    }
                    let record = held.await.unwrap();
                    println!(
                        "cluster failover: replica of {doomed} promoted within {promoted:?} of the kill; holder across it: {record:?}"
                    );
                    assert!(promoted.is_some(), "no replica promoted within 20 s");
                    world.extra.push(record);
                    world.on_node(index, |n| n.restart()).await;
                    world
                        .on_cluster(|cluster| cluster.wait_until_ok(Duration::from_secs(30)))
                        .await;
                    pause(1000).await;
                },
            )
            .await;
        row.assert_safe();
        println!(
            "overlaps after a lost lease: {}, stale writes refused: {}",
            row.overlaps.after_lost_lease, row.updates.refused_stale
        );
    }
}
