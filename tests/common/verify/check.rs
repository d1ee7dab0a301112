//! The checkers: critical sections from the servers' histories (overlaps per key), the counters
//! against the writes the histories report (lost updates), and the lock keys left in Redis.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// One admitted request's critical section, from a server's history.
#[derive(Clone, Debug)]
pub struct Section {
    pub server: usize,
    pub key: String,
    pub token: u64,
    pub enter_ns: u128,
    /// `None`: the process died inside it (SIGKILL); it ends when the process did.
    pub exit_ns: Option<u128>,
    pub outcome: String,
    pub lease_lost: bool,
}

impl Section {
    fn end(&self, killed_at: &HashMap<usize, u128>) -> u128 {
        self.exit_ns
            .unwrap_or_else(|| killed_at.get(&self.server).copied().unwrap_or(u128::MAX))
    }
}

/// Every section in the histories of servers `0..`, in the order of the files.
pub fn sections(histories: &[PathBuf]) -> Vec<Section> {
    let mut sections = Vec::new();
    for (server, path) in histories.iter().enumerate() {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut open: HashMap<(String, String), Section> = HashMap::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            match fields.as_slice() {
                ["E", pid, seq, key, token, enter] => {
                    open.insert(
                        (pid.to_string(), seq.to_string()),
                        Section {
                            server,
                            key: key.to_string(),
                            token: token.parse().expect("token"),
                            enter_ns: enter.parse().expect("enter"),
                            exit_ns: None,
                            outcome: "unfinished".into(),
                            lease_lost: false,
                        },
                    );
                }
                ["X", pid, seq, _key, _token, _enter, exit, outcome, lost] => {
                    let mut section = open
                        .remove(&(pid.to_string(), seq.to_string()))
                        .expect("an X line follows its E line");
                    section.exit_ns = Some(exit.parse().expect("exit"));
                    section.outcome = outcome.to_string();
                    section.lease_lost = *lost == "1";
                    sections.push(section);
                }
                // A line cut by a SIGKILL mid-write.
                _ => {}
            }
        }
        sections.extend(open.into_values());
    }
    sections
}

/// Overlapping critical sections on one key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overlaps {
    /// Pairs where the older holder (smaller token) was not told its lease was lost: a real
    /// violation of mutual exclusion.
    pub unexcused: u64,
    /// Pairs where the older holder's lease was reported lost (the case leases cannot prevent;
    /// fencing has to catch its write).
    pub after_lost_lease: u64,
    /// A few unexcused pairs, for the failure message.
    pub examples: Vec<String>,
}

/// Overlapping pairs of sections on the same key; `killed_at` ends the open sections of killed
/// servers.
pub fn overlaps(sections: &[Section], killed_at: &HashMap<usize, u128>) -> Overlaps {
    let mut by_key: BTreeMap<&str, Vec<&Section>> = BTreeMap::new();
    for section in sections {
        by_key.entry(&section.key).or_default().push(section);
    }
    let mut found = Overlaps::default();
    for (_, mut list) in by_key {
        list.sort_by_key(|s| s.enter_ns);
        // Sections still running at the current one's enter.
        let mut active: Vec<&Section> = Vec::new();
        for section in list {
            active.retain(|a| a.end(killed_at) > section.enter_ns);
            for other in &active {
                let older = if other.token <= section.token {
                    other
                } else {
                    &section
                };
                if older.lease_lost {
                    found.after_lost_lease += 1;
                } else {
                    found.unexcused += 1;
                    if found.examples.len() < 5 {
                        found
                            .examples
                            .push(format!("{other:?} overlaps {section:?}"));
                    }
                }
            }
            active.push(section);
        }
    }
    found
}

/// Counters against histories, per key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Updates {
    /// Writes the histories report as accepted.
    pub written: u64,
    /// Writes whose effect is unknown (the store failed on the write, the handler was
    /// cancelled, or the process died inside the section).
    pub indeterminate: u64,
    /// Writes refused by the fence (stale reads and stale writes).
    pub refused_stale: u64,
    /// Accepted writes the counters do not show.
    pub lost: u64,
    /// Counter increments no history explains.
    pub phantom: u64,
}

/// Compares `counters` (key → final value) with the sections.
pub fn updates(sections: &[Section], counters: &HashMap<String, u64>) -> Updates {
    let mut per_key: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut total = Updates::default();
    for section in sections {
        let entry = per_key.entry(&section.key).or_default();
        match section.outcome.as_str() {
            "written" => {
                entry.0 += 1;
                total.written += 1;
            }
            "write-failed" | "cancelled" | "unfinished" => {
                entry.1 += 1;
                total.indeterminate += 1;
            }
            "stale-read" | "stale-write" => total.refused_stale += 1,
            _ => {}
        }
    }
    for (key, &(written, indeterminate)) in &per_key {
        let counter = counters.get(*key).copied().unwrap_or(0);
        total.lost += written.saturating_sub(counter);
        total.phantom += counter.saturating_sub(written + indeterminate);
    }
    for (key, &counter) in counters {
        if !per_key.contains_key(key.as_str()) {
            total.phantom += counter;
        }
    }
    total
}
