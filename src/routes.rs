//! [`LockRoutes`]: one table of `path pattern → policy` for stacks without axum's router.
//!
//! The layer matches each request itself (with [`matchit`](https://docs.rs/matchit), the matcher
//! axum uses): the **first** route whose pattern matches the path and whose policy applies to the
//! method wins (a policy for `GET` also applies to `HEAD`); requests no route matches pass through
//! unlocked. Patterns use axum 0.8's syntax: `/accounts/{id}`, `/files/v{version}`,
//! `/files/{*path}`. A pattern that no request could match (axum 0.7's `:id` and `*rest`, no
//! leading `/`, a `?query`, …) is refused by [`LockRoutes::route`], so no route silently runs
//! unlocked.
//!
//! # Spellings of a path
//!
//! A route cannot be bypassed by spelling its path another way. Each route, in order, is matched
//! against the path as it comes (as axum matches it, with the same parameters) and, if that
//! fails, against the path **normalized**: empty segments (`//`) and `.` segments dropped, `..`
//! removing the segment before it (never above `/`), a trailing `/` dropped — so `/jobs/7/run/`,
//! `//jobs/7/run`, `/jobs/7/./run` and `/jobs/x/../7/run` take the lock of `/jobs/7/run`, with
//! the same path parameters, and a table locks at least whatever axum routes to the same
//! pattern. The request goes on to the inner service unchanged.
//!
//! Percent-encoded separators (`%2F`, `%5C`, `%2E`, either case) are matched as axum matches
//! them — as part of a segment, so `/files/{*path}` sees `a%2Fb` as one value — but a path
//! that, with them decoded, would match **another** route (or one where the encoded spelling
//! matches none) is refused with **400**: `/jobs/7%2Frun` and `/jobs/x/%2e%2e/7/run` are
//! neither locked as `/jobs/{id}/run` nor let through unlocked to a router that decodes first.
//! Other percent-encodings are not decoded (`/jobs/7/%72un` is not `/jobs/7/run`), as in axum.
//!
//! Matching is **case-sensitive**, as axum's is: `/Jobs/7/run` does not match `/jobs/{id}/run`.
//! An inner router that matches case-insensitively, or decodes percent-encodings before
//! routing, must see a path made canonical before this layer (see the README's "Non-axum
//! stacks").
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Method, Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_lock::{LockPolicy, LockRoutes, MemoryBackend};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let routes = LockRoutes::new(MemoryBackend::new())
//!     .route(
//!         "/accounts/{id}/deposit",
//!         LockPolicy::template("account:{path.id}")?.methods([Method::POST]),
//!     )?
//!     .route("/reports/nightly", LockPolicy::template("report:nightly")?)?;
//!
//! let service = ServiceBuilder::new()
//!     .layer(routes)
//!     .service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(String::new())) });
//!
//! let request = Request::post("/accounts/42/deposit").body(())?;
//! assert_eq!(service.oneshot(request).await?.status(), StatusCode::OK);
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::backend::LockBackend;
use crate::body::LockBody;
use crate::config::Shared;
use crate::future::ResponseFuture;
use crate::key::normalize;
use crate::key::pattern::{Pattern, TableMatch};
use crate::key::{KeyExtractor, KeyRejection, TemplateError};
use crate::layer::LockLayer;
use crate::policy::{LockPolicy, PolicyKey};
use crate::service::take_ready;

/// A table of routes and their lock policies; a [`Layer`]. See the [module docs](self).
#[must_use = "a route table does nothing until it is applied to a service"]
pub struct LockRoutes<B> {
    base: LockLayer<(), B>,
    routes: Arc<Vec<Route<B>>>,
}

struct Route<B> {
    pattern: Arc<str>,
    matcher: Pattern,
    key: PolicyKey,
    /// Kept to apply again over new [`defaults`](LockRoutes::defaults).
    policy: LockPolicy,
    /// The table's defaults with the policy's settings over them.
    shared: Arc<Shared<B>>,
}

impl<B> Clone for Route<B> {
    fn clone(&self) -> Self {
        Self {
            pattern: self.pattern.clone(),
            matcher: self.matcher.clone(),
            key: self.key.clone(),
            policy: self.policy.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<B: LockBackend> Clone for LockRoutes<B> {
    fn clone(&self) -> Self {
        Self {
            base: self.base.clone(),
            routes: self.routes.clone(),
        }
    }
}

impl<B> fmt::Debug for LockRoutes<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.routes.iter().map(|r| (&r.pattern, &r.key)))
            .finish()
    }
}

/// A route that cannot be added: a bad pattern, or a key template that does not fit it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RouteError {
    /// The policy's key template refers to a path parameter the pattern does not have.
    Template(TemplateError),
    /// The pattern is not a valid route pattern.
    Pattern {
        /// The pattern.
        pattern: String,
        /// What is wrong with it.
        message: String,
    },
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Template(error) => error.fmt(f),
            Self::Pattern { pattern, message } => {
                write!(f, "route pattern `{pattern}`: {message}")
            }
        }
    }
}

impl std::error::Error for RouteError {}

impl From<TemplateError> for RouteError {
    fn from(error: TemplateError) -> Self {
        Self::Template(error)
    }
}

impl<B: LockBackend> LockRoutes<B> {
    /// An empty table on `backend`, with the default layer settings.
    pub fn new(backend: B) -> Self {
        Self {
            base: LockLayer::new(backend, ()),
            routes: Arc::default(),
        }
    }

    /// An empty table whose routes start from the settings and renewal task of `locks`, so
    /// that they and the jobs that lock through `locks` share locks and renewal.
    pub fn from_locks(locks: &crate::Locks<B>) -> Self {
        Self {
            base: LockLayer::from_locks(locks, ()),
            routes: Arc::default(),
        }
    }

    /// Changes the settings every route starts from (namespace, timeouts, …); a route's policy
    /// overrides them. Whatever the order of calls: routes added before or after take the same
    /// settings.
    ///
    /// ```
    /// # use tower_lock::{LockRoutes, MemoryBackend};
    /// let routes = LockRoutes::new(MemoryBackend::new()).defaults(|layer| layer.namespace("shop:"));
    /// ```
    pub fn defaults(
        mut self,
        configure: impl FnOnce(LockLayer<(), B>) -> LockLayer<(), B>,
    ) -> Self {
        self.base = configure(self.base);
        // Routes added before apply the new defaults too, under their own policies.
        let mut routes = std::mem::take(&mut self.routes);
        for route in Arc::make_mut(&mut routes) {
            route.shared = self.shared_for(&route.policy);
        }
        self.routes = routes;
        self
    }

    /// The defaults with `policy`'s settings over them.
    fn shared_for(&self, policy: &LockPolicy) -> Arc<Shared<B>> {
        policy.apply(self.base.clone()).shared().clone()
    }

    /// Adds a route: requests whose path matches `pattern`, with a method `policy` applies to, are
    /// locked by `policy`. Earlier routes win.
    ///
    /// A pattern that could never match a request would leave its route unlocked, so it is an
    /// error ([`RouteError::Pattern`], with a message naming the fix): every pattern axum 0.8
    /// refuses (`""`, no leading `/`, a segment starting with `:` or `*` — write `{id}` and
    /// `{*rest}` —, a malformed or misplaced parameter), and every pattern whose literal text has
    /// a character no request path contains (`?`, `#`, spaces, control characters, `<`, `>`,
    /// `` ` ``: the query and fragment are not part of the path, the rest arrive
    /// percent-encoded).
    pub fn route(mut self, pattern: &str, policy: LockPolicy) -> Result<Self, RouteError> {
        let refuse = |message: String| RouteError::Pattern {
            pattern: pattern.to_owned(),
            message,
        };
        let matcher = Pattern::parse(pattern).map_err(refuse)?;
        let key = policy.key_extractor().clone().for_pattern(pattern)?;
        let shared = self.shared_for(&policy);
        Arc::make_mut(&mut self.routes).push(Route {
            pattern: pattern.into(),
            matcher,
            key,
            policy,
            shared,
        });
        Ok(self)
    }
}

impl<S, B: LockBackend> Layer<S> for LockRoutes<B> {
    type Service = LockRoutesService<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        LockRoutesService {
            inner,
            routes: self.routes.clone(),
            fallback: self.base.shared().clone(),
        }
    }
}

/// The service made by [`LockRoutes`].
pub struct LockRoutesService<S, B> {
    inner: S,
    routes: Arc<Vec<Route<B>>>,
    fallback: Arc<Shared<B>>,
}

impl<S: Clone, B> Clone for LockRoutesService<S, B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            routes: self.routes.clone(),
            fallback: self.fallback.clone(),
        }
    }
}

impl<S: fmt::Debug, B> fmt::Debug for LockRoutesService<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockRoutesService")
            .field("inner", &self.inner)
            .field("routes", &self.routes.len())
            .finish()
    }
}

impl<S, B> LockRoutesService<S, B> {
    /// The first route whose policy applies to `method` and whose pattern matches `path`, as it
    /// is or else normalized, with the path parameters (of `path` as it is when it matches, as
    /// axum would give them).
    fn route_for(
        &self,
        method: &http::Method,
        path: &str,
    ) -> Option<(&Route<B>, crate::key::pattern::PathParams)> {
        let normal = normalize::normalize(path);
        let normal = (normal != path).then_some(normal);
        self.routes.iter().find_map(|route| {
            if !route.key.applies_to(method) {
                return None;
            }
            let params = route
                .matcher
                .matches(path)
                .or_else(|| route.matcher.matches(normal.as_deref()?))?;
            Some((route, params))
        })
    }
}

impl<S, B, ReqB, ResB> Service<Request<ReqB>> for LockRoutesService<S, B>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    ResB: http_body::Body,
    B: LockBackend,
{
    type Response = Response<LockBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let inner = take_ready(&mut self.inner);
        let (mut parts, body) = request.into_parts();
        let path = parts.uri.path();
        let matched = self.route_for(&parts.method, path);
        if normalize::has_encoded_separators(path) {
            let decoded = normalize::decode_separators(path);
            let other = self.route_for(&parts.method, &decoded);
            if let Some((other, _)) = other
                && matched
                    .as_ref()
                    .is_none_or(|(route, _)| !std::ptr::eq(*route, other))
            {
                let refused = Err(KeyRejection::new(
                    "the path's percent-encoded `/`, `\\` or `.` would make it another locked \
                     route: spell it without them",
                ));
                let shared = other.shared.clone();
                return ResponseFuture::new(
                    shared,
                    refused,
                    inner,
                    Request::from_parts(parts, body),
                );
            }
        }
        let (shared, key) = match matched {
            Some((route, params)) => {
                // The key reads the parameters and pattern of the route this table matched, not
                // those of a router around it (axum's `MatchedPath` may be `/api/{*rest}`).
                let previous = parts.extensions.insert(TableMatch {
                    pattern: route.pattern.clone(),
                    params,
                });
                let key = route.key.extract(&parts);
                match previous {
                    Some(previous) => parts.extensions.insert(previous),
                    None => parts.extensions.remove::<TableMatch>(),
                };
                (route.shared.clone(), key)
            }
            None => (self.fallback.clone(), Ok(None)),
        };
        ResponseFuture::new(shared, key, inner, Request::from_parts(parts, body))
    }
}
