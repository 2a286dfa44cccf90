//! What every handler shares. Its own room, so that the server, the
//! request path and the telemetry endpoint all point down to it and not at
//! each other.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::fleet::{Fleet, Resolve, SystemResolver};
use crate::forward::Forwarder;
use crate::metrics::Metrics;
use crate::owner::Ids;
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
    /// How ids are made and read; set once the telemetry listener's
    /// address is known ([`App::set_routing`]).
    ids: OnceLock<Ids>,
    /// Sends events for other replicas' ids on to them.
    pub forwarder: Forwarder,
    /// The forwarder's sending task, spawned by `serve`.
    forward_task: Mutex<Option<Pin<Box<dyn Future<Output = ()> + Send>>>>,
    /// Completions requests in progress, from their arrival to the last
    /// byte of their answer: what a shutdown drain waits for.
    pub requests: AtomicUsize,
    /// Cancelled when the drain's time is up: every request still running
    /// ends with an error its client can see (an SSE error event, a 503)
    /// rather than a connection closed mid-answer.
    pub cut: CancellationToken,
    /// Request bodies held in memory at once, in KiB, across all requests:
    /// [`App::BODY_BUDGET_BODIES`] bodies at `--max-body-bytes`.
    pub body_budget: Arc<tokio::sync::Semaphore>,
    /// Span export with `--otlp-endpoint`; `None`: no spans are made.
    pub tracing: Option<Arc<crate::trace::Tracing>>,
}

impl App {
    /// Upstream names resolve through the system's resolver.
    pub fn new(config: Config) -> Arc<Self> {
        App::with_resolver(config, Arc::new(SystemResolver))
    }

    /// For tests and embedders that decide what names resolve to.
    pub fn with_resolver(config: Config, resolver: Arc<dyn Resolve>) -> Arc<Self> {
        let metrics = Metrics::new();
        let max_body_bytes = config.max_body_bytes;
        let client = upstream::client();
        let (forwarder, forward_task) = Forwarder::new(client.clone(), Arc::clone(&metrics));
        let tracing = config.otlp_endpoint.as_ref().and_then(|endpoint| {
            crate::trace::Tracing::start(
                endpoint,
                config.otlp_timeout,
                metrics.trace_spans_dropped.clone(),
            )
            .inspect_err(|e| tracing::error!(error = %e, "traces are off"))
            .ok()
        });
        Arc::new(App {
            ids: OnceLock::new(),
            forwarder,
            forward_task: Mutex::new(Some(Box::pin(forward_task))),
            pending: Pending::new(metrics.pending.clone(), config.max_pending),
            fleet: Fleet::new(&config, resolver, client.clone(), &metrics),
            client,
            tokens: TokenEstimate::new(metrics.bytes_per_token.clone()),
            metrics,
            config,
            requests: AtomicUsize::new(0),
            cut: CancellationToken::new(),
            tracing,
            body_budget: Arc::new(tokio::sync::Semaphore::new(
                (config_body_budget_kib(max_body_bytes)).min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
        })
    }
}

/// The body budget in KiB for `--max-body-bytes`.
fn config_body_budget_kib(max_body_bytes: usize) -> usize {
    max_body_bytes
        .saturating_mul(App::BODY_BUDGET_BODIES)
        .div_ceil(1024)
}

impl App {
    /// Bodies at the size limit that may be held at once. Each costs about
    /// twice its size (the body and its prefill copy), so with the default
    /// limit (32 MiB) all of them together stay within the sidecar's
    /// 512 MiB; ordinary bodies (kilobytes) number in the tens of thousands.
    pub const BODY_BUDGET_BODIES: usize = 6;

    /// Ids as this replica makes them: owner-routed with a cluster key,
    /// plain without.
    pub fn ids(&self) -> &Ids {
        // Before `set_routing` (nothing is served yet) the plain form is
        // answered but not kept, so the routing decided later stands.
        static PLAIN: Ids = Ids::local();
        debug_assert!(
            self.config.cluster_key.is_none() || self.ids.get().is_some(),
            "with a cluster key, ids are decided by set_routing (serve) before any is made"
        );
        self.ids.get().unwrap_or(&PLAIN)
    }

    /// Decides this replica's ids once its telemetry listener is bound at
    /// `telemetry`: with a cluster key they name `--advertise-telemetry`,
    /// else the listener's address when concrete, else `pod_ip` (the
    /// downward API's `POD_IP`) with the listener's port. The first call
    /// decides.
    pub fn set_routing(&self, telemetry: SocketAddr, pod_ip: Option<&str>) -> Result<(), String> {
        if self.ids.get().is_some() {
            return Ok(());
        }
        let ids = match &self.config.cluster_key {
            None => Ids::local(),
            Some(key) => {
                let reachable = |ip: IpAddr| !ip.is_unspecified() && !ip.is_multicast();
                let bound = reachable(telemetry.ip()).then_some(telemetry);
                let pod = pod_ip
                    .and_then(|ip| ip.trim().parse::<IpAddr>().ok())
                    .filter(|ip| reachable(*ip) && !ip.is_loopback())
                    .map(|ip| SocketAddr::new(ip, telemetry.port()));
                // A loopback bind names no address another host can use:
                // POD_IP goes first then (loopback stays for one host).
                let me = self
                    .config
                    .advertise_telemetry
                    .or(bound.filter(|b| !b.ip().is_loopback()))
                    .or(pod)
                    .or(bound)
                    .ok_or_else(|| {
                        format!(
                            "with a cluster key, ids must name an address where this replica's telemetry listener ({telemetry}) is reachable: set --advertise-telemetry IP:PORT or POD_IP"
                        )
                    })?;
                tracing::info!(advertise = %me, "owner-routed ids: telemetry for this replica's requests is forwarded to it");
                Ids::routed(key, me)?
            }
        };
        let _ = self.ids.set(ids);
        Ok(())
    }

    /// The forwarder's task, once: `serve` runs it.
    pub fn take_forward_task(&self) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
        self.forward_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
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
                .calibrate(&self.client, &endpoint.tokenize_uri, auth, limit)
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
