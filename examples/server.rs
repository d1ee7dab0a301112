//! The demo server: account deposits locked per account, an unlocked twin that loses updates, and
//! a streaming route that holds its lock until the body is sent.
//!
//! ```text
//! cargo run --example server                                   # in-process locks and balances
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example server # locks and balances in Redis
//! ```
//!
//! Environment: `PORT` (default 3000), `HOST` (the IP address to listen on, default
//! `127.0.0.1`; `HOST=0.0.0.0` for every interface), `REDIS_URL` (`rediss://…` for TLS, with
//! `--features tls-rustls`; the demo starts while Redis refuses it and answers 503 until Redis
//! accepts it), `REDIS_TLS_CA=path.pem` (CA certificates to trust for `rediss://` instead of
//! the platform's: for `REDIS_URL`, for `rediss://` nodes in `REDIS_CLUSTER_NODES` and
//! `REDLOCK_NODES`, and with `REDIS_SENTINELS` for the sentinels and the primary), `REDIS_CLUSTER_NODES=redis://h:p,redis://h:p,…`
//! (Redis Cluster: locks and balances in the cluster), `REDLOCK_NODES=redis://…,…` (Redlock over
//! independent primaries: balances in process), `REDIS_SENTINELS=redis://h:p,…` with
//! `REDIS_SENTINEL_MASTER=name` (the primary the sentinels name, followed across a failover:
//! balances in process; needs `--features sentinel`), at most one of those four, `LOCK_TTL_MS` (lock lease in ms, default
//! 10000), `LOCK_NO_RENEWAL=1` (leases are not renewed, so a deposit held longer than the lease
//! is refused by the fence once a newer holder has read the account), `RUST_LOG` (default
//! `info`).
//!
//! The deposit and the stream of account `42` share one lock, `account:42` (in Redis
//! `tower-lock:{account:42}`); `POST /orders` locks on its `Idempotency-Key`, which can never
//! name an account's lock.
//!
//! ```text
//! curl -i -X POST 'localhost:3000/accounts/42/deposit?amount=5&hold_ms=2000' &
//! curl -i -X POST 'localhost:3000/accounts/42/deposit?amount=5'   # 409 while the first holds it
//! curl -i -X POST 'localhost:3000/queued/accounts/42/deposit?amount=5' # waits its turn (≤ 10 s)
//! curl -i localhost:3000/accounts/42
//! curl -N 'localhost:3000/stream/42?ms=2000'
//! ```
//!
//! Fencing, with `LOCK_TTL_MS=200 LOCK_NO_RENEWAL=1`: the first deposit's lease lapses while it
//! holds; the second takes the lock with a newer fencing token and reads the balance, so the
//! first one's write is refused (409 `urn:tower-lock-demo:stale-fencing-token`) and only the
//! second deposit lands.
//!
//! ```text
//! curl -s -X POST 'localhost:3000/accounts/42/deposit?amount=100&hold_ms=500' &
//! sleep 0.3; curl -s -X POST 'localhost:3000/accounts/42/deposit?amount=1&hold_ms=400'
//! ```

#[path = "support/demo.rs"]
mod demo;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    let config = match demo::DemoConfig::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("tower-lock demo: {error}");
            std::process::exit(2);
        }
    };
    // The first line says which backend is used.
    println!("tower-lock demo: {}", config.describe_backend());

    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::stdout().is_terminal())
        .init();

    let host = std::env::var("HOST").ok();
    let port = std::env::var("PORT").ok();
    let addr = match demo::listen_addr(host.as_deref(), port.as_deref()) {
        Ok(addr) => addr,
        Err(error) => {
            eprintln!("tower-lock demo: {error}");
            std::process::exit(2);
        }
    };
    println!("tower-lock demo: {}", config.describe_lease());

    let router = match demo::app(config).await {
        Ok(router) => router,
        Err(error) => {
            eprintln!("tower-lock demo: cannot connect to Redis: {error}");
            std::process::exit(1);
        }
    };

    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("tower-lock demo: cannot listen on {addr}: {error}");
            std::process::exit(1);
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    println!("tower-lock demo: listening on http://{local}");
    println!(
        "tower-lock demo: try  curl -i -X POST 'http://127.0.0.1:{}/accounts/42/deposit?amount=5&hold_ms=2000'",
        local.port()
    );

    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        println!("tower-lock demo: shutting down");
    };
    if let Err(error) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
    {
        eprintln!("tower-lock demo: server error: {error}");
        std::process::exit(1);
    }
}
