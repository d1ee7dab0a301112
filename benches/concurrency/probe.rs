//! Readings: this process's CPU time and RSS, how busy the rest of the machine was, a Redis
//! server's CPU and command counters (`INFO`), and a `MONITOR` that tells the commands a client
//! sent from the ones run inside scripts.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tokio::runtime::Runtime;

// ---------------------------------------------------------------------------------------------
// This process.

/// CPU time of every live thread of this process, in ns (`/proc/self/task/*/schedstat`, first
/// field). Exact to the ns, unlike `/proc/self/stat`'s clock ticks.
pub fn process_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Resident set size of this process, in KiB (`VmRSS` of `/proc/self/status`).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The machine: how much CPU processes other than this bench (and its redis-servers and load
// generator) used while a section ran.

/// The 1-minute load average.
pub fn loadavg_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Clock ticks of the whole machine (`/proc/stat`): (user + nice + system, steal). Interrupt
/// time is left out: loopback traffic is handled in softirqs charged to no process, ours included.
fn machine_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    // user nice system idle iowait irq softirq steal
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    (field(0) + field(1) + field(2), field(7))
}

/// utime + stime (+ cutime + cstime with `children`) of process `pid`, in clock ticks.
fn process_ticks(pid: &str, children: bool) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name, which may contain spaces: state is field 3, utime 14.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return 0;
    };
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // rest[0] is the state; fields[k] is stat field k + 4. utime 14, stime 15, cutime 16,
    // cstime 17.
    let take = if children { 4 } else { 2 };
    fields.iter().skip(10).take(take).sum()
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// What the rest of the machine did while a section ran.
pub struct Noise {
    started: Instant,
    busy: u64,
    steal: u64,
    own: u64,
    pids: Vec<u32>,
    load_start: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct NoiseReading {
    /// CPU used by processes other than this bench, its redis-servers and its load generator,
    /// in cores (1.0: one core busy all the time), averaged over the section.
    pub other_cores: f64,
    /// CPU the hypervisor gave to others (steal), in cores.
    pub steal_cores: f64,
    /// 1-minute load average when the section started and when it ended (these include the
    /// bench itself).
    pub loadavg_start: f64,
    pub loadavg_end: f64,
    pub seconds: f64,
}

impl Noise {
    /// Starts watching; `pids` are this bench's own helper processes (redis-servers) that are
    /// alive for the whole section. Waited-for children (`wrk`, a child bench) count as ours.
    pub fn start(pids: Vec<u32>) -> Self {
        let mut noise = Self {
            started: Instant::now(),
            busy: 0,
            steal: 0,
            own: 0,
            pids,
            load_start: loadavg_1m(),
        };
        (noise.busy, noise.steal) = machine_ticks();
        noise.own = noise.own_ticks();
        noise
    }

    fn own_ticks(&self) -> u64 {
        process_ticks("self", true)
            + self
                .pids
                .iter()
                .map(|pid| process_ticks(&pid.to_string(), false))
                .sum::<u64>()
    }

    pub fn finish(self) -> NoiseReading {
        let (busy, steal) = machine_ticks();
        let busy = busy.saturating_sub(self.busy);
        let steal = steal.saturating_sub(self.steal);
        let own = self.own_ticks().saturating_sub(self.own);
        let seconds = self.started.elapsed().as_secs_f64();
        let per_second = clock_ticks_per_second() * seconds.max(1e-3);
        NoiseReading {
            other_cores: busy.saturating_sub(own) as f64 / per_second,
            steal_cores: steal as f64 / per_second,
            loadavg_start: self.load_start,
            loadavg_end: loadavg_1m(),
            seconds,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A Redis server's counters.

/// Server CPU and per-command call counts at one moment.
#[derive(Clone, Debug, Default)]
pub struct RedisStats {
    /// `used_cpu_sys + used_cpu_user`, in seconds.
    pub cpu_seconds: f64,
    /// `INFO commandstats` calls per command (lower case, `client|setinfo` for subcommands).
    /// Counted at the server: commands run inside scripts are counted too, under their names.
    pub calls: BTreeMap<String, u64>,
}

pub async fn redis_stats(connection: &mut MultiplexedConnection) -> RedisStats {
    let info: String = redis::cmd("INFO")
        .arg("all")
        .query_async(connection)
        .await
        .expect("INFO all");
    let mut stats = RedisStats::default();
    for line in info.lines() {
        if let Some(v) = line.strip_prefix("used_cpu_sys:") {
            stats.cpu_seconds += v.trim().parse::<f64>().unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("used_cpu_user:") {
            stats.cpu_seconds += v.trim().parse::<f64>().unwrap_or(0.0);
        } else if let Some(rest) = line.strip_prefix("cmdstat_")
            && let Some((name, fields)) = rest.split_once(':')
        {
            let calls = fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            stats.calls.insert(name.to_string(), calls);
        }
    }
    stats
}

impl RedisStats {
    /// Calls per command between `self` (before) and `after`, without the bench's own `INFO`.
    pub fn calls_since(&self, after: &RedisStats) -> BTreeMap<String, u64> {
        after
            .calls
            .iter()
            .filter(|(name, _)| name.as_str() != "info")
            .filter_map(|(name, &calls)| {
                let delta = calls.saturating_sub(self.calls.get(name).copied().unwrap_or(0));
                (delta > 0).then(|| (name.clone(), delta))
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// MONITOR: which commands came from clients and which ran inside scripts.

const MONITOR_END: &str = "tower-lock-bench-monitor-end";

/// A `MONITOR` connection read by a thread until [`Monitor::finish`].
pub struct Monitor {
    reader: JoinHandle<CommandSplit>,
}

/// Commands a server executed, split by where they came from.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CommandSplit {
    /// Sent by clients (`EVALSHA` counts once here).
    pub client: BTreeMap<String, u64>,
    /// Run by scripts (`redis.call` inside `EVALSHA`/`EVAL`).
    pub script: BTreeMap<String, u64>,
}

impl Monitor {
    /// Attaches to the server on `port` and returns once Redis has acknowledged `MONITOR`.
    pub fn attach(port: u16) -> Self {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("MONITOR connection");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        stream.write_all(b"MONITOR\r\n").expect("send MONITOR");
        let mut reader = BufReader::new(stream);
        let mut first = String::new();
        reader.read_line(&mut first).expect("MONITOR reply");
        assert!(first.starts_with("+OK"), "MONITOR refused: {first}");
        let reader = std::thread::spawn(move || {
            let mut split = CommandSplit::default();
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let Some((source, command)) = parse_monitor_line(&line) else {
                    continue;
                };
                if line.contains(MONITOR_END) {
                    break;
                }
                let into = if source == "lua" {
                    &mut split.script
                } else {
                    &mut split.client
                };
                *into.entry(command).or_default() += 1;
            }
            split
        });
        Self { reader }
    }

    /// Marks the end of the window (an `ECHO` the reader stops at) and returns what it saw.
    pub fn finish(self, runtime: &Runtime, connection: &mut MultiplexedConnection) -> CommandSplit {
        let _: String = runtime
            .block_on(redis::cmd("ECHO").arg(MONITOR_END).query_async(connection))
            .expect("ECHO");
        self.reader.join().expect("MONITOR reader")
    }
}

/// `+1712345678.123456 [0 127.0.0.1:5555] "SET" "k" …` → `("127.0.0.1:5555", "set")`;
/// `[0 lua]` for commands run by scripts.
fn parse_monitor_line(line: &str) -> Option<(String, String)> {
    let open = line.find(" [")?;
    let close = open + line[open..].find("] ")?;
    let bracket = &line[open + 2..close];
    let source = bracket.split_once(' ').map_or(bracket, |(_, s)| s);
    let rest = line[close + 2..].strip_prefix('"')?;
    let command = &rest[..rest.find('"')?];
    Some((source.to_string(), command.to_ascii_lowercase()))
}
