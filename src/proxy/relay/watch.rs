//! Deadlines on a stream in flight: a decoder that goes silent past
//! `--stream-idle-timeout` after it started, and the shutdown drain's cut.
//! Either ends the stream as a [`Break`]; the layer above decides what the
//! client sees of it.

use std::fmt;
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::shutdown::{ReachedOwned, StageHandle};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// Why a stream ended before its decoder finished it.
#[derive(Debug)]
pub enum Break<E> {
    /// The decoder's body failed.
    Upstream(E),
    /// The decoder sent nothing for this long.
    Idle(Duration),
    /// The shutdown drain's time is up.
    Drain,
}

impl<E: fmt::Display> fmt::Display for Break<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Break::Upstream(e) => write!(f, "the decoder stream broke: {e}"),
            Break::Idle(limit) => write!(
                f,
                "the decoder sent nothing for {:.1}s (--stream-idle-timeout)",
                limit.as_secs_f64()
            ),
            Break::Drain => f.write_str(
                "the proxy is shutting down and its drain time is up; the answer is incomplete",
            ),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for Break<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Break::Upstream(e) => Some(e),
            _ => None,
        }
    }
}

pub struct Watch<B> {
    inner: B,
    idle_limit: Duration,
    /// When the last frame came. Until the first, the wait is the first
    /// byte's, bounded by the relay phase: a request queued in the engine
    /// may take long to start, and that is not a stall.
    last_frame: Option<Instant>,
    /// Armed the first time the stream waits after a frame; moved on to
    /// the latest frame's deadline only when it fires. Boxed and made on
    /// demand: a stream that never waits needs none.
    idle: Option<Pin<Box<Sleep>>>,
    cut: StageHandle,
    /// The wait for the cut, made the first time the stream waits.
    cut_wait: Option<Pin<Box<ReachedOwned>>>,
    /// A break was reported: the stream is over.
    ended: bool,
}

impl<B> Watch<B> {
    pub fn new(inner: B, idle_limit: Duration, cut: StageHandle) -> Self {
        Watch {
            inner,
            idle_limit,
            last_frame: None,
            idle: None,
            cut,
            cut_wait: None,
            ended: false,
        }
    }

    /// `Ready` when the stream must end without the decoder.
    fn poll_break<E>(&mut self, cx: &mut Context<'_>) -> Poll<Break<E>> {
        if let Some(since) = self.last_frame {
            let deadline = since + self.idle_limit;
            // Frames move the deadline on without touching the timer: the
            // sleep is moved only when it fires before the deadline of the
            // latest frame. Moved on every frame, it would be registered
            // with the timer wheel again for each.
            let idle = self
                .idle
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            while idle.as_mut().poll(cx).is_ready() {
                if idle.deadline() >= deadline {
                    return Poll::Ready(Break::Idle(self.idle_limit));
                }
                idle.as_mut().reset(deadline);
            }
        }
        let cut = self
            .cut_wait
            .get_or_insert_with(|| Box::pin(self.cut.clone().reached()));
        if cut.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Break::Drain);
        }
        Poll::Pending
    }
}

impl<B: Body + Unpin> Body for Watch<B> {
    type Data = B::Data;
    type Error = Break<B::Error>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let polled = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.last_frame = Some(Instant::now());
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => Break::Upstream(e),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => std::task::ready!(this.poll_break(cx)),
        };
        this.ended = true;
        Poll::Ready(Some(Err(polled)))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::relay::testing::{channel, next, no_cut};
    use crate::shutdown::{Shutdown, Stage};
    use bytes::Bytes;

    const LIMIT: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn silence_after_a_frame_breaks_at_the_idle_limit() {
        let (tx, body) = channel();
        let mut watch = Watch::new(body, LIMIT, no_cut());
        tx.send(Ok(Frame::data(Bytes::from_static(b"data: 1\n\n"))))
            .await
            .unwrap();
        assert!(next(&mut watch).await.unwrap().is_ok());
        let started = Instant::now();
        let end = next(&mut watch).await.unwrap();
        assert!(matches!(end, Err(Break::Idle(l)) if l == LIMIT));
        assert_eq!(started.elapsed(), LIMIT);
        assert!(next(&mut watch).await.is_none(), "a break ends the stream");
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn each_frame_moves_the_idle_deadline_on() {
        let (tx, body) = channel();
        let mut watch = Watch::new(body, LIMIT, no_cut());
        let started = Instant::now();
        for _ in 0..3 {
            tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
                .await
                .unwrap();
            assert!(next(&mut watch).await.unwrap().is_ok());
            tokio::time::advance(LIMIT - Duration::from_secs(1)).await;
        }
        let end = next(&mut watch).await.unwrap();
        assert!(matches!(end, Err(Break::Idle(_))));
        assert_eq!(
            started.elapsed(),
            2 * (LIMIT - Duration::from_secs(1)) + LIMIT
        );
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_byte_has_no_idle_limit() {
        let (tx, body) = channel();
        let mut watch = Watch::new(body, LIMIT, no_cut());
        let waited = tokio::time::timeout(10 * LIMIT, next(&mut watch)).await;
        assert!(waited.is_err(), "still waiting for the first frame");
        drop(tx);
        assert!(next(&mut watch).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_cut_breaks_a_waiting_stream() {
        let (tx, body) = channel();
        let shutdown = Shutdown::default();
        let mut watch = Watch::new(body, LIMIT, shutdown.handle(Stage::Cut));
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            shutdown.begin(Stage::Cut);
        });
        let end = next(&mut watch).await.unwrap();
        assert!(matches!(end, Err(Break::Drain)));
        canceller.await.unwrap();
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_error_is_a_break() {
        let (tx, body) = channel();
        let mut watch = Watch::new(body, LIMIT, no_cut());
        tx.send(Err(std::io::Error::other("reset"))).await.unwrap();
        let end = next(&mut watch).await.unwrap();
        assert!(matches!(end, Err(Break::Upstream(_))));
        assert!(watch.is_end_stream());
    }
}
