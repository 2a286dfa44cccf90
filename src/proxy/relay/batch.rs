//! Frames already on their way are joined into one chunk, so hyper writes
//! them with one `writev`: hyper's client delivers one frame per wake-up,
//! and hyper's server flushes whenever the body is pending, so relaying
//! naively costs a syscall per SSE event on the client socket and a
//! wake-up of the client for each. Copying a few hundred bytes per event
//! is far cheaper than either.
//!
//! After the stream's first frame, and while frames come in a burst, the
//! body yields up to [`IDLE_YIELDS`] times to let the upstream connection
//! deliver the next, and hands the batch over when the yields bring
//! nothing. A burst is a frame that came while yielding, or less than
//! [`BURST_GAP`] after the one before. The first rule is what holds under
//! load: with a thousand streams on the runtime, a scheduler turn alone
//! can take longer than the gap, and a rule of time only turned every
//! event into a `writev` of its own. Tokens that come at generation pace
//! go out at once: batching costs them nothing, and never a timer.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// A batch stops growing at this size: it bounds the copy and the memory a
/// fast decoder can pile up before the client reads.
const MAX_BATCH_BYTES: usize = 64 << 10;

/// Yields without a new frame before a batch is handed over. Measured:
/// hyper's client connection task needs two scheduler turns to pass on a
/// frame it has already read; one is not enough.
const IDLE_YIELDS: u8 = 2;

/// Frames closer together than this are a burst worth batching; decoders
/// generate tokens milliseconds apart.
const BURST_GAP: Duration = Duration::from_micros(500);

pub struct Batch<B: Body> {
    inner: B,
    /// Data received and not yet handed over.
    gathered: Gathered,
    /// Upstream trailers, handed over after the data before them.
    trailers: Option<HeaderMap>,
    /// Yields since the last frame arrived, while gathering.
    idle_yields: u8,
    /// When the last frame arrived, to tell a burst from generation pace.
    last_frame: Option<Instant>,
    /// The last frame was the stream's first, came while the body was
    /// yielding for it, or came less than [`BURST_GAP`] after the one
    /// before: more is likely on its way.
    bursting: bool,
    /// `inner` has ended (or failed); what is left is the batch.
    inner_done: bool,
    /// An upstream failure, handed over after the data before it.
    error: Option<B::Error>,
    finished: bool,
}

impl<B: Body<Data = Bytes> + Unpin> Batch<B> {
    pub fn new(inner: B) -> Self {
        Batch {
            inner,
            gathered: Gathered::Empty,
            trailers: None,
            idle_yields: 0,
            last_frame: None,
            bursting: false,
            inner_done: false,
            error: None,
            finished: false,
        }
    }

    pub fn get_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    /// Nothing gathered is waiting to be handed over.
    fn nothing_gathered(&self) -> bool {
        self.gathered.is_empty() && self.trailers.is_none()
    }

    /// Gathers frames until upstream has nothing more right now. `Pending`
    /// while there is nothing to hand over, or while yielding for more.
    pub fn poll_gather(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while !self.inner_done && self.trailers.is_none() && self.gathered.len() < MAX_BATCH_BYTES {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let now = Instant::now();
                    self.bursting = self.idle_yields > 0
                        || self
                            .last_frame
                            .is_none_or(|last| now.duration_since(last) < BURST_GAP);
                    self.last_frame = Some(now);
                    self.idle_yields = 0;
                    match frame.into_data() {
                        Ok(data) => self.gathered.push(data),
                        Err(frame) => self.trailers = frame.into_trailers().ok(),
                    }
                }
                Poll::Ready(Some(Err(err))) => {
                    self.inner_done = true;
                    self.error = Some(err);
                }
                Poll::Ready(None) => self.inner_done = true,
                Poll::Pending if self.nothing_gathered() => return Poll::Pending,
                Poll::Pending if self.bursting && self.idle_yields < IDLE_YIELDS => {
                    self.idle_yields += 1;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Pending => break,
            }
        }
        self.idle_yields = 0;
        Poll::Ready(())
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Batch<B>
where
    B::Error: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        // Still gathering after a yield, or nothing left to hand over.
        if this.idle_yields > 0 || this.nothing_gathered() {
            std::task::ready!(this.poll_gather(cx));
        }
        let frame = match this.gathered.take() {
            Some(data) => Some(Frame::data(data)),
            None => this.trailers.take().map(Frame::trailers),
        };
        if let Some(frame) = frame {
            return Poll::Ready(Some(Ok(frame)));
        }
        this.finished = true;
        match this.error.take() {
            Some(err) => Poll::Ready(Some(Err(err))),
            None => Poll::Ready(None),
        }
    }

    /// Everything upstream sent has been handed over. With a
    /// Content-Length, hyper stops polling after the last byte, so the
    /// caller learns of the end here, not from a final `None`.
    fn is_end_stream(&self) -> bool {
        self.finished
            || (self.nothing_gathered()
                && self.error.is_none()
                && (self.inner_done || self.inner.is_end_stream()))
    }

    /// What upstream has yet to send plus what is gathered and not handed
    /// over (the first bytes are gathered before hyper asks).
    fn size_hint(&self) -> SizeHint {
        let gathered = self.gathered.len() as u64;
        let upstream = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(upstream.lower() + gathered);
        if let Some(upper) = upstream.upper() {
            hint.set_upper(upper + gathered);
        }
        hint
    }
}

/// Data gathered for one hand-over. A lone frame is passed on as it came
/// (a large JSON answer is not copied); only a second frame starts a copy.
#[derive(Default)]
enum Gathered {
    #[default]
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl Gathered {
    fn len(&self) -> usize {
        match self {
            Gathered::Empty => 0,
            Gathered::One(b) => b.len(),
            Gathered::Many(b) => b.len(),
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Gathered::Empty)
    }

    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        *self = match std::mem::take(self) {
            Gathered::Empty => Gathered::One(data),
            Gathered::One(first) => {
                let mut joined = BytesMut::with_capacity((first.len() + data.len()) * 2);
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&data);
                Gathered::Many(joined)
            }
            Gathered::Many(mut joined) => {
                joined.extend_from_slice(&data);
                Gathered::Many(joined)
            }
        };
    }

    fn take(&mut self) -> Option<Bytes> {
        match std::mem::take(self) {
            Gathered::Empty => None,
            Gathered::One(b) => Some(b),
            Gathered::Many(b) => Some(b.freeze()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::relay::testing::{channel, next, next_data};

    fn frame(b: &'static [u8]) -> Result<Frame<Bytes>, std::io::Error> {
        Ok(Frame::data(Bytes::from_static(b)))
    }

    #[test]
    fn a_lone_frame_is_handed_over_without_a_copy() {
        let frame = Bytes::from_static(b"data: {\"a\":1}\n\n");
        let mut batch = Gathered::default();
        batch.push(Bytes::new());
        assert!(batch.is_empty(), "empty frames are not batched");
        batch.push(frame.clone());
        let out = batch.take().unwrap();
        assert_eq!(out.as_ptr(), frame.as_ptr());
        assert!(batch.is_empty() && batch.take().is_none());
    }

    #[test]
    fn frames_in_flight_are_joined_in_order() {
        let frames: [&[u8]; 3] = [b"data: 1\n\n", b"data: 2\n", b"\ndata: [DONE]\n\n"];
        let mut batch = Gathered::default();
        for f in frames {
            batch.push(Bytes::from_static(f));
        }
        assert_eq!(batch.len(), frames.concat().len());
        assert_eq!(batch.take().unwrap(), frames.concat());
        assert!(batch.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_already_on_its_way_goes_out_as_one_chunk() {
        let (tx, body) = channel();
        let mut batch = Batch::new(body);
        for f in [&b"data: 1\n\n"[..], b"data: 2\n\n", b"data: [DONE]\n\n"] {
            tx.send(Ok(Frame::data(Bytes::from_static(f))))
                .await
                .unwrap();
        }
        drop(tx);
        let out = next_data(&mut batch).await;
        assert_eq!(out, &b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"[..]);
        assert!(batch.is_end_stream());
        assert!(next(&mut batch).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_at_generation_pace_go_out_one_by_one_without_a_timer() {
        let (tx, body) = channel();
        let mut batch = Batch::new(body);
        let sender = tokio::spawn(async move {
            for f in [&b"data: 1\n\n"[..], b"data: 2\n\n", b"data: 3\n\n"] {
                tx.send(frame(f)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let started = Instant::now();
        for (i, want) in [&b"data: 1\n\n"[..], b"data: 2\n\n", b"data: 3\n\n"]
            .iter()
            .enumerate()
        {
            let out = next_data(&mut batch).await;
            assert_eq!(&out[..], *want);
            assert_eq!(
                started.elapsed(),
                Duration::from_millis(5 * i as u64),
                "handed over as it came"
            );
        }
        sender.await.unwrap();
        assert!(next(&mut batch).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_comes_after_the_data_before_it_and_trailers_after_data() {
        let (tx, body) = channel();
        let mut batch = Batch::new(body);
        tx.send(frame(b"partial")).await.unwrap();
        tx.send(Err(std::io::Error::other("reset"))).await.unwrap();
        let out = next_data(&mut batch).await;
        assert_eq!(out, &b"partial"[..]);
        assert!(!batch.is_end_stream(), "the error is still to come");
        assert!(next(&mut batch).await.unwrap().is_err());
        assert!(next(&mut batch).await.is_none());

        let (tx, body) = channel();
        let mut batch = Batch::new(body);
        tx.send(frame(b"data")).await.unwrap();
        let mut trailers = HeaderMap::new();
        trailers.insert("x-t", http::HeaderValue::from_static("1"));
        tx.send(Ok(Frame::trailers(trailers))).await.unwrap();
        drop(tx);
        let first = next(&mut batch).await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), &b"data"[..]);
        let second = next(&mut batch).await.unwrap().unwrap();
        assert!(second.is_trailers());
        assert!(next(&mut batch).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_stops_growing_at_its_cap() {
        let (tx, body) = channel();
        let mut batch = Batch::new(body);
        static BIG: [u8; 40 << 10] = [b'x'; 40 << 10];
        for _ in 0..3 {
            tx.send(frame(&BIG)).await.unwrap();
        }
        drop(tx);
        let first = next_data(&mut batch).await;
        assert_eq!(
            first.len(),
            80 << 10,
            "two frames reach the cap; the third waits"
        );
        let second = next_data(&mut batch).await;
        assert_eq!(second.len(), 40 << 10);
        assert!(next(&mut batch).await.is_none());
    }
}
