//! `RedisSentinelBackend` on a real Sentinel group (a primary, a replica, three sentinels) and
//! the replication check (`WAIT`) of `RedisBackend` and `RedisSentinelBackend` on a real replica:
//! what issue 10 asks of a Sentinel-managed primary. The ordinary behaviour suites run on the
//! Sentinel backend too (`sentinel_backend::…` in every suite, with the `sentinel` feature).

#[macro_use]
mod common;

use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;
use tower_lock::backend::{Acquire, AcquireOptions, BackendErrorKind, LockToken};
use tower_lock::{LockBackend, RedisBackend, RedisSentinelBackend};

use common::sentinel::{MASTER, Sentinel, SentinelGroup};
use common::{
    Fixture, NS, RedisServer, body_json, eventually, holder_behind, holding, layer_on, lock_name,
    request, send,
};

const REPLICA_TIMEOUT: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// Discovery.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_is_found_through_the_sentinels_and_locked_on() {
    let fixture = Sentinel::start().await;
    let service = holder_behind(layer_on(fixture.backend()));
    let primary = fixture.group.primary_port().await.unwrap();
    assert!(
        fixture
            .backend
            .primary_address()
            .is_some_and(|a| a.ends_with(&format!(":{primary}"))),
        "{:?} is not the primary on {primary}",
        fixture.backend.primary_address()
    );
    let held = tokio::spawn(send(&service, holding("found", 500)));
    assert!(
        eventually(Duration::from_secs(5), async || {
            fixture.group.server(primary).lock_keys(NS).await.len() == 1
        })
        .await
    );
    assert_eq!(
        send(&service, request("found")).await.status(),
        StatusCode::CONFLICT
    );
    assert_eq!(held.await.unwrap().status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reachable_sentinel_is_a_503_not_a_hang_and_connect_fails() {
    // A port nothing listens on.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!(
            "redis://127.0.0.1:{}/",
            listener.local_addr().unwrap().port()
        )
    };
    assert!(
        RedisSentinelBackend::connect([dead.as_str()], MASTER)
            .await
            .is_err()
    );
    let backend = RedisSentinelBackend::from_sentinels([dead.as_str()], MASTER).unwrap();
    let service = holder_behind(layer_on(backend));
    let started = Instant::now();
    assert_eq!(
        send(&service, request("nobody")).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------------
// Failover.

/// Kills the primary while a lock is held, and measures how long until the layer locks again
/// once the sentinels have promoted the replica; then checks that the new primary admits one
/// holder per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_primary_is_killed_the_layer_follows_the_promoted_replica_and_stays_exclusive() {
    let mut group = tokio::task::spawn_blocking(SentinelGroup::start)
        .await
        .unwrap();
    let backend = group.backend().await;
    let service = holder_behind(
        layer_on(backend.clone())
            .ttl(Duration::from_secs(2))
            .renew_every(Duration::from_millis(200)),
    );
    let probe = holder_behind(layer_on(backend.clone()));
    let doomed = group.primary_port().await.unwrap();
    assert_eq!(doomed, group.servers[0].port());
    let survivor = group.servers[1].port();

    // A holder across the failover; wait until the replica has its lock.
    let holder = tokio::spawn(send(&service, holding("held-across", 4_000)));
    assert!(
        eventually(Duration::from_secs(5), async || {
            group.server(survivor).lock_keys(NS).await.len() == 1
        })
        .await,
        "the replica never received the lock"
    );

    let killed = Instant::now();
    group.servers[0].stop();
    let mut statuses = Vec::new();
    let recovered = loop {
        let status = send(&probe, request("after-kill")).await.status();
        if statuses.last().map(|(s, _)| s) != Some(&status) {
            statuses.push((status, killed.elapsed()));
        }
        if status == StatusCode::OK {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "no lock within 15 s of the kill: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("sentinel failover: locks again {recovered:?} after the kill ({statuses:?})");
    assert_eq!(group.primary_port().await, Some(survivor));
    assert!(
        backend
            .primary_address()
            .is_some_and(|a| a.ends_with(&format!(":{survivor}"))),
        "{:?}",
        backend.primary_address()
    );

    // The holder's lock was replicated: the promoted primary still has it.
    let report = body_json(holder.await.unwrap()).await;
    eprintln!("holder across the failover: {report}");

    // On the new primary, two concurrent contenders per key: one 200, one 409.
    for key in ["after:1", "after:2", "after:3"] {
        let first = tokio::spawn(send(&service, holding(key, 1_000)));
        let second = tokio::spawn(send(&service, holding(key, 1_000)));
        let mut statuses = [
            first.await.unwrap().status(),
            second.await.unwrap().status(),
        ];
        statuses.sort();
        assert_eq!(statuses, [StatusCode::OK, StatusCode::CONFLICT], "{key}");
    }
    assert!(
        eventually(Duration::from_secs(5), async || group
            .server(survivor)
            .lock_keys(NS)
            .await
            .is_empty())
        .await
    );
    tokio::task::block_in_place(|| drop(group));
}

/// A failover while the old primary stays up (`SENTINEL FAILOVER`): the backend follows the
/// sentinels to the new primary before the old one is demoted (which the sentinels do at their
/// next `INFO` to it, up to 10 s later) and answers `READONLY`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_primary_answering_readonly_is_left_for_the_new_one() {
    let group = tokio::task::spawn_blocking(SentinelGroup::start)
        .await
        .unwrap();
    let backend = group.backend().await;
    let service = holder_behind(layer_on(backend.clone()));
    assert_eq!(
        send(&service, request("before")).await.status(),
        StatusCode::OK
    );
    let old = group.servers[0].port();
    let new = group.servers[1].port();
    let mut sentinel = redis::Client::open(group.sentinel_urls()[0].as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(MASTER)
        .query_async(&mut sentinel)
        .await
        .unwrap();
    // The sentinels demote the old primary only at their next `INFO` to it (every 10 s): until
    // then it still takes writes, and the backend must not wait for its `READONLY` to leave it.
    let started = Instant::now();
    let switched = eventually(Duration::from_secs(7), async || {
        send(&service, request("after")).await.status() == StatusCode::OK
            && backend
                .primary_address()
                .is_some_and(|a| a.ends_with(&format!(":{new}")))
    })
    .await;
    assert!(
        switched,
        "still on {:?} (old primary {old}, new {new})",
        backend.primary_address()
    );
    eprintln!(
        "sentinel manual failover: followed within {:?}",
        started.elapsed()
    );
    tokio::task::block_in_place(|| drop(group));
}

// ---------------------------------------------------------------------------------------------
// The replication check (`WAIT`).

/// A primary and its replica, without sentinels.
fn replicated_pair() -> (RedisServer, RedisServer) {
    let primary = RedisServer::start();
    let replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port().to_string()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut replica.client().get_connection().unwrap())
            .unwrap();
        if info.contains("master_link_status:up") {
            return (primary, replica);
        }
        assert!(std::time::Instant::now() < deadline, "replica never synced");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn acquire<B: LockBackend>(
    backend: &B,
    key: &str,
) -> Result<Acquire, tower_lock::backend::BackendError> {
    backend
        .acquire(
            &lock_name(key),
            LockToken::random(),
            AcquireOptions::new(Duration::from_secs(10)),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_its_replica_up_a_checked_lock_is_a_200_and_on_the_replica() {
    let (primary, replica) = tokio::task::block_in_place(replicated_pair);
    let backend = RedisBackend::connect(&primary.url())
        .await
        .unwrap()
        .wait_for_replicas(1, REPLICA_TIMEOUT);
    let service = holder_behind(layer_on(backend.clone()));
    let held = tokio::spawn(send(&service, holding("checked", 300)));
    // WAIT answered before the handler ran: the replica has the lock as soon as it is held.
    assert!(
        eventually(Duration::from_secs(5), async || primary
            .lock_keys(NS)
            .await
            .len()
            == 1)
        .await
    );
    assert_eq!(replica.lock_keys(NS).await.len(), 1);
    assert_eq!(held.await.unwrap().status(), StatusCode::OK);
    // Two replicas asked for, one there: refused.
    let greedy = backend.wait_for_replicas(2, REPLICA_TIMEOUT);
    assert_eq!(
        acquire(&greedy, "greedy").await.unwrap_err().kind(),
        BackendErrorKind::Unavailable
    );
    assert!(primary.lock_keys(NS).await.is_empty());
    tokio::task::block_in_place(|| drop((primary, replica)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_its_replica_killed_or_paused_a_checked_lock_is_a_503_and_leaves_no_key() {
    let (primary, mut replica) = tokio::task::block_in_place(replicated_pair);
    let backend = RedisBackend::connect(&primary.url())
        .await
        .unwrap()
        .wait_for_replicas(1, REPLICA_TIMEOUT);
    let service = holder_behind(layer_on(backend.clone()));
    let unchecked = holder_behind(layer_on(
        RedisBackend::connect(&primary.url()).await.unwrap(),
    ));

    replica.pause();
    let started = Instant::now();
    assert_eq!(
        send(&service, request("paused")).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(primary.lock_keys(NS).await.is_empty());
    replica.resume();

    replica.stop();
    assert_eq!(
        send(&service, request("killed")).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(primary.lock_keys(NS).await.is_empty());
    // Without the check, the same primary locks as before.
    assert_eq!(
        send(&unchecked, request("killed")).await.status(),
        StatusCode::OK
    );
    // A refused acquire that found the lock held is a 409, not a 503: WAIT runs only when the
    // lock was taken.
    let held = tokio::spawn(send(&unchecked, holding("taken", 1_000)));
    assert!(
        eventually(Duration::from_secs(5), async || primary
            .lock_keys(NS)
            .await
            .len()
            == 1)
        .await
    );
    assert_eq!(
        send(&service, request("taken")).await.status(),
        StatusCode::CONFLICT
    );
    assert_eq!(held.await.unwrap().status(), StatusCode::OK);
    tokio::task::block_in_place(|| drop((primary, replica)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sentinel_backend_checks_replication_too() {
    let mut group = tokio::task::spawn_blocking(SentinelGroup::start)
        .await
        .unwrap();
    let backend = group.backend().await.wait_for_replicas(1, REPLICA_TIMEOUT);
    let service = holder_behind(layer_on(backend.clone()));
    assert_eq!(
        send(&service, request("replicated")).await.status(),
        StatusCode::OK
    );
    group.servers[1].stop();
    assert_eq!(
        send(&service, request("unreplicated")).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(group.servers[0].lock_keys(NS).await.is_empty());
    // The shortfall is the primary's answer, not its failure: the backend keeps it.
    assert!(
        backend
            .primary_address()
            .is_some_and(|a| a.ends_with(&format!(":{}", group.servers[0].port())))
    );
    tokio::task::block_in_place(|| drop(group));
}

// ---------------------------------------------------------------------------------------------
// Figures.

/// Acquire latency (p50, p99) with and without the replication check, on a primary with one
/// replica: `cargo test --release --all-features --test sentinel -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn acquire_latency_with_and_without_wait() {
    let (primary, replica) = tokio::task::block_in_place(replicated_pair);
    let plain = RedisBackend::connect(&primary.url()).await.unwrap();
    let checked = plain.clone().wait_for_replicas(1, REPLICA_TIMEOUT);
    for (label, backend) in [("without WAIT", plain), ("WAIT 1", checked)] {
        let mut samples = Vec::new();
        for i in 0..2_000 {
            let name = lock_name(&format!("latency:{i}"));
            let token = LockToken::random();
            let started = Instant::now();
            let acquired = backend
                .acquire(&name, token, AcquireOptions::new(Duration::from_secs(10)))
                .await
                .unwrap();
            samples.push(started.elapsed());
            assert!(matches!(acquired, Acquire::Acquired { .. }));
            backend.release(&name, token).await.unwrap();
        }
        samples.sort();
        eprintln!(
            "acquire {label}: p50 {:?}, p99 {:?}",
            samples[samples.len() / 2],
            samples[samples.len() * 99 / 100]
        );
    }
    tokio::task::block_in_place(|| drop((primary, replica)));
}
