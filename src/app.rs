//! What every handler shares. Its own room, so that the server, the
//! request path and the telemetry endpoint all point down to it and not at
//! each other.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::fleet::{Fleet, Resolve, SystemResolver};
use crate::forward::Forwarder;
use crate::metrics::Metrics;
use crate::owner::Ids;
use crate::pending::Pending;
use crate::shutdown::Shutdown;
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
    /// How ids are made and read, decided from where the telemetry
    /// listener is bound.
    ids: Ids,
    /// Sends events for other replicas' ids on to them; `serve` runs its
    /// queue.
    pub forwarder: Forwarder,
    /// Completions requests in progress, from their arrival to the last
    /// byte of their answer: what a shutdown drain waits for.
    pub requests: AtomicUsize,
    /// How far a shutdown has got: `serve` begins its stages, the request
    /// path waits for [`crate::shutdown::Stage::Cut`].
    pub shutdown: Shutdown,
    /// Request bodies held in memory at once, in KiB, across all requests:
    /// [`App::BODY_BUDGET_BODIES`] bodies at `--max-body-bytes`.
    pub body_budget: Arc<tokio::sync::Semaphore>,
    /// Span export with `--otlp-endpoint`; `None`: no spans are made.
    pub tracing: Option<Arc<crate::trace::Tracing>>,
}

/// Where this replica listens, known once its listeners are bound: what
/// the `App` must know about itself before it is made.
#[derive(Debug, Clone)]
pub struct Bound {
    pub public: SocketAddr,
    pub telemetry: SocketAddr,
    /// The downward API's `POD_IP`: the address ids name when the
    /// telemetry listener's own names none that others can reach.
    pub pod_ip: Option<String>,
}

impl Bound {
    /// The listeners' addresses, with `POD_IP` from the environment.
    pub fn new(public: &TcpListener, telemetry: &TcpListener) -> io::Result<Self> {
        Ok(Bound {
            public: public.local_addr()?,
            telemetry: telemetry.local_addr()?,
            pod_ip: std::env::var("POD_IP").ok(),
        })
    }

    /// The addresses an upstream must not be: requests sent there would
    /// come back to this proxy.
    pub fn own(&self) -> [SocketAddr; 2] {
        [self.public, self.telemetry]
    }
}

impl App {
    /// Upstream names resolve through the system's resolver.
    pub fn build(config: Config, bound: &Bound) -> Result<Arc<Self>, String> {
        App::build_with_resolver(config, bound, Arc::new(SystemResolver))
    }

    /// For tests and embedders that decide what names resolve to. Fails
    /// when owner-routed ids have no address to name.
    pub fn build_with_resolver(
        config: Config,
        bound: &Bound,
        resolver: Arc<dyn Resolve>,
    ) -> Result<Arc<Self>, String> {
        let ids = ids(&config, bound)?;
        let metrics = Metrics::new();
        let client = upstream::client();
        let forwarder = Forwarder::new(client.clone(), Arc::clone(&metrics));
        let tracing = config.tracing.otlp_endpoint.as_ref().and_then(|endpoint| {
            crate::trace::Tracing::start(
                endpoint,
                config.tracing.otlp_timeout,
                metrics.trace_spans_dropped.clone(),
            )
            .inspect_err(|e| tracing::error!(error = %e, "traces are off"))
            .ok()
        });
        let body_budget_kib = config
            .limits
            .max_body_bytes
            .saturating_mul(App::BODY_BUDGET_BODIES)
            .div_ceil(1024);
        Ok(Arc::new(App {
            ids,
            forwarder,
            pending: Pending::new(metrics.pending.clone(), config.limits.max_pending),
            fleet: Fleet::new(
                &config.fleet,
                &bound.own(),
                resolver,
                client.clone(),
                &metrics,
            ),
            client,
            tokens: TokenEstimate::new(metrics.bytes_per_token.clone()),
            metrics,
            config,
            requests: AtomicUsize::new(0),
            shutdown: Shutdown::default(),
            tracing,
            body_budget: Arc::new(tokio::sync::Semaphore::new(
                body_budget_kib.min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
        }))
    }

    /// Bodies at the size limit that may be held at once. Each costs about
    /// twice its size (the body and its prefill copy), so with the default
    /// limit (32 MiB) all of them together stay within the sidecar's
    /// 512 MiB; ordinary bodies (kilobytes) number in the tens of thousands.
    pub const BODY_BUDGET_BODIES: usize = 6;

    /// Ids as this replica makes them: owner-routed with a cluster key,
    /// plain without.
    pub fn ids(&self) -> &Ids {
        &self.ids
    }
}

/// This replica's ids: with a cluster key they name `--advertise-telemetry`,
/// else the telemetry listener's address when concrete, else `POD_IP` with
/// the listener's port.
fn ids(config: &Config, bound: &Bound) -> Result<Ids, String> {
    let Some(key) = &config.security.cluster_key else {
        return Ok(Ids::local());
    };
    let telemetry = bound.telemetry;
    let reachable = |ip: IpAddr| !ip.is_unspecified() && !ip.is_multicast();
    let concrete = reachable(telemetry.ip()).then_some(telemetry);
    let pod = bound
        .pod_ip
        .as_deref()
        .and_then(|ip| ip.trim().parse::<IpAddr>().ok())
        .filter(|ip| reachable(*ip) && !ip.is_loopback())
        .map(|ip| SocketAddr::new(ip, telemetry.port()));
    // A loopback bind names no address another host can use: POD_IP goes
    // first then (loopback stays for one host).
    let me = config
        .telemetry
        .advertise_telemetry
        .or(concrete.filter(|b| !b.ip().is_loopback()))
        .or(pod)
        .or(concrete)
        .ok_or_else(|| {
            format!(
                "with a cluster key, ids must name an address where this replica's telemetry listener ({telemetry}) is reachable: set --advertise-telemetry IP:PORT or POD_IP"
            )
        })?;
    tracing::info!(advertise = %me, "owner-routed ids: telemetry for this replica's requests is forwarded to it");
    Ids::routed(key, me)
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
                    _ => tokio::time::sleep(self.config.fleet.health_interval).await,
                }
            };
            let auth = self.config.fleet.upstream_auth.as_ref();
            let limit = self.config.fleet.health_timeout.max(Duration::from_secs(5));
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
