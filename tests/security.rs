//! Security of the connection to Redis (issue 12, item 6), against real `redis-server`s:
//!
//! - an ACL user restricted to the lock key prefix and the commands the backend needs (the
//!   README's recommended line) can lock, renew, release, inspect and force-release, and Redis
//!   logs no denial; a key outside the prefix is a 503 that says "denied";
//! - a wrong password is a 503 that says "denied", with the password in neither the body nor
//!   the logs;
//! - with the `tls-rustls` feature, `rediss://` with a trusted CA locks, and a certificate that
//!   is not trusted is a 503 that says "TLS", leaking nothing; a Redis that requires client
//!   certificates takes the one `client_certificate_pem` presents, and refuses a client without;
//! - a stopped Redis is a 503 that says "refused", a frozen one "did not answer in time";
//! - the multi-node backends (`multi_node_tls`): a 3-primary TLS cluster (`tls-cluster yes`)
//!   for the README's cluster ACL user, 3 TLS Redlock nodes (and with mutual TLS), a TLS
//!   sentinel naming a TLS primary: lock, 409, release with the test's CA; an untrusted CA is a
//!   503 that says "TLS". A cluster no node of which accepts a connection says "refused".

#[macro_use]
mod common;

use std::time::Duration;

use http::StatusCode;
use tower::ServiceBuilder;

use common::logs::Captured;
use common::tls::TlsRedis;
use common::{NS, RedisServer, answer, answers, body_json, holder_behind, holding, layer_on};
use common::{lock_name, request, send};
use tower_lock::backend::{Acquire, AcquireOptions, FailureReason, Inspect, LockToken, Release};
use tower_lock::key::{Header, LockKey};
use tower_lock::{LockBackend, LockLayer, Locks, RedisBackend};

/// The README's recommended ACL for the lock user, namespace `tower-lock:`.
const README_ACL: &str = "ACL SETUSER tower-lock on >CHANGE-ME resetkeys ~tower-lock:* \
                          resetchannels &tower-lock:* -@all +set +get +del +pttl +time +publish +subscribe \
                          +unsubscribe +evalsha +script|load +info";

/// The lock user's password in these tests.
const PASSWORD: &str = "lock-user-pw-7c1e";
/// A password Redis does not know.
const WRONG_PASSWORD: &str = "not-the-pw-93ab";

/// [`README_ACL`] for the test namespace [`NS`] and [`PASSWORD`], as `ACL SETUSER` arguments.
fn acl_rules() -> Vec<String> {
    README_ACL
        .replace("~tower-lock:*", &format!("~{NS}*"))
        .replace("&tower-lock:*", &format!("&{NS}*"))
        .replace(">CHANGE-ME", &format!(">{PASSWORD}"))
        .split_whitespace()
        .skip(2)
        .map(str::to_owned)
        .collect()
}

/// Creates the lock user on `server` (through its plain harness port, as the default user).
async fn create_lock_user(server: &RedisServer) {
    let mut admin = server.connection().await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(acl_rules())
        .query_async(&mut admin)
        .await
        .unwrap();
}

/// Redis's log of ACL denials (`ACL LOG`), as text.
async fn acl_denials(server: &RedisServer) -> String {
    let mut admin = server.connection().await;
    let log: redis::Value = redis::cmd("ACL")
        .arg("LOG")
        .query_async(&mut admin)
        .await
        .unwrap();
    match log {
        redis::Value::Array(entries) if entries.is_empty() => String::new(),
        other => format!("{other:?}"),
    }
}

/// The URL of the Redis the lock user is tested on: over TLS when the feature is on, plain text
/// otherwise, for user `tower-lock` with `password`.
fn lock_user_url(redis: &TlsRedis, password: &str) -> String {
    if cfg!(feature = "tls-rustls") {
        redis.url(Some(&format!("tower-lock:{password}")))
    } else {
        format!(
            "redis://tower-lock:{password}@127.0.0.1:{}/",
            redis.server.port()
        )
    }
}

/// A backend for `url`, trusting `redis`'s CA over TLS; connected lazily.
fn backend_for(redis: &TlsRedis, url: &str) -> RedisBackend {
    let builder = RedisBackend::builder(url);
    #[cfg(feature = "tls-rustls")]
    let builder = builder.trust_ca_pem(redis.pki.ca_pem.clone());
    let _ = redis;
    builder.build().unwrap()
}

/// Every log line of this test binary, from its first call on: one global subscriber, because
/// with a subscriber per thread, events of callsites first hit on other test threads (without
/// one) can be missed.
fn logs() -> &'static Captured {
    static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        tracing::subscriber::set_global_default(captured.subscriber())
            .expect("the only subscriber of this binary");
        captured
    })
}

/// Runs `test` on a current-thread runtime: its output and the logs written so far (by this
/// test and any running beside it).
fn with_logs<T>(test: impl AsyncFnOnce() -> T) -> (T, String) {
    let logs = logs();
    let output = common::current_thread().block_on(test());
    (output, logs.text())
}

/// Sends one locked request through `backend`'s layer: the 503's problem, checked for status
/// and type. Panics on any other answer.
async fn backend_unavailable<B: LockBackend>(backend: B) -> serde_json::Value {
    let service = ServiceBuilder::new()
        .layer(layer_on(backend).acquire_timeout(Duration::from_secs(5)))
        .service(answers("ran"));
    let response = send(&service, request("k")).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    let problem = body_json(response).await;
    assert_eq!(problem["type"], "urn:tower-lock:backend-unavailable");
    problem
}

/// Asserts that nothing in `texts` carries a secret.
fn assert_no_secret(texts: &[&str]) {
    for text in texts {
        for secret in [PASSWORD, WRONG_PASSWORD, "PRIVATE KEY"] {
            assert!(!text.contains(secret), "{secret:?} leaked in: {text}");
        }
    }
}

#[test]
fn the_readme_recommends_the_acl_that_is_tested() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    assert!(readme.contains(README_ACL), "README lacks: {README_ACL}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_restricted_to_the_lock_prefix_can_lock_renew_release_and_inspect() {
    let redis = TlsRedis::start(&[]);
    create_lock_user(&redis.server).await;
    let url = lock_user_url(&redis, PASSWORD);
    let backend = RedisBackend::builder(&url);
    #[cfg(feature = "tls-rustls")]
    let backend = backend.trust_ca_pem(redis.pki.ca_pem.clone());
    let backend = backend.connect().await.expect("the lock user connects");

    // Through the layer: a 300 ms lease renewed while the handler holds it for 1 s.
    let service = holder_behind(layer_on(backend.clone()).ttl(Duration::from_millis(300)));
    let (status, body) = answer(&service, holding("renewed", 1000)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["locked"], true);
    assert_eq!(seen["lost"], false, "the lease was lost: renewal denied?");
    assert!(seen["fencing_token"].as_u64().unwrap() >= 1);
    // Released: no lock key left.
    assert!(redis.server.lock_keys(NS).await.is_empty());

    // The backend's other calls: an acquire without fencing (`SET NX PX GET`), a refused one,
    // inspect, release, force-release.
    let name = lock_name("direct");
    let token = LockToken::random();
    let unfenced = AcquireOptions::new(Duration::from_secs(10)).fencing(false);
    assert!(matches!(
        backend.acquire(&name, token, unfenced).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    assert!(matches!(
        backend
            .acquire(&name, LockToken::random(), unfenced)
            .await
            .unwrap(),
        Acquire::Held { remaining: Some(_) }
    ));
    assert!(matches!(
        backend.inspect(&name).await.unwrap(),
        Inspect::Held { .. }
    ));
    assert_eq!(
        backend.release(&name, token).await.unwrap(),
        Release::Released
    );
    assert_eq!(backend.inspect(&name).await.unwrap(), Inspect::Free);
    let locks = Locks::new(backend.clone()).namespace(NS);
    let held = locks.try_lock(&LockKey::new("forced")).await.unwrap();
    assert!(locks.force_unlock(&LockKey::new("forced")).await.unwrap());
    assert!(held.fencing_token() >= 1);

    // Waiting: the release publishes on the lock's channel, and the waiter's subscriber
    // connection (the same user) subscribes to it.
    let waited = LockKey::new("waited");
    let first = locks.try_lock(&waited).await.unwrap();
    let waiter = {
        let (locks, waited) = (locks.clone(), waited.clone());
        tokio::spawn(async move { locks.lock(&waited, Duration::from_secs(5)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first_token = first.fencing_token();
    first.release().await.unwrap();
    let second = waiter
        .await
        .unwrap()
        .expect("the waiter takes the lock after the release");
    assert!(second.fencing_token() > first_token);
    second.release().await.unwrap();

    assert_eq!(
        acl_denials(&redis.server).await,
        "",
        "Redis denied a command"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_outside_the_acl_prefix_is_a_503_that_says_denied() {
    let redis = TlsRedis::start(&[]);
    create_lock_user(&redis.server).await;
    let backend = backend_for(&redis, &lock_user_url(&redis, PASSWORD));
    // A layer in another namespace than the one the user may write.
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(backend.clone(), Header::new("x-key")).namespace("elsewhere:"))
        .service(answers("ran"));
    let response = send(&service, request("k")).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let problem = body_json(response).await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("denied access"), "{detail}");

    let name = LockLayer::new(backend.clone(), Header::new("x-key"))
        .namespace("elsewhere:")
        .lock_name(&LockKey::new("k"));
    let error = backend
        .acquire(
            &name,
            LockToken::random(),
            AcquireOptions::new(Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
    assert_eq!(error.reason(), FailureReason::Denied, "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_the_acl_forbids_inside_a_script_is_a_503_that_says_denied() {
    let redis = TlsRedis::start(&[]);
    create_lock_user(&redis.server).await;
    // The fencing token's clock floor (`TIME`) is read inside the acquire script.
    let mut admin = redis.server.connection().await;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "tower-lock", "-time"])
        .query_async(&mut admin)
        .await
        .unwrap();
    let backend = backend_for(&redis, &lock_user_url(&redis, PASSWORD));
    let problem = backend_unavailable(backend).await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("denied access"), "{detail}");
}

#[test]
fn a_wrong_password_is_a_503_that_says_denied_and_leaks_no_password() {
    let redis = TlsRedis::start(&[]);
    let ((problem, eager_error), logs) = with_logs(async || {
        create_lock_user(&redis.server).await;
        let url = lock_user_url(&redis, WRONG_PASSWORD);
        let problem = backend_unavailable(backend_for(&redis, &url)).await;
        let eager = RedisBackend::builder(&url);
        #[cfg(feature = "tls-rustls")]
        let eager = eager.trust_ca_pem(redis.pki.ca_pem.clone());
        let eager_error = eager.connect().await.unwrap_err();
        (problem, eager_error)
    });
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("denied access"), "{detail}");
    // The failure is logged, for operators, without the password.
    assert!(logs.contains("Password authentication failed"), "{logs}");
    assert_no_secret(&[&problem.to_string(), &logs, &eager_error.to_string()]);
    assert_no_secret(&[&format!("{eager_error:?}")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_redis_is_a_503_that_says_refused() {
    let mut server = RedisServer::start();
    let backend = RedisBackend::connect(&server.url()).await.unwrap();
    server.stop();
    let problem = backend_unavailable(backend).await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("refused or closed the connection"),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redlock_whose_nodes_all_refuse_is_a_503_that_says_refused() {
    use common::Fixture;
    let mut redlock = common::redlock::Redlock::start().await;
    for server in &mut redlock.servers {
        server.stop();
    }
    let problem = backend_unavailable(redlock.backend()).await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("refused or closed the connection"),
        "{detail}"
    );
}

/// The cluster client alone would say "No connections found": the backend asks the nodes why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_whose_nodes_all_refuse_is_a_503_that_says_refused() {
    // Nothing listens on port 1 of the loopback interface.
    let backend = tower_lock::RedisClusterBackend::from_nodes(["redis://127.0.0.1:1/"]).unwrap();
    let problem = backend_unavailable(backend).await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("refused or closed the connection"),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_is_a_503_that_says_it_did_not_answer_in_time() {
    let server = RedisServer::start();
    let backend = RedisBackend::connect(&server.url()).await.unwrap();
    server.pause();
    let service = ServiceBuilder::new()
        .layer(layer_on(backend).acquire_timeout(Duration::from_millis(200)))
        .service(answers("ran"));
    let response = send(&service, request("k")).await;
    server.resume();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let problem = body_json(response).await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("did not answer in time"), "{detail}");
}

#[cfg(feature = "tls-rustls")]
mod tls {
    use super::*;
    use common::tls::Pki;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn locks_work_over_tls_with_a_trusted_ca() {
        let redis = TlsRedis::start(&[]);
        let backend = RedisBackend::builder(&redis.url(None))
            .trust_ca_pem(redis.pki.ca_pem.clone())
            .connect()
            .await
            .expect("TLS connection with the test CA");
        let service = holder_behind(layer_on(backend.clone()));
        let first = tokio::spawn(send(&service, holding("tls", 500)));
        let held = async || redis.server.lock_keys(NS).await.len() == 1;
        assert!(common::eventually(Duration::from_secs(5), held).await);
        let (status, _) = answer(&service, holding("tls", 0)).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(first.await.unwrap().status(), StatusCode::OK);
        assert!(redis.server.lock_keys(NS).await.is_empty());
    }

    #[test]
    fn an_untrusted_certificate_is_a_503_that_says_tls_and_leaks_nothing() {
        let redis = TlsRedis::start(&[]);
        let stranger = Pki::generate("stranger");
        let ((trusting_another_ca, trusting_the_platform, eager_error), logs) =
            with_logs(async || {
                create_lock_user(&redis.server).await;
                let url = redis.url(Some(&format!("tower-lock:{PASSWORD}")));
                let another_ca = RedisBackend::builder(&url)
                    .trust_ca_pem(stranger.ca_pem.clone())
                    .build()
                    .unwrap();
                let trusting_another_ca = backend_unavailable(another_ca).await;
                let trusting_the_platform =
                    backend_unavailable(RedisBackend::from_url(&url).unwrap()).await;
                let eager_error = RedisBackend::builder(&url)
                    .trust_ca_pem(stranger.ca_pem.clone())
                    .connect()
                    .await
                    .unwrap_err();
                (trusting_another_ca, trusting_the_platform, eager_error)
            });
        for problem in [&trusting_another_ca, &trusting_the_platform] {
            let detail = problem["detail"].as_str().unwrap();
            assert!(detail.contains("TLS connection"), "{detail}");
            assert_no_secret(&[&problem.to_string()]);
        }
        assert!(logs.contains("invalid peer certificate"), "{logs}");
        assert_no_secret(&[&logs, &eager_error.to_string(), &format!("{eager_error:?}")]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mutual_tls_presents_the_client_certificate() {
        let redis = TlsRedis::start(&["--tls-auth-clients", "yes"]);
        let name = lock_name("mtls");
        let options = AcquireOptions::new(Duration::from_secs(5));
        let trusting =
            || RedisBackend::builder(&redis.url(None)).trust_ca_pem(redis.pki.ca_pem.clone());

        let anonymous = trusting().build().unwrap();
        let error = anonymous
            .acquire(&name, LockToken::random(), options)
            .await
            .unwrap_err();
        assert_eq!(error.reason(), FailureReason::Tls, "{error}");

        let presenting = trusting()
            .client_certificate_pem(
                redis.pki.client_cert_pem.clone(),
                redis.pki.client_key_pem.clone(),
            )
            .connect()
            .await
            .expect("mutual TLS with the test CA's client certificate");
        assert!(matches!(
            presenting
                .acquire(&name, LockToken::random(), options)
                .await
                .unwrap(),
            Acquire::Acquired { .. }
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rediss_url_installs_a_crypto_provider_and_keeps_an_installed_one() {
        // Another test of this binary may have built a backend first: either way one is there
        // after a backend is built, and installing again is refused without a panic.
        let redis = TlsRedis::start(&[]);
        let backend = RedisBackend::from_url(&redis.url(None)).unwrap();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
        assert!(!tower_lock::backend::install_crypto_provider());
        drop(backend);
    }
}

/// The ACL line the README recommends for the lock user on a Redis Cluster, namespace
/// `tower-lock:`: the single-Redis line's key and channel patterns, with what the cluster client
/// adds (`CLUSTER SLOTS` to learn the topology, `PING` on every new node connection) and the
/// release's wake-up through sharded pub/sub (`SPUBLISH`, and the waiters' sharded subscriber's
/// `SSUBSCRIBE`/`SUNSUBSCRIBE`). ACL users are per node in a cluster: run it on every node.
const README_CLUSTER_ACL: &str = "ACL SETUSER tower-lock on >CHANGE-ME resetkeys ~tower-lock:* \
                                  resetchannels &tower-lock:* -@all +set +get +del +pttl +time +spublish \
                                  +ssubscribe +sunsubscribe +evalsha +script|load +info +ping +cluster|slots";

#[test]
fn the_readme_recommends_the_cluster_acl_that_is_tested() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    assert!(
        readme.contains(README_CLUSTER_ACL),
        "README lacks: {README_CLUSTER_ACL}"
    );
}

/// Issue 12 item 6 on the multi-node backends: TLS (with a CA of the test's own) and the
/// README's ACL on a Redis Cluster and on Redlock nodes.
#[cfg(feature = "tls-rustls")]
mod multi_node_tls {
    use super::*;
    use common::tls::{Pki, TlsCluster, TlsNodes};
    use tower_lock::{RedisClusterBackend, RedlockBackend};

    /// Creates the lock user with `line` (an `ACL SETUSER` line for namespace `tower-lock:`) on
    /// `server`, for the test namespace and [`PASSWORD`].
    async fn create_user_with(server: &RedisServer, line: &str) {
        let rules: Vec<String> = line
            .replace("~tower-lock:*", &format!("~{NS}*"))
            .replace("&tower-lock:*", &format!("&{NS}*"))
            .replace(">CHANGE-ME", &format!(">{PASSWORD}"))
            .split_whitespace()
            .skip(2)
            .map(str::to_owned)
            .collect();
        let mut admin = server.connection().await;
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(rules)
            .query_async(&mut admin)
            .await
            .unwrap();
    }

    /// Through the layer on `backend`: a request holds `key` for 600 ms, a second one on the
    /// same key meanwhile is a 409, the first is a 200; `held()` counts the lock keys behind
    /// the backend's back (1 while held, 0 after).
    async fn lock_conflict_release<B: LockBackend>(
        backend: B,
        key: &str,
        held: impl AsyncFn() -> usize,
    ) {
        let service = holder_behind(layer_on(backend));
        let first = tokio::spawn(send(&service, holding(key, 600)));
        assert!(
            common::eventually(Duration::from_secs(5), async || held().await == 1).await,
            "the first request never held the lock"
        );
        let (status, body) = answer(&service, holding(key, 0)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        let response = first.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let seen = body_json(response).await;
        assert_eq!(seen["lost"], false, "{seen}");
        assert!(seen["fencing_token"].as_u64().unwrap() >= 1, "{seen}");
        assert_eq!(held().await, 0, "a lock key was left behind");
    }

    /// Asserts that a 503 `problem` says the TLS handshake failed and carries no secret.
    fn says_tls(problem: &serde_json::Value) {
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains("TLS connection"), "{detail}");
        assert_no_secret(&[&problem.to_string()]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tls_cluster_locks_for_the_readme_acl_user_and_refuses_an_untrusted_ca() {
        let tls = TlsCluster::start();
        for node in &tls.cluster.nodes {
            create_user_with(node, README_CLUSTER_ACL).await;
        }
        let urls = tls.urls(Some(&format!("tower-lock:{PASSWORD}")));
        let backend = RedisClusterBackend::builder(&urls)
            .trust_ca_pem(tls.pki.ca_pem.clone())
            .connect()
            .await
            .expect("the lock user reaches the TLS cluster");
        let held = async || tls.cluster.lock_keys(NS).await.len();
        lock_conflict_release(backend.clone(), "cluster-tls", held).await;

        // The backend's other calls: an unfenced acquire (`SET NX PX GET`), a refused one,
        // inspect, release, force-release; locks on keys spread over the three primaries.
        let options = AcquireOptions::new(Duration::from_secs(10)).fencing(false);
        for i in 0..12 {
            let name = lock_name(&format!("spread-{i}"));
            let token = LockToken::random();
            assert!(matches!(
                backend.acquire(&name, token, options).await.unwrap(),
                Acquire::Acquired { .. }
            ));
            assert!(matches!(
                backend
                    .acquire(&name, LockToken::random(), options)
                    .await
                    .unwrap(),
                Acquire::Held { remaining: Some(_) }
            ));
            assert!(matches!(
                backend.inspect(&name).await.unwrap(),
                Inspect::Held { .. }
            ));
            if i % 2 == 0 {
                assert_eq!(
                    backend.release(&name, token).await.unwrap(),
                    Release::Released
                );
            } else {
                assert!(backend.force_release(&name).await.unwrap());
            }
        }
        assert!(tls.cluster.lock_keys(NS).await.is_empty());

        // Waiting: the release `SPUBLISH`es on the lock's channel and the waiter's sharded
        // subscriber (the same user, over TLS: `HELLO 3`, `SSUBSCRIBE`) subscribes to it; no node
        // logs a denial below (pushed rather than polled is pinned in tests/cluster.rs).
        let locks = Locks::new(backend.clone())
            .namespace(NS)
            .ttl(Duration::from_secs(30));
        let waited = LockKey::new("waited");
        let first = locks.try_lock(&waited).await.unwrap();
        let waiter = {
            let (locks, waited) = (locks.clone(), waited.clone());
            tokio::spawn(async move { locks.lock(&waited, Duration::from_secs(20)).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let released = std::time::Instant::now();
        first.release().await.unwrap();
        let second = waiter
            .await
            .unwrap()
            .expect("the waiter takes the lock after the release");
        assert!(
            released.elapsed() < Duration::from_secs(3),
            "handed over {:?} after the release",
            released.elapsed()
        );
        second.release().await.unwrap();

        for node in &tls.cluster.nodes {
            assert_eq!(acl_denials(node).await, "", "node {} denied", node.port());
        }

        // A CA that did not sign the nodes' certificates: 503 saying TLS, lazily and eagerly.
        let stranger = Pki::generate("cluster-stranger");
        let untrusting =
            || RedisClusterBackend::builder(&urls).trust_ca_pem(stranger.ca_pem.clone());
        says_tls(&backend_unavailable(untrusting().build().unwrap()).await);
        let error = untrusting().connect().await.unwrap_err();
        assert_no_secret(&[&error.to_string(), &format!("{error:?}")]);
        // Certificates for nodes without TLS are a configuration error, not a silent downgrade.
        let plain = RedisClusterBackend::builder(tls.cluster.urls())
            .trust_ca_pem(tls.pki.ca_pem.clone())
            .build()
            .unwrap_err();
        assert_eq!(plain.kind(), redis::ErrorKind::InvalidClientConfig);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redlock_over_three_tls_nodes_locks_and_refuses_an_untrusted_ca() {
        let nodes = TlsNodes::start(3);
        for server in &nodes.servers {
            create_lock_user(server).await;
        }
        let urls = nodes.urls(Some(&format!("tower-lock:{PASSWORD}")));
        let backend = RedlockBackend::builder(&urls)
            .trust_ca_pem(nodes.pki.ca_pem.clone())
            .connect()
            .await
            .expect("a majority of TLS nodes accepts the lock user");
        let held = async || {
            let mut most = 0;
            for server in &nodes.servers {
                most = most.max(server.lock_keys(NS).await.len());
            }
            most
        };
        lock_conflict_release(backend, "redlock-tls", held).await;
        for server in &nodes.servers {
            assert_eq!(
                acl_denials(server).await,
                "",
                "node {} denied",
                server.port()
            );
        }

        let stranger = Pki::generate("redlock-stranger");
        let untrusting = || RedlockBackend::builder(&urls).trust_ca_pem(stranger.ca_pem.clone());
        says_tls(&backend_unavailable(untrusting().build().unwrap()).await);
        let error = untrusting().connect().await.unwrap_err();
        assert_no_secret(&[&error.to_string(), &format!("{error:?}")]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redlock_presents_the_client_certificate_to_every_node() {
        let nodes = TlsNodes::start_with(3, &["--tls-auth-clients", "yes"]);
        let urls = nodes.urls(None);
        let trusting = || RedlockBackend::builder(&urls).trust_ca_pem(nodes.pki.ca_pem.clone());
        says_tls(&backend_unavailable(trusting().build().unwrap()).await);

        let presenting = trusting()
            .client_certificate_pem(
                nodes.pki.client_cert_pem.clone(),
                nodes.pki.client_key_pem.clone(),
            )
            .connect()
            .await
            .expect("mutual TLS with the test CA's client certificate on every node");
        let held = async || {
            let mut most = 0;
            for server in &nodes.servers {
                most = most.max(server.lock_keys(NS).await.len());
            }
            most
        };
        lock_conflict_release(presenting, "redlock-mtls", held).await;
    }

    /// Sentinel over TLS: the sentinel (`rediss://`) and the primary it names (its TLS port)
    /// both checked against the test's CA.
    #[cfg(feature = "sentinel")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sentinel_over_tls_finds_the_tls_primary_and_refuses_an_untrusted_ca() {
        use common::sentinel::MASTER;
        use tower_lock::RedisSentinelBackend;
        let group = common::tls::TlsSentinel::start();
        let backend = RedisSentinelBackend::builder([group.url()], MASTER)
            .trust_ca_pem(group.primary.pki.ca_pem.clone())
            .connect()
            .await
            .expect("the TLS primary through the TLS sentinel");
        assert_eq!(
            backend.primary_address().as_deref(),
            Some(format!("127.0.0.1:{}", group.primary.tls_port).as_str())
        );
        let held = async || group.primary.server.lock_keys(NS).await.len();
        lock_conflict_release(backend, "sentinel-tls", held).await;

        let stranger = Pki::generate("sentinel-stranger");
        let untrusting = RedisSentinelBackend::builder([group.url()], MASTER)
            .trust_ca_pem(stranger.ca_pem.clone());
        says_tls(&backend_unavailable(untrusting.build().unwrap()).await);
    }
}

/// The harness's own promise for TLS fixtures: a `--tls-port` another process took between its
/// pick and the server's start is picked again for the next attempt. Before, the TLS port was
/// chosen once and every retry met the same taken port (a TLS cluster test failed in CI with
/// "redis-server exited early" ten times).
#[test]
fn a_tls_port_taken_before_the_start_is_picked_again() {
    let pki = common::tls::Pki::generate("taken");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let taken_port = taken.local_addr().expect("its address").port();
    let attempts = std::cell::Cell::new(0);
    let server = RedisServer::start_with_each(|| {
        attempts.set(attempts.get() + 1);
        let port = if attempts.get() == 1 {
            taken_port
        } else {
            let free = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
            free.local_addr().expect("its address").port()
        };
        let path = |path: std::path::PathBuf| path.to_str().expect("utf-8").to_owned();
        vec![
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            path(pki.cert_file()),
            "--tls-key-file".to_owned(),
            path(pki.key_file()),
            "--tls-ca-cert-file".to_owned(),
            path(pki.ca_file()),
        ]
    });
    assert!(
        attempts.get() >= 2,
        "the taken port failed the first attempt"
    );
    let used = server.arg_port("--tls-port").expect("a TLS port");
    assert_ne!(used, taken_port);
}
