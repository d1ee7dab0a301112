//! `RedisClusterBackend` on real Redis Clusters (3 primaries, from the harness's pool; 3
//! primaries and 3 replicas for the failover): what issue 10 asks of a Cluster backend, and the
//! core behaviours through `LockLayer` and `Locks`.

#[macro_use]
mod common;

use std::collections::HashSet;
use std::time::Duration;

use http::StatusCode;
use tower_lock::backend::{Acquire, AcquireOptions, Extend, LockToken, Release};
use tower_lock::key::LockKey;
use tower_lock::{LockBackend, Locks, TryLockError};

use common::cluster::{Cluster, RedisCluster};
use common::{
    Fixture, NS, assert_held_throughout, body_json, eventually, holder_behind, holding, layer,
    lock_name, request, send, start_holding, until_held,
};

fn engine(fixture: &Cluster) -> Locks<tower_lock::RedisClusterBackend> {
    Locks::new(fixture.backend()).namespace(NS)
}

// ---------------------------------------------------------------------------------------------
// Where the keys go.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_of_one_lock_land_in_one_slot_on_one_primary() {
    let fixture = Cluster::start().await;
    let locks = engine(&fixture);
    let long = "k".repeat(1000);
    // Request material that tries to pick its own hash tag, and keys that become digests.
    let keys = ["account:42", "{victim}", "a}{victim", "}{", "{", "", &long];
    for key in keys {
        let lock = locks.try_lock(&LockKey::new(key)).await.unwrap();
        assert!(lock.fencing_token() >= 1);
        let name = lock.name().clone();
        let slot = fixture.cluster.slot(name.lock_key()).await;
        assert_eq!(
            fixture.cluster.slot(name.fence_key()).await,
            slot,
            "{key:?}"
        );
        let primary = fixture.cluster.primary_of_slot(slot).await;
        let on_primary = &fixture.cluster.keys_by_primary(NS).await[&primary];
        assert!(
            on_primary.iter().any(|k| k == name.lock_key())
                && on_primary.iter().any(|k| k == name.fence_key()),
            "{key:?}: lock and counter not both on {primary}: {on_primary:?}"
        );
        lock.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_material_cannot_choose_the_hash_slot() {
    let fixture = Cluster::start().await;
    // Were `{victim}` a hash tag, all of these would share the slot of `victim`.
    let mut slots = HashSet::new();
    for i in 0..20 {
        let name = lock_name(&format!("{{victim}}{i}"));
        slots.insert(fixture.cluster.slot(name.lock_key()).await);
    }
    assert!(slots.len() > 10, "{slots:?}");
    assert!(!slots.contains(&fixture.cluster.slot("victim").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_on_many_keys_spread_over_every_primary() {
    let fixture = Cluster::start().await;
    let locks = engine(&fixture);
    let mut held = Vec::new();
    for i in 0..60 {
        held.push(
            locks
                .try_lock(&LockKey::new(format!("spread:{i}")))
                .await
                .unwrap(),
        );
    }
    let by_primary = fixture.cluster.keys_by_primary(NS).await;
    assert_eq!(by_primary.len(), 3);
    for (port, keys) in &by_primary {
        let locks = keys.iter().filter(|k| !k.ends_with(":fence")).count();
        assert!(locks >= 5, "primary {port} holds only {locks} of 60 locks");
    }
    drop(held);
    until_held(&fixture, 0).await;
}

// ---------------------------------------------------------------------------------------------
// Scripts and resent commands.

/// Makes every node forget its scripts (as a restarted or newly promoted node has), and answers
/// how many `SCRIPT LOAD`s the nodes had served until then.
async fn flush_scripts(cluster: &RedisCluster) -> u64 {
    let mut loads = 0;
    for node in &cluster.nodes {
        loads += node.command_calls("script|load").await;
        let mut connection = node.connection().await;
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    loads
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_flushed_from_every_node_are_loaded_again() {
    let fixture = Cluster::start().await;
    let cluster = &fixture.cluster;
    let backend = fixture.backend();
    let name = lock_name("noscript");
    let token = LockToken::random();
    let ttl = Duration::from_secs(5);
    let mut loads = flush_scripts(cluster).await;
    let acquired = backend
        .acquire(&name, token, AcquireOptions::new(ttl))
        .await
        .unwrap();
    assert!(
        matches!(acquired, Acquire::Acquired { fencing_token } if fencing_token > 0),
        "{acquired:?}"
    );
    let after_acquire = flush_scripts(cluster).await;
    assert!(after_acquire > loads, "the acquire script was not reloaded");
    loads = after_acquire;
    assert_eq!(
        backend.extend(&name, token, ttl).await.unwrap(),
        Extend::Extended
    );
    let after_extend = flush_scripts(cluster).await;
    assert!(after_extend > loads, "the extend script was not reloaded");
    assert_eq!(
        backend.release(&name, token).await.unwrap(),
        Release::Released
    );
    assert!(flush_scripts(cluster).await > after_extend);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_acquire_finds_its_own_lock_not_a_holder() {
    let fixture = Cluster::start().await;
    let backend = fixture.backend();
    let ttl = Duration::from_secs(5);
    for fencing in [true, false] {
        let name = lock_name(&format!("resent:{fencing}"));
        let token = LockToken::random();
        let options = AcquireOptions::new(ttl).fencing(fencing);
        let first = backend.acquire(&name, token, options).await.unwrap();
        let resent = backend.acquire(&name, token, options).await.unwrap();
        assert_eq!(first, resent, "fencing {fencing}");
        assert!(
            matches!(first, Acquire::Acquired { fencing_token } if (fencing_token > 0) == fencing),
            "{first:?}"
        );
        let other = backend
            .acquire(&name, LockToken::random(), options)
            .await
            .unwrap();
        assert!(
            matches!(other, Acquire::Held { remaining: Some(r) } if r > Duration::from_secs(4)),
            "{other:?}"
        );
        assert_eq!(
            backend.release(&name, token).await.unwrap(),
            Release::Released
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The core behaviours, through the layer and the engine.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_key_is_a_409_and_other_keys_pass() {
    let fixture = Cluster::start().await;
    let service = holder_behind(layer(&fixture));
    let holder = start_holding(&fixture, &service, holding("busy", 400)).await;
    let refused = send(&service, request("busy")).await;
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    assert_eq!(
        send(&service, request("free")).await.status(),
        StatusCode::OK
    );
    assert_eq!(holder.await.unwrap().status(), StatusCode::OK);
    until_held(&fixture, 0).await;
    assert_eq!(
        send(&service, request("busy")).await.status(),
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_response_future_releases_the_lock() {
    let fixture = Cluster::start().await;
    let service = holder_behind(layer(&fixture));
    let holder = start_holding(&fixture, &service, holding("dropped", 30_000)).await;
    holder.abort();
    until_held(&fixture, 0).await;
    assert_eq!(
        send(&service, request("dropped")).await.status(),
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_the_lock_past_its_ttl() {
    let fixture = Cluster::start().await;
    let service = holder_behind(layer(&fixture).ttl(Duration::from_millis(300)));
    let holder = start_holding(&fixture, &service, holding("renewed", 1200)).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let report = assert_held_throughout(&service, "renewed", holder).await;
    assert!(report["elapsed_ms"].as_u64().unwrap() >= 1200, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_lost_when_the_lock_is_deleted() {
    let fixture = Cluster::start().await;
    let service = holder_behind(
        layer(&fixture)
            .ttl(Duration::from_millis(600))
            .renew_every(Duration::from_millis(100)),
    );
    let holder = start_holding(&fixture, &service, holding("deleted", 10_000)).await;
    fixture.delete(&lock_name("deleted")).await;
    let response = holder.await.unwrap();
    let report = body_json(response).await;
    assert_eq!(report["lost"], true, "{report}");
    assert!(report["elapsed_ms"].as_u64().unwrap() < 5_000, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_locks_refuses_and_releases_with_growing_fencing_tokens() {
    let fixture = Cluster::start().await;
    let locks = engine(&fixture);
    let key = LockKey::new("engine");
    let first = locks.try_lock(&key).await.unwrap();
    assert!(matches!(
        locks.try_lock(&key).await,
        Err(TryLockError::Held { remaining: Some(_) })
    ));
    assert!(locks.is_locked(&key).await.unwrap());
    let token = first.fencing_token();
    drop(first);
    assert!(
        eventually(Duration::from_secs(5), async || !locks
            .is_locked(&key)
            .await
            .unwrap())
        .await
    );
    let second = locks.try_lock(&key).await.unwrap();
    assert!(second.fencing_token() > token);
    assert!(locks.force_unlock(&key).await.unwrap());
    assert!(!locks.is_locked(&key).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_client_sees_the_first_clients_locks() {
    let fixture = Cluster::start().await;
    let other = Locks::new(fixture.new_client()).namespace(NS);
    let key = LockKey::new("shared");
    let lock = engine(&fixture).try_lock(&key).await.unwrap();
    assert!(matches!(
        other.try_lock(&key).await,
        Err(TryLockError::Held { .. })
    ));
    lock.release().await.unwrap();
    other.try_lock(&key).await.unwrap().release().await.unwrap();
}

/// `connect` reads every primary's eviction policy, as `RedisBackend::connect` reads its one.
#[tokio::test]
async fn an_evicting_primary_is_warned_of_on_connect() {
    let fixture = Cluster::start().await;
    let cluster = &fixture.cluster;
    let evicting = cluster.primaries().await[1];
    let set_policy = async |policy: &str| {
        let mut connection = cluster.node(evicting).connection().await;
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg(policy)
            .query_async(&mut connection)
            .await
            .unwrap();
    };
    let warnings = async || {
        let logs = common::logs::Captured::default();
        let _guard = tracing::subscriber::set_default(logs.subscriber());
        tower_lock::RedisClusterBackend::connect(cluster.urls())
            .await
            .unwrap();
        logs.text()
    };
    let quiet = warnings().await;
    assert!(!quiet.contains("maxmemory_policy"), "{quiet}");
    set_policy("allkeys-lru").await;
    let logs = warnings().await;
    set_policy("noeviction").await;
    assert!(logs.contains("WARN"), "{logs}");
    assert!(logs.contains("allkeys-lru"), "{logs}");
    assert!(logs.contains("fencing counters"), "{logs}");
}

// ---------------------------------------------------------------------------------------------
// Failover.

/// Kills the primary of a key's slot while its lock is held, and measures how long until the
/// layer locks that slot again once its replica is promoted; then checks that the promoted
/// primary admits one holder per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_primary_fails_over_the_layer_recovers_and_stays_exclusive() {
    let mut cluster = tokio::task::block_in_place(|| RedisCluster::start(3, 1, 1000));
    let backend = cluster.backend().await;
    let service = holder_behind(
        common::layer_on(backend.clone())
            .ttl(Duration::from_secs(2))
            .renew_every(Duration::from_millis(200)),
    );
    let probe = holder_behind(common::layer_on(backend));
    let slot = cluster.slot(lock_name("failover").lock_key()).await;
    let doomed = cluster.primary_of_slot(slot).await;
    // Another key on the doomed primary, to probe it with.
    let mut probe_key = String::new();
    for i in 0.. {
        probe_key = format!("probe:{i}");
        let probe_slot = cluster.slot(lock_name(&probe_key).lock_key()).await;
        if cluster.primary_of_slot(probe_slot).await == doomed {
            break;
        }
    }
    // A holder on the doomed primary; wait until its replica has the lock and its counter (the
    // only keys in this cluster).
    let holder = tokio::spawn(send(&service, holding("failover", 4_000)));
    let replicated = eventually(Duration::from_secs(5), async || {
        let mut keys = 0;
        for node in cluster.nodes.iter().filter(|n| n.port() != doomed) {
            let mut connection = node.connection().await;
            keys += redis::cmd("DBSIZE")
                .query_async::<i64>(&mut connection)
                .await
                .unwrap_or(0);
        }
        keys == 2
    })
    .await;
    assert!(replicated, "the replica never received the lock");

    // A key on another primary, to see what the failover costs the slots it does not move.
    let mut bystander = String::new();
    for i in 0.. {
        bystander = format!("bystander:{i}");
        let bystander_slot = cluster.slot(lock_name(&bystander).lock_key()).await;
        if cluster.primary_of_slot(bystander_slot).await != doomed {
            break;
        }
    }

    let killed = tokio::time::Instant::now();
    cluster.node_mut(doomed).stop();
    // Locks on the failed primary's slots: 503 until its replica takes over, then a lock again.
    let mut statuses = Vec::new();
    let mut bystander_statuses = Vec::new();
    let recovered = loop {
        let status = send(&probe, request(&probe_key)).await.status();
        if statuses.last() != Some(&status) {
            statuses.push(status);
        }
        let elsewhere = send(&probe, request(&bystander)).await.status();
        if bystander_statuses.last().map(|(s, _)| s) != Some(&elsewhere) {
            bystander_statuses.push((elsewhere, killed.elapsed()));
        }
        if status == StatusCode::OK {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "no recovery within 20 s: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "cluster failover: locks again {recovered:?} after the kill ({statuses:?}); \
         another primary's key meanwhile: {bystander_statuses:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), async || cluster
            .primary_of_slot(slot)
            .await
            != doomed)
        .await,
        "the topology still names the killed primary"
    );

    // The first holder's lease: renewals fail while the slot has no primary, so it is reported
    // lost if that outlasts its validity, though its lock survived on the replica.
    let report = body_json(holder.await.unwrap()).await;
    eprintln!("holder across the failover: {report}");

    // On the promoted primary and the others, 10 concurrent requests per key: one holder each.
    let mut requests = Vec::new();
    for key in [probe_key.as_str(), "after:1", "after:2"] {
        for _ in 0..10 {
            requests.push((key, tokio::spawn(send(&service, holding(key, 1_000)))));
        }
    }
    let mut admitted = std::collections::HashMap::<&str, usize>::new();
    for (key, response) in requests {
        let status = response.await.unwrap().status();
        assert!(
            status == StatusCode::OK || status == StatusCode::CONFLICT,
            "{key}: {status}"
        );
        if status == StatusCode::OK {
            *admitted.entry(key).or_default() += 1;
        }
    }
    assert_eq!(
        admitted,
        [(probe_key.as_str(), 1), ("after:1", 1), ("after:2", 1)].into()
    );
    tokio::task::block_in_place(|| drop(cluster));
}

/// The port of the replica of the primary on `port` (`INFO replication`'s `slave0`).
async fn replica_of(cluster: &RedisCluster, port: u16) -> u16 {
    let mut connection = cluster.node(port).connection().await;
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut connection)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("slave0:"))
        .and_then(|fields| fields.split(',').find_map(|f| f.strip_prefix("port=")))
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no replica of {port}: {info}"))
}

/// The failover window, measured: a lock taken on a primary whose replica had not received it
/// (its replication link cut and the replica frozen just before; on a real cluster, replication
/// lag) is lost when the primary dies and the replica is promoted. A second holder (another
/// process) is admitted as soon as the slot has a primary again, while the first still believes
/// it holds the lock; the first holder's next renewal finds the lock gone and its lease reports
/// lost (before its validity would have run out), its release leaves the second holder's lock
/// alone, and the second holder's fencing token is larger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_the_replica_had_not_received_is_lost_in_a_failover_and_its_lease_reports_it() {
    let mut cluster = tokio::task::block_in_place(|| RedisCluster::start(3, 1, 1000));
    let ttl = Duration::from_secs(9);
    let first = Locks::new(cluster.backend().await).namespace(NS).ttl(ttl);
    let second = Locks::new(cluster.backend().await).namespace(NS).ttl(ttl);
    let key = LockKey::new("window");
    let slot = cluster.slot(lock_name("window").lock_key()).await;
    let doomed = cluster.primary_of_slot(slot).await;
    let replica = replica_of(&cluster, doomed).await;
    // Both clients know the doomed primary already.
    for locks in [&first, &second] {
        locks.try_lock(&key).await.unwrap().release().await.unwrap();
    }

    // The replica frozen and its link cut: the acquire below never reaches it.
    cluster.node(replica).pause();
    let mut connection = cluster.node(doomed).connection().await;
    let () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .query_async::<i64>(&mut connection)
        .await
        .map(drop)
        .unwrap();
    let held = first.try_lock(&key).await.unwrap();
    let acquired = tokio::time::Instant::now();
    cluster.node_mut(doomed).stop();
    cluster.node(replica).resume();
    let killed = tokio::time::Instant::now();

    // A second holder gets in once the replica is promoted: the lock did not survive.
    let taken = loop {
        match second.try_lock(&key).await {
            Ok(lock) => break lock,
            Err(TryLockError::Held { .. }) => {
                panic!("the lock survived the failover: the replica had received it")
            }
            Err(_) => {
                assert!(
                    killed.elapsed() < Duration::from_secs(20),
                    "no promotion within 20 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let window = killed.elapsed();
    let first_lost_then = held.is_lost();
    assert!(
        taken.fencing_token() > held.fencing_token(),
        "{} after {}",
        taken.fencing_token(),
        held.fencing_token()
    );

    // The first holder's renewal (every ttl/3) finds the lock gone: its lease is lost.
    tokio::time::timeout(ttl, held.lease().lost())
        .await
        .expect("the first holder's lease never reported the loss");
    let lost_after = acquired.elapsed();
    assert!(
        lost_after < ttl - Duration::from_secs(1),
        "lost only when its validity ran out ({lost_after:?}): no renewal noticed it"
    );
    assert_eq!(held.release().await.unwrap(), Release::HeldByOther);
    assert!(!taken.is_lost());
    assert!(
        matches!(
            cluster.backend().await.inspect(&lock_name("window")).await,
            Ok(tower_lock::backend::Inspect::Held { .. })
        ),
        "the first holder's release deleted the second holder's lock"
    );
    eprintln!(
        "cluster failover window: a second holder admitted {window:?} after the kill \
         (the first lease then lost: {first_lost_then}); the first lease reported lost \
         {lost_after:?} after its acquire (ttl {ttl:?}, renewal every ttl/3)"
    );
    taken.release().await.unwrap();
    tokio::task::block_in_place(|| drop(cluster));
}

/// `wait_for_replicas` on a cluster: `WAIT` goes to the lock's primary only (a key on a primary
/// whose replica is frozen is refused, fail-closed and with no lock left behind, while keys on
/// the other primaries still lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_replicas_waits_on_the_locks_primary_and_fails_closed() {
    // A long node timeout: the frozen replica is not replaced meanwhile.
    let cluster = tokio::task::block_in_place(|| RedisCluster::start(3, 1, 5000));
    let backend = cluster
        .backend()
        .await
        .wait_for_replicas(1, Duration::from_millis(300));
    let options = AcquireOptions::new(Duration::from_secs(10));
    let keys = key_per_primary(&cluster, "replicated").await;
    for (_, key) in &keys {
        let token = LockToken::random();
        let name = lock_name(key);
        let acquired = backend.acquire(&name, token, options).await.unwrap();
        assert!(matches!(acquired, Acquire::Acquired { .. }), "{key}");
        backend.release(&name, token).await.unwrap();
    }
    let (port, frozen_key) = &keys[0];
    let replica = replica_of(&cluster, *port).await;
    cluster.node(replica).pause();
    let started = tokio::time::Instant::now();
    let refused = backend
        .acquire(&lock_name(frozen_key), LockToken::random(), options)
        .await;
    let took = started.elapsed();
    let others: Vec<_> = {
        let mut outcomes = Vec::new();
        for (_, key) in &keys[1..] {
            let token = LockToken::random();
            let name = lock_name(key);
            let acquired = backend.acquire(&name, token, options).await;
            if acquired.is_ok() {
                backend.release(&name, token).await.unwrap();
            }
            outcomes.push(acquired);
        }
        outcomes
    };
    cluster.node(replica).resume();
    let error = refused.expect_err("acquired without the replica's acknowledgement");
    assert_eq!(
        error.kind(),
        tower_lock::backend::BackendErrorKind::Unavailable,
        "{error}"
    );
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(
        cluster.lock_keys(NS).await.is_empty(),
        "a refused lock was left behind"
    );
    for outcome in others {
        assert!(
            matches!(outcome, Ok(Acquire::Acquired { .. })),
            "a key on another primary: {outcome:?}"
        );
    }
    eprintln!(
        "cluster wait_for_replicas(1, 300 ms) with the replica frozen: refused after {took:?}"
    );
    tokio::task::block_in_place(|| drop(cluster));
}

// ---------------------------------------------------------------------------------------------
// Waiting: wake-ups pushed through sharded pub/sub.

/// How many acquire commands (`EVALSHA`/`EVAL`/`SET`) `port` has served since its stats were
/// last reset.
async fn acquire_calls(cluster: &RedisCluster, port: u16) -> u64 {
    let mut connection = cluster.node(port).connection().await;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .unwrap();
    stats
        .lines()
        .filter(|line| {
            ["cmdstat_evalsha:", "cmdstat_eval:", "cmdstat_set:"]
                .iter()
                .any(|command| line.starts_with(command))
        })
        .filter_map(|line| {
            let calls = line.split("calls=").nth(1)?.split(',').next()?;
            calls.parse::<u64>().ok()
        })
        .sum()
}

async fn reset_stats(cluster: &RedisCluster, port: u16) {
    let mut connection = cluster.node(port).connection().await;
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut connection)
        .await
        .unwrap();
}

/// A task waiting up to `max_wait` for `key` on `locks`.
fn spawn_waiter<B: LockBackend>(
    locks: &Locks<B>,
    key: &str,
    max_wait: Duration,
) -> tokio::task::JoinHandle<Result<tower_lock::Lock<B>, TryLockError>> {
    let locks = locks.clone();
    let key = LockKey::new(key);
    tokio::spawn(async move { locks.lock(&key, max_wait).await })
}

/// Whether, within 10 s, one sharded subscriber to `key`'s wake-ups shows on node `port`.
async fn subscribed_on(cluster: &RedisCluster, port: u16, key: &str) -> bool {
    eventually(Duration::from_secs(10), async || {
        shard_subscribers(cluster, port, key).await == 1
    })
    .await
}

/// Sharded subscribers of `key`'s wake-up channel on `port` (`PUBSUB SHARDNUMSUB`).
async fn shard_subscribers(cluster: &RedisCluster, port: u16, key: &str) -> i64 {
    let Ok(mut connection) = cluster
        .node(port)
        .client()
        .get_multiplexed_async_connection()
        .await
    else {
        return -1;
    };
    let channel = format!("{}:wake", lock_name(key).lock_key());
    let reply: Vec<redis::Value> = redis::cmd("PUBSUB")
        .arg("SHARDNUMSUB")
        .arg(&channel)
        .query_async(&mut connection)
        .await
        .unwrap_or_default();
    match reply.get(1) {
        Some(redis::Value::Int(n)) => *n,
        _ => -1,
    }
}

/// A key whose lock lives on each primary of `cluster`, by port.
async fn key_per_primary(cluster: &RedisCluster, prefix: &str) -> Vec<(u16, String)> {
    let primaries = cluster.primaries().await;
    let mut found = Vec::new();
    for port in primaries {
        for i in 0.. {
            let key = format!("{prefix}:{port}:{i}");
            let slot = cluster.slot(lock_name(&key).lock_key()).await;
            if cluster.primary_of_slot(slot).await == port {
                found.push((port, key));
                break;
            }
        }
    }
    found
}

/// A waiter for `key` (held by `holder`, a 30 s lease) on the primary `port`: it is subscribed
/// there, sleeps instead of polling, and gets the lock within a second of the release (its
/// poll, were it not woken, would come at the end of the holder's 30 s lease). Answers how long
/// the hand-over took.
async fn woken_by_the_release(
    cluster: &RedisCluster,
    locks: &Locks<tower_lock::RedisClusterBackend>,
    port: u16,
    key: &str,
) -> Duration {
    let holder = locks.try_lock(&LockKey::new(key)).await.unwrap();
    let waiter = spawn_waiter(locks, key, Duration::from_secs(20));
    assert!(
        subscribed_on(cluster, port, key).await,
        "{key}: no sharded subscriber on its primary {port}"
    );
    // Once subscribed, the waiter sleeps until the holder's lease ends: a polling waiter (10–50 ms)
    // would send 20 acquires or more in this second.
    tokio::time::sleep(Duration::from_millis(200)).await;
    reset_stats(cluster, port).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = acquire_calls(cluster, port).await;
    assert!(
        calls <= 3,
        "{key}: the waiter polled ({calls} acquires in 1 s)"
    );
    assert!(!waiter.is_finished(), "{key}: the waiter took a held lock");
    let released = tokio::time::Instant::now();
    holder.release().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter was not woken")
        .unwrap()
        .expect("the waiter gets the lock");
    let handover = released.elapsed();
    assert!(
        handover < Duration::from_secs(1),
        "{key}: handed over {handover:?} after the release: not pushed"
    );
    second.release().await.unwrap();
    handover
}

/// `RedisClusterBackend` pushes wake-ups: the release's `SPUBLISH` wakes a waiter on whichever
/// primary its lock lives, and the channel is unsubscribed once nobody waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_every_primary_are_woken_by_the_release_spublish() {
    let fixture = Cluster::start().await;
    assert!(
        fixture.backend().wakeups().is_some(),
        "RedisClusterBackend has no pushed wake-ups: its waiters poll"
    );
    let locks = engine(&fixture).ttl(Duration::from_secs(30));
    let keys = key_per_primary(&fixture.cluster, "woken").await;
    assert_eq!(keys.len(), 3);
    let mut handovers = Vec::new();
    for (port, key) in &keys {
        handovers.push(woken_by_the_release(&fixture.cluster, &locks, *port, key).await);
    }
    eprintln!("cluster waiters woken after the release: {handovers:?}");
    for (port, key) in &keys {
        assert!(
            eventually(Duration::from_secs(5), async || shard_subscribers(
                &fixture.cluster,
                *port,
                key
            )
            .await
                == 0)
            .await,
            "{key}: still subscribed on {port} with nobody waiting"
        );
    }
}

/// The subscriber's connection to a node is killed while a waiter waits: the waiter polls
/// meanwhile, the subscriber subscribes again, and the next release is pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_survive_the_sharded_subscriber_being_killed() {
    let fixture = Cluster::start().await;
    let cluster = &fixture.cluster;
    let locks = engine(&fixture).ttl(Duration::from_secs(30));
    let (port, key) = key_per_primary(cluster, "killed").await.remove(0);
    let holder = locks.try_lock(&LockKey::new(&key)).await.unwrap();
    let waiter = spawn_waiter(&locks, &key, Duration::from_secs(20));
    assert!(subscribed_on(cluster, port, &key).await);
    let mut connection = cluster.node(port).connection().await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(killed, 1, "the sharded subscriber's connection");
    assert!(
        subscribed_on(cluster, port, &key).await,
        "not subscribed again"
    );
    // Confirmed again: the waiter sleeps instead of polling.
    tokio::time::sleep(Duration::from_millis(300)).await;
    reset_stats(cluster, port).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = acquire_calls(cluster, port).await;
    assert!(
        calls <= 3,
        "the waiter still polls ({calls} acquires in 1 s)"
    );
    let released = tokio::time::Instant::now();
    holder.release().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter was stranded")
        .unwrap()
        .expect("the lock");
    assert!(
        released.elapsed() < Duration::from_secs(1),
        "handed over {:?} after the release: not pushed",
        released.elapsed()
    );
    second.release().await.unwrap();
}

/// A manual failover (`CLUSTER FAILOVER` on the replica: the old primary stays up and becomes a
/// replica) while a waiter waits: the waiter never errs, its subscription stays confirmed in the
/// slot's shard (on Redis 7.0 it stays on the old primary, now a replica, which receives the
/// shard's `SPUBLISH`es), and the release on the promoted primary is pushed to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_follows_its_slot_to_the_new_primary_in_a_manual_failover() {
    let cluster = tokio::task::block_in_place(|| RedisCluster::start(3, 1, 5000));
    let locks = Locks::new(cluster.backend().await)
        .namespace(NS)
        .ttl(Duration::from_secs(30));
    let key = "moved";
    let slot = cluster.slot(lock_name(key).lock_key()).await;
    let old = cluster.primary_of_slot(slot).await;
    let replica = replica_of(&cluster, old).await;
    let holder = locks.try_lock(&LockKey::new(key)).await.unwrap();
    let waiter = spawn_waiter(&locks, key, Duration::from_secs(25));
    assert!(subscribed_on(&cluster, old, key).await);
    let mut connection = cluster.node(replica).connection().await;
    let () = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(15), async || cluster
            .primary_of_slot(slot)
            .await
            == replica)
        .await,
        "the replica was not promoted"
    );
    // Subscribed in the slot's shard: on the promoted primary, or on the old one, now its
    // replica (a replica serves `SSUBSCRIBE` for its shard's slots and receives its `SPUBLISH`es).
    assert!(
        eventually(Duration::from_secs(10), async || shard_subscribers(
            &cluster, replica, key
        )
        .await
            + shard_subscribers(&cluster, old, key).await
            >= 1)
        .await,
        "not subscribed in the slot's shard"
    );
    eprintln!(
        "manual failover: sharded subscribers on the promoted primary {}, on the old one {}",
        shard_subscribers(&cluster, replica, key).await,
        shard_subscribers(&cluster, old, key).await
    );
    // Confirmed there: the waiter sleeps instead of polling.
    tokio::time::sleep(Duration::from_millis(300)).await;
    reset_stats(&cluster, replica).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = acquire_calls(&cluster, replica).await;
    assert!(
        calls <= 3,
        "the waiter still polls ({calls} acquires in 1 s)"
    );
    assert!(
        !waiter.is_finished(),
        "the waiter ended: {:?}",
        waiter.await
    );
    // The promoted primary publishes a release to the replicas it knows of: wait until the
    // shard's gossip has told it the old primary is one (until then a release's wake-up can be
    // lost, and the waiter rechecks within 2 s: `a_lost_wake_up_costs_a_confirmed_waiter_at_most_the_recheck`).
    assert!(
        eventually(Duration::from_secs(15), async || connected_replicas(
            &cluster, replica
        )
        .await
            >= 1)
        .await,
        "the old primary never became the new one's replica"
    );
    let released = tokio::time::Instant::now();
    holder.release().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter was stranded")
        .unwrap()
        .expect("the lock");
    let handover = released.elapsed();
    assert!(
        handover < Duration::from_secs(1),
        "handed over {handover:?} after the release: not pushed"
    );
    eprintln!("manual failover: the waiter got the lock {handover:?} after the release");
    second.release().await.unwrap();
    tokio::task::block_in_place(|| drop(cluster));
}

/// A waiter across a primary failover is never stuck (woken, or answered unavailable while the
/// slot has no primary), and afterwards waiters on the promoted primary are pushed again, by
/// the same backend's subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_primary_failover_waiters_are_pushed_again() {
    let mut cluster = tokio::task::block_in_place(|| RedisCluster::start(3, 1, 1000));
    let backend = cluster.backend().await;
    let locks = Locks::new(backend)
        .namespace(NS)
        .ttl(Duration::from_secs(30));
    let key = "waited";
    let slot = cluster.slot(lock_name(key).lock_key()).await;
    let doomed = cluster.primary_of_slot(slot).await;
    let holder = locks.try_lock(&LockKey::new(key)).await.unwrap();
    let waiter = spawn_waiter(&locks, key, Duration::from_secs(25));
    assert!(
        subscribed_on(&cluster, doomed, key).await,
        "no sharded subscriber on {doomed}"
    );
    // The replica has the lock and its counter (the only keys in this cluster).
    let replicated = eventually(Duration::from_secs(5), async || {
        let mut keys = 0;
        for node in cluster.nodes.iter().filter(|n| n.port() != doomed) {
            let mut connection = node.connection().await;
            keys += redis::cmd("DBSIZE")
                .query_async::<i64>(&mut connection)
                .await
                .unwrap_or(0);
        }
        keys == 2
    })
    .await;
    assert!(replicated, "the replica never received the lock");

    let killed = tokio::time::Instant::now();
    cluster.node_mut(doomed).stop();
    let promoted = loop {
        let primary = cluster.primary_of_slot(slot).await;
        if primary != doomed {
            break primary;
        }
        assert!(killed.elapsed() < Duration::from_secs(20), "no promotion");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Release once the promoted primary answers (the lock survived there).
    let released = loop {
        match locks.try_lock(&LockKey::new("probe")).await {
            Ok(probe) => {
                let _ = probe.release().await;
            }
            Err(_) => {
                assert!(killed.elapsed() < Duration::from_secs(20), "no recovery");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let _ = holder.release().await;
        break tokio::time::Instant::now();
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("a waiter across the failover was stranded")
        .unwrap();
    eprintln!(
        "waiter across the cluster failover: {} {:?} after the release ({:?} after the kill)",
        if outcome.is_ok() {
            "got the lock"
        } else {
            "answered unavailable"
        },
        released.elapsed(),
        killed.elapsed(),
    );
    if let Ok(lock) = outcome {
        lock.release().await.unwrap();
    }

    // Waiters on the promoted primary and on the others: subscribed and pushed again.
    let mut handovers = Vec::new();
    for (port, key) in key_per_primary(&cluster, "after").await {
        handovers.push(woken_by_the_release(&cluster, &locks, port, &key).await);
    }
    handovers.push(woken_by_the_release(&cluster, &locks, promoted, key).await);
    eprintln!("after the failover, waiters woken after the release: {handovers:?}");
    tokio::task::block_in_place(|| drop(cluster));
}

// ---------------------------------------------------------------------------------------------
// Figures.

/// Acquire latency (p50, p99) and acquire+release throughput on the cluster and on one Redis, in
/// the same run: `cargo test --release --all-features --test cluster -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn acquire_latency_against_a_single_node() {
    let cluster = Cluster::start().await;
    let single = common::Redis::start().await;
    for fencing in [true, false] {
        let (p50, p99, rate) = measure(cluster.backend(), fencing).await;
        eprintln!(
            "cluster (3 primaries), fencing {fencing}: acquire p50 {p50:?} p99 {p99:?}, {rate:.0} acquire+release/s with 16 tasks"
        );
        let (p50, p99, rate) = measure(single.backend(), fencing).await;
        eprintln!(
            "single Redis,          fencing {fencing}: acquire p50 {p50:?} p99 {p99:?}, {rate:.0} acquire+release/s with 16 tasks"
        );
    }
}

/// 2000 sequential acquires (each released), then 16 tasks acquiring and releasing for 2 s.
async fn measure<B: LockBackend>(backend: B, fencing: bool) -> (Duration, Duration, f64) {
    let options = AcquireOptions::new(Duration::from_secs(10)).fencing(fencing);
    let mut latencies = Vec::with_capacity(2000);
    for i in 0..2000 {
        let name = lock_name(&format!("latency:{i}"));
        let token = LockToken::random();
        let started = std::time::Instant::now();
        let acquired = backend.acquire(&name, token, options).await.unwrap();
        latencies.push(started.elapsed());
        assert!(matches!(acquired, Acquire::Acquired { .. }));
        backend.release(&name, token).await.unwrap();
    }
    latencies.sort_unstable();
    let (p50, p99) = (latencies[1000], latencies[1980]);
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    let tasks: Vec<_> = (0..16)
        .map(|task| {
            let backend = backend.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                while tokio::time::Instant::now() < until {
                    let name = lock_name(&format!("rate:{task}:{done}"));
                    let token = LockToken::random();
                    backend.acquire(&name, token, options).await.unwrap();
                    backend.release(&name, token).await.unwrap();
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    (p50, p99, total as f64 / 2.0)
}

/// How many replicas the node on `port` knows it has, in its own view of the cluster
/// (`CLUSTER NODES`): those it forwards its shard's `SPUBLISH`es to.
async fn connected_replicas(cluster: &RedisCluster, port: u16) -> usize {
    let mut connection = cluster.node(port).connection().await;
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut connection)
        .await
        .unwrap();
    let fields = |line: &str| line.split(' ').map(str::to_owned).collect::<Vec<_>>();
    let Some(me) = nodes
        .lines()
        .map(fields)
        .find(|f| f.len() > 3 && f[2].contains("myself"))
    else {
        return 0;
    };
    nodes
        .lines()
        .map(fields)
        .filter(|f| f.len() > 3 && f[3] == me[0])
        .count()
}

/// Every sharded channel subscribed on `cluster`'s primaries (`PUBSUB SHARDCHANNELS`) under
/// the test namespace.
async fn subscribed_wake_channels(cluster: &RedisCluster) -> Vec<String> {
    let mut channels = Vec::new();
    for port in cluster.primaries().await {
        let Ok(mut connection) = cluster
            .node(port)
            .client()
            .get_multiplexed_async_connection()
            .await
        else {
            continue;
        };
        let found: Vec<String> = redis::cmd("PUBSUB")
            .arg("SHARDCHANNELS")
            .arg(format!("{NS}*"))
            .query_async(&mut connection)
            .await
            .unwrap_or_default();
        channels.extend(
            found
                .into_iter()
                .map(|channel| format!("{port}: {channel}")),
        );
    }
    channels
}

/// Red team: a burst of waiters on many distinct keys, most of them handed the lock at once
/// (released while their `SSUBSCRIBE` is still in flight), leaves no sharded subscription
/// behind once nobody waits: the subscriber unsubscribes every channel it no longer needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_waiters_on_distinct_keys_leaves_no_sharded_subscription() {
    let fixture = Cluster::start().await;
    let locks = engine(&fixture).ttl(Duration::from_secs(30));
    for round in 0..3 {
        let mut waiters = Vec::new();
        let mut holders = Vec::new();
        for i in 0..40 {
            let key = LockKey::new(format!("burst:{round}:{i}"));
            holders.push(locks.try_lock(&key).await.unwrap());
            waiters.push(tokio::spawn({
                let locks = locks.clone();
                async move {
                    let lease = locks.lock(&key, Duration::from_secs(20)).await.unwrap();
                    lease.release().await.unwrap();
                }
            }));
        }
        if round == 0 {
            // Not vacuous: the waiters do subscribe.
            assert!(
                eventually(Duration::from_secs(10), async || {
                    !subscribed_wake_channels(&fixture.cluster).await.is_empty()
                })
                .await,
                "the waiters never subscribed"
            );
        }
        // Release at varying moments: some before, some while, some after the waiter's
        // subscription is confirmed.
        for (i, holder) in holders.into_iter().enumerate() {
            if i % 4 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            holder.release().await.unwrap();
        }
        for waiter in waiters {
            tokio::time::timeout(Duration::from_secs(25), waiter)
                .await
                .expect("a waiter was stranded")
                .unwrap();
        }
    }
    let mut left = Vec::new();
    assert!(
        eventually(Duration::from_secs(10), async || {
            left = subscribed_wake_channels(&fixture.cluster).await;
            left.is_empty()
        })
        .await,
        "sharded subscriptions left with nobody waiting: {left:?}"
    );
}

/// Clients connected with RESP3 (the sharded subscriber's) on `cluster`'s primaries.
async fn resp3_clients(cluster: &RedisCluster) -> usize {
    let mut count = 0;
    for port in cluster.primaries().await {
        let mut connection = cluster.node(port).connection().await;
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut connection)
            .await
            .unwrap();
        count += list
            .lines()
            .filter(|line| line.split_whitespace().any(|field| field == "resp=3"))
            .count();
    }
    count
}

/// Red team: a backend dropped after its waiters were woken leaves no subscriber task behind:
/// its sharded subscriber's connections close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_backend_closes_its_sharded_subscriber() {
    let fixture = Cluster::start().await;
    let before = resp3_clients(&fixture.cluster).await;
    {
        let backend = tower_lock::RedisClusterBackend::from_nodes(fixture.cluster.urls()).unwrap();
        let locks = Locks::new(backend)
            .namespace(NS)
            .ttl(Duration::from_secs(30));
        let key = LockKey::new("dropped-backend");
        let holder = locks.try_lock(&key).await.unwrap();
        let waiter = tokio::spawn({
            let locks = locks.clone();
            let key = key.clone();
            async move { locks.lock(&key, Duration::from_secs(20)).await }
        });
        assert!(
            eventually(Duration::from_secs(10), async || {
                resp3_clients(&fixture.cluster).await > before
            })
            .await,
            "no sharded subscriber connected"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        holder.release().await.unwrap();
        let lease = waiter.await.unwrap().unwrap();
        lease.release().await.unwrap();
    }
    let mut now = 0;
    assert!(
        eventually(Duration::from_secs(10), async || {
            now = resp3_clients(&fixture.cluster).await;
            now <= before
        })
        .await,
        "the dropped backend's subscriber still has {now} connections (had {before})"
    );
}

/// Red team: a waiter that leaves (its `SUNSUBSCRIBE` sent) while another starts waiting on the
/// same key (its `SSUBSCRIBE` sent right after) is still pushed: whichever order the two land
/// in, the second waiter gets the lock well within a second of the release, not at its next
/// check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_replacing_one_that_left_is_still_pushed() {
    let fixture = Cluster::start().await;
    let locks = engine(&fixture).ttl(Duration::from_secs(30));
    let mut slow = Vec::new();
    for i in 0..10 {
        let key = LockKey::new(format!("replaced:{i}"));
        let holder = locks.try_lock(&key).await.unwrap();
        let first = tokio::spawn({
            let locks = locks.clone();
            let key = key.clone();
            async move { locks.lock(&key, Duration::from_secs(20)).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        first.abort();
        let _ = first.await;
        let second = tokio::spawn({
            let locks = locks.clone();
            let key = key.clone();
            async move { locks.lock(&key, Duration::from_secs(20)).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let released = tokio::time::Instant::now();
        holder.release().await.unwrap();
        let lease = tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("the second waiter was stranded")
            .unwrap()
            .unwrap();
        let handover = released.elapsed();
        lease.release().await.unwrap();
        if handover > Duration::from_millis(1000) {
            slow.push((i, handover));
        }
    }
    assert!(
        slow.is_empty(),
        "not pushed (handover after the release): {slow:?}"
    );
}
