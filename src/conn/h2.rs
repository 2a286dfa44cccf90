//! An idle bound for HTTP/2 connections, which hyper does not have: each
//! connection counts its requests in progress, so its task can close it
//! once none has run for a while.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Requests in progress on one connection, so an idle HTTP/2 connection
/// can be told from a busy one: hyper closes idle HTTP/1.1 keep-alive
/// connections itself (its header read timeout), but has no idle bound
/// for HTTP/2.
pub struct Activity {
    active: AtomicUsize,
    /// When a request last started or ended, in ms after `epoch`.
    last_change: AtomicU64,
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
