//! Declarative protection: a [`LockPolicy`] says how one endpoint is locked.
//!
//! A policy is a key (a [template](crate::key::KeyTemplate) or any
//! [`KeyExtractor`]), the methods it applies to, and the settings that differ from the
//! layer's defaults (lease, hold-through-body, fail-open, …). It is used in one of two ways:
//!
//! - **axum (recommended):** turn it into a layer with [`LockPolicy::layer`] and attach it to the
//!   route with `route_layer`, so unmatched requests (404, 405) are never locked;
//! - **hyper / plain tower:** collect policies in a [`LockRoutes`](crate::LockRoutes) table, which
//!   matches method and path itself.
//!
//! ```
//! use std::time::Duration;
//! use http::Method;
//! use tower_lock::{LockPolicy, MemoryBackend};
//!
//! # fn main() -> Result<(), tower_lock::key::TemplateError> {
//! let deposit = LockPolicy::template("account:{path.id}")?
//!     .methods([Method::POST])
//!     .ttl(Duration::from_secs(5));
//! let layer = deposit.layer(MemoryBackend::new());
//! // axum: Router::new().route("/accounts/{id}/deposit", post(handler)).route_layer(layer)
//! # let _ = layer; Ok(()) }
//! ```

use std::sync::Arc;

use http::Method;
use http::request::Parts;

use crate::backend::LockBackend;
use crate::config::{HttpConfig, http_setters};
use crate::key::{DynExtract, KeyExtractor, KeyRejection, KeyTemplate, LockKey, TemplateError};
use crate::layer::LockLayer;
use crate::locks::Locks;
use crate::settings::{Settings, engine_setters};

/// One setting a policy changes, applied over the layer's (or engine's) settings in the order
/// the policy's builder methods were called; `Debug` shows it as `name: value`.
#[derive(Clone)]
struct Override {
    name: &'static str,
    value: String,
    change: Change,
}

#[derive(Clone)]
enum Change {
    Settings(Arc<dyn Fn(&mut Settings) + Send + Sync>),
    Http(Arc<dyn Fn(&mut HttpConfig) + Send + Sync>),
}

/// How one endpoint is locked. See the [module docs](self).
#[derive(Clone)]
#[must_use = "a policy does nothing until it is made a layer or added to a route table"]
pub struct LockPolicy {
    key: PolicyKey,
    overrides: Arc<Vec<Override>>,
}

/// The key extractor of a policy: its key source, applied only to the policy's methods.
#[derive(Clone)]
pub struct PolicyKey {
    source: KeySource,
    methods: Option<Arc<[Method]>>,
}

#[derive(Clone)]
enum KeySource {
    Template(KeyTemplate),
    Extractor(Arc<DynExtract>),
}

impl KeyExtractor for PolicyKey {
    fn extract(&self, parts: &Parts) -> Result<Option<LockKey>, KeyRejection> {
        if !self.applies_to(&parts.method) {
            return Ok(None);
        }
        match &self.source {
            KeySource::Template(template) => template.extract(parts),
            KeySource::Extractor(extract) => extract(parts),
        }
    }
}

impl PolicyKey {
    /// Whether requests with `method` are locked by this policy (see [`LockPolicy::methods`]).
    pub(crate) fn applies_to(&self, method: &Method) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|methods| covers(methods, method))
    }

    /// The key for a new layer: a template gets its own misconfiguration report (logged once per
    /// layer, not once for every layer made from this policy).
    pub(crate) fn for_layer(&self) -> Self {
        let mut key = self.clone();
        if let KeySource::Template(template) = &self.source {
            key.source = KeySource::Template(template.for_another_layer());
        }
        key
    }

    /// Gives a template key the route pattern it is attached to (checking its path parameters).
    pub(crate) fn for_pattern(mut self, pattern: &str) -> Result<Self, TemplateError> {
        if let KeySource::Template(template) = self.source {
            self.source = KeySource::Template(template.with_pattern(pattern)?);
        }
        Ok(self)
    }
}

/// Whether a list of methods covers `method`: it is listed, or it is `HEAD` and `GET` is listed.
///
/// A HEAD is a GET without the body, and routers (axum's `get`, hyper services matching GET)
/// run the GET handler for it: a lock that covers GET and not HEAD would let that handler run
/// unlocked beside a GET holding the lock.
pub(crate) fn covers(methods: &[Method], method: &Method) -> bool {
    methods.contains(method) || (*method == Method::HEAD && methods.contains(&Method::GET))
}

impl std::fmt::Debug for PolicyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut debug = f.debug_struct("PolicyKey");
        match &self.source {
            KeySource::Template(template) => debug.field("template", &template.as_str()),
            KeySource::Extractor(_) => debug.field("extractor", &"<fn>"),
        };
        debug.field("methods", &self.methods).finish()
    }
}

impl std::fmt::Debug for LockPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // What the policy sets, the last call of each setting winning; the rest comes from the
        // layer, table or engine the policy is used with.
        let mut debug = f.debug_struct("LockPolicy");
        debug.field("key", &self.key);
        for (i, set) in self.overrides.iter().enumerate() {
            let later = self.overrides[i + 1..].iter().any(|o| o.name == set.name);
            if !later {
                debug.field(set.name, &format_args!("{}", set.value));
            }
        }
        debug.finish()
    }
}

impl LockPolicy {
    /// A policy keyed by a [template](crate::key::KeyTemplate) such as `"account:{path.id}"`,
    /// compiled now: a bad template is an error here, never at request time.
    pub fn template(template: &str) -> Result<Self, TemplateError> {
        Ok(Self::from_source(KeySource::Template(KeyTemplate::parse(
            template,
        )?)))
    }

    /// A policy keyed by any extractor.
    pub fn key<K: KeyExtractor>(extractor: K) -> Self {
        Self::from_source(KeySource::Extractor(Arc::new(move |parts: &Parts| {
            extractor.extract(parts)
        })))
    }

    fn from_source(source: KeySource) -> Self {
        Self {
            key: PolicyKey {
                source,
                methods: None,
            },
            overrides: Arc::default(),
        }
    }

    /// Lock only requests with these methods; others pass through unlocked (default: all).
    ///
    /// `GET` covers `HEAD` too: axum (and most routers) answer a HEAD with the GET handler, so a
    /// HEAD must meet the lock a GET meets. The converse does not hold: a policy for `HEAD` alone
    /// does not lock `GET`.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.key.methods = Some(methods.into_iter().collect());
        self
    }

    fn settings(
        self,
        name: &'static str,
        value: String,
        change: impl Fn(&mut Settings) + Send + Sync + 'static,
    ) -> Self {
        self.set(name, value, Change::Settings(Arc::new(change)))
    }

    fn http(
        self,
        name: &'static str,
        value: String,
        change: impl Fn(&mut HttpConfig) + Send + Sync + 'static,
    ) -> Self {
        self.set(name, value, Change::Http(Arc::new(change)))
    }

    fn set(mut self, name: &'static str, value: String, change: Change) -> Self {
        Arc::make_mut(&mut self.overrides).push(Override {
            name,
            value,
            change,
        });
        self
    }

    engine_setters!();
    http_setters!();

    /// The layer for this policy with the default settings, for axum's `route_layer`.
    ///
    /// With the crate's `axum` feature, `{path.NAME}` reads axum's matched route. Without it, use
    /// [`LockPolicy::layer_for`] to give the route pattern.
    pub fn layer<B: LockBackend>(&self, backend: B) -> LockLayer<PolicyKey, B> {
        self.apply(LockLayer::new(backend, self.key.for_layer()))
    }

    /// The layer for this policy attached to the route `pattern` (e.g. `/accounts/{id}`), which
    /// `{path.NAME}` placeholders are checked against now.
    pub fn layer_for<B: LockBackend>(
        &self,
        backend: B,
        pattern: &str,
    ) -> Result<LockLayer<PolicyKey, B>, TemplateError> {
        let key = self.key.clone().for_pattern(pattern)?;
        Ok(self.apply(LockLayer::new(backend, key)))
    }

    /// The layer for this policy over the settings and renewal task of an engine (its
    /// namespace, lease, timeouts, …, with this policy's settings applied on top), for axum's
    /// `route_layer`: routes and the jobs that lock through `locks` share locks and renewal.
    ///
    /// ```
    /// use tower_lock::{LockPolicy, Locks, MemoryBackend};
    ///
    /// # fn main() -> Result<(), tower_lock::key::TemplateError> {
    /// let locks = Locks::new(MemoryBackend::new()).namespace("bank:");
    /// let layer = LockPolicy::template("account:{path.id}")?.layer_with(&locks);
    /// # let _ = layer; Ok(()) }
    /// ```
    pub fn layer_with<B: LockBackend>(&self, locks: &Locks<B>) -> LockLayer<PolicyKey, B> {
        self.apply(locks.layer(self.key.for_layer()))
    }

    /// [`LockPolicy::layer_with`] attached to the route `pattern`, which `{path.NAME}`
    /// placeholders are checked against now (see [`LockPolicy::layer_for`]).
    pub fn layer_for_with<B: LockBackend>(
        &self,
        locks: &Locks<B>,
        pattern: &str,
    ) -> Result<LockLayer<PolicyKey, B>, TemplateError> {
        let key = self.key.clone().for_pattern(pattern)?;
        Ok(self.apply(locks.layer(key)))
    }

    pub(crate) fn key_extractor(&self) -> &PolicyKey {
        &self.key
    }

    /// Applies this policy's settings over `layer`'s.
    pub(crate) fn apply<K, B: LockBackend>(&self, mut layer: LockLayer<K, B>) -> LockLayer<K, B> {
        for set in self.overrides.iter() {
            let (name, value) = (set.name, set.value.clone());
            layer = match set.change.clone() {
                Change::Settings(change) => layer.settings(name, value, move |s| change(s)),
                Change::Http(change) => layer.http(name, value, move |h| change(h)),
            };
        }
        layer
    }
}
