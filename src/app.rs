//! What every handler shares. Its own room, so that the server, the
//! request path and the telemetry endpoint all point down to it and not at
//! each other.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::fleet::{Fleet, Resolve, SystemResolver};
use crate::metrics::Metrics;
use crate::pending::Pending;
use crate::tokens::TokenEstimate;
use crate::upstream::{self, HttpClient};

pub struct App {
    pub config: Config,
    pub pending: Arc<Pending>,
    pub metrics: Arc<Metrics>,
    pub client: HttpClient,
    pub fleet: Arc<Fleet>,
    /// The prompt-length guess of `--direct-below-tokens`.
    pub tokens: TokenEstimate,
}

impl App {
    /// Upstream names resolve through the system's resolver.
    pub fn new(config: Config) -> Arc<Self> {
        App::with_resolver(config, Arc::new(SystemResolver))
    }

    /// For tests and embedders that decide what names resolve to.
    pub fn with_resolver(config: Config, resolver: Arc<dyn Resolve>) -> Arc<Self> {
        let metrics = Metrics::new();
        let client = upstream::client();
        Arc::new(App {
            pending: Pending::new(metrics.pending.clone()),
            fleet: Fleet::new(&config, resolver, client.clone()),
            client,
            tokens: TokenEstimate::new(metrics.bytes_per_token.clone()),
            metrics,
            config,
        })
    }
}

/// Tries to calibrate the prompt-length estimate this many times, this far
/// apart, before leaving it to the prefill answers alone (a prefiller that
/// is not vLLM may have no `/tokenize`).
const CALIBRATION_TRIES: u32 = 5;
const CALIBRATION_RETRY: Duration = Duration::from_secs(10);

impl App {
    /// Calibrates `tokens` from the first healthy prefiller, for
    /// `--direct-below-tokens`; returns when done or given up.
    pub async fn calibrate_tokens(self: Arc<Self>) {
        for attempt in 1..=CALIBRATION_TRIES {
            let endpoint = loop {
                match self.fleet.prefillers.pick(&[]) {
                    Some(pick) if !pick.panic => break pick.endpoint,
                    _ => tokio::time::sleep(self.config.health_interval).await,
                }
            };
            let auth = self.config.upstream_auth.as_ref();
            let limit = self.config.health_timeout.max(Duration::from_secs(5));
            match self
                .tokens
                .calibrate(&self.client, &endpoint, auth, limit)
                .await
            {
                Ok(()) => return,
                Err(e) => tracing::warn!(
                    endpoint = %endpoint.authority,
                    attempt,
                    error = %e,
                    "could not calibrate the prompt-length estimate; it learns from prefill answers meanwhile"
                ),
            }
            tokio::time::sleep(CALIBRATION_RETRY).await;
        }
    }
}
