//! [`LockLayer`]: the configuration, applied to services with [`tower_layer::Layer`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use sha2::Digest;
use tokio::runtime::Handle;
use tokio::time::Instant;
use tower_layer::Layer;

use crate::backend::{LockBackend, LockName};
use crate::key::{KeyExtractor, LockKey};
use crate::lease::{LockLease, Plan, Renewer};
use crate::response::Rejection;
use crate::service::LockService;

/// What the handler's request does when its lease is lost while it runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseLostPolicy {
    /// The handler keeps running; [`LockLease::is_lost`](crate::LockLease::is_lost) and
    /// [`LockLease::lost`](crate::LockLease::lost) tell it, and a warning is traced.
    #[default]
    Signal,
    /// The inner future is dropped and the client gets 503 problem+json.
    Abort,
}

/// How leases are renewed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Renewal {
    /// Every third of the TTL.
    #[default]
    Auto,
    /// Every this long (at least 1 ms), but at most every half TTL.
    Every(Duration),
    /// Never.
    Off,
}

type RejectionHandler = Arc<dyn Fn(Rejection) -> Response<Bytes> + Send + Sync>;

/// The layer's settings. See the builder methods of [`LockLayer`] for each.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) namespace: Arc<str>,
    pub(crate) ttl: Duration,
    pub(crate) acquire_timeout: Duration,
    pub(crate) release_timeout: Duration,
    pub(crate) fail_open: bool,
    pub(crate) release_in_background: bool,
    pub(crate) max_key_len: usize,
    pub(crate) on_rejection: Option<RejectionHandler>,
    pub(crate) renewal: Renewal,
    /// `None`: 500 ms or the renewal interval, whichever is shorter.
    pub(crate) renew_timeout: Option<Duration>,
    pub(crate) max_hold: Option<Duration>,
    /// `None`: a tenth of the TTL.
    pub(crate) min_validity: Option<Duration>,
    pub(crate) lease_lost: LeaseLostPolicy,
    pub(crate) hold_through_body: bool,
    pub(crate) fencing: bool,
    pub(crate) log_keys: bool,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("namespace", &self.namespace)
            .field("ttl", &self.ttl)
            .field("renew_every", &self.renewal_interval())
            .field("renew_timeout", &self.renew_timeout())
            .field("acquire_timeout", &self.acquire_timeout)
            .field("release_timeout", &self.release_timeout)
            .field("min_validity", &self.min_validity())
            .field("max_hold", &self.max_hold)
            .field("fail_open", &self.fail_open)
            .field("release_in_background", &self.release_in_background)
            .field("hold_through_body", &self.hold_through_body)
            .field("lease_lost", &self.lease_lost)
            .field("fencing", &self.fencing)
            .field("max_key_len", &self.max_key_len)
            .field("log_keys", &self.log_keys)
            .field("on_rejection", &self.on_rejection.as_ref().map(|_| "<fn>"))
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: "tower-lock:".into(),
            ttl: Duration::from_secs(10),
            acquire_timeout: Duration::from_millis(500),
            release_timeout: Duration::from_millis(500),
            fail_open: false,
            release_in_background: false,
            max_key_len: 256,
            on_rejection: None,
            renewal: Renewal::Auto,
            renew_timeout: None,
            max_hold: None,
            min_validity: None,
            lease_lost: LeaseLostPolicy::Signal,
            hold_through_body: false,
            fencing: true,
            log_keys: false,
        }
    }
}

impl Config {
    /// The name of the lock for `key`: the namespace, then the key as a Redis Cluster hash tag
    /// (`ns{key}`), or a digest of the key when it is longer than `max_key_len`.
    pub(crate) fn lock_name(&self, key: &LockKey) -> LockName {
        /// What the empty key is named in a lock name.
        const EMPTY_KEY: &str = "#empty";
        if key.is_empty() {
            // `ns{}` would not be a hash tag: Redis Cluster would hash the lock and its fence
            // counter (`ns{}:fence`) to different slots. Material and literals never give `#`,
            // and a digest is `#` and 64 hex digits, so this name is the empty key's alone.
            LockName::new(&self.namespace, EMPTY_KEY)
        } else if key.len() <= self.max_key_len {
            LockName::new(&self.namespace, key.as_str())
        } else {
            let digest = sha2::Sha256::digest(key.as_str().as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            LockName::new(&self.namespace, &format!("#{hex}"))
        }
    }

    /// How often to renew, or `None` when renewal is off. Computed against the TTL in effect, so
    /// a `renew_every` set before a shorter `ttl` (in `LockRoutes::defaults`, say) is rescaled:
    /// never more than half the TTL, so that a renewal can fail and be retried before the lease
    /// runs out.
    pub(crate) fn renewal_interval(&self) -> Option<Duration> {
        let every = match self.renewal {
            Renewal::Auto => self.ttl / 3,
            Renewal::Every(every) => every.min(self.ttl / 2),
            Renewal::Off => return None,
        };
        Some(every.max(Duration::from_millis(1)))
    }

    /// The timeout of one extend call (it is also cut short where the lease's validity ends).
    pub(crate) fn renew_timeout(&self) -> Duration {
        self.renew_timeout.unwrap_or_else(|| {
            self.renewal_interval()
                .map_or(DEFAULT_RENEW_TIMEOUT, |every| {
                    every.min(DEFAULT_RENEW_TIMEOUT)
                })
        })
    }

    pub(crate) fn min_validity(&self) -> Duration {
        self.min_validity.unwrap_or(self.ttl / 10)
    }

    pub(crate) fn respond(&self, rejection: Rejection) -> Response<Bytes> {
        match &self.on_rejection {
            Some(handler) => handler(rejection),
            None => rejection.into_response(),
        }
    }
}

const DEFAULT_RENEW_TIMEOUT: Duration = Duration::from_millis(500);

/// What every service and response of one layer shares: backend, settings, renewal task.
///
/// The renewal schedule is shared by every clone, so a layer reconfigured from another, or from
/// a [`Locks`](crate::Locks) engine, keeps renewing on the same task (each lease carries its own
/// TTL and interval).
pub(crate) struct Core<B> {
    pub(crate) backend: B,
    pub(crate) config: Config,
    pub(crate) renewer: Arc<Renewer<B>>,
}

impl<B: LockBackend> Core<B> {
    /// Starts renewing `lease`, acquired at `started`, on `runtime`, with this core's settings.
    pub(crate) fn renew(&self, lease: &LockLease, started: Instant, runtime: &Handle) {
        let config = &self.config;
        self.renewer.watch(
            lease.clone(),
            Plan {
                ttl: config.ttl,
                every: config.renewal_interval(),
                renew_until: config.max_hold.and_then(|max| started.checked_add(max)),
                valid_until: lease.valid_until(),
                timeout: config.renew_timeout(),
            },
            runtime,
        );
    }
}

impl<B: LockBackend> Clone for Core<B> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            config: self.config.clone(),
            renewer: self.renewer.clone(),
        }
    }
}

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
    core: Arc<Core<B>>,
}

impl<K: std::fmt::Debug, B> std::fmt::Debug for LockLayer<K, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockLayer")
            .field("extractor", &self.extractor)
            .field("config", &self.core.config)
            .finish_non_exhaustive()
    }
}

impl<K, B: LockBackend> LockLayer<K, B> {
    /// Locks on the key `extractor` finds, in `backend`, with the default settings: TTL 10 s
    /// renewed every 3.3 s, acquire and release timeouts 500 ms, fail-closed (503), release awaited
    /// before the response is returned, namespace `tower-lock:`.
    pub fn new(backend: B, extractor: K) -> Self {
        Self {
            extractor,
            core: Arc::new(Core {
                renewer: Arc::new(Renewer::new(backend.clone())),
                backend,
                config: Config::default(),
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
    pub fn from_locks(locks: &crate::Locks<B>, extractor: K) -> Self {
        locks.base().clone().with_extractor(extractor)
    }

    fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(&mut Arc::make_mut(&mut self.core).config);
        self
    }

    /// The prefix of every key this layer stores (default `tower-lock:`). It is not escaped: a
    /// `{...}` in it would put every lock of the layer in one Redis Cluster hash slot.
    pub fn namespace(self, namespace: &str) -> Self {
        let namespace = namespace.into();
        self.with(|c| c.namespace = namespace)
    }

    /// The lease of each lock (default 10 s): how long it outlives a crashed holder. Renewal keeps
    /// it alive while the request runs. Values are clamped to [`MIN_TTL`] (10 ms: a shorter lease
    /// could not be renewed before it runs out) and [`MAX_TTL`] (365 days: every backend can keep
    /// a lease that long, and deadlines that far ahead never overflow).
    ///
    /// [`MIN_TTL`]: crate::backend::MIN_TTL
    /// [`MAX_TTL`]: crate::backend::MAX_TTL
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with(|c| c.ttl = ttl.clamp(crate::backend::MIN_TTL, crate::backend::MAX_TTL))
    }

    /// How long an acquire may take before the request is answered 503 (default 500 ms).
    pub fn acquire_timeout(self, timeout: Duration) -> Self {
        self.with(|c| c.acquire_timeout = timeout)
    }

    /// How long a release may take (default 500 ms); after that the lock expires with its TTL.
    pub fn release_timeout(self, timeout: Duration) -> Self {
        self.with(|c| c.release_timeout = timeout)
    }

    /// When the backend fails, call the inner service without a lock (and trace a warning)
    /// instead of answering 503. Default: `false` (fail closed).
    pub fn fail_open(self, fail_open: bool) -> Self {
        self.with(|c| c.fail_open = fail_open)
    }

    /// Return the response without waiting for the release round trip; the release runs on the
    /// runtime. Saves one backend round trip of latency, at the price that a client which sends
    /// its next same-key request right after reading the response may meet its own lock (409).
    /// Default: `false`.
    pub fn release_in_background(self, background: bool) -> Self {
        self.with(|c| c.release_in_background = background)
    }

    /// Keys longer than this many bytes (after escaping) are replaced by their SHA-256 digest
    /// (default 256).
    pub fn max_key_len(self, max: usize) -> Self {
        self.with(|c| c.max_key_len = max)
    }

    /// Answers rejections (409, 400, 503) with your own response instead of problem+json.
    ///
    /// Your response replaces the default one entirely: add `Retry-After` from
    /// [`Rejection::retry_after_secs`] if you want clients to keep it.
    ///
    /// ```
    /// use tower_lock::{LockLayer, MemoryBackend, Rejection, key::Global};
    ///
    /// let layer = LockLayer::new(MemoryBackend::new(), Global::new("report"))
    ///     .on_rejection(|rejection: Rejection| {
    ///         http::Response::builder()
    ///             .status(rejection.status())
    ///             .body(format!("busy: {}", rejection.status()))
    ///             .unwrap()
    ///     });
    /// ```
    pub fn on_rejection<F, T>(self, handler: F) -> Self
    where
        F: Fn(Rejection) -> Response<T> + Send + Sync + 'static,
        T: Into<Bytes>,
    {
        let handler: RejectionHandler = Arc::new(move |r| handler(r).map(Into::into));
        self.with(|c| c.on_rejection = Some(handler))
    }

    /// Renew the lease this often while the request runs (default: a third of the TTL).
    ///
    /// Clamped to between 1 ms and half the TTL in effect when a lock is taken (so a policy's
    /// shorter [`ttl`](Self::ttl) rescales it). The first renewal comes one interval after the
    /// acquire, or one interval before the lease would run out if that is sooner (after a slow
    /// acquire); a failed renewal is retried every third of the interval until the lease's
    /// validity runs out.
    pub fn renew_every(self, every: Duration) -> Self {
        self.with(|c| c.renewal = Renewal::Every(every.max(Duration::from_millis(1))))
    }

    /// Never renew: the lock lasts one TTL at most, and the handler is told when it has run out.
    pub fn no_renewal(self) -> Self {
        self.with(|c| c.renewal = Renewal::Off)
    }

    /// How long one renewal (extend) call may take before it counts as failed and is retried
    /// (default: 500 ms or the renewal interval, whichever is shorter). Whatever this is, a call
    /// still running when the lease's validity ends is given up then, and the lease is reported
    /// lost at that moment.
    pub fn renew_timeout(self, timeout: Duration) -> Self {
        self.with(|c| c.renew_timeout = Some(timeout))
    }

    /// Stop renewing this long after acquiring (default: renew for as long as the request runs;
    /// bound requests with an outer timeout). The lock then expires within one TTL, and the
    /// handler's lease reports it lost.
    pub fn max_hold(self, max_hold: Duration) -> Self {
        self.with(|c| c.max_hold = Some(max_hold))
    }

    /// Refuse (503) a lock that has less than this validity left once acquired, e.g. after a slow
    /// acquire (default: a tenth of the TTL).
    pub fn min_validity(self, min: Duration) -> Self {
        self.with(|c| c.min_validity = Some(min))
    }

    /// What happens when the lease is lost while the handler runs (default
    /// [`LeaseLostPolicy::Signal`]).
    pub fn on_lease_lost(self, policy: LeaseLostPolicy) -> Self {
        self.with(|c| c.lease_lost = policy)
    }

    /// Keep the lock (and its renewal) until the response body has been sent or dropped, not just
    /// until the handler returns. For streaming responses. Default: `false`.
    pub fn hold_through_body(self, hold: bool) -> Self {
        self.with(|c| c.hold_through_body = hold)
    }

    /// Hand out fencing tokens (default `true`). On Redis each lock key then has a counter key
    /// that is kept forever (a few dozen bytes); turn fencing off for unbounded key spaces such as
    /// idempotency keys, where [`LockLease::fencing_token`](crate::LockLease::fencing_token) is 0.
    pub fn fencing(self, fencing: bool) -> Self {
        self.with(|c| c.fencing = fencing)
    }

    /// Put the lock's key in traces instead of a short hash of it (default `false`: keys are
    /// request material, such as account ids or idempotency keys).
    pub fn log_keys(self, log_keys: bool) -> Self {
        self.with(|c| c.log_keys = log_keys)
    }

    /// The same settings (and renewal task) with another key extractor.
    pub(crate) fn with_extractor<K2>(self, extractor: K2) -> LockLayer<K2, B> {
        LockLayer {
            extractor,
            core: self.core,
        }
    }

    pub(crate) fn core(&self) -> &Arc<Core<B>> {
        &self.core
    }

    /// How many leases this layer's renewal schedule holds, and how many it has room for. For
    /// tests; not part of the API.
    #[doc(hidden)]
    pub fn renewal_entries(&self) -> (usize, usize) {
        self.core.renewer.stored()
    }

    /// The backend name this layer uses for `key` (namespace, hash tag, digest of long keys).
    pub fn lock_name(&self, key: &LockKey) -> LockName {
        self.core.config.lock_name(key)
    }
}

impl<S, K, B> Layer<S> for LockLayer<K, B>
where
    K: KeyExtractor,
    B: LockBackend,
{
    type Service = LockService<S, K, B>;

    fn layer(&self, inner: S) -> Self::Service {
        LockService::new(inner, self.extractor.clone(), self.core.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_are_replaced_by_a_digest() {
        let config = Config {
            max_key_len: 8,
            ..Config::default()
        };
        let short = config.lock_name(&LockKey::new("12345678"));
        assert_eq!(short.lock_key(), "tower-lock:{12345678}");
        let long = config.lock_name(&LockKey::new("123456789"));
        assert!(long.lock_key().starts_with("tower-lock:{#"));
        assert_eq!(long.lock_key().len(), "tower-lock:{#}".len() + 64);
        assert_ne!(long, config.lock_name(&LockKey::new("123456780")));
    }
}
