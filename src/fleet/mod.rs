//! The servers behind the proxy as a changing, partly broken fleet.
//!
//! - **Discovery**: every configured host is resolved again every
//!   `--discovery-interval`; each address behind a name is an endpoint. An
//!   address that appears is health-checked at once and joins after its
//!   first pass; one that disappears takes no new requests, and its
//!   requests in flight finish (they hold the endpoint).
//! - **Health**: `GET /health` of every endpoint every `--health-interval`
//!   (3 failures eject, 2 passes restore), and passive ejection with
//!   back-off when a request finds the server refusing, resetting or
//!   failing (see [`Endpoint`]).
//! - **Choice**: [`RoleSet::pick`], least loaded of two or round robin,
//!   among healthy endpoints, or all of them when none is.

mod balance;
mod discovery;
mod endpoint;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::join_all;
use ipnet::IpNet;
use metrics::Counter;
use tokio::time::{timeout, MissedTickBehavior};

pub use balance::{Pick, RoleSet};
pub use discovery::{is_own_address, Resolve, SystemResolver};
pub use endpoint::{Clock, Endpoint, InFlight, Role};

use crate::config::{FleetConfig, Target};
use crate::metrics::{EndpointSeries, Metrics};
use crate::upstream::{self, HttpClient};

/// A DNS answer larger than this is cut: every endpoint costs a health
/// check per interval and a few metric series.
pub const MAX_ENDPOINTS_PER_ROLE: usize = 1024;

/// Prefillers one `x-prefiller-host-port` header may name.
pub const MAX_HEADER_PREFILLERS: usize = 16;

/// Prefillers outside the fleet that gateways named, kept so that their
/// in-flight counts and ejections carry from one request to the next.
const MAX_VOUCHED: usize = 1024;

/// Resolutions of one name that fail in a row before its last answer is
/// dropped (30 s at the default interval).
const STALE_AFTER_FAILURES: u32 = 6;

/// The longest a resolution may take; past it the last answer stands.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Fleet {
    pub prefillers: RoleSet,
    pub decoders: RoleSet,
    prefiller_targets: Vec<Target>,
    decoder_targets: Vec<Target>,
    resolver: Arc<dyn Resolve>,
    client: HttpClient,
    clock: Clock,
    discovery_interval: Duration,
    health_interval: Duration,
    health_timeout: Duration,
    /// The proxy's own listening addresses: an upstream address among them
    /// would loop.
    own: Vec<SocketAddr>,
    /// Each target's last good answer (same order as the targets): a
    /// failed resolution keeps it, so a DNS hiccup does not empty the
    /// fleet; servers that are really gone fail their checks instead.
    answers: Mutex<[Vec<Vec<IpAddr>>; 2]>,
    /// Failed resolutions in a row, per target (same order).
    failures: Mutex<[Vec<u32>; 2]>,
    discovery_errors: Counter,
    /// `--allowed-prefillers`.
    allowed_prefillers: Vec<IpNet>,
    /// Prefillers outside the fleet named by `x-prefiller-host-port`.
    vouched: Mutex<HashMap<SocketAddr, Arc<Endpoint>>>,
}

impl Fleet {
    /// The fleet as far as it is known without DNS: IP addresses are
    /// endpoints at once, names wait for the first discovery round.
    /// `own`: the proxy's own listening addresses.
    pub fn new(
        config: &FleetConfig,
        own: &[SocketAddr],
        resolver: Arc<dyn Resolve>,
        client: HttpClient,
        metrics: &Metrics,
    ) -> Arc<Self> {
        let clock = Clock::new();
        let literal = |targets: &[Target]| -> Vec<Vec<IpAddr>> {
            targets
                .iter()
                .map(|t| t.ip().into_iter().collect())
                .collect()
        };
        let fleet = Fleet {
            prefillers: RoleSet::new(Role::Prefiller, config.balance, clock),
            decoders: RoleSet::new(Role::Decoder, config.balance, clock),
            answers: Mutex::new([literal(&config.prefillers), literal(&config.decoders)]),
            failures: Mutex::new([
                vec![0; config.prefillers.len()],
                vec![0; config.decoders.len()],
            ]),
            prefiller_targets: config.prefillers.clone(),
            decoder_targets: config.decoders.clone(),
            resolver,
            client,
            clock,
            discovery_interval: config.discovery_interval,
            health_interval: config.health_interval,
            health_timeout: config.health_timeout,
            own: own.to_vec(),
            discovery_errors: metrics.discovery_errors(),
            allowed_prefillers: config.allowed_prefillers.clone(),
            vouched: Mutex::new(HashMap::new()),
        };
        fleet.rebuild(Role::Prefiller);
        fleet.rebuild(Role::Decoder);
        for role in [Role::Prefiller, Role::Decoder] {
            // Shown from zero, before the first panic pick.
            let _ = metrics.panic_picks(role);
        }
        Arc::new(fleet)
    }

    pub fn role(&self, role: Role) -> &RoleSet {
        match role {
            Role::Prefiller => &self.prefillers,
            Role::Decoder => &self.decoders,
        }
    }

    fn targets(&self, role: Role) -> &[Target] {
        match role {
            Role::Prefiller => &self.prefiller_targets,
            Role::Decoder => &self.decoder_targets,
        }
    }

    /// Discovery and health checks, until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        let discovery = async {
            let mut tick = tokio::time::interval(self.discovery_interval);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let added = self.discover().await;
                join_all(added.iter().map(|e| self.check(e))).await;
            }
        };
        let health = async {
            let mut tick = tokio::time::interval(self.health_interval);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let all: Vec<_> = self
                    .prefillers
                    .snapshot()
                    .iter()
                    .chain(self.decoders.snapshot().iter())
                    .cloned()
                    .collect();
                join_all(all.iter().map(|e| self.check(e))).await;
            }
        };
        tokio::join!(discovery, health);
    }

    /// One round of resolution for every named target; returns the
    /// endpoints it added.
    pub async fn discover(&self) -> Vec<Arc<Endpoint>> {
        let mut added = Vec::new();
        for role in [Role::Prefiller, Role::Decoder] {
            let targets = self.targets(role);
            let answers = join_all(targets.iter().map(|t| self.resolve(t))).await;
            {
                let mut known = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
                let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
                let (known, failures) = (&mut known[role as usize], &mut failures[role as usize]);
                for (i, answer) in answers.into_iter().enumerate() {
                    match answer {
                        Some(ips) => {
                            known[i] = ips;
                            failures[i] = 0;
                        }
                        // A name that keeps failing is gone (a headless
                        // Service scaled to zero answers NXDOMAIN): its
                        // last answer stands only so long, since pod
                        // addresses are reused by other pods.
                        None => {
                            failures[i] += 1;
                            if failures[i] >= STALE_AFTER_FAILURES && !known[i].is_empty() {
                                tracing::warn!(host = %targets[i].host, rounds = failures[i], "resolution keeps failing; dropping its last answer");
                                known[i].clear();
                            }
                        }
                    }
                }
            }
            added.extend(self.rebuild(role));
        }
        added
    }

    /// `None`: the resolution failed and the last answer stands.
    async fn resolve(&self, target: &Target) -> Option<Vec<IpAddr>> {
        if let Some(ip) = target.ip() {
            return Some(vec![ip]);
        }
        let outcome = timeout(RESOLVE_TIMEOUT, self.resolver.resolve(&target.host)).await;
        match outcome {
            Ok(Ok(mut ips)) => {
                ips.sort();
                ips.dedup();
                // `localhost` answers 127.0.0.1 and ::1 on most systems:
                // one server, not two endpoints.
                if ips.iter().any(|ip| *ip == IpAddr::from([127, 0, 0, 1])) {
                    ips.retain(|ip| *ip != IpAddr::from(std::net::Ipv6Addr::LOCALHOST));
                }
                Some(ips)
            }
            Ok(Err(e)) => {
                self.discovery_errors.increment(1);
                tracing::warn!(host = %target.host, error = %e, "resolution failed; keeping the last answer");
                None
            }
            Err(_) => {
                self.discovery_errors.increment(1);
                tracing::warn!(host = %target.host, "resolution timed out; keeping the last answer");
                None
            }
        }
    }

    /// Makes a role's endpoint set match the known answers: endpoints
    /// still listed keep their state, new addresses get new endpoints
    /// (returned), the rest are dropped from the set.
    fn rebuild(&self, role: Role) -> Vec<Arc<Endpoint>> {
        let set = self.role(role);
        let current = set.snapshot();
        let answers =
            self.answers.lock().unwrap_or_else(PoisonError::into_inner)[role as usize].clone();
        let mut next: Vec<Arc<Endpoint>> = Vec::new();
        let mut added = Vec::new();
        let mut cut = false;
        for (target, ips) in self.targets(role).iter().zip(&answers) {
            for ip in ips {
                let addr = SocketAddr::new(*ip, target.port);
                if next.iter().any(|e| e.addr == addr) {
                    continue;
                }
                if is_own_address(addr, &self.own) {
                    tracing::warn!(role = role.as_str(), %addr, host = %target.host, "skipping an upstream address that is this proxy's own");
                    continue;
                }
                if next.len() == MAX_ENDPOINTS_PER_ROLE {
                    cut = true;
                    break;
                }
                match current.iter().find(|e| e.addr == addr) {
                    Some(e) => next.push(Arc::clone(e)),
                    None => {
                        let e = Endpoint::new(role, addr, self.clock);
                        added.push(Arc::clone(&e));
                        next.push(e);
                    }
                }
            }
        }
        if cut {
            tracing::warn!(
                role = role.as_str(),
                max = MAX_ENDPOINTS_PER_ROLE,
                "too many addresses; the rest are ignored"
            );
        }
        let removed: Vec<_> = current
            .iter()
            .filter(|e| !next.iter().any(|n| Arc::ptr_eq(n, e)))
            .collect();
        if !added.is_empty() || !removed.is_empty() {
            tracing::info!(
                role = role.as_str(),
                added = ?added.iter().map(|e| e.authority.as_str()).collect::<Vec<_>>(),
                removed = ?removed.iter().map(|e| e.authority.as_str()).collect::<Vec<_>>(),
                total = next.len(),
                "endpoints changed"
            );
            set.replace(next);
        }
        added
    }

    /// One active health check: vLLM's `GET /health` answers 200 while the
    /// engine lives, 503 once it died.
    pub async fn check(&self, endpoint: &Arc<Endpoint>) {
        // A round waits for its slowest check: no check may outlast the
        // interval, or one hung server would delay every other's verdict.
        let limit = self.health_timeout.min(self.health_interval);
        let call = async {
            let response = self
                .client
                .request(upstream::get(&endpoint.health_uri, None))
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            // The body is empty; reading it returns the connection to the
            // pool.
            let _ = timeout(
                limit,
                http_body_util::BodyExt::collect(response.into_body()),
            )
            .await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("GET /health answered {status}"))
            }
        };
        let verdict = match timeout(limit, call).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no answer in {limit:?}")),
        };
        match verdict {
            Ok(()) => endpoint.check_result(true, ""),
            Err(e) => endpoint.check_result(false, &e),
        };
    }

    /// The prefillers an `x-prefiller-host-port` value names (llm-d's
    /// convention: `ip:port`, or a comma list of them). Each must be a
    /// prefiller of the fleet or inside `--allowed-prefillers`, and never
    /// the proxy itself: the header comes from whoever can reach the API
    /// port, and must not make the proxy connect where it pleases. Names
    /// are refused rather than resolved per request.
    pub fn header_prefillers(&self, value: &str) -> Result<Vec<Arc<Endpoint>>, String> {
        let entries: Vec<&str> = value
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        if entries.is_empty() {
            return Err("x-prefiller-host-port names no prefiller".into());
        }
        if entries.len() > 4 * MAX_HEADER_PREFILLERS {
            return Err(format!(
                "x-prefiller-host-port has {} entries; at most {MAX_HEADER_PREFILLERS} prefillers",
                entries.len()
            ));
        }
        let mut distinct = entries.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() > MAX_HEADER_PREFILLERS {
            return Err(format!(
                "x-prefiller-host-port names {} prefillers; at most {MAX_HEADER_PREFILLERS}",
                distinct.len()
            ));
        }
        let known = self.prefillers.snapshot();
        let mut chosen: Vec<Arc<Endpoint>> = Vec::with_capacity(entries.len());
        for entry in entries {
            let shown: String = entry.chars().take(64).collect();
            // No zone ids (the client would pick the interface), and
            // IPv4-mapped IPv6 compared as the IPv4 address it is.
            let addr: SocketAddr = entry
                .parse()
                .ok()
                .filter(|a: &SocketAddr| {
                    a.port() != 0 && !matches!(a, SocketAddr::V6(v6) if v6.scope_id() != 0)
                })
                .map(|a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port()))
                .ok_or_else(|| {
                    format!("x-prefiller-host-port: {shown:?} is not an IP address and port")
                })?;
            if chosen.iter().any(|e| e.addr == addr) {
                continue;
            }
            if is_own_address(addr, &self.own) {
                return Err(format!(
                    "x-prefiller-host-port: {addr} is this proxy's own address"
                ));
            }
            if let Some(e) = known.iter().find(|e| e.addr == addr) {
                chosen.push(Arc::clone(e));
            } else if self
                .allowed_prefillers
                .iter()
                .any(|n| n.contains(&addr.ip()))
            {
                chosen.push(self.vouched(addr));
            } else {
                return Err(format!(
                    "x-prefiller-host-port: {addr} is neither a known prefiller nor inside --allowed-prefillers"
                ));
            }
        }
        Ok(chosen)
    }

    fn vouched(&self, addr: SocketAddr) -> Arc<Endpoint> {
        let mut vouched = self.vouched.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = vouched.get(&addr) {
            return Arc::clone(e);
        }
        if vouched.len() >= MAX_VOUCHED {
            // Forget those with nothing in flight; past that, this one is
            // not remembered.
            vouched.retain(|_, e| e.in_flight() > 0);
        }
        let endpoint = Endpoint::vouched(Role::Prefiller, addr, self.clock);
        if vouched.len() < MAX_VOUCHED {
            vouched.insert(addr, Arc::clone(&endpoint));
        }
        endpoint
    }

    /// (healthy, all) per role, prefillers first.
    pub fn readiness(&self) -> [(usize, usize); 2] {
        [self.prefillers.counts(), self.decoders.counts()]
    }

    /// The per-endpoint series, written from the live set at each render
    /// so that an endpoint gone from DNS leaves the page (bounded label
    /// sets).
    pub fn write_metrics(&self, series: &EndpointSeries) {
        for set in [self.prefillers.snapshot(), self.decoders.snapshot()] {
            for endpoint in set.iter() {
                series.endpoint(endpoint.stats());
            }
        }
    }
}

/// Resolves every target once and refuses any that is one of the proxy's
/// own listening addresses: a proxy that forwards to itself recurses until
/// it runs out of file descriptors. A name that does not resolve yet is
/// left to discovery (pods may start after the proxy).
pub async fn check_not_self(
    config: &FleetConfig,
    own: &[SocketAddr],
    resolver: &dyn Resolve,
) -> Result<(), String> {
    let roles = [
        ("prefiller", &config.prefillers),
        ("decoder", &config.decoders),
    ];
    for (role, targets) in roles {
        for target in targets.iter() {
            let ips = match target.ip() {
                Some(ip) => vec![ip],
                None => match timeout(RESOLVE_TIMEOUT, resolver.resolve(&target.host)).await {
                    Ok(Ok(ips)) => ips,
                    _ => continue,
                },
            };
            for ip in ips {
                let addr = SocketAddr::new(ip, target.port);
                if let Some(o) = own
                    .iter()
                    .find(|o| is_own_address(addr, std::slice::from_ref(o)))
                {
                    return Err(format!(
                        "{role} {target} ({addr}) is this proxy's own listening address {o}: it would send requests to itself"
                    ));
                }
            }
        }
    }
    Ok(())
}
