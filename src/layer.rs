//! [`LockLayer`]: the configuration, applied to services with [`tower_layer::Layer`].

use std::sync::Arc;

use tower_layer::Layer;

use crate::backend::{LockBackend, LockName};
use crate::config::{HttpConfig, Shared, http_setters};
use crate::core::Core;
use crate::key::{KeyExtractor, LockKey};
use crate::locks::Locks;
use crate::service::LockService;
use crate::settings::{Settings, engine_setters};

/// Locks each request on a key before calling the inner service.
///
/// Configuration only; cheap to clone. Applied to a service it makes a [`LockService`].
///
/// ```
/// use std::time::Duration;
/// use tower_lock::{LockLayer, MemoryBackend, key::Header};
///
/// let layer = LockLayer::new(MemoryBackend::new(), Header::new("idempotency-key"))
///     .ttl(Duration::from_secs(30))
///     .namespace("orders:");
/// ```
#[derive(Clone)]
#[must_use = "a layer does nothing until it is applied to a service"]
pub struct LockLayer<K, B> {
    extractor: K,
    shared: Arc<Shared<B>>,
}

impl<K: std::fmt::Debug, B> std::fmt::Debug for LockLayer<K, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockLayer")
            .field("extractor", &self.extractor)
            .field("config", &self.shared)
            .finish_non_exhaustive()
    }
}

impl<K, B: LockBackend> LockLayer<K, B> {
    /// Locks on the key `extractor` finds, in `backend`, with the default settings: TTL 10 s
    /// renewed every 3.3 s, acquire and release timeouts 500 ms, fail-closed (503), release awaited
    /// before the response is returned, namespace `tower-lock:`.
    pub fn new(backend: B, extractor: K) -> Self {
        Self::from_core(Arc::new(Core::new(backend)), extractor)
    }

    pub(crate) fn from_core(core: Arc<Core<B>>, extractor: K) -> Self {
        Self {
            extractor,
            shared: Arc::new(Shared {
                core,
                http: HttpConfig::default(),
            }),
        }
    }

    /// Locks each request on the key `extractor` finds, with the settings and the renewal task
    /// of `locks`, so that the routes it protects and the jobs that lock through `locks` name,
    /// take and renew locks alike. HTTP settings ([`fail_open`](Self::fail_open),
    /// [`hold_through_body`](Self::hold_through_body), …) start at their defaults; settings
    /// changed on the layer apply to it alone. The same as [`Locks::layer`](crate::Locks::layer).
    ///
    /// ```
    /// use tower_lock::{LockLayer, Locks, MemoryBackend, key::Header};
    ///
    /// let locks = Locks::new(MemoryBackend::new()).namespace("shop:");
    /// let layer = LockLayer::from_locks(&locks, Header::new("idempotency-key")).fail_open(true);
    /// ```
    pub fn from_locks(locks: &Locks<B>, extractor: K) -> Self {
        Self::from_core(locks.core().clone(), extractor)
    }

    /// Changes the engine settings of this layer alone (the renewal task stays shared).
    pub(crate) fn settings(
        mut self,
        _name: &'static str,
        _value: String,
        change: impl Fn(&mut Settings) + Send + Sync + 'static,
    ) -> Self {
        let shared = Arc::make_mut(&mut self.shared);
        shared.core = Arc::new(shared.core.with_settings(change));
        self
    }

    pub(crate) fn http(
        mut self,
        _name: &'static str,
        _value: String,
        change: impl Fn(&mut HttpConfig) + Send + Sync + 'static,
    ) -> Self {
        change(&mut Arc::make_mut(&mut self.shared).http);
        self
    }

    engine_setters!();
    http_setters!();

    pub(crate) fn shared(&self) -> &Arc<Shared<B>> {
        &self.shared
    }

    /// How many leases this layer's renewal schedule holds, and how many it has room for. For
    /// tests; not part of the API.
    #[doc(hidden)]
    pub fn renewal_entries(&self) -> (usize, usize) {
        self.shared.core.renewal_entries()
    }

    /// The backend name this layer uses for `key` (namespace, hash tag, digest of long keys).
    pub fn lock_name(&self, key: &LockKey) -> LockName {
        self.shared.core.settings.lock_name(key)
    }
}

impl<S, K, B> Layer<S> for LockLayer<K, B>
where
    K: KeyExtractor,
    B: LockBackend,
{
    type Service = LockService<S, K, B>;

    fn layer(&self, inner: S) -> Self::Service {
        LockService::new(inner, self.extractor.clone(), self.shared.clone())
    }
}

impl<B: LockBackend> Locks<B> {
    /// A layer locking each request on the key `extractor` finds, with this engine's settings
    /// and renewal task (HTTP settings such as [`LockLayer::fail_open`] at their defaults, to be
    /// set on the layer). The same as [`LockLayer::from_locks`].
    pub fn layer<K>(&self, extractor: K) -> LockLayer<K, B> {
        LockLayer::from_locks(self, extractor)
    }
}
