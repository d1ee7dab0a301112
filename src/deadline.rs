//! Backend calls bounded by a timeout whose timer is armed only when the call does not complete
//! at once: an in-process backend answers at its first poll, and then a timer (a clock read and a
//! runtime handle per call, twice per request) would only be overhead.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tokio::task::coop::{Unconstrained, unconstrained};
use tokio::time::{Instant, Sleep};

/// The call did not complete before its deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Elapsed;

pin_project! {
    /// A call bounded by a deadline, or by a timeout counted from its first poll.
    pub(crate) struct Bounded<F> {
        #[pin]
        call: F,
        limit: Limit,
        // Armed at the first poll that leaves the call pending. Polled unconstrained (as tokio's
        // `Timeout` polls its delay once the call has used up the task's budget), so that a call
        // that keeps the budget spent cannot keep the deadline from firing.
        #[pin]
        timer: Option<Unconstrained<Sleep>>,
    }
}

#[derive(Clone, Copy, Debug)]
enum Limit {
    /// Fires at this instant (`None`: never).
    At(Option<Instant>),
    /// Fires this long after the first poll that leaves the call pending.
    After(Duration),
}

impl<F: Future> Bounded<F> {
    /// `call`, failing with [`Elapsed`] at `deadline` (never if `None`).
    pub(crate) fn until(call: F, deadline: Option<Instant>) -> Self {
        Self {
            call,
            limit: Limit::At(deadline),
            timer: None,
        }
    }

    /// `call`, failing with [`Elapsed`] once it has been pending for `timeout`.
    pub(crate) fn after(call: F, timeout: Duration) -> Self {
        Self {
            call,
            limit: Limit::After(timeout),
            timer: None,
        }
    }

    /// Polls the call, then, if it is pending, its timer, armed on `runtime` (the current one if
    /// `None`) if it is not yet.
    pub(crate) fn poll_on(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        runtime: Option<&Handle>,
    ) -> Poll<Result<F::Output, Elapsed>> {
        let mut this = self.project();
        if let Poll::Ready(output) = this.call.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        if this.timer.is_none() {
            let deadline = match *this.limit {
                Limit::At(deadline) => deadline,
                Limit::After(timeout) => Instant::now().checked_add(timeout),
            };
            // Computed once: a deadline past what an `Instant` holds is never reached.
            *this.limit = Limit::At(deadline);
            let Some(deadline) = deadline else {
                return Poll::Pending;
            };
            let _entered = runtime.map(Handle::enter);
            this.timer
                .set(Some(unconstrained(tokio::time::sleep_until(deadline))));
        }
        match this.timer.as_pin_mut() {
            Some(timer) => timer.poll(cx).map(|()| Err(Elapsed)),
            None => Poll::Pending,
        }
    }
}

impl<F: Future> Future for Bounded<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.poll_on(cx, None)
    }
}

#[cfg(test)]
mod tests {
    use std::future::{pending, ready};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_call_that_completes_at_once_arms_no_timer() {
        let mut call = std::pin::pin!(Bounded::after(ready(7), Duration::from_millis(10)));
        let waker = futures_util::task::noop_waker();
        let polled = call.as_mut().poll(&mut Context::from_waker(&waker));
        assert_eq!(polled, Poll::Ready(Ok(7)));
        assert!(call.timer.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pending_call_times_out_after_its_timeout_from_the_first_poll() {
        let start = Instant::now();
        let outcome = Bounded::after(pending::<()>(), Duration::from_millis(300)).await;
        assert_eq!(outcome, Err(Elapsed));
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pending_call_times_out_at_its_deadline() {
        let deadline = Instant::now() + Duration::from_millis(200);
        tokio::time::advance(Duration::from_millis(50)).await;
        let outcome = Bounded::until(pending::<()>(), Some(deadline)).await;
        assert_eq!(outcome, Err(Elapsed));
        assert_eq!(Instant::now(), deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_without_deadline_is_never_cut() {
        let call = async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            1
        };
        assert_eq!(Bounded::until(call, None).await, Ok(1));
    }
}
