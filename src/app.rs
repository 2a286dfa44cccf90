//! What every handler shares. Its own room, so that the server, the
//! request path and the telemetry endpoint all point down to it and not at
//! each other.

use std::sync::Arc;

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
