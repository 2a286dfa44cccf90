//! The prefiller's LMCache store: which ranks post `request_store_finished`
//! for a finished prefill, when, and how often.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::body::sleep_if;
use crate::{telemetry, Sim, TelemetryPost};

/// Which telemetry events a prefill sends: the fixed knobs with this
/// request's fault applied.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Posting {
    /// A rank whose event is lost, besides `drop_ranks`.
    pub(crate) lost_rank: Option<u32>,
    /// Each event posted twice.
    pub(crate) duplicate: bool,
}

impl Sim {
    /// `(rank, delay after the response)` for every rank whose event is not
    /// lost.
    pub(crate) fn rank_schedule(
        &self,
        posting: Posting,
    ) -> impl Iterator<Item = (u32, Duration)> + '_ {
        (0..self.config.world_size)
            .filter(move |rank| {
                !self.config.drop_ranks.contains(rank) && posting.lost_rank != Some(*rank)
            })
            .map(|rank| {
                let stagger = self.config.rank_stagger.saturating_mul(rank);
                (rank, self.config.telemetry_delay.saturating_add(stagger))
            })
    }

    /// Sends a finished prefill's events in the background, one task per
    /// rank, as LMCache's workers do independently.
    pub(crate) fn spawn_telemetry(
        self: &Arc<Self>,
        handle: &tokio::runtime::Handle,
        ids: Vec<String>,
        posting: Posting,
    ) {
        let ids: Arc<[String]> = ids.into();
        for (rank, delay) in self.rank_schedule(posting) {
            handle.spawn(Arc::clone(self).post_rank(Arc::clone(&ids), rank, delay, posting));
        }
    }

    pub(crate) async fn post_rank(
        self: Arc<Self>,
        ids: Arc<[String]>,
        rank: u32,
        delay: Duration,
        posting: Posting,
    ) {
        sleep_if(delay).await;
        let body = telemetry::payload(&ids, &self.config.model, self.config.world_size, rank);
        let copies = if posting.duplicate { 2 } else { 1 };
        for _ in 0..copies {
            self.post_once(body.clone()).await;
        }
    }

    async fn post_once(&self, body: Bytes) {
        let result = match &self.telemetry {
            None => return,
            Some(Err(e)) => Err(e.clone()),
            Some(Ok(target)) => target.post(body.clone()).await,
        };
        let status = match result {
            Ok(status) => {
                self.counters.telemetry_ok.fetch_add(1, Ordering::Relaxed);
                status
            }
            Err(e) => {
                self.counters
                    .telemetry_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!("pd-sim: telemetry POST failed: {e}");
                0
            }
        };
        if self.config.record {
            let post = TelemetryPost {
                at: Instant::now(),
                payload: serde_json::from_slice(&body).unwrap_or_default(),
                status,
            };
            self.telemetry_log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(post);
        }
    }
}
