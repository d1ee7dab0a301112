//! [`ResponseFuture`]: acquire, call the inner service, release.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tokio::time::{Instant, Timeout};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tower_service::Service;

use crate::backend::{
    Acquire, AcquireOptions, BackendError, BackendErrorKind, BackendFuture, LockBackend, LockToken,
    Release,
};
use crate::body::{BodyLock, LockBody};
use crate::guard::{AcquireCleanup, LockGuard, report_release};
use crate::key::{KeyRejection, LockKey};
use crate::layer::{Core, LeaseLostPolicy};
use crate::lease::LockLease;
use crate::response::Rejection;

pin_project! {
    /// The response future of [`LockService`](crate::LockService).
    ///
    /// Acquiring → calling the inner service → releasing. The lock is owned by a guard inside this
    /// future (or, in hold-through-body mode, inside the response body), so it is released however
    /// the future ends: completion, error, panic, or drop.
    pub struct ResponseFuture<S, ReqB, B>
    where
        S: Service<Request<ReqB>>,
        B: LockBackend,
    {
        core: Arc<Core<B>>,
        span: tracing::Span,
        // A HEAD request: its response has no body to hold the lock through.
        head: bool,
        #[pin]
        state: State<S, ReqB, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqB, B>
    where
        S: Service<Request<ReqB>>,
        B: LockBackend,
    {
        Acquiring {
            #[pin]
            acquire: Timeout<BackendFuture<Acquire>>,
            pending: Option<Pending<S, ReqB, B>>,
        },
        Calling {
            #[pin]
            future: S::Future,
            guard: Option<LockGuard<B>>,
            // Set under `LeaseLostPolicy::Abort`: completes when the lease is lost.
            #[pin]
            lost: Option<WaitForCancellationFutureOwned>,
        },
        Releasing {
            #[pin]
            release: Timeout<BackendFuture<Release>>,
            guard: Option<LockGuard<B>>,
            output: Option<Outcome<S::Response, S::Error>>,
        },
        Rejected {
            rejection: Option<Rejection>,
        },
        Done,
    }
}

/// What an acquiring request carries until the lock is held.
struct Pending<S, ReqB, B: LockBackend> {
    inner: S,
    request: Request<ReqB>,
    started: Instant,
    /// Deletes the lock if this future is dropped before the acquire's outcome is known.
    cleanup: AcquireCleanup<B>,
}

enum Outcome<R, E> {
    Inner(Result<R, E>),
    Rejected(Rejection),
}

impl<S, ReqB, B> ResponseFuture<S, ReqB, B>
where
    S: Service<Request<ReqB>>,
    B: LockBackend,
{
    pub(crate) fn new(
        core: Arc<Core<B>>,
        key: Result<Option<LockKey>, KeyRejection>,
        mut inner: S,
        request: Request<ReqB>,
    ) -> Self {
        let head = request.method() == http::Method::HEAD;
        let mut span = tracing::Span::none();
        let state = match key {
            Ok(None) => State::Calling {
                future: inner.call(request),
                guard: None,
                lost: None,
            },
            Err(rejection) => {
                tracing::debug!(%rejection, "request rejected: no lock key");
                State::Rejected {
                    rejection: Some(Rejection::from(rejection)),
                }
            }
            Ok(Some(key)) => match Handle::try_current() {
                Ok(runtime) => {
                    let name = core.config.lock_name(&key);
                    span = tracing::debug_span!("tower_lock", lock = %name.label(core.config.log_keys));
                    let token = LockToken::random();
                    let started = Instant::now();
                    let acquire = tokio::time::timeout(
                        core.config.acquire_timeout,
                        core.backend.acquire(
                            &name,
                            token,
                            AcquireOptions::new(core.config.ttl).fencing(core.config.fencing),
                        ),
                    );
                    State::Acquiring {
                        acquire,
                        pending: Some(Pending {
                            inner,
                            request,
                            started,
                            cleanup: AcquireCleanup::new(core.clone(), name, token, runtime),
                        }),
                    }
                }
                Err(_) => {
                    let error = BackendError::new(
                        BackendErrorKind::Unavailable,
                        "no Tokio runtime to run the lock backend on",
                    );
                    if core.config.fail_open {
                        tracing::warn!(%error, "calling the service unlocked (fail-open)");
                        State::Calling {
                            future: inner.call(request),
                            guard: None,
                            lost: None,
                        }
                    } else {
                        tracing::warn!(%error, "answering 503");
                        State::Rejected {
                            rejection: Some(Rejection::BackendUnavailable(error)),
                        }
                    }
                }
            },
        };
        Self {
            core,
            span,
            head,
            state,
        }
    }
}

impl<S, ReqB, ResB, B> Future for ResponseFuture<S, ReqB, B>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: http_body::Body,
    B: LockBackend,
{
    type Output = Result<Response<LockBody<ResB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        let core: &Arc<Core<B>> = this.core;
        loop {
            match this.state.as_mut().project() {
                StateProj::Acquiring { acquire, pending } => {
                    let outcome = ready!(acquire.poll(cx));
                    let Some(pending) = pending.take() else {
                        unreachable!("the acquiring state always carries its request");
                    };
                    let next = acquired(core, pending, outcome);
                    this.state.set(next);
                }
                StateProj::Calling {
                    future,
                    guard,
                    lost,
                } => {
                    if let Some(lost) = lost.as_pin_mut()
                        && lost.poll(cx).is_ready()
                    {
                        // Abort: drop the inner future, release (never touching another
                        // holder's lock), then answer 503.
                        let rejection = Rejection::LeaseLost;
                        let next = match guard.take() {
                            Some(guard) => release(guard, Outcome::Rejected(rejection)),
                            None => State::Rejected {
                                rejection: Some(rejection),
                            },
                        };
                        this.state.set(next);
                        continue;
                    }
                    let output = ready!(future.poll(cx));
                    let Some(guard) = guard.take() else {
                        this.state.set(State::Done);
                        return Poll::Ready(output.map(|r| r.map(LockBody::inner)));
                    };
                    match output {
                        Ok(response)
                            if core.config.hold_through_body
                                && has_body_to_send(*this.head, &response) =>
                        {
                            this.state.set(State::Done);
                            let lost = (core.config.lease_lost == LeaseLostPolicy::Abort)
                                .then(|| guard.lease().lost_owned());
                            let lock = BodyLock::new(
                                Box::new(guard),
                                lost,
                                core.config.release_in_background,
                                declared_length(&response),
                            );
                            let response = response.map(|body| LockBody::holding(body, lock));
                            return Poll::Ready(Ok(response));
                        }
                        output if core.config.release_in_background => {
                            drop(guard); // spawns the release
                            this.state.set(State::Done);
                            return Poll::Ready(output.map(|r| r.map(LockBody::inner)));
                        }
                        output => {
                            let next = release(guard, Outcome::Inner(output));
                            this.state.set(next);
                        }
                    }
                }
                StateProj::Releasing {
                    release,
                    guard,
                    output,
                } => {
                    let released = ready!(release.poll(cx));
                    if let Some(guard) = guard.take() {
                        report_release(
                            &guard.lease().label(),
                            released.map_err(|_| core.config.release_timeout),
                        );
                        guard.disarm();
                    }
                    let output = output.take();
                    this.state.set(State::Done);
                    return Poll::Ready(match output {
                        Some(Outcome::Inner(output)) => output.map(|r| r.map(LockBody::inner)),
                        Some(Outcome::Rejected(rejection)) => Ok(respond(core, rejection)),
                        None => unreachable!("the releasing state always carries its output"),
                    });
                }
                StateProj::Rejected { rejection } => {
                    let rejection = rejection.take();
                    this.state.set(State::Done);
                    let Some(rejection) = rejection else {
                        unreachable!("the rejected state always carries its rejection");
                    };
                    return Poll::Ready(Ok(respond(core, rejection)));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// The state after an acquire attempt finished.
fn acquired<S, ReqB, B>(
    core: &Arc<Core<B>>,
    pending: Pending<S, ReqB, B>,
    outcome: Result<Result<Acquire, BackendError>, tokio::time::error::Elapsed>,
) -> State<S, ReqB, B>
where
    S: Service<Request<ReqB>>,
    B: LockBackend,
{
    let config = &core.config;
    let error = match outcome {
        Ok(Ok(Acquire::Acquired { fencing_token })) => {
            return locked(core, pending, fencing_token);
        }
        Ok(Ok(Acquire::Held { remaining })) => {
            pending.cleanup.disarm();
            tracing::debug!(?remaining, "lock held by another request");
            crate::telemetry::contended();
            return State::Rejected {
                rejection: Some(Rejection::Conflict { remaining }),
            };
        }
        // The SET may have landed although we got no answer: `pending.cleanup` deletes it (if
        // ours) when dropped below.
        Ok(Err(error)) => {
            crate::telemetry::backend_error("acquire");
            error
        }
        Err(_) => {
            crate::telemetry::backend_error("acquire");
            BackendError::timeout("lock acquire", config.acquire_timeout)
        }
    };
    if config.fail_open {
        tracing::warn!(%error, "lock backend failed; calling the service unlocked (fail-open)");
        let Pending {
            mut inner, request, ..
        } = pending;
        return State::Calling {
            future: inner.call(request),
            guard: None,
            lost: None,
        };
    }
    tracing::warn!(%error, "lock backend failed; answering 503");
    State::Rejected {
        rejection: Some(Rejection::BackendUnavailable(error)),
    }
}

/// The lock is ours: check its validity, start renewal, and call the inner service.
fn locked<S, ReqB, B>(
    core: &Arc<Core<B>>,
    pending: Pending<S, ReqB, B>,
    fencing_token: u64,
) -> State<S, ReqB, B>
where
    S: Service<Request<ReqB>>,
    B: LockBackend,
{
    let config = &core.config;
    let Pending {
        mut inner,
        mut request,
        started,
        cleanup,
    } = pending;
    // The guard made here owns the lock from now on.
    let (name, token, runtime) = cleanup.disarm();
    crate::telemetry::acquired(started.elapsed());
    let lease = LockLease::new(
        name,
        token,
        fencing_token,
        config.log_keys,
        started,
        config.ttl,
    );
    let guard = LockGuard::new(core.clone(), lease.clone(), runtime.clone());
    let validity = config.ttl.saturating_sub(started.elapsed());
    if validity < config.min_validity() {
        tracing::warn!(
            ?validity,
            "lock acquired with too little validity; releasing"
        );
        return release(
            guard,
            Outcome::Rejected(Rejection::InsufficientValidity { validity }),
        );
    }
    tracing::debug!(fencing_token, "lock acquired");
    core.renew(&lease, started, &runtime);
    let lost = (config.lease_lost == LeaseLostPolicy::Abort).then(|| lease.lost_owned());
    request.extensions_mut().insert(lease);
    State::Calling {
        future: inner.call(request),
        guard: Some(guard),
        lost,
    }
}

fn release<S, ReqB, B>(
    guard: LockGuard<B>,
    output: Outcome<S::Response, S::Error>,
) -> State<S, ReqB, B>
where
    S: Service<Request<ReqB>>,
    B: LockBackend,
{
    State::Releasing {
        release: guard.release(),
        guard: Some(guard),
        output: Some(output),
    }
}

/// Whether a held-through response has body frames the client will read: not for HEAD, 204 and
/// 304, nor for a body already known to be empty (hyper does not poll those, it drops them), so
/// the lock is released before such a response is returned, as without hold-through-body.
fn has_body_to_send<ResB: http_body::Body>(head: bool, response: &Response<ResB>) -> bool {
    let status = response.status();
    let body = response.body();
    !(head
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED
        || body.is_end_stream()
        || body.size_hint().exact() == Some(0))
}

/// The `Content-Length` a response declares: a client reading that many bytes has the whole body.
fn declared_length<ResB>(response: &Response<ResB>) -> Option<u64> {
    response
        .headers()
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn respond<B, ResB>(core: &Core<B>, rejection: Rejection) -> Response<LockBody<ResB>> {
    crate::telemetry::rejected(&rejection);
    core.config.respond(rejection).map(LockBody::rejection)
}
