//! [`Wakeups`]: how a backend tells the waiters of this process that a lock was released.
//!
//! A backend that can push wake-ups returns a [`Wakeups`] from
//! [`LockBackend::wakeups`](super::LockBackend::wakeups) (one per backend, shared by its clones).
//! The engine *watches* a lock while it has local waiters for it; the backend *wakes* the lock
//! when it learns of a release. A watch is *confirmed* once a wake-up for any later release is
//! certain to arrive (at once in process; on Redis once the shared subscriber connection's
//! `SUBSCRIBE` has been answered; on Cluster once the sharded subscriber's `SSUBSCRIBE` has
//! been answered by the primary of the lock's slot). While a watch is not confirmed (the
//! subscriber is connecting or reconnecting), waiters poll, bounded by the holder's remaining
//! lease, with jitter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Notify, mpsc};

/// What the engine asks of a backend's subscriber (see [`Wakeups`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Interest {
    /// Start listening for releases of this lock key.
    Watch(Arc<str>),
    /// Stop listening for releases of this lock key.
    Unwatch(Arc<str>),
}

/// Starts a backend's subscriber task: given the hub, returns the channel it reads interests from.
pub(crate) type StartSubscriber =
    Arc<dyn Fn(std::sync::Weak<Hub>) -> Option<mpsc::UnboundedSender<Interest>> + Send + Sync>;

/// Wake-ups for a backend's waiters: see this (private) module's docs in the source. Cheap to clone; clones share
/// their watches.
///
/// A custom backend that releases in process builds one with [`Wakeups::in_process`] and calls
/// [`Wakeups::wake`] after each release:
///
/// ```
/// use tower_lock::backend::Wakeups;
///
/// let wakeups = Wakeups::in_process();
/// // After deleting the lock `tower-lock:{job}`:
/// wakeups.wake("tower-lock:{job}");
/// ```
#[derive(Clone)]
pub struct Wakeups {
    hub: Arc<Hub>,
}

impl std::fmt::Debug for Wakeups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wakeups")
            .field("watched", &self.hub.watched.load(Ordering::Relaxed))
            .field("pushed", &self.hub.subscriber.is_some())
            .finish()
    }
}

/// The state every clone of a [`Wakeups`] shares.
pub(crate) struct Hub {
    channels: Mutex<HashMap<Arc<str>, Arc<Channel>>>,
    /// How many locks are watched: a release wakes nothing (and takes no lock) when none is.
    watched: AtomicUsize,
    /// `None`: in process, every watch is confirmed at once.
    subscriber: Option<Subscriber>,
}

struct Subscriber {
    start: StartSubscriber,
    sender: Mutex<Option<mpsc::UnboundedSender<Interest>>>,
}

/// The wake-ups of one lock key.
pub(crate) struct Channel {
    /// Bumped by every wake-up, and by every change of the subscription.
    epoch: AtomicU64,
    confirmed: AtomicBool,
    notify: Notify,
    watchers: AtomicUsize,
}

/// What a waiter saw before an acquire attempt: whether a release after it would wake it, and the
/// wake-ups so far.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seen {
    epoch: u64,
    pub(crate) confirmed: bool,
}

// A panic cannot leave the hub inconsistent (every update is one insert, remove or count under
// its lock), so backends holding one stay unwind-safe, as they were without it.
impl std::panic::UnwindSafe for Wakeups {}
impl std::panic::RefUnwindSafe for Wakeups {}

impl Default for Wakeups {
    fn default() -> Self {
        Self::in_process()
    }
}

impl Wakeups {
    /// Wake-ups delivered in process: every watch is confirmed at once, and [`Wakeups::wake`]
    /// wakes the waiters of a lock.
    pub fn in_process() -> Self {
        Self::with(None)
    }

    /// Wake-ups delivered by a subscriber task that `start` spawns (again after it ended) when a
    /// lock is first watched.
    pub(crate) fn pushed(start: StartSubscriber) -> Self {
        Self::with(Some(Subscriber {
            start,
            sender: Mutex::new(None),
        }))
    }

    fn with(subscriber: Option<Subscriber>) -> Self {
        Self {
            hub: Arc::new(Hub {
                channels: Mutex::default(),
                watched: AtomicUsize::new(0),
                subscriber,
            }),
        }
    }

    /// Wakes the local waiters of `lock_key` (a [`LockName::lock_key`](super::LockName::lock_key)):
    /// the lock was released. Cheap when nobody waits.
    pub fn wake(&self, lock_key: &str) {
        self.hub.wake(lock_key);
    }

    /// Starts watching `lock_key` for wake-ups; stops when the watch is dropped.
    pub(crate) fn watch(&self, lock_key: &str) -> Watch {
        let hub = &self.hub;
        let (key, channel, first) = {
            let mut channels = hub.lock();
            let entry = match channels.get_key_value(lock_key) {
                Some((key, channel)) => (key.clone(), channel.clone(), false),
                None => {
                    let key: Arc<str> = lock_key.into();
                    let channel = Arc::new(Channel {
                        epoch: AtomicU64::new(0),
                        confirmed: AtomicBool::new(hub.subscriber.is_none()),
                        notify: Notify::new(),
                        watchers: AtomicUsize::new(0),
                    });
                    channels.insert(key.clone(), channel.clone());
                    hub.watched.fetch_add(1, Ordering::Relaxed);
                    (key, channel, true)
                }
            };
            // Under the map's lock, so that the last watch's drop sees this one.
            entry.1.watchers.fetch_add(1, Ordering::AcqRel);
            entry
        };
        if first {
            tell(hub, Interest::Watch(key.clone()));
        }
        Watch {
            hub: hub.clone(),
            key,
            channel,
        }
    }
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Channel>>> {
        // Every update is one insert or remove: a poisoned map is still consistent.
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn wake(&self, lock_key: &str) {
        if self.watched.load(Ordering::Relaxed) == 0 {
            return;
        }
        let channel = self.lock().get(lock_key).cloned();
        if let Some(channel) = channel {
            channel.wake();
        }
    }

    /// The keys watched now.
    pub(crate) fn watched_keys(&self) -> Vec<Arc<str>> {
        self.lock().keys().cloned().collect()
    }

    /// The subscription of `lock_key` is in place: a release from now on wakes its waiters.
    pub(crate) fn confirm(&self, lock_key: &str) {
        let channel = self.lock().get(lock_key).cloned();
        if let Some(channel) = channel {
            channel.confirmed.store(true, Ordering::Release);
            // A release may have happened while unconfirmed: let the waiters try again.
            channel.wake();
        }
    }

    /// The subscription of `lock_key` is gone (its node dropped it, or is unreachable): its
    /// waiters retry, then poll until it is confirmed again.
    pub(crate) fn unconfirm(&self, lock_key: &str) {
        let channel = self.lock().get(lock_key).cloned();
        if let Some(channel) = channel {
            channel.confirmed.store(false, Ordering::Release);
            channel.wake();
        }
    }

    /// The subscriber connection is gone: no watch is confirmed until it is back, and every
    /// waiter retries (then polls).
    pub(crate) fn disconnected(&self) {
        let channels: Vec<_> = self.lock().values().cloned().collect();
        for channel in channels {
            channel.confirmed.store(false, Ordering::Release);
            channel.wake();
        }
    }

    /// The subscriber task ended (its runtime shut down, or it returned): the next watch starts
    /// another, and meanwhile no watch is confirmed (see [`Hub::disconnected`]).
    pub(crate) fn subscriber_ended(&self) {
        if let Some(subscriber) = &self.subscriber {
            let mut sender = subscriber
                .sender
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Only the ended task's sender (closed): a newer subscriber may run already.
            if sender
                .as_ref()
                .is_some_and(mpsc::UnboundedSender::is_closed)
            {
                *sender = None;
            }
        }
        self.disconnected();
    }

    /// Whether `lock_key` is watched now.
    pub(crate) fn is_watched(&self, lock_key: &str) -> bool {
        self.lock().contains_key(lock_key)
    }
}

/// Sends `interest` to `hub`'s subscriber, starting it if it is not running.
fn tell(hub: &Arc<Hub>, interest: Interest) {
    let Some(subscriber) = &hub.subscriber else {
        return;
    };
    let mut sender = subscriber
        .sender
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(live) = sender.as_ref()
        && live.send(interest.clone()).is_ok()
    {
        return;
    }
    // Not started yet, or its task ended (its runtime shut down): start one, which subscribes
    // to every watched key when it connects.
    *sender = None;
    if matches!(interest, Interest::Watch(_)) {
        *sender = (subscriber.start)(Arc::downgrade(hub));
    }
}

impl Channel {
    fn wake(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_waiters();
    }
}

/// A watch on one lock key: its waiters are woken by releases while it lives.
pub(crate) struct Watch {
    hub: Arc<Hub>,
    key: Arc<str>,
    channel: Arc<Channel>,
}

impl Watch {
    /// What a waiter sees before an attempt.
    pub(crate) fn seen(&self) -> Seen {
        // Confirmation first: a disconnect after it bumps the epoch read next.
        let confirmed = self.channel.confirmed.load(Ordering::Acquire);
        Seen {
            epoch: self.channel.epoch.load(Ordering::Acquire),
            confirmed,
        }
    }

    /// Whether a wake-up came since `seen`.
    pub(crate) fn woken_since(&self, seen: Seen) -> bool {
        self.channel.epoch.load(Ordering::Acquire) != seen.epoch
    }

    /// Completes at the next wake-up (enable it before the attempt to miss none).
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.channel.notify.notified()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.channel.watchers.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let removed = {
            let mut channels = self.hub.lock();
            // A new watch may have joined meanwhile: remove only if still unwatched.
            if self.channel.watchers.load(Ordering::Acquire) == 0
                && channels
                    .get(&self.key)
                    .is_some_and(|c| Arc::ptr_eq(c, &self.channel))
            {
                channels.remove(&self.key);
                self.hub.watched.fetch_sub(1, Ordering::Relaxed);
                true
            } else {
                false
            }
        };
        if removed {
            tell(&self.hub, Interest::Unwatch(self.key.clone()));
        }
    }
}
