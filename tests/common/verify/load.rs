//! The clients: many concurrent tasks posting to the servers over real HTTP on a few hot keys,
//! each request with a client timeout, each outcome recorded.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// What one request got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    /// No answer within the client timeout: a hang.
    TimedOut,
    /// The connection failed (refused, reset): expected only from a killed or frozen server.
    ConnectionFailed,
}

/// One request, timed from the scenario's start.
#[derive(Clone, Copy, Debug)]
pub struct Record {
    pub server: usize,
    /// The load's key (an index into [`Load::keys`]); `None` for a scenario's own requests.
    pub key: Option<usize>,
    pub sent: Duration,
    pub finished: Duration,
    pub outcome: Outcome,
}

/// The load's settings.
#[derive(Clone, Debug)]
pub struct Load {
    /// Concurrent client tasks.
    pub clients: usize,
    /// Hot keys the clients pick from.
    pub keys: Vec<String>,
    /// The handler's hold between read and write.
    pub hold_ms: u64,
    /// The client timeout of every request.
    pub timeout: Duration,
}

/// The running load: clients post until stopped.
pub struct Running {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    records: Arc<Mutex<Vec<Record>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Requests sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops the clients after their current request; every request's record.
    pub async fn finish(self) -> Vec<Record> {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            let _ = task.await;
        }
        std::mem::take(&mut *self.records.lock().unwrap())
    }
}

/// Starts `load` against the servers at `bases` (`http://addr`), timed from `start`.
pub fn start(load: &Load, bases: Vec<String>, start: Instant) -> Running {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let records = Arc::new(Mutex::new(Vec::new()));
    let client = reqwest::Client::builder()
        .timeout(load.timeout)
        .pool_max_idle_per_host(load.clients)
        .build()
        .expect("http client");
    let tasks = (0..load.clients)
        .map(|_| {
            let (stop, sent, records) = (stop.clone(), sent.clone(), records.clone());
            let (client, bases, keys) = (client.clone(), bases.clone(), load.keys.clone());
            let hold_ms = load.hold_ms;
            tokio::spawn(async move {
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let (server, key) = {
                        let mut rng = rand::rng();
                        (
                            rng.random_range(0..bases.len()),
                            rng.random_range(0..keys.len()),
                        )
                    };
                    let url = format!("{}/incr/{}?hold_ms={hold_ms}", bases[server], keys[key]);
                    sent.fetch_add(1, Ordering::Relaxed);
                    let mut record = post(&client, server, &url, start).await;
                    record.key = Some(key);
                    if record.outcome == Outcome::ConnectionFailed {
                        // A dead server refuses at once: do not spin on it.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    mine.push(record);
                }
                records.lock().unwrap().extend(mine);
            })
        })
        .collect();
    Running {
        stop,
        sent,
        records,
        tasks,
    }
}

/// One POST, recorded.
pub async fn post(client: &reqwest::Client, server: usize, url: &str, start: Instant) -> Record {
    let sent = start.elapsed();
    let outcome = match client.post(url).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            // Read the body so the connection is reused.
            let _ = response.bytes().await;
            Outcome::Status(status)
        }
        Err(error) if error.is_timeout() => Outcome::TimedOut,
        Err(_) => Outcome::ConnectionFailed,
    };
    Record {
        server,
        key: None,
        sent,
        finished: start.elapsed(),
        outcome,
    }
}
