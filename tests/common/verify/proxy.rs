//! A fault-injecting TCP proxy between a server and Redis: every byte is forwarded after an
//! added latency (switchable), and while the proxy is blackholed nothing is delivered in either
//! direction (bytes are held, as a partitioned network's retransmissions would be, and delivered
//! when it heals). Connections stay open through both faults. Closing one side closes the other.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

struct State {
    latency_us: AtomicU64,
    blackholed: AtomicBool,
    changed: watch::Sender<()>,
}

/// A running proxy, stopped (with all its connections) when dropped.
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// A proxy on a free loopback port forwarding to `upstream_port` on 127.0.0.1.
    pub async fn start(upstream_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let (changed, _) = watch::channel(());
        let state = Arc::new(State {
            latency_us: AtomicU64::new(0),
            blackholed: AtomicBool::new(false),
            changed,
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let state = shared.clone();
                connections.spawn(async move {
                    let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await
                    else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (upstream_read, upstream_write) = upstream.into_split();
                    // Either direction ending ends the connection (both halves are dropped).
                    tokio::select! {
                        () = pipe(client_read, upstream_write, state.clone()) => {}
                        () = pipe(upstream_read, client_write, state) => {}
                    }
                });
                // Reap finished connections.
                while connections.try_join_next().is_some() {}
            }
        });
        Self { addr, state, task }
    }

    /// `redis://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Adds `latency` to every byte from now on, in both directions.
    pub fn set_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.state.latency_us.store(us, Ordering::SeqCst);
    }

    /// Holds every byte (true) or delivers them again (false).
    pub fn set_blackhole(&self, on: bool) {
        self.state.blackholed.store(on, Ordering::SeqCst);
        self.state.changed.send_replace(());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards `from` to `to`: a reader stamps each chunk with its delivery time, a writer waits
/// for it (and for the blackhole to lift) before writing.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<State>,
) {
    let (sender, mut receiver) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader_state = state.clone();
    let reader = async move {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let latency =
                        Duration::from_micros(reader_state.latency_us.load(Ordering::SeqCst));
                    if sender
                        .send((Instant::now() + latency, buffer[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        let mut changed = state.changed.subscribe();
        while let Some((deliver_at, chunk)) = receiver.recv().await {
            tokio::time::sleep_until(deliver_at).await;
            while state.blackholed.load(Ordering::SeqCst) {
                if changed.changed().await.is_err() {
                    return;
                }
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // The writer drains what the reader queued before a clean end.
    let (reader_done, writer_done) = (reader, writer);
    tokio::pin!(reader_done, writer_done);
    tokio::select! {
        () = &mut writer_done => {}
        () = &mut reader_done => writer_done.await,
    }
}
