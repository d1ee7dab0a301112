//! The verification servers as processes: each is this test binary run again with
//! [`ROLE_VAR`] set, so it runs only the ignored `verification_server_process` test, which
//! serves until killed. They can be SIGKILLed, SIGSTOPped and resumed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::server::{LISTENING, ROLE_VAR};

/// How a server process is configured.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// `redis`, `redlock` or `cluster` (see [`server`](super::server)).
    pub lock_backend: &'static str,
    /// The lock backend's URL, or its nodes' URLs separated by commas.
    pub lock_url: String,
    pub store_url: String,
    pub ttl: Duration,
    pub unlocked: bool,
}

/// One running server process.
pub struct ServerProcess {
    pub index: usize,
    pub addr: String,
    pub history: PathBuf,
    child: Child,
    killed: bool,
}

impl ServerProcess {
    /// Starts server `index`, writing its history and stderr under `dir`; panics if it does not
    /// listen within 30 s.
    pub fn start(index: usize, dir: &Path, config: &ServerConfig) -> Self {
        let history = dir.join(format!("history-{index}.log"));
        let stderr = std::fs::File::create(dir.join(format!("server-{index}.stderr")))
            .expect("server stderr file");
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "verification_server_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE_VAR, "1")
            .env("VERIFY_LOCK_BACKEND", config.lock_backend)
            .env("VERIFY_LOCK_URL", &config.lock_url)
            .env("VERIFY_STORE_URL", &config.store_url)
            .env("VERIFY_HISTORY", &history)
            .env("VERIFY_TTL_MS", config.ttl.as_millis().to_string())
            .env("VERIFY_UNLOCKED", if config.unlocked { "1" } else { "0" })
            // Its end of the pipe closes when this process exits, however it exits.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn the verification server");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                // libtest may print "test … ... " on the same line first.
                if let Some((_, addr)) = line.split_once(LISTENING) {
                    let _ = sender.send(addr.trim().to_owned());
                }
                // Keep draining so that the server never blocks on a full pipe.
            }
        });
        let addr = match receiver.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("verification server {index} did not start within 30 s");
            }
        };
        Self {
            index,
            addr,
            history,
            child,
            killed: false,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL (no clean-up of any kind: its locks must expire on their own).
    pub fn kill(&mut self) {
        signal(self.pid(), "-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.killed = true;
    }

    pub fn is_killed(&self) -> bool {
        self.killed
    }

    /// SIGSTOP: the process freezes, connections stay open.
    pub fn pause(&self) {
        signal(self.pid(), "-STOP");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        signal(self.pid(), "-CONT");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if !self.killed {
            signal(self.pid(), "-CONT");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: u32, which: &str) {
    let _ = Command::new("kill")
        .args([which, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}
