//! The end of an SSE stream as the client sees it. A stream that ends
//! without the decoder (it broke, went silent, or the drain cut it) gets
//! a proper ending: an error event in OpenAI's shape, then `[DONE]`, as
//! vLLM itself ends a stream that fails. It also remembers what the
//! request's record needs of the stream: when its first data came, and
//! whether its last bytes were `data: [DONE]`.

use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::watch::Break;
use crate::error::error_json;

pub const DONE: &[u8; 14] = b"data: [DONE]\n\n";

pub struct SseEnd<B, E> {
    inner: B,
    /// Whether the bytes relayed so far end on an event boundary, so the
    /// error event is not glued onto a half-sent one.
    ends_cleanly: bool,
    /// The last bytes relayed: a client may close as soon as it reads
    /// `data: [DONE]`, before the decoder's final chunk, and that answer
    /// was complete.
    tail: [u8; DONE.len()],
    first_data: Option<Instant>,
    /// Why the stream ended early, until the request's record takes it.
    broke: Option<Break<E>>,
    ended: bool,
}

impl<B, E> SseEnd<B, E> {
    pub fn new(inner: B) -> Self {
        SseEnd {
            inner,
            ends_cleanly: true,
            tail: [0; DONE.len()],
            first_data: None,
            broke: None,
            ended: false,
        }
    }

    /// When the decoder's first data came.
    pub fn first_data(&self) -> Option<Instant> {
        self.first_data
    }

    /// The stream's last bytes so far are `data: [DONE]`.
    pub fn saw_done(&self) -> bool {
        &self.tail == DONE
    }

    /// Why the stream ended early, once.
    pub fn take_break(&mut self) -> Option<Break<E>> {
        self.broke.take()
    }

    fn observe(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.first_data.is_none() {
            self.first_data = Some(Instant::now());
        }
        self.ends_cleanly = data.ends_with(b"\n\n");
        let keep = data.len().min(DONE.len());
        self.tail.copy_within(keep.., 0);
        let at = DONE.len() - keep;
        self.tail[at..].copy_from_slice(&data[data.len() - keep..]);
    }

    fn error_event(&self, message: &str, kind: &str, code: u16) -> Bytes {
        let event = error_json(message, kind, None, code);
        let mut out = Vec::with_capacity(event.len() + 32);
        if !self.ends_cleanly {
            out.extend_from_slice(b"\n\n");
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&event);
        out.extend_from_slice(b"\n\ndata: [DONE]\n\n");
        Bytes::from(out)
    }
}

impl<B, E> Body for SseEnd<B, E>
where
    B: Body<Data = Bytes, Error = Break<E>> + Unpin,
    E: fmt::Display + Unpin,
{
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.observe(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(cause)) => {
                this.ended = true;
                let (kind, code) = match &cause {
                    Break::Upstream(_) => ("BadGatewayError", 502),
                    Break::Idle(_) => ("GatewayTimeoutError", 504),
                    Break::Drain => ("ServiceUnavailableError", 503),
                };
                let event = this.error_event(&cause.to_string(), kind, code);
                this.broke = Some(cause);
                Poll::Ready(Some(Ok(Frame::data(event))))
            }
            None => {
                this.ended = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    /// A stream may grow an error event: no length is promised.
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::relay::testing::{channel, next, next_data, no_cut};
    use crate::proxy::relay::watch::Watch;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_broken_stream_ends_with_an_error_event_and_done() {
        let (tx, body) = channel();
        let mut sse = SseEnd::new(Watch::new(body, Duration::from_secs(5), no_cut()));
        tx.send(Ok(Frame::data(Bytes::from_static(
            b"data: {\"a\":1}\n\ndata: {\"b\"",
        ))))
        .await
        .unwrap();
        assert!(next_data(&mut sse).await.starts_with(b"data: {\"a\""));
        tx.send(Err(std::io::Error::other("connection reset")))
            .await
            .unwrap();
        let end = next_data(&mut sse).await;
        let text = std::str::from_utf8(&end).unwrap();
        assert!(
            text.starts_with("\n\ndata: {\"error\":"),
            "not glued onto the half event: {text}"
        );
        assert!(
            text.contains("the decoder stream broke: connection reset"),
            "{text}"
        );
        assert!(text.contains("\"code\":502"), "{text}");
        assert!(text.ends_with("\n\ndata: [DONE]\n\n"), "{text}");
        assert!(!sse.saw_done(), "the decoder never said [DONE]");
        assert!(matches!(sse.take_break(), Some(Break::Upstream(_))));
        assert!(sse.take_break().is_none(), "taken once");
        assert!(next(&mut sse).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_decoder_gets_a_504_event() {
        let (tx, body) = channel();
        let mut sse = SseEnd::new(Watch::new(body, Duration::from_secs(5), no_cut()));
        tx.send(Ok(Frame::data(Bytes::from_static(b"data: 1\n\n"))))
            .await
            .unwrap();
        next(&mut sse).await.unwrap().unwrap();
        let end = next_data(&mut sse).await;
        let text = std::str::from_utf8(&end).unwrap();
        assert!(text.starts_with("data: {\"error\":"), "{text}");
        assert!(
            text.contains("GatewayTimeoutError") && text.contains("5.0s"),
            "{text}"
        );
        assert!(matches!(sse.take_break(), Some(Break::Idle(_))));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn done_is_seen_across_frames_and_the_first_data_is_timed() {
        let (tx, body) = channel();
        let mut sse: SseEnd<_, std::io::Error> =
            SseEnd::new(Watch::new(body, Duration::from_secs(5), no_cut()));
        let started = Instant::now();
        tokio::time::advance(Duration::from_millis(30)).await;
        for part in [&b"data: {}\n\nda"[..], b"ta: [DO", b"NE]\n\n"] {
            tx.send(Ok(Frame::data(Bytes::from_static(part))))
                .await
                .unwrap();
            next(&mut sse).await.unwrap().unwrap();
        }
        assert!(sse.saw_done());
        assert_eq!(
            sse.first_data().unwrap() - started,
            Duration::from_millis(30)
        );
        tx.send(Ok(Frame::data(Bytes::from_static(b": keep-alive\n\n"))))
            .await
            .unwrap();
        next(&mut sse).await.unwrap().unwrap();
        assert!(!sse.saw_done(), "only the last bytes count");
        drop(tx);
        assert!(next(&mut sse).await.is_none());
        assert!(sse.take_break().is_none());
    }
}
