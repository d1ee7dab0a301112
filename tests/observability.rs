//! Tracing events and metrics, captured. One process-wide subscriber and recorder, so one test.

mod common;

use std::time::Duration;

use http::{Request, StatusCode};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceBuilder;
use tower_lock::key::Header;
use tower_lock::{LockLayer, MemoryBackend};

use common::logs::Captured;
use common::{Gate, echo, gate_if, send};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracing_and_metrics_report_acquire_contention_release_and_loss() {
    let captured = Captured::default();
    tracing::subscriber::set_global_default(captured.subscriber()).unwrap();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let backend = MemoryBackend::new();
    let gate = Gate::new();
    let handler = echo(gate.clone());
    let service = |log_keys: bool| {
        ServiceBuilder::new()
            .layer(
                LockLayer::new(backend.clone(), Header::new("x-key"))
                    .ttl(Duration::from_millis(300))
                    .log_keys(log_keys),
            )
            .service(handler.clone())
    };
    let request = |key: &str, gated: bool| gate_if(Request::post("/").header("x-key", key), gated);

    // Acquire + release, contention, and a lease lost to a DEL, with keys redacted.
    let holder = tokio::spawn(send(&service(false), request("secret-account", true)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let conflict = send(&service(false), request("secret-account", false)).await;
    assert_eq!(conflict.status(), StatusCode::CONFLICT);
    let name = LockLayer::new(backend.clone(), Header::new("x"))
        .lock_name(&tower_lock::key::LockKey::new("secret-account"));
    assert!(backend.remove(&name));
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.open();
    holder.await.unwrap();
    // Opted in: the key is logged.
    send(&service(true), request("visible-account", false)).await;
    let missing = send(&service(false), Request::post("/")).await;
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let logs = captured.text();
    for event in [
        "lock acquired",
        "lock held by another holder",
        "lock lease lost",
        "lock had already expired when released",
        "lock released",
        "request rejected: no lock key",
    ] {
        assert!(logs.contains(event), "no `{event}` in:\n{logs}");
    }
    assert!(logs.contains(&name.fingerprint()), "{logs}");
    assert!(
        !logs.contains("secret-account"),
        "a key leaked into logs:\n{logs}"
    );
    assert!(logs.contains("visible-account"), "{logs}");

    let metrics = snapshotter.snapshot().into_vec();
    let counter = |name: &str, label: Option<(&str, &str)>| -> u64 {
        metrics
            .iter()
            .filter(|(key, _, _, _)| key.key().name() == name)
            .filter(|(key, _, _, _)| {
                label
                    .is_none_or(|(k, v)| key.key().labels().any(|l| l.key() == k && l.value() == v))
            })
            .map(|(_, _, _, value)| match value {
                DebugValue::Counter(n) => *n,
                _ => 0,
            })
            .sum()
    };
    let histogram_len = |name: &str| -> usize {
        metrics
            .iter()
            .filter(|(key, _, _, _)| key.key().name() == name)
            .map(|(_, _, _, value)| match value {
                DebugValue::Histogram(values) => values.len(),
                _ => 0,
            })
            .sum()
    };
    assert_eq!(counter("tower_lock_acquired_total", None), 2);
    assert_eq!(counter("tower_lock_contended_total", None), 1);
    assert_eq!(
        counter("tower_lock_rejected_total", Some(("reason", "conflict"))),
        1
    );
    assert_eq!(
        counter("tower_lock_rejected_total", Some(("reason", "invalid_key"))),
        1
    );
    assert_eq!(counter("tower_lock_lease_lost_total", None), 1);
    assert_eq!(histogram_len("tower_lock_acquire_seconds"), 2);
    assert_eq!(histogram_len("tower_lock_hold_seconds"), 2);
}
