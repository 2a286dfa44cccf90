//! Bounds on what a client connection may hold: how many there are, how
//! long one may leave sent bytes unread, how long one may sit idle, and
//! the shape of the answers hyper writes on its own.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::error::error_json;
use crate::metrics::{Metrics, Port, TimeoutKind};

/// Open connections of one listener, against its cap. A slot is held by
/// the connection's task for as long as it lives.
pub struct Slots {
    open: AtomicUsize,
    cap: usize,
    pub port: Port,
    metrics: Arc<Metrics>,
    /// Woken whenever a connection closes, for the shutdown drain.
    closed: Notify,
}

impl Slots {
    pub fn new(cap: usize, port: Port, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Slots {
            open: AtomicUsize::new(0),
            cap,
            port,
            metrics,
            closed: Notify::new(),
        })
    }

    /// A slot, or `None` at the cap (counted as refused).
    pub fn take(self: &Arc<Self>) -> Option<Slot> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.cap).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            self.metrics.guards.connection_refused(self.port);
            return None;
        }
        self.metrics.guards.connections(self.port).increment(1.0);
        Some(Slot {
            slots: Arc::clone(self),
        })
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Returns once no connection of this listener is open.
    pub async fn all_closed(&self) {
        loop {
            let notified = self.closed.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

pub struct Slot {
    slots: Arc<Slots>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.open.fetch_sub(1, Ordering::AcqRel);
        self.slots
            .metrics
            .guards
            .connections(self.slots.port)
            .decrement(1.0);
        self.slots.closed.notify_waiters();
    }
}

/// What a connection refused at the cap is told before it is closed: the
/// socket's buffer is empty, so one non-blocking write sends it all.
pub fn refusal(port: Port) -> Vec<u8> {
    let what = match port {
        Port::Api | Port::Metrics => "connections",
        Port::Telemetry => "telemetry connections",
    };
    let body = error_json(
        &format!("the proxy has as many {what} open as it allows; try again shortly"),
        "ServiceUnavailableError",
        None,
        503,
    );
    let mut out = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

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

/// hyper's bodiless answer to a request it could not parse, as the JSON
/// answer the proxy gives every other error; `None` for anything else.
fn shape_hyper_error(buf: &[u8]) -> Option<Bytes> {
    let (status, message) = if buf.starts_with(b"HTTP/1.1 400 ") {
        (400, "the request could not be parsed as HTTP/1.1")
    } else if buf.starts_with(b"HTTP/1.1 431 ") {
        (431, "the request's headers are too large or too many")
    } else if buf.starts_with(b"HTTP/1.1 414 ") {
        (414, "the request's URI is too long")
    } else {
        return None;
    };
    // Only a whole head with nothing after it, saying it has no body.
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    if head_end + 4 != buf.len() {
        return None;
    }
    let head = std::str::from_utf8(&buf[..head_end])
        .ok()?
        .to_ascii_lowercase();
    if !head.lines().any(|l| l.trim() == "content-length: 0") {
        return None;
    }
    let (reason, kind) = match status {
        400 => ("Bad Request", "BadRequestError"),
        431 => (
            "Request Header Fields Too Large",
            "RequestHeaderFieldsTooLargeError",
        ),
        _ => ("URI Too Long", "URITooLongError"),
    };
    let body = error_json(message, kind, None, status);
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    Some(Bytes::from(out))
}

/// Requests in progress on one connection, so an idle HTTP/2 connection
/// can be told from a busy one: hyper closes idle HTTP/1.1 keep-alive
/// connections itself (its header read timeout), but has no idle bound
/// for HTTP/2.
pub struct Activity {
    active: AtomicUsize,
    /// When a request last started or ended, in ms after `epoch`.
    last_change: std::sync::atomic::AtomicU64,
    epoch: Instant,
    /// Woken when the count reaches zero.
    idle: Notify,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            active: AtomicUsize::new(0),
            last_change: 0.into(),
            epoch: Instant::now(),
            idle: Notify::new(),
        }
    }
}

impl Activity {
    pub fn busy(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_change.store(ms, Ordering::Release);
    }

    /// Waits until no request has been in progress for `idle_for`.
    pub async fn idle_for(&self, idle_for: Duration) {
        loop {
            let went_idle = self.idle.notified();
            if self.busy() {
                went_idle.await;
                continue;
            }
            let since = Duration::from_millis(self.last_change.load(Ordering::Acquire));
            let quiet_until = self.epoch + since + idle_for;
            if Instant::now() >= quiet_until {
                return;
            }
            tokio::time::sleep_until(quiet_until).await;
        }
    }

    fn start(self: &Arc<Self>) -> Busy {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.touch();
        Busy {
            activity: Arc::clone(self),
        }
    }
}

/// One request in progress; dropped with its response body.
struct Busy {
    activity: Arc<Activity>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.activity.touch();
        if self.activity.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.activity.idle.notify_waiters();
        }
    }
}

/// The router, counting each request on its connection's [`Activity`]
/// until the response body is gone.
#[derive(Clone)]
pub struct Tracked {
    pub router: axum::Router,
    pub activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Self::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let busy = self.activity.start();
        let router = self.router.clone();
        Box::pin(async move {
            let response = tower::ServiceExt::oneshot(router, req).await?;
            Ok(response.map(|body| Body::new(BusyBody { body, _busy: busy })))
        })
    }
}

struct BusyBody {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for BusyBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Raises the open-file soft limit to the hard limit: each proxied
/// request holds up to three sockets, and the usual soft limit of 1,024
/// runs out at a few hundred clients — after which every accept fails and
/// telemetry is not heard, so every parked request waits out its KV
/// timeout. Returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(soft, _)| soft)
                .unwrap_or(1024)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_bodiless_errors_get_a_json_body() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Fri, 27 Nov 2026 11:00:00 GMT\r\n\r\n";
        let shaped = shape_hyper_error(head).expect("recognised");
        let text = std::str::from_utf8(&shaped).unwrap();
        assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], 431);
        assert!(text.contains(&format!("content-length: {}\r\n", body.len())));
        // The proxy's own answers have bodies and are left alone.
        assert!(
            shape_hyper_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n").is_none()
        );
        assert!(
            shape_hyper_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nx").is_none()
        );
        assert!(shape_hyper_error(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
    }
}
