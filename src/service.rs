//! [`LockService`]: the middleware made by [`LockLayer`](crate::LockLayer).

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use crate::backend::LockBackend;
use crate::body::LockBody;
use crate::config::Shared;
use crate::future::ResponseFuture;
use crate::key::KeyExtractor;

/// Locks each request on its key, then calls the inner service. Made by
/// [`LockLayer`](crate::LockLayer); see the crate docs for the semantics.
pub struct LockService<S, K, B> {
    inner: S,
    extractor: K,
    shared: Arc<Shared<B>>,
}

impl<S, K, B> LockService<S, K, B> {
    pub(crate) fn new(inner: S, extractor: K, shared: Arc<Shared<B>>) -> Self {
        Self {
            inner,
            extractor,
            shared,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, K: Clone, B> Clone for LockService<S, K, B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            extractor: self.extractor.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: std::fmt::Debug, K: std::fmt::Debug, B> std::fmt::Debug for LockService<S, K, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockService")
            .field("inner", &self.inner)
            .field("extractor", &self.extractor)
            .finish_non_exhaustive()
    }
}

impl<S, K, B, ReqB, ResB> Service<Request<ReqB>> for LockService<S, K, B>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    ResB: http_body::Body,
    K: KeyExtractor,
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
        let (parts, body) = request.into_parts();
        let key = self.extractor.extract(&parts);
        let request = Request::from_parts(parts, body);
        ResponseFuture::new(self.shared.clone(), key, inner, request)
    }
}

/// Takes the service that was driven to readiness, for this request (it is called once the lock
/// is held), and leaves a fresh clone behind for the next `poll_ready`.
pub(crate) fn take_ready<S: Clone>(ready: &mut S) -> S {
    let clone = ready.clone();
    std::mem::replace(ready, clone)
}
