//! Tracing events and metrics, captured. One process-wide subscriber and recorder, so one test.

use std::convert::Infallible;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tokio::sync::Notify;
use tower::{ServiceBuilder, ServiceExt};
use tower_lock::key::Header;
use tower_lock::{LockLayer, MemoryBackend};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracing_and_metrics_report_acquire_contention_release_and_loss() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let backend = MemoryBackend::new();
    let gate = Arc::new(Notify::new());
    let handler = {
        let gate = gate.clone();
        tower::service_fn(move |req: Request<String>| {
            let gate = gate.clone();
            async move {
                if req.headers().contains_key("x-gate") {
                    gate.notified().await;
                }
                Ok::<_, Infallible>(Response::new(String::new()))
            }
        })
    };
    let service = |log_keys: bool| {
        ServiceBuilder::new()
            .layer(
                LockLayer::new(backend.clone(), Header::new("x-key"))
                    .ttl(Duration::from_millis(300))
                    .log_keys(log_keys),
            )
            .service(handler.clone())
    };
    let request = |key: &str, gated: bool| {
        let mut builder = Request::post("/").header("x-key", key);
        if gated {
            builder = builder.header("x-gate", "1");
        }
        builder.body(String::new()).unwrap()
    };

    // Acquire + release, contention, and a lease lost to a DEL, with keys redacted.
    let holder = tokio::spawn(service(false).oneshot(request("secret-account", true)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let conflict = service(false)
        .oneshot(request("secret-account", false))
        .await
        .unwrap();
    assert_eq!(conflict.status(), StatusCode::CONFLICT);
    let name = LockLayer::new(backend.clone(), Header::new("x"))
        .lock_name(&tower_lock::key::LockKey::new("secret-account"));
    assert!(backend.remove(&name));
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.notify_one();
    holder.await.unwrap().unwrap();
    // Opted in: the key is logged.
    service(true)
        .oneshot(request("visible-account", false))
        .await
        .unwrap();
    let missing = service(false)
        .oneshot(Request::post("/").body(String::new()).unwrap())
        .await
        .unwrap();
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
