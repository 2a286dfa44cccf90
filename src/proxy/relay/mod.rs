//! The decoder's answer on its way to the client. A non-streaming answer
//! is read whole first, so a decoder that breaks mid-body is a 502, not a
//! truncated 200. A stream passes through unchanged (no parsing, no
//! re-framing of SSE events) through three layers, each generic over the
//! body inside it:
//!
//! ```text
//! Relayed ── the request's context: first byte, outcome, the log line on drop
//!  └ Batch ── frames already on their way leave in one write
//!     └ SseEnd ── an early end becomes an error event and [DONE]
//!        └ Watch ── the idle limit and the drain's cut
//!           └ the decoder's body
//! ```
//!
//! The answer's headers wait for its first bytes (bounded by
//! `--upstream-timeout`, like the headers themselves), so both leave in one
//! write and a decoder that never starts its stream is a 504, not a hung
//! 200.

mod batch;
mod sse;
mod watch;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderMap, StatusCode};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use self::batch::Batch;
use self::sse::SseEnd;
use self::watch::{Break, Watch};
use super::answer::{passthrough, read_whole, upstream_said};
use super::ctx::{Outcome, RequestCtx};
use super::decode::DecoderAnswer;
use super::leg::timed_out;
use crate::error::{Leg, ProxyError};
use crate::fleet::InFlight;
use crate::metrics::TimeoutKind;
use crate::shutdown::Stage;
use crate::upstream;

/// The decoder's stream as the layers wrap it.
type Layers = Batch<SseEnd<Watch<Incoming>, hyper::Error>>;

/// What the relay phase hands back to the handler. Not boxed: it is
/// returned once and moved straight into the response body, which axum
/// boxes anyway; a box here would be a second allocation a request.
#[allow(clippy::large_enum_variant)]
pub enum Reply {
    /// An answer complete in itself: an upstream's refusal, or a
    /// non-streaming answer read whole.
    Whole(Response),
    /// A stream whose first bytes are in; the handler moves the request's
    /// context into its body.
    Stream(Stream),
}

pub struct Stream {
    status: StatusCode,
    headers: HeaderMap,
    body: Layers,
    started: Instant,
    in_flight: InFlight,
}

/// Relays the decoder's answer: read whole, or its stream started.
pub async fn start(ctx: &mut RequestCtx, answer: DecoderAnswer) -> Result<Reply, ProxyError> {
    let DecoderAnswer {
        response,
        started,
        in_flight,
    } = answer;
    let decoder = std::sync::Arc::clone(in_flight.endpoint());
    let status = response.status();
    let headers = upstream::relayed_headers(&response);
    let sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    ctx.record.status = Some(status.as_u16());
    let limit = ctx.app.config.fleet.upstream_timeout;
    if !sse {
        let read = read_whole(Leg::Decode, &decoder.authority, response);
        let whole = match tokio::time::timeout(limit, read).await {
            Ok(Ok(whole)) => whole,
            Ok(Err(err)) => {
                ctx.app.metrics.upstream_error(Leg::Decode);
                return Err(err.into());
            }
            Err(_) => return Err(timed_out(&ctx.app, Leg::Decode)),
        };
        ctx.first_byte(started.elapsed());
        if whole.status.is_client_error() || whole.status.is_server_error() {
            ctx.record.upstream_said =
                Some(upstream_said("decoder", &decoder.authority, &whole.body));
        }
        ctx.record.outcome = if whole.status.is_client_error() {
            Outcome::Refused
        } else {
            Outcome::Completed
        };
        drop(in_flight);
        return Ok(Reply::Whole(passthrough(whole)));
    }
    let idle = ctx.app.config.limits.stream_idle_timeout;
    let watch = Watch::new(
        response.into_body(),
        idle,
        ctx.app.shutdown.handle(Stage::Cut),
    );
    let mut body = Batch::new(SseEnd::new(watch));
    let first = std::future::poll_fn(|cx| body.poll_gather(cx));
    if tokio::time::timeout(limit, first).await.is_err() {
        return Err(timed_out(&ctx.app, Leg::Decode));
    }
    Ok(Reply::Stream(Stream {
        status,
        headers,
        body,
        started,
        in_flight,
    }))
}

impl Stream {
    /// The response, its body owning the request's context from here on:
    /// the end of the body is the end of the request.
    pub fn into_response(self, ctx: RequestCtx) -> Response {
        let mut relayed = Relayed {
            body: self.body,
            ctx,
            started: self.started,
            first_seen: false,
            _in_flight: self.in_flight,
        };
        relayed.absorb();
        let mut out = Response::new(Body::new(relayed));
        *out.status_mut() = self.status;
        *out.headers_mut() = self.headers;
        out
    }
}

/// The relayed stream, owning the request's context.
pub(super) struct Relayed {
    body: Layers,
    ctx: RequestCtx,
    /// When the decode leg started: the first byte's time counts from it.
    started: Instant,
    first_seen: bool,
    /// The decoder counts this request in flight until the body is gone.
    _in_flight: InFlight,
}

impl Relayed {
    /// Takes into the record what the layers saw: the first data, and why
    /// the stream ended early.
    fn absorb(&mut self) {
        let sse = self.body.get_mut();
        if !self.first_seen {
            if let Some(at) = sse.first_data() {
                self.first_seen = true;
                let since = at.into_std().saturating_duration_since(self.started);
                self.ctx.first_byte(since);
            }
        }
        let Some(cause) = sse.take_break() else {
            return;
        };
        let (app, span) = (&self.ctx.app, &self.ctx.span);
        match &cause {
            Break::Upstream(err) => {
                app.metrics.upstream_error(Leg::Decode);
                tracing::warn!(parent: span, error = %err, "decoder stream broke");
                self.ctx.record.outcome = Outcome::DecoderBroke;
            }
            Break::Idle(limit) => {
                app.metrics.guards.timeout(TimeoutKind::StreamIdle);
                app.metrics.upstream_error(Leg::Decode);
                tracing::warn!(parent: span, secs = limit.as_secs_f64(), "decoder stream went silent past --stream-idle-timeout; ending it");
                self.ctx.record.outcome = Outcome::DecoderBroke;
            }
            Break::Drain => {
                tracing::warn!(parent: span, "the shutdown drain ended; cutting the stream");
                self.ctx.record.outcome = Outcome::Cut;
            }
        }
    }
}

impl http_body::Body for Relayed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_ready() {
            this.absorb();
            // With a Content-Length, hyper stops polling after the last
            // byte, so completion is decided here, not only at `None`.
            if matches!(polled, Poll::Ready(None)) || this.body.is_end_stream() {
                this.ctx.completed();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Relayed {
    fn drop(&mut self) {
        if self.body.get_mut().saw_done() {
            self.ctx.completed();
        }
    }
}

/// A body fed from a channel, for the layers' tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body::{Body, Frame};
    use tokio::sync::mpsc;

    pub type Item = Result<Frame<Bytes>, std::io::Error>;

    pub struct ChannelBody(mpsc::Receiver<Item>);

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
            self.0.poll_recv(cx)
        }
    }

    /// A cut that never comes.
    pub fn no_cut() -> crate::shutdown::StageHandle {
        crate::shutdown::Shutdown::default().handle(crate::shutdown::Stage::Cut)
    }

    pub fn channel() -> (mpsc::Sender<Item>, ChannelBody) {
        let (tx, rx) = mpsc::channel(16);
        (tx, ChannelBody(rx))
    }

    /// The body's next frame, which must be data.
    pub async fn next_data<B: Body<Data = Bytes> + Unpin>(body: &mut B) -> Bytes
    where
        B::Error: std::fmt::Debug,
    {
        let frame = next(body).await.expect("a frame").expect("not an error");
        frame.into_data().expect("data, not trailers")
    }

    /// The body's next frame.
    pub async fn next<B: Body + Unpin>(body: &mut B) -> Option<Result<Frame<B::Data>, B::Error>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }
}
