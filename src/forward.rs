//! Telemetry events for another replica's requests, sent on to it.
//!
//! The telemetry handler answers LMCache at once (its sender is
//! fire-and-forget with a 5 s timeout), so forwarding happens behind a
//! bounded queue: one job per owner per event, sent by a single task over
//! the shared pooled client (keep-alive connections to each owner), a
//! bounded number at a time, each with a short timeout. Every outcome is
//! counted; nothing waits on a slow or dead owner.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Uri};
use http_body_util::BodyExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::metrics::{ForwardOutcome, Metrics};
use crate::upstream::{self, HttpClient};

/// Marks a forwarded event, so that its receiver never forwards it again
/// (an id whose owner is not the receiver was routed wrongly: dropped).
pub static FORWARDED_HEADER: HeaderName = HeaderName::from_static("x-pd-proxy-forwarded");

/// Jobs waiting to be sent, and their bytes; past either, events are
/// dropped and counted. The bytes bound what a flood of large events can
/// pin (a job is a copy of its event's ids).
const QUEUE: usize = 4096;
const QUEUE_BYTES: usize = 16 << 20;
/// Forwards in flight at once.
const IN_FLIGHT: usize = 256;
/// An owner that has not answered in this long is counted unreachable:
/// the event is worth little later (the owner's own KV wait runs on).
const TIMEOUT: Duration = Duration::from_secs(1);
/// Largest reply read from an owner.
const MAX_REPLY: usize = 4096;

/// One event's ids for one owner.
pub struct Job {
    pub owner: SocketAddr,
    /// The event as LMCache sent it, with only this owner's ids.
    pub body: Bytes,
    pub ids: usize,
    /// When the event reached this replica: the forward's added wait is
    /// measured from here.
    pub received: Instant,
    /// `--telemetry-token`: the owner refuses posts without it, forwards
    /// included (every replica shares the configuration).
    pub token: Option<Arc<str>>,
}

pub struct Forwarder {
    queue: mpsc::Sender<Job>,
    /// The queue's far end, drained by [`Forwarder::run`] while `serve`
    /// runs it; the lock keeps it to one drainer.
    jobs: tokio::sync::Mutex<mpsc::Receiver<Job>>,
    metrics: Arc<Metrics>,
    client: HttpClient,
    /// Forwards in flight; a job that finds one free is sent at once from
    /// the telemetry handler, the others wait in the queue.
    permits: Arc<Semaphore>,
    /// Bytes of the jobs queued or in flight.
    queued: Arc<AtomicUsize>,
}

impl Forwarder {
    /// The forwarder; the jobs that have to queue wait for
    /// [`Forwarder::run`].
    pub fn new(client: HttpClient, metrics: Arc<Metrics>) -> Self {
        let (queue, jobs) = mpsc::channel(QUEUE);
        Forwarder {
            queue,
            jobs: tokio::sync::Mutex::new(jobs),
            metrics,
            client,
            permits: Arc::new(Semaphore::new(IN_FLIGHT)),
            queued: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Sends the jobs that had to queue, as forward slots free up, until
    /// the task running it is dropped. A second run waits for the first.
    pub async fn run(&self) {
        let mut jobs = self.jobs.lock().await;
        while let Some(job) = jobs.recv().await {
            let Ok(permit) = Arc::clone(&self.permits).acquire_owned().await else {
                return;
            };
            // A job that waited past the forward timeout is worth nothing
            // to its owner any more; sending it would only delay fresher
            // ones.
            if job.received.elapsed() > TIMEOUT {
                self.queued.fetch_sub(job.body.len(), Ordering::Relaxed);
                self.metrics
                    .forwarded(ForwardOutcome::QueueFull, job.ids as u64);
                continue;
            }
            self.spawn_delivery(permit, job);
        }
    }

    /// Sends a job now if a forward slot is free (no hop through the
    /// queue's task: under load every hand-over is a wait for a core),
    /// else queues it; a full queue drops it (counted).
    pub fn send(&self, job: Job) {
        let (ids, bytes) = (job.ids as u64, job.body.len());
        if self.queued.fetch_add(bytes, Ordering::Relaxed) + bytes > QUEUE_BYTES {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
            return self.metrics.forwarded(ForwardOutcome::QueueFull, ids);
        }
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            self.spawn_delivery(permit, job);
            return;
        }
        if self.queue.try_send(job).is_err() {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
            self.metrics.forwarded(ForwardOutcome::QueueFull, ids);
        }
    }

    /// Sends `job` on a task of its own, holding `permit` until done.
    fn spawn_delivery(&self, permit: OwnedSemaphorePermit, job: Job) {
        let (client, metrics, queued) = (
            self.client.clone(),
            Arc::clone(&self.metrics),
            Arc::clone(&self.queued),
        );
        tokio::spawn(async move {
            let bytes = job.body.len();
            deliver(&client, &metrics, job).await;
            queued.fetch_sub(bytes, Ordering::Relaxed);
            drop(permit);
        });
    }
}

async fn deliver(client: &HttpClient, metrics: &Metrics, job: Job) {
    let uri = match &job.token {
        Some(token) => format!("http://{}/api/v1/telemetry?token={token}", job.owner),
        None => format!("http://{}/api/v1/telemetry", job.owner),
    };
    let uri: Uri = match uri.parse() {
        Ok(uri) => uri,
        Err(_) => return metrics.forwarded(ForwardOutcome::Unreachable, job.ids as u64),
    };
    let mut req = upstream::post_json(&uri, job.body, None, None);
    req.headers_mut()
        .insert(FORWARDED_HEADER.clone(), HeaderValue::from_static("1"));
    let call = async {
        let response = client.request(req).await.map_err(|_| ())?;
        if !response.status().is_success() {
            return Err(());
        }
        let body = http_body_util::Limited::new(response.into_body(), MAX_REPLY)
            .collect()
            .await
            .map_err(|_| ())?
            .to_bytes();
        let reply: serde_json::Value = serde_json::from_slice(&body).map_err(|_| ())?;
        Ok(reply["notified"].as_u64().unwrap_or(0))
    };
    let ids = job.ids as u64;
    match tokio::time::timeout(TIMEOUT, call).await {
        Ok(Ok(notified)) => {
            metrics.forward_seconds.record(job.received.elapsed());
            let notified = notified.min(ids);
            metrics.forwarded(ForwardOutcome::Delivered, notified);
            metrics.forwarded(ForwardOutcome::UnknownAtOwner, ids - notified);
        }
        _ => {
            tracing::debug!(owner = %job.owner, ids, "telemetry forward failed");
            metrics.forwarded(ForwardOutcome::Unreachable, ids);
        }
    }
}
