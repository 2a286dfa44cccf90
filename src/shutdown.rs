//! A shutdown as one value. `serve` begins its stages one after another;
//! each port, connection and request waits for the stage that concerns
//! it, reading the same value rather than a channel handed down to it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio_util::sync::{
    CancellationToken, WaitForCancellationFuture, WaitForCancellationFutureOwned,
};

/// A stage of a shutdown. `serve` begins them in this order; `Cut` only
/// when requests are still running as the drain ends, and a port that
/// fails goes straight to `Kill`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The API and metrics ports accept no more connections, and the open
    /// ones are asked to finish (idle keep-alive ones close at once).
    StopApi,
    /// The drain's time is up: every request still running ends with an
    /// error its client can see (an SSE error event, a 503) rather than a
    /// connection closed mid-answer.
    Cut,
    /// The telemetry port stops likewise, once no request can still be
    /// waiting for an event.
    StopTelemetry,
    /// The open connections are dropped.
    Kill,
}

/// Where a shutdown has got to. The `App` holds it, so the request path
/// reaches the cut through the state it already has.
#[derive(Debug, Default)]
pub struct Shutdown {
    inner: Arc<Stages>,
}

#[derive(Debug, Default)]
struct Stages {
    /// One token per [`Stage`], in its order.
    tokens: [CancellationToken; 4],
    /// Whether each stage has begun: read without a lock on every poll of
    /// a wait (a token's own check takes its mutex, and every connection
    /// polls two waits at each wake-up).
    begun: [AtomicBool; 4],
}

impl Stages {
    fn begin(&self, stage: Stage) {
        self.begun[stage as usize].store(true, Ordering::Release);
        self.tokens[stage as usize].cancel();
    }
}

impl Shutdown {
    fn token(&self, stage: Stage) -> &CancellationToken {
        &self.inner.tokens[stage as usize]
    }

    /// Begins `stage`; every wait for it ends. Beginning it again does
    /// nothing.
    pub fn begin(&self, stage: Stage) {
        self.inner.begin(stage);
    }

    /// Ready once `stage` has begun (at once if it already has).
    pub fn reached(&self, stage: Stage) -> Reached<'_> {
        Reached {
            begun: &self.inner.begun[stage as usize],
            wait: self.token(stage).cancelled(),
            waker: None,
        }
    }

    /// A handle on `stage` to wait on later: a relayed body keeps it and
    /// makes its wait only if the stream ever waits.
    pub fn handle(&self, stage: Stage) -> StageHandle {
        StageHandle {
            stages: Arc::clone(&self.inner),
            stage,
        }
    }

    pub fn has_reached(&self, stage: Stage) -> bool {
        self.inner.begun[stage as usize].load(Ordering::Acquire)
    }

    /// Begins [`Stage::Kill`] when dropped: a `serve` that is itself
    /// dropped (its task aborted) drops its connections too, as one that
    /// returns does.
    pub fn kill_on_drop(&self) -> KillOnDrop {
        KillOnDrop(Arc::clone(&self.inner))
    }
}

pub struct KillOnDrop(Arc<Stages>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.begin(Stage::Kill);
    }
}

/// A stage of one shutdown, to wait for from a future that must own its
/// wait, as a response body polled after its handler returned does.
#[derive(Debug, Clone)]
pub struct StageHandle {
    stages: Arc<Stages>,
    stage: Stage,
}

impl StageHandle {
    pub fn reached(self) -> ReachedOwned {
        let wait = self.stages.tokens[self.stage as usize]
            .clone()
            .cancelled_owned();
        ReachedOwned {
            handle: self,
            wait,
            waker: None,
        }
    }
}

pin_project_lite::pin_project! {
    /// A wait for a stage, borrowing the shutdown.
    pub struct Reached<'a> {
        begun: &'a AtomicBool,
        #[pin]
        wait: WaitForCancellationFuture<'a>,
        waker: Option<Waker>,
    }
}

pin_project_lite::pin_project! {
    /// A wait for a stage that owns its handle on the shutdown.
    pub struct ReachedOwned {
        handle: StageHandle,
        #[pin]
        wait: WaitForCancellationFutureOwned,
        waker: Option<Waker>,
    }
}

impl Future for Reached<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        poll_stage(this.begun, this.wait, this.waker, cx)
    }
}

impl Future for ReachedOwned {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let begun = &this.handle.stages.begun[this.handle.stage as usize];
        poll_stage(begun, this.wait, this.waker, cx)
    }
}

/// A wait polled again by the task it last registered reads the stage's
/// flag and nothing else: the token's wait is polled only to register a
/// new waker. A token's own check takes its mutex, and every connection
/// and every waiting stream polls such a wait at each wake-up.
fn poll_stage(
    begun: &AtomicBool,
    wait: Pin<&mut impl Future<Output = ()>>,
    waker: &mut Option<Waker>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    // `begin` sets the flag before it wakes the waiters, so a woken task
    // sees it.
    if begun.load(Ordering::Acquire) {
        return Poll::Ready(());
    }
    if waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        return Poll::Pending;
    }
    let polled = wait.poll(cx);
    if polled.is_pending() {
        *waker = Some(cx.waker().clone());
    }
    polled
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use super::*;

    #[tokio::test]
    async fn a_stage_ends_only_its_own_waits() {
        let shutdown = Shutdown::default();
        shutdown.begin(Stage::StopApi);
        shutdown.reached(Stage::StopApi).await;
        assert!(!shutdown.has_reached(Stage::Cut));
        assert!(!shutdown.has_reached(Stage::Kill));
        let cut = shutdown.handle(Stage::Cut).reached();
        shutdown.begin(Stage::Cut);
        cut.await;
        drop(shutdown.kill_on_drop());
        assert!(shutdown.has_reached(Stage::Kill));
        assert!(!shutdown.has_reached(Stage::StopTelemetry));
    }

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_wait_polled_again_by_its_task_is_still_woken_by_begin() {
        let shutdown = Shutdown::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        let mut wait = std::pin::pin!(shutdown.reached(Stage::Kill));
        for _ in 0..3 {
            assert!(wait.as_mut().poll(&mut cx).is_pending());
        }
        shutdown.begin(Stage::Kill);
        assert_eq!(count.0.load(Ordering::Relaxed), 1, "woken once");
        assert!(wait.as_mut().poll(&mut cx).is_ready());
        // A wait made after the stage began is ready at once.
        let mut late = std::pin::pin!(shutdown.reached(Stage::Kill));
        assert!(late.as_mut().poll(&mut cx).is_ready());
        // The same for a wait that owns its handle.
        let mut owned = Box::pin(shutdown.handle(Stage::Cut).reached());
        assert!(owned.as_mut().poll(&mut cx).is_pending());
        assert!(owned.as_mut().poll(&mut cx).is_pending());
        shutdown.begin(Stage::Cut);
        assert_eq!(count.0.load(Ordering::Relaxed), 2, "woken by the cut");
        assert!(owned.as_mut().poll(&mut cx).is_ready());
    }
}
