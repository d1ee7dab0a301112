//! The response body of a locked service: the inner body, or a rejection's problem+json.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::task::JoinHandle;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::guard::HeldLock;

/// The error type of [`LockBody`]: the inner body's error, or the lease lost mid-body under
/// [`LeaseLostPolicy::Abort`](crate::LeaseLostPolicy::Abort).
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The lock a hold-through-body response carries until its last frame.
pub(crate) struct BodyLock {
    held: Box<dyn HeldLock>,
    /// Under `Abort`: completes when the lease is lost.
    lost: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// Release in the background (`release_in_background`) instead of before the end.
    background: bool,
    /// Bytes of the declared `Content-Length` not sent yet: a client that has them all stops
    /// reading, so the frame that completes them is the last.
    remaining: Option<u64>,
    /// The response of a gRPC call: a lost lease ends it with `UNAVAILABLE` trailers.
    grpc: bool,
}

impl BodyLock {
    pub(crate) fn new(
        held: Box<dyn HeldLock>,
        lost: Option<WaitForCancellationFutureOwned>,
        background: bool,
        declared_length: Option<u64>,
    ) -> Self {
        Self {
            held,
            lost: lost.map(Box::pin),
            background,
            remaining: declared_length,
            grpc: false,
        }
    }

    /// Marks the response as a gRPC call's (see [`crate::grpc`]).
    pub(crate) fn grpc(mut self, grpc: bool) -> Self {
        self.grpc = grpc;
        self
    }
}

/// The error a held-through body ends with when its lease is lost under `Abort`: the client must
/// not take the truncated body for a complete one.
#[derive(Debug)]
struct LeaseLostMidBody;

impl std::fmt::Display for LeaseLostMidBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the lock's lease was lost while the response body was being sent")
    }
}

impl std::error::Error for LeaseLostMidBody {}

pin_project! {
    /// The body of every response of a [`LockService`](crate::LockService).
    ///
    /// Either the inner service's body, unchanged, or the problem+json body of a rejection. In
    /// hold-through-body mode it holds the lock until the body is fully sent or dropped: the
    /// compare-and-delete completes *before* the body reports its end (before its last data
    /// frame when the inner body knows it is the last, else before the end of the stream), so a
    /// client that reads the whole body and sends its next same-key request never meets its own
    /// lock (unless [`release_in_background`](crate::LockLayer::release_in_background) is set).
    /// Under [`LeaseLostPolicy::Abort`](crate::LeaseLostPolicy::Abort), a lease lost while the
    /// body streams ends the body with an error, never with a clean (truncated) end (a gRPC
    /// call's body ends with trailers saying `UNAVAILABLE`: see [`crate::grpc`]).
    ///
    /// Its `Data` is the inner body's, which must be constructible from [`Bytes`] — true for
    /// axum's `Body`, `String`, hyper's `Full<Bytes>`, the `http-body-util` bodies over `Bytes`
    /// and most others. Its `Error` is a `Box<dyn Error + Send + Sync>` (the inner body's error,
    /// boxed, or the lost lease), which axum and hyper accept.
    pub struct LockBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner {
            #[pin]
            body: B,
            lock: Option<BodyLock>,
            // The release in flight, and the frame (or end, `None`) held back until it is done.
            releasing: Option<JoinHandle<()>>,
            // (As `Bytes`: the struct does not bound `B`; a zero-copy move for `Bytes` data.)
            held_back: Option<Option<Frame<Bytes>>>,
            // The body ended with an error: nothing more to send.
            failed: bool,
        },
        Rejection {
            data: Option<Bytes>,
        },
    }
}

impl<B> LockBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self::with_lock(body, None)
    }

    pub(crate) fn holding(body: B, lock: BodyLock) -> Self {
        Self::with_lock(body, Some(lock))
    }

    fn with_lock(body: B, lock: Option<BodyLock>) -> Self {
        Self {
            kind: Kind::Inner {
                body,
                lock,
                releasing: None,
                held_back: None,
                failed: false,
            },
        }
    }

    pub(crate) fn rejection(data: Bytes) -> Self {
        Self {
            // An empty body (a gRPC Trailers-Only response) is over before it starts, so hyper
            // sends its headers as the whole response.
            kind: Kind::Rejection {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl<B> std::fmt::Debug for LockBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Inner {
                lock, releasing, ..
            } => f
                .debug_struct("LockBody::Inner")
                .field("holds_lock", &(lock.is_some() || releasing.is_some()))
                .finish_non_exhaustive(),
            Kind::Rejection { data } => f
                .debug_struct("LockBody::Rejection")
                .field("data", data)
                .finish(),
        }
    }
}

impl<B> Body for LockBody<B>
where
    B: Body,
    B::Data: From<Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner {
                mut body,
                lock,
                releasing,
                held_back,
                failed,
            } => loop {
                if let Some(handle) = releasing {
                    // A failed or cancelled release was reported (or the runtime is gone and the
                    // lock expires with its TTL): either way the body may end now.
                    let _ = ready!(Pin::new(handle).poll(cx));
                    *releasing = None;
                }
                if let Some(frame) = held_back.take() {
                    return Poll::Ready(frame.map(|frame| Ok(frame.map_data(B::Data::from))));
                }
                if *failed {
                    return Poll::Ready(None);
                }
                if let Some(held) = lock
                    && let Some(lost) = held.lost.as_mut()
                    && lost.as_mut().poll(cx).is_ready()
                {
                    // Abort: the lease is gone. Release (compare-and-delete never touches a new
                    // holder's lock) in the background and fail the body (a gRPC call: end it
                    // with an `UNAVAILABLE` status).
                    let grpc = held.grpc;
                    if let Some(held) = lock.take() {
                        drop(held.held.release());
                    }
                    *failed = true;
                    if grpc {
                        let trailers = crate::grpc::lease_lost_trailers();
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    return Poll::Ready(Some(Err(Box::new(LeaseLostMidBody))));
                }
                let frame = ready!(body.as_mut().poll_frame(cx));
                let last = match &frame {
                    // The last frame: trailers (hyper ends the body after them), a data frame
                    // the inner body knows is its last, or the one that completes the declared
                    // length. Release before it is sent: a client that has the whole body stops
                    // reading there.
                    Some(Ok(frame)) => {
                        let completes = match (frame.data_ref(), lock.as_mut()) {
                            (Some(data), Some(held)) => {
                                held.remaining.as_mut().is_some_and(|left| {
                                    let sent = u64::try_from(data.remaining()).unwrap_or(u64::MAX);
                                    *left = left.saturating_sub(sent);
                                    *left == 0
                                })
                            }
                            _ => false,
                        };
                        frame.is_trailers()
                            || (frame.is_data() && (completes || body.is_end_stream()))
                    }
                    None => true,
                    Some(Err(_)) => {
                        // The response is broken: release now, in the background.
                        if let Some(held) = lock.take() {
                            drop(held.held.release());
                        }
                        *failed = true;
                        false
                    }
                };
                let frame = match frame {
                    Some(Ok(frame)) => Some(frame),
                    None => None,
                    Some(Err(error)) => return Poll::Ready(Some(Err(error.into()))),
                };
                match lock.take() {
                    Some(held) if last => {
                        let handle = held.held.release();
                        if !held.background {
                            *releasing = Some(handle);
                        }
                        *held_back =
                            Some(frame.map(|frame| {
                                frame.map_data(|mut d| d.copy_to_bytes(d.remaining()))
                            }));
                    }
                    other => {
                        *lock = other;
                        return Poll::Ready(frame.map(Ok));
                    }
                }
            },
            KindProj::Rejection { data } => {
                Poll::Ready(data.take().map(|data| Ok(Frame::data(data.into()))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            // Not over while the lock is held or its release is in flight: the caller must poll
            // once more, and that poll completes the release.
            Kind::Inner {
                body,
                lock,
                releasing,
                held_back,
                failed,
            } => {
                *failed
                    || (lock.is_none()
                        && releasing.is_none()
                        && held_back.is_none()
                        && body.is_end_stream())
            }
            Kind::Rejection { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner {
                body, held_back, ..
            } => {
                let held = match held_back {
                    Some(Some(frame)) => frame.data_ref().map_or(0, |d| d.len() as u64),
                    _ => 0,
                };
                let inner = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(held));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(held));
                }
                hint
            }
            Kind::Rejection { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
