//! The renewal task that keeps leases alive.
//!
//! One renewal task per engine and runtime (an engine's clones, and the layers built from it,
//! share it), started on the first lock, drives every held lease; no task is spawned per lock.
//! Leases live in one schedule shared with the task (see `Inbox`): a holder adds its lease there
//! and takes it out when it ends, without waking the task unless the new lease is due before the
//! task's next wake-up. Most requests end long before their first renewal is due, so a new lease
//! waits in a small nursery (a push, no index) that the schedule takes in whenever the task wakes
//! or the nursery fills; a lease whose request has ended by then is dropped there, having cost
//! neither an insert nor a removal. So the schedule holds the leases held (and the nursery a
//! few dozen more at most), whatever the request rate.
//!
//! The task wakes when the earliest lease is due, takes every lease that is due (a batch), and
//! extends them concurrently. Each extend is bounded by the renewal timeout and by the lease's
//! remaining validity, so a lease whose validity runs out is reported lost at that moment, even
//! while an extend hangs. When the task ends for any reason (its runtime shuts down, a bug
//! panics it), every lease it was keeping is marked lost, and the next lease starts a new task on
//! the runtime of the holder that registers it. A panicking backend call counts as a failed
//! renewal of that one lease. The task ends when the engine, and every layer, service, response
//! and lock made from it, are dropped.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::runtime::{Handle, Id as RuntimeId};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backend::{Extend, LockBackend};
use crate::lease::{LockLease, Unschedule};

/// How a lease is to be kept alive.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub(crate) ttl: Duration,
    /// Renew every this long (at most half the TTL: see `Config::renewal_interval`); `None`:
    /// never renew (the lease is only watched for expiry).
    pub(crate) every: Option<Duration>,
    /// Stop renewing after this instant.
    pub(crate) renew_until: Option<Instant>,
    /// When the lease expires on the server, at the latest, unless renewed.
    pub(crate) valid_until: Instant,
    /// Timeout of one extend call (it is also cut short where the validity runs out).
    pub(crate) timeout: Duration,
}

/// Failed renewals are retried this often (a third of the interval), but not more often than
/// every `MIN_RETRY`.
const MIN_RETRY: Duration = Duration::from_millis(10);

impl Plan {
    /// When to renew next, `now` being when the lease was acquired or last extended: one interval
    /// later, but at least one interval before the validity runs out, so that a slow acquire or a
    /// slow extend still leaves time to try (and to retry).
    fn next_due(&self, now: Instant) -> Instant {
        match self.every {
            Some(every) => {
                let latest = self.valid_until.checked_sub(every).unwrap_or(now);
                now.checked_add(every).map_or(latest, |due| due.min(latest))
            }
            None => self.valid_until,
        }
    }

    /// When to try again after a failed renewal at `now`.
    fn retry_due(&self, now: Instant) -> Instant {
        let every = self.every.unwrap_or(self.ttl);
        now.checked_add((every / 3).max(MIN_RETRY))
            .map_or(self.valid_until, |retry| retry.min(self.valid_until))
    }

    /// Whether the lease is still to be renewed at `now` (else it is only watched for expiry).
    fn renewing(&self, now: Instant) -> bool {
        self.every.is_some() && self.renew_until.is_none_or(|until| now < until)
    }

    /// Until when an extend sent at `now` may run: the renewal timeout, cut at the validity.
    fn extend_deadline(&self, now: Instant) -> Instant {
        now.checked_add(self.timeout)
            .map_or(self.valid_until, |deadline| deadline.min(self.valid_until))
    }
}

struct Entry {
    lease: LockLease,
    plan: Plan,
    /// When the entry is next due (its key in `State::schedule`); `None` while its extend runs.
    due: Option<Instant>,
}

/// A lease registered since the schedule last took the nursery in.
struct Newborn {
    lease: LockLease,
    plan: Plan,
    /// When it is first due.
    due: Instant,
}

/// How many leases wait in the nursery before the registering request takes them into the
/// schedule itself (so that the nursery stays small even when the task cannot run, e.g. a
/// current-thread runtime busy with a loop of requests).
const NURSERY: usize = 32;

/// The schedule a layer's requests share with its renewal task.
///
/// Registering must not wake another thread on every request (that alone costs more than the
/// layer's own work), so a request only pushes its lease into the nursery, and wakes the task only
/// when the lease is due before the task's next wake-up (a slow acquire); a parked task has no
/// wake-up. Whenever the task wakes, it takes the nursery in first, so a lease is in the schedule
/// before it is due.
struct Inbox {
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    /// Every lease of a request in flight, by registration id: scheduled or being extended.
    entries: HashMap<u64, Entry>,
    /// The scheduled entries, by when they are due.
    schedule: BTreeSet<(Instant, u64)>,
    /// Leases not in `entries` yet (see the module docs); their due times are covered by
    /// `next_wake`.
    nursery: Vec<Newborn>,
    next_id: u64,
    /// When the task looks at the schedule next without being woken; `None`: only when woken.
    next_wake: Option<Instant>,
    /// The shortest renewal interval of the leases registered so far: how long the task stays
    /// on a timer after its schedule empties, so that a steady stream of short requests (each
    /// gone before its first renewal) does not wake it once per request.
    linger: Option<Duration>,
    /// The renewer is gone: the task should end once nothing is left.
    closed: bool,
    /// The task has ended: nothing may be added any more.
    dead: bool,
}

impl Inbox {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Unschedule for Inbox {
    fn unschedule(&self, id: u64) {
        self.state().remove(id);
    }
}

impl State {
    /// Takes the nursery into the schedule: a lease whose request has ended is dropped, the
    /// others get an id and a place in `schedule`, and learn where to take themselves out of.
    fn adopt(&mut self, inbox: &Arc<Inbox>) {
        if self.nursery.is_empty() {
            return;
        }
        let mut nursery = std::mem::take(&mut self.nursery);
        for Newborn { lease, plan, due } in nursery.drain(..) {
            if lease.has_ended() {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let schedule: Weak<dyn Unschedule> = Arc::downgrade(inbox) as _;
            // Registered first, then checked: `end` either sees the registration (and waits on
            // this lock to unschedule it) or is seen here.
            if !lease.register(schedule, id) || lease.has_ended() {
                continue; // watched already, or ended meanwhile
            }
            self.insert(
                id,
                Entry {
                    lease,
                    plan,
                    due: Some(due),
                },
            );
        }
        // Keeps its (small) capacity.
        self.nursery = nursery;
    }

    fn insert(&mut self, id: u64, entry: Entry) {
        if let Some(due) = entry.due {
            self.schedule.insert((due, id));
        }
        self.entries.insert(id, entry);
    }

    /// Drops the entry `id`, wherever it is; after a burst, gives memory back.
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        if let Some(due) = entry.due {
            self.schedule.remove(&(due, id));
        }
        let capacity = self.entries.capacity();
        if capacity > 64 && self.entries.len() * 4 < capacity {
            self.entries.shrink_to(self.entries.len() * 2);
        }
        Some(entry)
    }

    fn reschedule(&mut self, id: u64, due: Instant) {
        if let Some(entry) = self.entries.get_mut(&id) {
            if let Some(old) = entry.due.replace(due) {
                self.schedule.remove(&(old, id));
            }
            self.schedule.insert((due, id));
        }
    }
}

/// Registers leases with the layer's renewal task, starting it when needed.
pub(crate) struct Renewer<B> {
    backend: B,
    /// One renewal task per runtime that has locked through this renewer: a lease is renewed by
    /// a task on its own request's runtime, so a runtime that is idle or shutting down can only
    /// hold back (or lose) leases of its own requests.
    tasks: Mutex<Vec<(RuntimeId, Arc<Inbox>)>>,
}

impl<B: LockBackend> Renewer<B> {
    pub(crate) fn new(backend: B) -> Self {
        Self {
            backend,
            tasks: Mutex::default(),
        }
    }

    /// Starts watching `lease`, acquired (or last extended) at `now`: a push into the nursery;
    /// the timer lives in the shared task, which is started on `runtime` if there is none alive.
    pub(crate) fn watch(&self, lease: LockLease, plan: Plan, now: Instant, runtime: &Handle) {
        let due = plan.next_due(now);
        let runtime_id = runtime.id();
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        // Two tries: a dead task is replaced once; a task that dies at once (a runtime that is
        // shutting down drops what is spawned on it) cannot renew, so the lease is lost.
        for _ in 0..2 {
            let index = match tasks.iter().position(|(id, _)| *id == runtime_id) {
                Some(index) => index,
                None => {
                    // Forget the tasks of runtimes that have shut down.
                    tasks.retain(|(_, inbox)| !inbox.state().dead);
                    let inbox = Arc::new(Inbox {
                        state: Mutex::default(),
                        wake: Notify::new(),
                    });
                    // The guard is an argument, so it is dropped (marking leases lost) even if
                    // the runtime drops the task before it first runs.
                    runtime.spawn(run(self.backend.clone(), TaskGuard(inbox.clone())));
                    tasks.push((runtime_id, inbox));
                    tasks.len() - 1
                }
            };
            // Borrowed under the `tasks` lock: no refcount traffic on the shared inbox.
            let Some((_, inbox)) = tasks.get(index) else {
                break;
            };
            let mut state = inbox.state();
            if state.dead {
                // The task ended (its runtime shut down, or it panicked): start another.
                drop(state);
                tasks.retain(|(id, _)| *id != runtime_id);
                continue;
            }
            if state.nursery.len() >= NURSERY {
                state.adopt(inbox);
            }
            state.nursery.push(Newborn { lease, plan, due });
            let interval = plan.every.unwrap_or(plan.ttl);
            state.linger = Some(state.linger.map_or(interval, |linger| linger.min(interval)));
            if state.next_wake.is_none_or(|wake| due < wake) {
                state.next_wake = Some(due);
                inbox.wake.notify_one();
            }
            return;
        }
        drop(tasks);
        lease.mark_lost("no renewal task could run: the lock's runtime is shutting down");
    }

    /// How many leases of requests in flight the schedule and its nursery hold, and how many
    /// they have room for (for tests: both must be bounded by the requests in flight, not by the
    /// requests served).
    pub(crate) fn stored(&self) -> (usize, usize) {
        let tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        tasks.iter().fold((0, 0), |(len, capacity), (_, inbox)| {
            let state = inbox.state();
            let newborn = state.nursery.iter();
            (
                len + state.entries.len() + newborn.filter(|n| !n.lease.has_ended()).count(),
                capacity + state.entries.capacity() + state.nursery.capacity(),
            )
        })
    }
}

impl<B> Drop for Renewer<B> {
    fn drop(&mut self) {
        let tasks = self.tasks.get_mut().unwrap_or_else(PoisonError::into_inner);
        for (_, inbox) in tasks.drain(..) {
            inbox.state().closed = true;
            inbox.wake.notify_one();
        }
    }
}

/// However the task ends (its runtime dropping it, a panic, or the layer being gone), marks the
/// inbox dead, so that no lease is added any more, and every lease still in it lost.
struct TaskGuard(Arc<Inbox>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        let orphans: Vec<LockLease> = {
            let mut state = self.0.state();
            state.dead = true;
            state.schedule.clear();
            let nursery = std::mem::take(&mut state.nursery);
            let entries = state.entries.drain().map(|(_, entry)| entry.lease);
            let newborn = nursery.into_iter().map(|newborn| newborn.lease);
            // An ended request has no lease to lose.
            entries
                .chain(newborn.filter(|lease| !lease.has_ended()))
                .collect()
        };
        for lease in orphans {
            lease.mark_lost("the renewal task ended (its runtime shut down?)");
        }
    }
}

/// What one extend call came to.
enum Renewed {
    Done(Extend),
    Failed(&'static str),
}

async fn run<B: LockBackend>(backend: B, guard: TaskGuard) {
    let inbox = &guard.0;
    let mut extending = FuturesUnordered::new();
    let mut finished: Vec<(u64, Instant, Renewed)> = Vec::new();
    let mut lost: Vec<(LockLease, &'static str)> = Vec::new();
    let mut calls: Vec<(u64, LockLease, Plan)> = Vec::new();
    // Until when the task stays on a timer with an empty schedule (see `State::linger`).
    let mut idle_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let (next_wake, stop) = {
            let mut state = inbox.state();
            state.adopt(inbox);
            for (id, sent_at, outcome) in finished.drain(..) {
                settle(&mut state, id, sent_at, outcome, now, &mut lost);
            }
            // Every entry that is due, in one pass.
            while let Some(&(due, id)) = state.schedule.first()
                && due <= now
            {
                state.schedule.pop_first();
                let Some(entry) = state.entries.get_mut(&id) else {
                    continue;
                };
                entry.due = None;
                if now >= entry.plan.valid_until {
                    if let Some(entry) = state.remove(id) {
                        let why = "lease validity ran out before it could be renewed";
                        lost.push((entry.lease, why));
                    }
                } else if entry.plan.renewing(now) {
                    calls.push((id, entry.lease.clone(), entry.plan));
                } else {
                    let at = entry.plan.valid_until;
                    state.reschedule(id, at);
                }
            }
            let mut next_wake = state.schedule.first().map(|&(due, _)| due);
            if !state.entries.is_empty() {
                idle_until = None;
            } else if let Some(linger) = state.linger {
                let until =
                    *idle_until.get_or_insert_with(|| now.checked_add(linger).unwrap_or(now));
                if now < until {
                    next_wake = Some(until);
                }
            }
            state.next_wake = next_wake;
            let stop = state.closed && state.entries.is_empty() && extending.is_empty();
            (next_wake, stop)
        };
        for (lease, why) in lost.drain(..) {
            lease.mark_lost(why);
        }
        if stop {
            // The layer and everything made from it are gone, so no request holds a lease.
            break;
        }
        for (id, lease, plan) in calls.drain(..) {
            extending.push(extend(&backend, id, lease, plan, now));
        }
        let sleep = tokio::time::sleep_until(next_wake.unwrap_or(now));
        tokio::select! {
            biased;
            Some(done) = extending.next(), if !extending.is_empty() => {
                finished.push(done);
                while let Some(Some(done)) = extending.next().now_or_never() {
                    finished.push(done);
                }
            }
            () = sleep, if next_wake.is_some() => {}
            () = inbox.wake.notified() => {
                // A registration found the task parked: linger again once the schedule empties.
                idle_until = None;
            }
        }
    }
}

/// One extend call for the entry `id`: bounded by the renewal timeout and by the lease's
/// validity; a panic (in making the call or in its future) is a failure like any other.
fn extend<B: LockBackend>(
    backend: &B,
    id: u64,
    lease: LockLease,
    plan: Plan,
    now: Instant,
) -> impl Future<Output = (u64, Instant, Renewed)> + use<B> {
    let deadline = plan.extend_deadline(now);
    let call = std::panic::catch_unwind(AssertUnwindSafe(|| {
        backend.extend(lease.name(), lease.token(), plan.ttl)
    }));
    async move {
        let outcome = match call {
            Ok(call) => {
                match tokio::time::timeout_at(deadline, AssertUnwindSafe(call).catch_unwind()).await
                {
                    Ok(Ok(Ok(extended))) => Renewed::Done(extended),
                    Ok(Ok(Err(_))) => Renewed::Failed("lease renewal failed"),
                    Ok(Err(_)) => Renewed::Failed("lease renewal panicked"),
                    Err(_) => Renewed::Failed("lease renewal timed out"),
                }
            }
            Err(_) => Renewed::Failed("lease renewal panicked"),
        };
        (id, now, outcome)
    }
}

/// Applies the outcome of the extend of entry `id`, sent at `sent_at`, seen at `now`.
fn settle(
    state: &mut State,
    id: u64,
    sent_at: Instant,
    outcome: Renewed,
    now: Instant,
    lost: &mut Vec<(LockLease, &'static str)>,
) {
    // Gone: the request ended while its extend was in flight.
    let Some(entry) = state.entries.get_mut(&id) else {
        return;
    };
    match outcome {
        Renewed::Done(Extend::Extended) => {
            tracing::trace!(lock = %entry.lease.label(), "lease renewed");
            entry.plan.valid_until = sent_at.checked_add(entry.plan.ttl).unwrap_or(sent_at);
            entry.lease.set_valid_until(entry.plan.valid_until);
            let due = entry.plan.next_due(now);
            state.reschedule(id, due);
        }
        Renewed::Done(Extend::Lost) => {
            if let Some(entry) = state.remove(id) {
                lost.push((entry.lease, "the lock was gone or held by another request"));
            }
        }
        Renewed::Failed(why) => {
            tracing::debug!(lock = %entry.lease.label(), why, "lease renewal failed, retrying");
            crate::telemetry::backend_error("extend");
            if now >= entry.plan.valid_until {
                if let Some(entry) = state.remove(id) {
                    lost.push((entry.lease, "lease validity ran out while renewals failed"));
                }
            } else {
                let due = entry.plan.retry_due(now);
                state.reschedule(id, due);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{LockName, LockToken};

    fn lease() -> LockLease {
        LockLease::new(
            crate::key::LockKey::new("k"),
            LockName::new("t:", "k"),
            LockToken::random(),
            7,
            false,
            Instant::now(),
            Duration::from_secs(60),
        )
    }

    fn state_with(entries: u64) -> State {
        let mut state = State::default();
        let plan = Plan {
            ttl: Duration::from_secs(60),
            every: None,
            renew_until: None,
            valid_until: Instant::now(),
            timeout: Duration::from_secs(1),
        };
        for id in 0..entries {
            let entry = Entry {
                lease: lease(),
                plan,
                due: Some(Instant::now()),
            };
            state.insert(id, entry);
        }
        state
    }

    fn plan() -> Plan {
        Plan {
            ttl: Duration::from_secs(60),
            every: Some(Duration::from_secs(20)),
            renew_until: None,
            valid_until: Instant::now() + Duration::from_secs(60),
            timeout: Duration::from_secs(1),
        }
    }

    /// Requests that end before their first renewal never enter the schedule, and the nursery
    /// they wait in stays small even when the renewal task never gets to run (a current-thread
    /// runtime busy with a loop of requests that never yields): the registering request takes
    /// the nursery in itself once it is full.
    #[tokio::test(flavor = "current_thread")]
    async fn short_requests_stay_out_of_the_schedule_and_the_nursery_stays_small() {
        let renewer = Renewer::new(crate::MemoryBackend::new());
        let runtime = Handle::current();
        let mut held = Vec::new();
        for i in 0..10_000 {
            let lease = lease();
            renewer.watch(lease.clone(), plan(), Instant::now(), &runtime);
            if i % 1000 == 0 {
                held.push(lease); // still running
            } else {
                lease.end();
            }
            let (stored, capacity) = renewer.stored();
            assert!(
                stored <= held.len() + 1,
                "{stored} leases for {} held",
                held.len()
            );
            assert!(capacity <= 2 * NURSERY, "room for {capacity} leases");
        }
        let tasks = renewer.tasks.lock().unwrap();
        let state = tasks[0].1.state();
        assert!(state.nursery.len() <= NURSERY, "{}", state.nursery.len());
        assert!(
            state.entries.len() >= held.len() - 1,
            "the held leases were not taken in"
        );
        assert!(state.entries.values().all(|entry| !entry.lease.has_ended()));
        assert_eq!(state.schedule.len(), state.entries.len());
    }

    /// A lease taken into the schedule is unscheduled when its request ends; one that ended in
    /// the nursery is dropped when the nursery is taken in.
    #[tokio::test(flavor = "current_thread")]
    async fn taking_the_nursery_in_keeps_the_running_and_drops_the_ended() {
        let renewer = Renewer::new(crate::MemoryBackend::new());
        let runtime = Handle::current();
        let (running, ended) = (lease(), lease());
        renewer.watch(running.clone(), plan(), Instant::now(), &runtime);
        renewer.watch(ended.clone(), plan(), Instant::now(), &runtime);
        ended.end();
        assert_eq!(renewer.stored().0, 1);
        tokio::task::yield_now().await; // the task runs, and takes the nursery in
        {
            let tasks = renewer.tasks.lock().unwrap();
            let state = tasks[0].1.state();
            assert!(state.nursery.is_empty());
            assert_eq!(state.entries.len(), 1);
        }
        running.end();
        assert_eq!(renewer.stored().0, 0);
        let tasks = renewer.tasks.lock().unwrap();
        assert!(tasks[0].1.state().schedule.is_empty());
    }

    /// The schedule gives memory back once it is less than a quarter full (and only then),
    /// keeping room for twice what it holds, so a steady load does not rehash on every request;
    /// small maps are left alone. (A removal may also leave a tombstone, which lowers the
    /// capacity by one: a shrink is a drop of more than one.)
    #[tokio::test]
    async fn the_schedule_shrinks_below_a_quarter_full_to_twice_its_entries() {
        let mut state = state_with(1000);
        let mut shrinks = 0;
        for id in 0..1000 {
            let before = state.entries.capacity();
            assert!(state.remove(id).is_some());
            let (len, after) = (state.entries.len(), state.entries.capacity());
            assert!(
                after > 64 || len * 4 >= after || after + 1 >= before,
                "left {len} entries in room for {after}"
            );
            if after + 1 < before {
                shrinks += 1;
                assert!(before > 64, "a small map ({before}) was shrunk");
                assert!(
                    len * 4 < before,
                    "shrunk from {before} with {len} entries left"
                );
                assert!(after >= 2 * len, "shrunk to {after} for {len} entries");
            }
            assert_eq!(state.schedule.len(), len);
        }
        assert!(shrinks > 0, "never shrunk");

        let mut small = state_with(40);
        let capacity = small.entries.capacity();
        assert!(capacity <= 64);
        for id in 0..38 {
            small.remove(id);
        }
        assert!(
            small.entries.capacity() + 38 >= capacity,
            "a small map was shrunk"
        );
        assert!(small.remove(1000).is_none());
    }
}
