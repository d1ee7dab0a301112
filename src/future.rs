//! [`ResponseFuture`]: acquire, call the inner service, release.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tower_service::Service;

use crate::acquire::{Attempt, Attempted};
use crate::backend::{
    BackendError, BackendErrorKind, BackendFuture, LockBackend, LockName, Release,
};
use crate::body::{BodyLock, LockBody};
use crate::config::{HttpConfig, LeaseLostPolicy, Shared};
use crate::deadline::Bounded;
use crate::guard::LockGuard;
use crate::key::{KeyRejection, LockKey};
use crate::response::Rejection;
use crate::wait::Waiting;
use crate::wait::estimate::TimedHold;

pin_project! {
    /// The response future of [`LockService`](crate::LockService).
    ///
    /// The lock is owned by a guard inside this future (or, in hold-through-body mode, inside
    /// the response body), so it is released however the future ends: completion, error, panic,
    /// or drop. Its states:
    ///
    /// ```text
    ///  new ──(no key for the request; no runtime under fail-open)──▶ PassThrough ──▶ Done
    ///   │ ──(key rejected: 400, or 500 when misconfigured;
    ///   │    no runtime: 503)────────────────────────────────────▶ Rejected ─────▶ Done
    ///   ▼ key
    ///  Acquiring ──(backend failed, fail-open)──────────────────▶ PassThrough
    ///   │ ──(held by another: 409; backend failed: 503)─────────▶ Rejected
    ///   │ ──(taken with too little validity: 503)─────┐
    ///   ▼ locked                                       ▼
    ///  Calling ──(inner future done; lease lost under Abort)──▶ Releasing ────▶ Done
    ///   └──(hold-through-body, or release-in-background)──────▶ Done: the lock is released
    ///                                                            by the body, or in the background
    /// ```
    ///
    /// Dropped in any state, it releases what it holds: `Acquiring` cleans up whatever the
    /// acquire may have taken, `Calling` and `Releasing` release the lock in the background.
    pub struct ResponseFuture<S, ReqB, B>
    where
        S: Service<Request<ReqB>>,
        B: LockBackend,
    {
        shared: Arc<Shared<B>>,
        span: tracing::Span,
        // A HEAD request: its response has no body to hold the lock through.
        head: bool,
        // A gRPC call: rejections are answered with a gRPC status.
        grpc: bool,
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
        // No lock for this request: the inner future, as it is.
        PassThrough {
            #[pin]
            future: S::Future,
        },
        Acquiring {
            #[pin]
            attempt: Attempt<B>,
            // The inner service and the request, until the lock is held (always `Some` while
            // in this state).
            pending: Option<(S, Request<ReqB>)>,
            // Under a wait policy: what a wait needs, if the lock is held.
            wait: Option<WaitFor>,
        },
        // Under a wait policy, in the key's local queue (see `crate::wait`).
        Waiting {
            waiting: Waiting<B>,
            pending: Option<(S, Request<ReqB>)>,
            name: LockName,
        },
        Calling {
            #[pin]
            future: S::Future,
            // When the lock was taken: the hold time (to the response, or under hold-through-body
            // to the end of the body) feeds the layer's `Retry-After` estimate.
            since: Instant,
            // The lock: `Some` while in this state, taken when it is left.
            guard: Option<LockGuard<B>>,
            // Set under `LeaseLostPolicy::Abort`: completes when the lease is lost.
            #[pin]
            lost: Option<WaitForCancellationFutureOwned>,
        },
        Releasing {
            #[pin]
            release: Bounded<BackendFuture<Release>>,
            // `Some` while in this state: disarmed once the release has completed.
            guard: Option<LockGuard<B>>,
            output: Option<Outcome<S::Response, S::Error>>,
        },
        Rejected {
            rejection: Option<Rejection>,
        },
        Done,
    }
}

/// What a request under a wait policy needs to wait, if its first attempt finds the lock held.
struct WaitFor {
    key: LockKey,
    name: LockName,
    runtime: Handle,
    until: Instant,
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
        shared: Arc<Shared<B>>,
        key: Result<Option<LockKey>, KeyRejection>,
        mut inner: S,
        request: Request<ReqB>,
    ) -> Self {
        let head = request.method() == http::Method::HEAD;
        let grpc = crate::grpc::is_grpc(request.headers());
        let mut span = tracing::Span::none();
        let state = match key {
            Ok(None) => State::PassThrough {
                future: inner.call(request),
            },
            Err(rejection) => {
                tracing::debug!(%rejection, "request rejected: no lock key");
                State::Rejected {
                    rejection: Some(Rejection::from(rejection)),
                }
            }
            Ok(Some(key)) => match Handle::try_current() {
                Ok(runtime) => {
                    let core = &shared.core;
                    let name = core.settings.lock_name(&key);
                    span = tracing::debug_span!("tower_lock", lock = %name.label(core.settings.log_keys()));
                    match core.settings.wait() {
                        None => State::Acquiring {
                            attempt: core.attempt(key, name, runtime, false),
                            pending: Some((inner, request)),
                            wait: None,
                        },
                        Some(max) => {
                            let until = Instant::now().checked_add(max);
                            match until {
                                // Local waiters are ahead: queue behind them.
                                Some(until) if core.has_waiters(&name) => State::Waiting {
                                    waiting: core.wait(key, name.clone(), runtime, until, None),
                                    pending: Some((inner, request)),
                                    name,
                                },
                                Some(until) => State::Acquiring {
                                    attempt: core.attempt(
                                        key.clone(),
                                        name.clone(),
                                        runtime.clone(),
                                        false,
                                    ),
                                    pending: Some((inner, request)),
                                    wait: Some(WaitFor {
                                        key,
                                        name,
                                        runtime,
                                        until,
                                    }),
                                },
                                None => State::Acquiring {
                                    attempt: core.attempt(key, name, runtime, false),
                                    pending: Some((inner, request)),
                                    wait: None,
                                },
                            }
                        }
                    }
                }
                Err(_) => unlocked(
                    &shared.http,
                    BackendError::new(
                        BackendErrorKind::Unavailable,
                        "no Tokio runtime to run the lock backend on",
                    ),
                    inner,
                    request,
                ),
            },
        };
        Self {
            shared,
            span,
            head,
            grpc,
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
        let http = &this.shared.http;
        loop {
            match this.state.as_mut().project() {
                StateProj::PassThrough { future } => {
                    let output = ready!(future.poll(cx));
                    this.state.set(State::Done);
                    return Poll::Ready(output.map(|r| r.map(LockBody::inner)));
                }
                StateProj::Acquiring {
                    attempt,
                    pending,
                    wait,
                } => {
                    let attempted = ready!(attempt.poll(cx));
                    let Some((inner, request)) = pending.take() else {
                        unreachable!("the acquiring state always carries its request");
                    };
                    let next = match (attempted, wait.take()) {
                        (Attempted::Held(remaining), Some(wait)) => State::Waiting {
                            waiting: this.shared.core.wait(
                                wait.key,
                                wait.name.clone(),
                                wait.runtime,
                                wait.until,
                                remaining,
                            ),
                            pending: Some((inner, request)),
                            name: wait.name,
                        },
                        (attempted, _) => {
                            attempted_next(this.shared, attempted, None, inner, request)
                        }
                    };
                    this.state.set(next);
                }
                StateProj::Waiting {
                    waiting,
                    pending,
                    name,
                } => {
                    let attempted = ready!(waiting.as_mut().poll(cx));
                    let Some((inner, request)) = pending.take() else {
                        unreachable!("the waiting state always carries its request");
                    };
                    let name = name.clone();
                    let next = attempted_next(this.shared, attempted, Some(&name), inner, request);
                    this.state.set(next);
                }
                StateProj::Calling {
                    future,
                    since,
                    guard,
                    lost,
                } => {
                    if let Some(lost) = lost.as_pin_mut()
                        && lost.poll(cx).is_ready()
                    {
                        http.hold_times.observe(since.elapsed());
                        // Abort: drop the inner future, release (never touching another
                        // holder's lock), then answer 503.
                        let Some(guard) = guard.take() else {
                            unreachable!("the calling state always holds its lock");
                        };
                        this.state
                            .set(release(guard, Outcome::Rejected(Rejection::LeaseLost)));
                        continue;
                    }
                    let output = ready!(future.poll(cx));
                    let since = *since;
                    let Some(guard) = guard.take() else {
                        unreachable!("the calling state always holds its lock");
                    };
                    match output {
                        Ok(response)
                            if http.hold_through_body
                                && has_body_to_send(*this.head, &response) =>
                        {
                            this.state.set(State::Done);
                            let lost = (http.lease_lost == LeaseLostPolicy::Abort)
                                .then(|| guard.lease().lost_owned());
                            // Held until the body ends: the hold is timed until then.
                            let held =
                                TimedHold::new(Box::new(guard), http.hold_times.clone(), since);
                            let lock = BodyLock::new(
                                Box::new(held),
                                lost,
                                http.release_in_background,
                                declared_length(&response),
                            )
                            .grpc(*this.grpc);
                            let response = response.map(|body| LockBody::holding(body, lock));
                            return Poll::Ready(Ok(response));
                        }
                        output if http.release_in_background => {
                            http.hold_times.observe(since.elapsed());
                            drop(guard); // spawns the release
                            this.state.set(State::Done);
                            return Poll::Ready(output.map(|r| r.map(LockBody::inner)));
                        }
                        output => {
                            http.hold_times.observe(since.elapsed());
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
                        let timeout = guard.release_timeout();
                        guard.finish(released.map_err(|_| timeout));
                    }
                    let output = output.take();
                    this.state.set(State::Done);
                    return Poll::Ready(match output {
                        Some(Outcome::Inner(output)) => output.map(|r| r.map(LockBody::inner)),
                        Some(Outcome::Rejected(rejection)) => {
                            Ok(respond(http, *this.grpc, rejection))
                        }
                        None => unreachable!("the releasing state always carries its output"),
                    });
                }
                StateProj::Rejected { rejection } => {
                    let rejection = rejection.take();
                    this.state.set(State::Done);
                    let Some(rejection) = rejection else {
                        unreachable!("the rejected state always carries its rejection");
                    };
                    return Poll::Ready(Ok(respond(http, *this.grpc, rejection)));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// The backend could not lock the request: call the inner service unlocked (fail-open), or
/// answer 503.
fn unlocked<S, ReqB, B>(
    http: &HttpConfig,
    error: BackendError,
    mut inner: S,
    request: Request<ReqB>,
) -> State<S, ReqB, B>
where
    S: Service<Request<ReqB>>,
    B: LockBackend,
{
    if http.fail_open {
        tracing::warn!(%error, "lock backend failed; calling the service unlocked (fail-open)");
        State::PassThrough {
            future: inner.call(request),
        }
    } else {
        tracing::warn!(%error, "lock backend failed; answering 503");
        State::Rejected {
            rejection: Some(Rejection::BackendUnavailable(error)),
        }
    }
}

/// The lock is held (and renewed): hand the handler its lease and call the inner service.
fn locked<S, ReqB, B>(
    http: &HttpConfig,
    guard: LockGuard<B>,
    mut inner: S,
    mut request: Request<ReqB>,
) -> State<S, ReqB, B>
where
    S: Service<Request<ReqB>>,
    B: LockBackend,
{
    let lease = guard.lease();
    let lost = (http.lease_lost == LeaseLostPolicy::Abort).then(|| lease.lost_owned());
    request.extensions_mut().insert(lease.clone());
    State::Calling {
        future: inner.call(request),
        since: Instant::now(),
        guard: Some(guard),
        lost,
    }
}

/// The next state once the lock was taken, refused or could not be asked for. `queued`: the
/// lock's name, when the request waited (and may have left local waiters behind it).
fn attempted_next<S, ReqB, B>(
    shared: &Shared<B>,
    attempted: Attempted<B>,
    queued: Option<&LockName>,
    inner: S,
    request: Request<ReqB>,
) -> State<S, ReqB, B>
where
    S: Service<Request<ReqB>>,
    B: LockBackend,
{
    let http = &shared.http;
    match attempted {
        Attempted::Locked(guard) => locked(http, guard, inner, request),
        Attempted::TooLittleValidity(guard, validity) => release(
            guard,
            Outcome::Rejected(Rejection::InsufficientValidity { validity }),
        ),
        Attempted::Held(remaining) => {
            let core = &shared.core;
            let ahead = queued.map_or(0, |name| core.waiters(name));
            let renewed = core.settings.renewal_interval().is_some();
            State::Rejected {
                rejection: Some(Rejection::Conflict {
                    remaining,
                    retry_after: http.hold_times.estimate(remaining, ahead, renewed),
                }),
            }
        }
        Attempted::Failed(error) => unlocked(http, error, inner, request),
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

fn respond<ResB>(http: &HttpConfig, grpc: bool, rejection: Rejection) -> Response<LockBody<ResB>> {
    crate::telemetry::rejected(metric_reason(&rejection));
    http.respond(rejection, grpc).map(LockBody::rejection)
}

/// The `reason` label of `tower_lock_rejected_total` for `rejection`.
fn metric_reason(rejection: &Rejection) -> &'static str {
    match rejection {
        Rejection::Conflict { .. } => "conflict",
        Rejection::InvalidKey(_) => "invalid_key",
        Rejection::MisconfiguredKey(_) => "misconfigured_key",
        Rejection::BackendUnavailable(_) => "backend_unavailable",
        Rejection::InsufficientValidity { .. } => "insufficient_validity",
        Rejection::LeaseLost => "lease_lost",
    }
}
