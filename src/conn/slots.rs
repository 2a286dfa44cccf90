//! How many connections each listener holds: a slot per connection,
//! refused past the cap with an answer of the proxy's own shape.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::error::error_json;
use crate::metrics::{Metrics, Port};

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
