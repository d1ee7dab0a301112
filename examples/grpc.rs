//! A tonic gRPC server whose calls are locked per job: `proto/demo.proto`'s `tower_lock.demo.Jobs`.
//!
//! ```text
//! cargo run --example grpc --features tonic                                   # in-process locks
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example grpc --features tonic # locks in Redis
//! ```
//!
//! Environment: `PORT` (default 50051), `HOST` (default 127.0.0.1), `REDIS_URL` (unset: locks in process), `RUST_LOG`
//! (default `info`).
//!
//! `/tower_lock.demo.Jobs/Run` (`RunRequest { string id = 1; uint64 hold_ms = 2; }` →
//! `RunReply { string id = 1; uint64 fencing_token = 2; }`) is locked on the `x-job-id` metadata
//! and holds the lock `hold_ms`. A second call for the same job meanwhile ends with `ABORTED` and
//! `grpc-retry-pushback-ms`; a call without `x-job-id` with `INVALID_ARGUMENT`; with Redis down,
//! `UNAVAILABLE`. `/tower_lock.demo.Jobs/Watch` streams 5 replies over `hold_ms`, holding the
//! job's lock until the stream ends or the client cancels. With grpcurl:
//!
//! ```text
//! grpcurl -plaintext -import-path proto -proto demo.proto -H 'x-job-id: 7' \
//!   -d '{"id":"a","hold_ms":3000}' 127.0.0.1:50051 tower_lock.demo.Jobs/Run &
//! grpcurl -plaintext -import-path proto -proto demo.proto -H 'x-job-id: 7' \
//!   -d '{"id":"b"}' 127.0.0.1:50051 tower_lock.demo.Jobs/Run   # ERROR: Code: Aborted
//! ```

#[path = "support/jobs.rs"]
mod jobs;

use std::io::IsTerminal;
use std::net::SocketAddr;

use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::stdout().is_terminal())
        .init();

    let port: u16 = match std::env::var("PORT") {
        Err(_) => 50051,
        Ok(port) => match port.trim().parse() {
            Ok(port) => port,
            Err(_) => {
                eprintln!("tower-lock grpc demo: PORT must be a port number, got {port:?}");
                std::process::exit(2);
            }
        },
    };
    let redis_url = std::env::var("REDIS_URL")
        .ok()
        .filter(|url| !url.is_empty());
    match &redis_url {
        Some(url) => println!("tower-lock grpc demo: locks in Redis at {url}"),
        None => println!("tower-lock grpc demo: locks in process (set REDIS_URL for Redis)"),
    }
    let routes = match jobs::routes(redis_url.as_deref()) {
        Ok(routes) => routes,
        Err(error) => {
            eprintln!("tower-lock grpc demo: invalid REDIS_URL: {error}");
            std::process::exit(2);
        }
    };

    // Loopback unless told otherwise, as the HTTP demo (`HOST=0.0.0.0` for every interface).
    let ip: std::net::IpAddr = match std::env::var("HOST") {
        Err(_) => [127, 0, 0, 1].into(),
        Ok(host) if host.trim().is_empty() => [127, 0, 0, 1].into(),
        Ok(host) => match host.trim().parse() {
            Ok(ip) => ip,
            Err(_) => {
                eprintln!("tower-lock grpc demo: HOST must be an IP address, got {host:?}");
                std::process::exit(2);
            }
        },
    };
    let addr = SocketAddr::new(ip, port);
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("tower-lock grpc demo: cannot listen on {addr}: {error}");
            std::process::exit(1);
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    println!(
        "tower-lock grpc demo: serving {} on {local}",
        jobs::RUN_PATH
    );

    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        println!("tower-lock grpc demo: shutting down");
    };
    if let Err(error) = jobs::serve(routes, listener, shutdown).await {
        eprintln!("tower-lock grpc demo: server error: {error}");
        std::process::exit(1);
    }
}
