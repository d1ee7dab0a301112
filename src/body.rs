//! The response body of a locked service: the inner body, or a rejection's problem+json.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// Something dropped when the body finishes: the lock guard in hold-through-body mode.
pub(crate) type BodyGuard = Box<dyn Send + Sync>;

pin_project! {
    /// The body of every response of a [`LockService`](crate::LockService).
    ///
    /// Either the inner service's body, unchanged (and, in hold-through-body mode, holding the lock
    /// until it is fully sent or dropped), or the problem+json body of a rejection. Its `Data` is
    /// the inner body's, which must be constructible from [`Bytes`] — true for axum's `Body`,
    /// hyper's `Full<Bytes>`, `String`-free `http-body-util` bodies and most others.
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
            guard: Option<BodyGuard>,
        },
        Rejection {
            data: Option<Bytes>,
        },
    }
}

impl<B> LockBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body, guard: None },
        }
    }

    pub(crate) fn holding(body: B, guard: BodyGuard) -> Self {
        Self {
            kind: Kind::Inner {
                body,
                guard: Some(guard),
            },
        }
    }

    pub(crate) fn rejection(data: Bytes) -> Self {
        Self {
            kind: Kind::Rejection { data: Some(data) },
        }
    }
}

impl<B> std::fmt::Debug for LockBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Inner { guard, .. } => f
                .debug_struct("LockBody::Inner")
                .field("holds_lock", &guard.is_some())
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
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body, guard } => {
                let frame = std::task::ready!(body.poll_frame(cx));
                if !matches!(frame, Some(Ok(_))) {
                    // End of stream or a body error: the response is over, release now.
                    guard.take();
                }
                Poll::Ready(frame)
            }
            KindProj::Rejection { data } => {
                Poll::Ready(data.take().map(|data| Ok(Frame::data(data.into()))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body, .. } => body.is_end_stream(),
            Kind::Rejection { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body, .. } => body.size_hint(),
            Kind::Rejection { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
