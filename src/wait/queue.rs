//! The local queue of each lock key: waiters of this process line up per key, first come first
//! served, and only the head of a queue contends for the lock in the backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::backend::{LockName, Wakeups, Watch};

/// Every key's queue, shared by the engines and layers made from one another (as the renewal
/// task is).
#[derive(Default)]
pub(crate) struct Queues {
    keys: Mutex<HashMap<LockName, KeyQueue>>,
}

/// The waiters of one key.
struct KeyQueue {
    /// One permit: the head of the queue holds it. Tokio's semaphore is fair, so the permit goes
    /// to waiters in the order they asked for it.
    turn: Arc<Semaphore>,
    /// How many waiters are in the queue, head included.
    waiters: usize,
    /// Wake-ups for this key while it has waiters (`None`: the backend has none; waiters poll).
    watch: Option<Arc<Watch>>,
}

/// A waiter's place in its key's queue: dropping it leaves the queue at once.
pub(crate) struct Place {
    queues: Arc<Queues>,
    name: LockName,
    turn: Arc<Semaphore>,
    watch: Option<Arc<Watch>>,
}

impl Queues {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LockName, KeyQueue>> {
        // Every update is one insert, remove or count: a poisoned map is still consistent.
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many local waiters `name` has (0: a new request may contend at once).
    pub(crate) fn waiters(&self, name: &LockName) -> usize {
        self.lock().get(name).map_or(0, |queue| queue.waiters)
    }

    /// Joins the queue of `name`, unless it already has `cap` waiters (`None`).
    pub(crate) fn join(
        self: &Arc<Self>,
        name: &LockName,
        cap: usize,
        wakeups: Option<&Wakeups>,
    ) -> Option<Place> {
        let mut keys = self.lock();
        let queue = keys.entry(name.clone()).or_insert_with(|| KeyQueue {
            turn: Arc::new(Semaphore::new(1)),
            waiters: 0,
            watch: wakeups.map(|w| Arc::new(w.watch(name.lock_key()))),
        });
        if queue.waiters >= cap {
            if queue.waiters == 0 {
                keys.remove(name);
            }
            return None;
        }
        queue.waiters += 1;
        Some(Place {
            queues: self.clone(),
            name: name.clone(),
            turn: queue.turn.clone(),
            watch: queue.watch.clone(),
        })
    }
}

impl Place {
    /// Completes when this waiter is the head of its queue; holding the permit is its turn.
    pub(crate) async fn turn(&self) -> Option<OwnedSemaphorePermit> {
        self.turn.clone().acquire_owned().await.ok()
    }

    /// The queue's wake-ups, if the backend pushes them.
    pub(crate) fn watch(&self) -> Option<&Watch> {
        self.watch.as_deref()
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut keys = self.queues.lock();
        let Some(queue) = keys.get_mut(&self.name) else {
            return;
        };
        if !Arc::ptr_eq(&queue.turn, &self.turn) {
            return;
        }
        queue.waiters = queue.waiters.saturating_sub(1);
        if queue.waiters == 0 {
            // Its watch ends with the last place holding it: the subscriber stops listening.
            keys.remove(&self.name);
        }
    }
}
