//! The client socket as the proxy wraps it: a bound on how long sent
//! bytes may stay unread, and hyper's own error answers reshaped.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::errors::shape_hyper_error;
use crate::metrics::{Metrics, TimeoutKind};

/// A client socket with two bounds hyper does not have.
///
/// A write that stays pending for `send_timeout` (the client stopped
/// reading and its receive window is full) fails with `TimedOut`; hyper
/// then drops the connection and with it the response body, which closes
/// the decoder's connection, so vLLM stops generating for a reader that is
/// gone.
///
/// On HTTP/1.1, hyper answers a request it cannot parse (bad syntax, too
/// many or too large headers, a URI too long) with a bodiless 400, 414 or
/// 431 of its own. Such an answer is recognised here (no response of the
/// proxy's is bodiless with those statuses) and sent instead with an
/// OpenAI-shaped JSON body, so every error a client can get has one shape.
pub struct GuardedIo<T> {
    io: T,
    send_timeout: Duration,
    /// Armed when a write first stays pending; reset by any progress.
    stall: Option<Pin<Box<Sleep>>>,
    stalled: bool,
    metrics: Arc<Metrics>,
    /// hyper's own error answer, rewritten: the bytes still to send, and
    /// how many of hyper's bytes they stand for.
    rewrite: Option<(Bytes, usize)>,
    http1: bool,
}

impl<T> GuardedIo<T> {
    pub fn new(io: T, send_timeout: Duration, http1: bool, metrics: Arc<Metrics>) -> Self {
        GuardedIo {
            io,
            send_timeout,
            stall: None,
            stalled: false,
            metrics,
            rewrite: None,
            http1,
        }
    }

    /// `Pending` while the stall is within bounds; an error once it is not.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let deadline = Instant::now() + self.send_timeout;
        let sleep = match &mut self.stall {
            Some(sleep) => {
                if !self.stalled {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            None => self
                .stall
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.stalled = true;
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.metrics.guards.timeout(TimeoutKind::Send);
                tracing::warn!(
                    secs = self.send_timeout.as_secs_f64(),
                    "a client left sent bytes unread past --send-timeout; closing its connection"
                );
                Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client did not read within --send-timeout",
                ))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> GuardedIo<T> {
    /// Writes through the timeout.
    fn write_bounded(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match write(Pin::new(&mut self.io), cx) {
            Poll::Ready(result) => {
                self.stalled = false;
                Poll::Ready(result)
            }
            Poll::Pending => match self.stalled(cx) {
                Poll::Ready(err) => Poll::Ready(Err(err)),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    /// Sends the rewritten error answer; `Ready(Ok(n))` with hyper's byte
    /// count once all of it is out.
    fn drive_rewrite(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            let Some((rest, stands_for)) = self.rewrite.take() else {
                return Poll::Ready(Ok(0));
            };
            if rest.is_empty() {
                return Poll::Ready(Ok(stands_for));
            }
            let chunk = rest.clone();
            match self.write_bounded(cx, |io, cx| io.poll_write(cx, &chunk)) {
                Poll::Ready(Ok(n)) => self.rewrite = Some((rest.slice(n..), stands_for)),
                other => {
                    self.rewrite = Some((rest, stands_for));
                    return other;
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.rewrite.is_none() && this.http1 {
            if let Some(shaped) = shape_hyper_error(buf) {
                this.rewrite = Some((shaped, buf.len()));
            }
        }
        if this.rewrite.is_some() {
            return this.drive_rewrite(cx);
        }
        this.write_bounded(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.rewrite.is_none() && this.http1 {
            let first = bufs.iter().find(|b| !b.is_empty());
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            if let Some(first) = first.filter(|f| f.len() == total) {
                if let Some(shaped) = shape_hyper_error(first) {
                    this.rewrite = Some((shaped, total));
                }
            }
        }
        if this.rewrite.is_some() {
            return this.drive_rewrite(cx);
        }
        this.write_bounded(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
