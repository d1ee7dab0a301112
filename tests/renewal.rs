//! Lease renewal: cadence, one task per layer, slow acquires, hanging and panicking extends, the
//! renewal task dying, and the schedule holding only requests in flight.
//! Each behaviour runs against a real redis-server and against the memory backend.

#[macro_use]
mod common;

use std::time::Duration;

use futures_util::StreamExt;
use http::StatusCode;
use tokio::time::Instant;
use tower::Layer;
use tower::util::BoxCloneSyncService;
use tower_lock::{LockPolicy, LockRoutes};

use common::backends::{Acquires, Fault, Wrapped};
use common::{
    Fixture, NS, assert_held_throughout, body_json, eventually, holder, holder_behind, holding,
    layer_on, multi_thread, request, send, start_holding, until_held,
};

/// A lease of 300 ms is renewed every 100 ms: about ten extends in a second, not one per TTL
/// and not a busy loop.
async fn renewal_cadence_follows_the_interval<F: Fixture>() {
    let fixture = F::start().await;
    let backend = Wrapped::new(fixture.backend());
    let auto = holder_behind(layer_on(backend.clone()).ttl(Duration::from_millis(300)));
    let response = send(&auto, holding("k", 1000)).await;
    assert_eq!(body_json(response).await["lost"], false);
    let extends = backend.extends();
    assert!(
        (6..=13).contains(&extends),
        "{extends} extends in 1 s at a 100 ms interval"
    );
    // An explicit interval is followed too: ttl 1 s renewed every 100 ms.
    let backend = Wrapped::new(fixture.backend());
    let every = holder_behind(
        layer_on(backend.clone())
            .ttl(Duration::from_secs(1))
            .renew_every(Duration::from_millis(100)),
    );
    send(&every, holding("k", 1000)).await;
    let extends = backend.extends();
    assert!(
        (6..=13).contains(&extends),
        "{extends} extends in 1 s at a 100 ms interval"
    );
}

/// One task renews every lease of a layer, however many requests hold one.
async fn one_renewal_task_renews_every_lease_of_a_layer<F: Fixture>() {
    let fixture = F::start().await;
    let backend = Wrapped::new(fixture.backend());
    let service = holder_behind(layer_on(backend.clone()).ttl(Duration::from_millis(600)));
    let holders: Vec<_> = (0..20)
        .map(|i| tokio::spawn(send(&service, holding(&format!("k{i}"), 800))))
        .collect();
    for holder in holders {
        assert_eq!(body_json(holder.await.unwrap()).await["lost"], false);
    }
    assert!(backend.extends() >= 40, "{} extends", backend.extends());
    let callers = backend.extend_callers();
    assert_eq!(callers, 1, "extends came from {callers} tasks");
}

/// A 2 s lease acquired in 1.6 s (still above `min_validity`) is renewed at once, not declared
/// lost at the end of its validity without one try; and at once even when the renewal task is
/// asleep until a later renewal of another lease (registered at about 1.45 s, first due
/// about 0.67 s later, after the slow lease's validity).
async fn slow_acquire_is_renewed_before_it_expires<F: Fixture>() {
    let fixture = F::start().await;
    let backend = Wrapped::new(fixture.backend()).acquires(|name| {
        if name.lock_key().contains("slow") {
            Acquires::AnsweredAfter(Duration::from_millis(1600))
        } else {
            Acquires::Pass
        }
    });
    let service = holder_behind(
        layer_on(backend.clone())
            .ttl(Duration::from_secs(2))
            .acquire_timeout(Duration::from_secs(3)),
    );
    let slow = start_holding(&fixture, &service, holding("slow", 2500)).await;
    tokio::time::sleep(Duration::from_millis(1450)).await;
    let other = tokio::spawn(send(&service, holding("other", 2500)));
    // Past the slow lease's first validity (its acquire started before `until_held` returned).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        send(&service, request("slow")).await.status(),
        StatusCode::CONFLICT,
        "the slowly acquired lock expired"
    );
    for holder in [slow, other] {
        let response = holder.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_json(response).await["lost"], false);
    }
}

/// An extend that never answers (and an `acquire_timeout` far longer than the TTL) does not
/// delay the signal: the lease is reported lost when its validity ends.
async fn lost_fires_by_validity_end_while_extend_hangs<F: Fixture>() {
    let fixture = F::start().await;
    let backend = Wrapped::new(fixture.backend()).fault(|_, _| Fault::Hang);
    let service = holder_behind(
        layer_on(backend.clone())
            .ttl(Duration::from_millis(400))
            .acquire_timeout(Duration::from_secs(5))
            .renew_timeout(Duration::from_secs(5)),
    );
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(3), send(&service, holding("k", 5000)))
        .await
        .expect("the handler was not told its lease ran out");
    let elapsed = started.elapsed();
    let body = body_json(response).await;
    assert_eq!(body["lost"], true);
    // Validity ends 400 ms after the acquire was sent; allow for scheduling delays on a loaded
    // machine (without the bound on the extend, this took the 5 s acquire timeout).
    assert!(
        elapsed < Duration::from_millis(400 + 400),
        "lost reported {elapsed:?} after the request started"
    );
    assert!(backend.extends() >= 1);
}

/// `renew_timeout` gives up an extend that hangs and tries again while the lease is valid.
async fn renew_timeout_gives_up_a_hanging_extend_and_retries<F: Fixture>() {
    let fixture = F::start().await;
    // Only the first extend hangs.
    let backend = Wrapped::new(fixture.backend()).fault(|_, before| {
        if before == 0 {
            Fault::Hang
        } else {
            Fault::None
        }
    });
    let service = holder_behind(
        layer_on(backend.clone())
            .ttl(Duration::from_millis(600))
            .acquire_timeout(Duration::from_secs(5))
            .renew_timeout(Duration::from_millis(50)),
    );
    let response = send(&service, holding("k", 1500)).await;
    assert_eq!(body_json(response).await["lost"], false);
    assert!(backend.extends() >= 3, "{} extends", backend.extends());
}

/// A backend call that panics (while being made, or in its future) counts as one failed
/// renewal of that lease: the others go on being renewed, and that one is reported lost when its
/// validity ends.
// A TTL of 1 s: a panic prints its message (and, with RUST_BACKTRACE, a backtrace) on the
// renewal task's thread, which under load takes long enough to starve a shorter lease.
async fn panicking_extend_does_not_stop_other_renewals<F: Fixture>() {
    let fixture = F::start().await;
    let backend = Wrapped::new(fixture.backend()).fault(|name, _| {
        if name.lock_key().contains("boom-now") {
            Fault::PanicNow
        } else if name.lock_key().contains("boom-later") {
            Fault::PanicLater
        } else {
            Fault::None
        }
    });
    let service = holder_behind(layer_on(backend.clone()).ttl(Duration::from_millis(1000)));
    let now = tokio::spawn(send(&service, holding("boom-now", 4000)));
    let later = tokio::spawn(send(&service, holding("boom-later", 4000)));
    let fine = tokio::spawn(send(&service, holding("k", 4000)));
    until_held(&fixture, 3).await;
    for panicked in [now, later] {
        let response = tokio::time::timeout(Duration::from_secs(3), panicked)
            .await
            .expect("a lease whose renewals panic was not reported lost")
            .unwrap();
        assert_eq!(body_json(response).await["lost"], true);
    }
    // Well past its first TTL, the healthy lease is still held.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_held_throughout(&service, "k", fine).await;
}

/// A `renew_every` given in `LockRoutes::defaults` is rescaled when a policy sets a shorter TTL:
/// at most half the TTL, so the lease is renewed in time.
async fn renew_every_from_defaults_is_rescaled_to_a_shorter_policy_ttl<F: Fixture>() {
    let fixture = F::start().await;
    let routes = LockRoutes::new(fixture.backend())
        .defaults(|layer| layer.namespace(NS).renew_every(Duration::from_secs(2)))
        .route(
            "/work",
            LockPolicy::template("{header.x-key}")
                .unwrap()
                .ttl(Duration::from_millis(300)),
        )
        .unwrap();
    let service = BoxCloneSyncService::new(routes.layer(holder()));
    let holder = start_holding(&fixture, &service, holding("k", 1000)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Renewed within its 300 ms TTL.
    let report = assert_held_throughout(&service, "k", holder).await;
    assert_eq!(report["locked"], true);
}

/// `no_renewal`: not one extend, and the handler is told when the TTL has run out.
async fn without_renewal_the_lease_is_lost_at_its_ttl<F: Fixture>() {
    let fixture = F::start().await;
    let backend = Wrapped::new(fixture.backend());
    let service = holder_behind(
        layer_on(backend.clone())
            .ttl(Duration::from_millis(300))
            .no_renewal(),
    );
    let response = send(&service, holding("k", 3000)).await;
    let body = body_json(response).await;
    assert_eq!(body["lost"], true);
    let elapsed = body["elapsed_ms"].as_u64().unwrap();
    assert!((100..900).contains(&elapsed), "lost after {elapsed} ms");
    assert_eq!(backend.extends(), 0);
}

/// 100 000 short requests with a one-hour TTL: the renewal schedule holds at most the requests
/// in flight, and nothing once they are done; after a burst of held requests its memory is
/// given back. (20 000 on Redis: the schedule does not depend on the backend, and round trips
/// make 100 000 slow.)
async fn ended_requests_leave_the_renewal_schedule<F: Fixture>() {
    const IN_FLIGHT: usize = 32;
    // In process, many; through a store (one Redis, Cluster, Redlock, Sentinel), fewer.
    let requests = if std::any::type_name::<F>().ends_with("Memory") {
        100_000
    } else {
        20_000
    };
    let fixture = F::start().await;
    let layer = layer_on(fixture.backend())
        .ttl(Duration::from_secs(3600))
        .fencing(false);
    let service = holder_behind(layer.clone());
    let mut requests = futures_util::stream::iter(0..requests)
        .map(|i| send(&service, request(&format!("k{i}"))))
        .buffer_unordered(IN_FLIGHT);
    let mut served = 0;
    while let Some(response) = requests.next().await {
        assert_eq!(response.status(), StatusCode::OK);
        served += 1;
        if served % 1000 == 0 {
            let (stored, _) = layer.renewal_entries();
            assert!(stored <= IN_FLIGHT, "{stored} leases stored after {served}");
        }
    }
    assert_eq!(layer.renewal_entries().0, 0);
    // A burst of 2 000 held requests, then none. Each holds 2 s, so that at least half of them
    // hold at once even where acquiring is slow (Redlock's five nodes on a busy machine).
    let burst: Vec<_> = (0..2000)
        .map(|i| {
            tokio::spawn(send(
                &service,
                request(&format!("b{i}")).header("x-hold-ms", "2000"),
            ))
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(10), async || layer.renewal_entries().0
            >= 1000)
        .await,
        "the burst did not register"
    );
    assert!(layer.renewal_entries().1 >= 1000);
    for request in burst {
        assert_eq!(request.await.unwrap().status(), StatusCode::OK);
    }
    let (stored, capacity) = layer.renewal_entries();
    assert_eq!(stored, 0);
    assert!(
        capacity <= 128,
        "room for {capacity} leases kept after the burst"
    );
}

/// A tight loop of short requests beside many renewed leases: every lease is renewed in time.
async fn renewals_keep_up_under_a_tight_loop_of_short_requests<F: Fixture>() {
    let fixture = F::start().await;
    // 600 ms leases renewed every 200 ms, held 1.5 s: a renewal task that stops or falls behind
    // loses them. (300 ms leases were lost on Redlock's five nodes on a busy 2-core machine.)
    let layer = layer_on(fixture.backend())
        .ttl(Duration::from_millis(600))
        .fencing(false);
    let service = holder_behind(layer);
    let holders: Vec<_> = (0..300)
        .map(|i| tokio::spawn(send(&service, holding(&format!("h{i}"), 1500))))
        .collect();
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut i = 0u64;
    while Instant::now() < deadline {
        let batch: Vec<_> = (0..16)
            .map(|_| {
                i += 1;
                send(&service, request(&format!("s{i}")))
            })
            .collect();
        for response in futures_util::future::join_all(batch).await {
            assert_eq!(response.status(), StatusCode::OK);
        }
    }
    let mut lost = 0;
    for holder in holders {
        if body_json(holder.await.unwrap()).await["lost"] == true {
            lost += 1;
        }
    }
    assert_eq!(
        lost, 0,
        "{lost} of 300 leases lost beside {i} short requests"
    );
}

suite!(
    renewal_cadence_follows_the_interval,
    one_renewal_task_renews_every_lease_of_a_layer,
    slow_acquire_is_renewed_before_it_expires,
    lost_fires_by_validity_end_while_extend_hangs,
    renew_timeout_gives_up_a_hanging_extend_and_retries,
    panicking_extend_does_not_stop_other_renewals,
    renew_every_from_defaults_is_rescaled_to_a_shorter_policy_ttl,
    without_renewal_the_lease_is_lost_at_its_ttl,
    ended_requests_leave_the_renewal_schedule,
    renewals_keep_up_under_a_tight_loop_of_short_requests,
);

/// A request called on a runtime that has since shut down, and polled on another, cannot have its
/// lease renewed there (whatever is spawned on a shut-down runtime is dropped at once): the lease
/// is reported lost at once, and the request neither hangs nor spins.
#[test]
fn lease_registered_on_a_shut_down_runtime_is_lost_at_once() {
    use tower::Service;
    let mut service =
        holder_behind(layer_on(tower_lock::MemoryBackend::new()).ttl(Duration::from_secs(10)));
    let dead = multi_thread(1);
    let future = {
        let _entered = dead.enter();
        service.call(holding("a", 2000).body(String::new()).unwrap())
    };
    drop(dead);
    let live = multi_thread(1);
    let response = live
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), future).await })
        .expect("the request hung registering its lease with a dead runtime")
        .unwrap();
    let body = live.block_on(body_json(response));
    assert_eq!(body["lost"], true, "{body}");
    assert!(body["elapsed_ms"].as_u64().unwrap() < 1000, "{body}");
}

/// Each runtime keeps its one renewal task while another runtime starts its own: a second
/// request on the first runtime is renewed by the same task as the first (two runtimes, two
/// tasks, never three).
#[test]
fn each_runtime_keeps_its_one_renewal_task() {
    let backend = Wrapped::new(tower_lock::MemoryBackend::new());
    let service = holder_behind(
        layer_on(backend.clone())
            .ttl(Duration::from_millis(300))
            .renew_every(Duration::from_millis(50)),
    );
    let (a, b) = (multi_thread(1), multi_thread(1));
    let first = a.spawn(send(&service, holding("a1", 600)));
    a.block_on(async { tokio::time::sleep(Duration::from_millis(150)).await });
    b.block_on(send(&service, holding("b1", 300)));
    let second = a.spawn(send(&service, holding("a2", 600)));
    for response in a.block_on(async { [first.await.unwrap(), second.await.unwrap()] }) {
        assert_eq!(a.block_on(body_json(response))["lost"], false);
    }
    let callers = backend.extend_callers();
    assert_eq!(
        callers, 2,
        "extends came from {callers} tasks for two runtimes"
    );
}

/// A renewal task that panics (here: dropping a finished extend call panics, past the task's
/// `catch_unwind` of the call) reports every lease it held lost, and the next lease of that
/// runtime gets a new task.
#[test]
fn a_renewal_task_that_panics_loses_its_leases_and_is_replaced() {
    let backend = Wrapped::new(tower_lock::MemoryBackend::new()).fault(|_, before| {
        if before == 0 {
            Fault::PanicOnDrop
        } else {
            Fault::None
        }
    });
    let runtime = multi_thread(1);
    let service = holder_behind(
        layer_on(backend.clone())
            .ttl(Duration::from_millis(300))
            .renew_every(Duration::from_millis(50)),
    );
    let response = runtime.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::spawn(send(&service, holding("first", 1500))),
        )
        .await
        .expect("the lease of a task that panicked was not reported lost")
        .unwrap()
    });
    let body = runtime.block_on(body_json(response));
    assert_eq!(body["lost"], true, "{body}");
    assert!(body["elapsed_ms"].as_u64().unwrap() < 1000, "{body}");
    let response = runtime.block_on(runtime.spawn(send(&service, holding("second", 500))));
    let body = runtime.block_on(body_json(response.unwrap()));
    assert_eq!(
        body["lost"], false,
        "the next lease was not renewed: {body}"
    );
    assert!(backend.extends() >= 3, "{} extends", backend.extends());
}
