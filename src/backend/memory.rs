//! Locks in this process's memory.

use std::collections::HashMap;
use std::collections::hash_map::Entry as Slot;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{
    Acquire, AcquireOptions, BackendFuture, Extend, Inspect, LockBackend, LockName, LockToken,
    Release, Wakeups,
};

/// In-process locks with the same semantics as [`RedisBackend`](super::RedisBackend): random
/// tokens, expiry, compare-and-delete, compare-and-expire and fencing tokens.
///
/// For single-instance apps, demos, and your own tests. Clones share the same locks. Expired locks
/// are purged as the map grows, so memory stays proportional to the locks actually held. Fencing
/// tokens come from one counter for the whole backend, so they only grow, per key and overall,
/// for as long as the process lives.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use tower_lock::backend::{Acquire, AcquireOptions, LockBackend, LockToken, MemoryBackend};
///
/// let backend = MemoryBackend::new();
/// let name = tower_lock::Locks::new(backend.clone()).name(&tower_lock::key::LockKey::new("job"));
/// let first = backend.acquire(&name, LockToken::random(), AcquireOptions::new(Duration::from_secs(5))).await.unwrap();
/// assert!(matches!(first, Acquire::Acquired { .. }));
/// let second = backend.acquire(&name, LockToken::random(), AcquireOptions::new(Duration::from_secs(5))).await.unwrap();
/// assert!(matches!(second, Acquire::Held { .. }));
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct MemoryBackend {
    state: Arc<Mutex<State>>,
    /// Wakes this process's waiters at each release (in process, no publish).
    wakeups: Wakeups,
}

#[derive(Debug, Default)]
struct State {
    locks: HashMap<LockName, Entry>,
    last_fencing_token: u64,
    purge_at: usize,
}

#[derive(Debug)]
struct Entry {
    token: LockToken,
    expires_at: Instant,
}

/// Purge expired entries once the map reaches this size, then at twice the live count.
const MIN_PURGE_AT: usize = 1024;

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many locks are held now (expired ones are not counted).
    pub fn held(&self) -> usize {
        let now = Instant::now();
        self.with_state(|state| state.locks.values().filter(|e| e.expires_at > now).count())
    }

    /// Deletes the lock `name` whoever holds it, as an operator's `DEL` would on Redis; the
    /// holder's lease is then lost at its next renewal. For tests of lease loss.
    pub fn remove(&self, name: &LockName) -> bool {
        let removed = self.with_state(|state| state.locks.remove(name).is_some());
        if removed {
            self.wakeups.wake(name.lock_key());
        }
        removed
    }

    /// How many entries the map stores, expired ones included (for memory-bound tests).
    #[doc(hidden)]
    pub fn stored(&self) -> usize {
        self.with_state(|state| state.locks.len())
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A panic cannot leave `State` inconsistent (every update is a single insert or remove),
        // so a poisoned mutex is still safe to use.
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl State {
    fn live(&mut self, name: &LockName, now: Instant) -> Option<&mut Entry> {
        self.locks
            .get_mut(name)
            .filter(|entry| entry.expires_at > now)
    }

    fn purge_if_due(&mut self, now: Instant) {
        if self.locks.len() >= self.purge_at.max(MIN_PURGE_AT) {
            self.locks.retain(|_, entry| entry.expires_at > now);
            self.purge_at = self.locks.len().saturating_mul(2);
        }
    }
}

/// `now + ttl`, saturating at [`MAX_TTL`](super::MAX_TTL) from now.
fn far_future(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl.min(super::MAX_TTL)).unwrap_or(now)
}

/// Microseconds since 1970 by the system clock (0 before it).
fn clock_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
        })
}

fn ready<T: Send + 'static>(value: T) -> BackendFuture<T> {
    Box::pin(std::future::ready(Ok(value)))
}

impl LockBackend for MemoryBackend {
    fn acquire(
        &self,
        name: &LockName,
        token: LockToken,
        options: AcquireOptions,
    ) -> BackendFuture<Acquire> {
        let now = Instant::now();
        let outcome = self.with_state(|state| {
            state.purge_if_due(now);
            // One lookup (a SipHash of the name) for the check and the insert.
            let entry = Entry {
                token,
                expires_at: far_future(now, options.ttl),
            };
            match state.locks.entry(name.clone()) {
                Slot::Occupied(holder) if holder.get().expires_at > now => {
                    return Acquire::Held {
                        remaining: Some(holder.get().expires_at.saturating_duration_since(now)),
                    };
                }
                Slot::Occupied(mut expired) => *expired.get_mut() = entry,
                Slot::Vacant(free) => {
                    free.insert(entry);
                }
            }
            if !options.fencing {
                return Acquire::Acquired { fencing_token: 0 };
            }
            state.last_fencing_token = state
                .last_fencing_token
                .saturating_add(1)
                .max(clock_micros());
            Acquire::Acquired {
                fencing_token: state.last_fencing_token,
            }
        });
        ready(outcome)
    }

    fn release(&self, name: &LockName, token: LockToken) -> BackendFuture<Release> {
        let now = Instant::now();
        // One lookup (a SipHash of the name) for the check and the removal.
        let outcome = self.with_state(|state| match state.locks.entry(name.clone()) {
            Slot::Occupied(entry) if entry.get().expires_at > now => {
                if entry.get().token == token {
                    entry.remove();
                    Release::Released
                } else {
                    Release::HeldByOther
                }
            }
            Slot::Occupied(expired) => {
                expired.remove();
                Release::Expired
            }
            Slot::Vacant(_) => Release::Expired,
        });
        if outcome == Release::Released {
            self.wakeups.wake(name.lock_key());
        }
        ready(outcome)
    }

    fn extend(&self, name: &LockName, token: LockToken, ttl: Duration) -> BackendFuture<Extend> {
        let now = Instant::now();
        let outcome = self.with_state(|state| match state.live(name, now) {
            Some(entry) if entry.token == token => {
                entry.expires_at = far_future(now, ttl);
                Extend::Extended
            }
            _ => Extend::Lost,
        });
        ready(outcome)
    }

    fn inspect(&self, name: &LockName) -> BackendFuture<Inspect> {
        let now = Instant::now();
        let outcome = self.with_state(|state| match state.live(name, now) {
            Some(entry) => Inspect::Held {
                remaining: Some(entry.expires_at.saturating_duration_since(now)),
            },
            None => Inspect::Free,
        });
        ready(outcome)
    }

    fn force_release(&self, name: &LockName) -> BackendFuture<bool> {
        let now = Instant::now();
        let outcome = self.with_state(|state| {
            let held = state.live(name, now).is_some();
            state.locks.remove(name);
            held
        });
        if outcome {
            self.wakeups.wake(name.lock_key());
        }
        ready(outcome)
    }

    /// Releases wake this process's waiters at once (no expiry is announced: waiters sleep no
    /// longer than the holder's remaining lease).
    fn wakeups(&self) -> Option<Wakeups> {
        Some(self.wakeups.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(key: &str) -> LockName {
        LockName::new("t:", key)
    }

    #[tokio::test(start_paused = true)]
    async fn expired_locks_can_be_taken_and_are_not_released_by_their_old_holder() {
        let backend = MemoryBackend::new();
        let (old, new) = (LockToken::random(), LockToken::random());
        let ttl = Duration::from_millis(100);
        let before = clock_micros();
        let Acquire::Acquired {
            fencing_token: first,
        } = backend
            .acquire(&name("a"), old, AcquireOptions::new(ttl))
            .await
            .unwrap()
        else {
            panic!("not acquired");
        };
        assert!(first >= before, "{first} is below the clock ({before})");
        tokio::time::advance(Duration::from_millis(150)).await;
        assert_eq!(
            backend.extend(&name("a"), old, ttl).await.unwrap(),
            Extend::Lost
        );
        assert!(matches!(
            backend
                .acquire(&name("a"), new, AcquireOptions::new(ttl))
                .await
                .unwrap(),
            Acquire::Acquired { fencing_token } if fencing_token > first
        ));
        assert_eq!(
            backend.release(&name("a"), old).await.unwrap(),
            Release::HeldByOther
        );
        assert_eq!(
            backend.release(&name("a"), new).await.unwrap(),
            Release::Released
        );
        assert_eq!(
            backend.release(&name("a"), new).await.unwrap(),
            Release::Expired
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_purged_so_memory_stays_bounded() {
        let backend = MemoryBackend::new();
        for i in 0..10_000 {
            let key = format!("k{i}");
            backend
                .acquire(
                    &name(&key),
                    LockToken::random(),
                    AcquireOptions::new(Duration::from_millis(10)),
                )
                .await
                .unwrap();
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!(backend.stored() <= 2 * MIN_PURGE_AT, "{}", backend.stored());
    }

    #[tokio::test]
    async fn tokens_grow_past_the_last_token_and_the_clock() {
        let backend = MemoryBackend::new();
        let ttl = AcquireOptions::new(Duration::from_secs(1));
        let mut last = 0;
        for i in 0..10_000 {
            let Acquire::Acquired { fencing_token } = backend
                .acquire(&name(&format!("k{i}")), LockToken::random(), ttl)
                .await
                .unwrap()
            else {
                panic!("not acquired");
            };
            assert!(fencing_token > last, "{fencing_token} after {last}");
            last = fencing_token;
        }
        // A counter far behind the clock (a new process, say): the clock's floor takes over.
        backend.with_state(|state| state.last_fencing_token = 5);
        let before = clock_micros();
        let Acquire::Acquired { fencing_token } = backend
            .acquire(&name("b"), LockToken::random(), ttl)
            .await
            .unwrap()
        else {
            panic!("not acquired");
        };
        assert!(
            fencing_token >= before,
            "{fencing_token} below the clock {before}"
        );
    }

    #[tokio::test]
    async fn huge_ttl_does_not_overflow() {
        let backend = MemoryBackend::new();
        let outcome = backend
            .acquire(
                &name("a"),
                LockToken::random(),
                AcquireOptions::new(Duration::MAX),
            )
            .await
            .unwrap();
        assert!(matches!(outcome, Acquire::Acquired { .. }));
        assert_eq!(backend.held(), 1);
    }
}
