//! What every lock of one engine shares: backend, settings, renewal task.

use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::time::Instant;

use crate::backend::LockBackend;
use crate::lease::LockLease;
use crate::renewal::{Plan, Renewer};
use crate::settings::Settings;

/// What every lock of one engine shares: backend, settings, renewal task.
///
/// The renewal schedule is shared by every clone, so a layer reconfigured from another, or from
/// a [`Locks`](crate::Locks) engine, keeps renewing on the same task (each lease carries its own
/// TTL and interval).
pub(crate) struct Core<B> {
    pub(crate) backend: B,
    pub(crate) settings: Settings,
    renewer: Arc<Renewer<B>>,
    /// The local queues of waiters, shared as the renewal task is.
    pub(crate) queues: Arc<crate::wait::queue::Queues>,
}

impl<B: LockBackend> Core<B> {
    pub(crate) fn new(backend: B) -> Self {
        Self {
            renewer: Arc::new(Renewer::new(backend.clone())),
            backend,
            settings: Settings::default(),
            queues: Arc::default(),
        }
    }

    /// Starts renewing `lease`, acquired at `started` (the acquire returned at `now`), on
    /// `runtime`, with these settings.
    pub(crate) fn renew(
        &self,
        lease: &LockLease,
        started: Instant,
        now: Instant,
        runtime: &Handle,
    ) {
        let settings = &self.settings;
        self.renewer.watch(
            lease.clone(),
            Plan {
                ttl: settings.ttl(),
                every: settings.renewal_interval(),
                renew_until: settings.max_hold().and_then(|max| started.checked_add(max)),
                valid_until: lease.valid_until(),
                timeout: settings.renew_timeout(),
            },
            now,
            runtime,
        );
    }

    /// How many leases the renewal schedule holds, and how many it has room for.
    pub(crate) fn renewal_entries(&self) -> (usize, usize) {
        self.renewer.stored()
    }

    /// The same backend and renewal task, with other settings.
    pub(crate) fn with_settings(&self, change: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = self.settings.clone();
        change(&mut settings);
        Self {
            backend: self.backend.clone(),
            settings,
            renewer: self.renewer.clone(),
            queues: self.queues.clone(),
        }
    }
}
