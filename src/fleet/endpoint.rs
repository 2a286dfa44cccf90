//! One vLLM server of the fleet: where it is, how loaded it is by this
//! proxy's own requests, and whether it may take new ones.
//!
//! The hot path only reads atomics (is it eligible, how many in flight);
//! the health state machine behind them changes a few times a minute at
//! most and sits behind a mutex.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::Uri;

use crate::metrics::{EndpointSample, LabelValue};

/// Which half of the deployment an endpoint serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Prefiller,
    Decoder,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefiller => "prefiller",
            Role::Decoder => "decoder",
        }
    }
}

impl LabelValue for Role {
    fn label_value(self) -> &'static str {
        self.as_str()
    }
}

/// Failed checks in a row that take a healthy endpoint out of rotation.
pub const FAILS_TO_EJECT: u32 = 3;
/// Passed checks in a row that bring an ejected endpoint back. A new
/// endpoint needs only one: it has no bad record to live down.
pub const PASSES_TO_RESTORE: u32 = 2;

/// The first passive ejection lasts this long; each further one in a row
/// doubles it, up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(32);

/// ORCA load reports older than this no longer weigh the choice: the
/// server's queue has moved on since.
const ORCA_FRESH_MS: u64 = 5_000;

/// The latency average forgets at this pace: an endpoint that has not
/// answered for a while (it lost every draw) looks faster and faster, so
/// it is tried again and measured afresh.
const LATENCY_DECAY_MS: f64 = 10_000.0;
/// Each answer moves the latency average this fraction of the way.
const LATENCY_WEIGHT: f64 = 0.2;

/// Milliseconds on the fleet's own clock, so that deadlines fit in an
/// atomic.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            epoch: Instant::now(),
        }
    }

    /// Never 0, which marks "no deadline" in the atomics.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// What the active checks have concluded so far.
#[derive(Debug, Default)]
struct Checks {
    fails: u32,
    passes: u32,
    /// Some check ever passed: a new endpoint joins after its first pass.
    ever_passed: bool,
}

pub struct Endpoint {
    pub role: Role,
    pub addr: SocketAddr,
    /// `ip:port` (`[ip]:port` for IPv6), for logs and metric labels.
    pub authority: String,
    pub chat_uri: Uri,
    pub completions_uri: Uri,
    pub models_uri: Uri,
    pub health_uri: Uri,
    pub tokenize_uri: Uri,
    clock: Clock,
    /// The active checks' verdict: passed its way in and not failed its
    /// way out.
    active_ok: AtomicBool,
    /// The last active check passed: among endpoints none of which is
    /// healthy, those are tried first (a server that is back answers its
    /// first check before its second restores it).
    last_check_passed: AtomicBool,
    /// A passive ejection's end on [`Clock`]; 0 when not ejected.
    ejected_until: AtomicU64,
    /// When the current passive ejection began: only a request started
    /// after it may close it.
    ejected_at: AtomicU64,
    /// Back from an ejection, the one request allowed through (half-open)
    /// is under way.
    probing: AtomicBool,
    /// Passive ejections in a row (no success in between): the back-off's
    /// exponent.
    backoff_level: AtomicU32,
    checks: Mutex<Checks>,
    in_flight: AtomicU32,
    requests: AtomicU64,
    retries: AtomicU64,
    ejections: AtomicU64,
    /// vLLM's own `num_requests_waiting`, from the ORCA header of its last
    /// answer, and when it came ([`Clock`] ms; 0: never).
    orca_waiting: AtomicU32,
    orca_at: AtomicU64,
    /// Moving average of the answers' latency (µs), and when it was last
    /// updated ([`Clock`] ms): breaks ties between equally loaded
    /// endpoints.
    latency_us: AtomicU64,
    latency_at: AtomicU64,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("role", &self.role)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// An endpoint a gateway named for a request (`x-prefiller-host-port`)
    /// rather than one of the fleet: the proxy does not health-check it,
    /// so it starts in rotation on the gateway's word; passive ejection
    /// still applies.
    pub fn vouched(role: Role, addr: SocketAddr, clock: Clock) -> Arc<Self> {
        let endpoint = Endpoint::new(role, addr, clock);
        endpoint.active_ok.store(true, Ordering::Relaxed);
        endpoint
    }

    pub fn new(role: Role, addr: SocketAddr, clock: Clock) -> Arc<Self> {
        let authority = addr.to_string();
        let uri = |path: &str| {
            format!("http://{authority}{path}")
                .parse::<Uri>()
                .expect("a socket address makes a valid authority")
        };
        Arc::new(Endpoint {
            role,
            addr,
            chat_uri: uri("/v1/chat/completions"),
            completions_uri: uri("/v1/completions"),
            models_uri: uri("/v1/models"),
            health_uri: uri("/health"),
            tokenize_uri: uri("/tokenize"),
            authority,
            clock,
            active_ok: AtomicBool::new(false),
            last_check_passed: AtomicBool::new(false),
            ejected_until: AtomicU64::new(0),
            ejected_at: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            backoff_level: AtomicU32::new(0),
            checks: Mutex::new(Checks::default()),
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            orca_waiting: AtomicU32::new(0),
            orca_at: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
            latency_at: AtomicU64::new(0),
        })
    }

    /// May take new requests: its checks pass and no passive ejection
    /// runs at `now_ms`. Back from an ejection, until a request started
    /// since succeeds, it takes one request at a time (a half-open circuit
    /// breaker): with nothing in flight it would otherwise win every
    /// least-loaded draw, and a server still dead would draw a burst of
    /// requests, each to be retried.
    pub fn eligible(&self, now_ms: u64) -> bool {
        if !self.active_ok.load(Ordering::Relaxed) {
            return false;
        }
        match self.ejected_until.load(Ordering::Relaxed) {
            0 => true,
            until if now_ms < until => false,
            _ => !self.probing.load(Ordering::Relaxed),
        }
    }

    /// The active checks pass: what readiness goes by, so that a request
    /// that fails now and then does not take the proxy out of its Service.
    pub fn passes_checks(&self) -> bool {
        self.active_ok.load(Ordering::Relaxed)
    }

    pub fn last_check_passed(&self) -> bool {
        self.last_check_passed.load(Ordering::Relaxed)
    }

    pub fn healthy(&self) -> bool {
        self.eligible(self.clock.now_ms())
    }

    /// The load the balancer compares: this proxy's requests in flight,
    /// plus the server's own queue when it reported one lately.
    pub fn load(&self, now_ms: u64) -> u32 {
        let mine = self.in_flight.load(Ordering::Relaxed);
        let at = self.orca_at.load(Ordering::Relaxed);
        if at != 0 && now_ms.saturating_sub(at) <= ORCA_FRESH_MS {
            mine.saturating_add(self.orca_waiting.load(Ordering::Relaxed))
        } else {
            mine
        }
    }

    /// Folds one answer's latency (the prefill's whole answer, the
    /// decoder's first bytes) into the moving average.
    pub fn observe_latency(&self, latency: Duration) {
        let now = self.clock.now_ms();
        let sample = latency.as_micros().min(u128::from(u32::MAX)) as f64;
        let old = self.latency(now);
        let new = if self.latency_at.load(Ordering::Relaxed) == 0 {
            sample
        } else {
            old + (sample - old) * LATENCY_WEIGHT
        };
        self.latency_us.store(new as u64, Ordering::Relaxed);
        self.latency_at.store(now, Ordering::Relaxed);
    }

    /// The latency average at `now_ms`, decayed since its last update.
    pub fn latency(&self, now_ms: u64) -> f64 {
        let at = self.latency_at.load(Ordering::Relaxed);
        if at == 0 {
            return 0.0;
        }
        let idle = now_ms.saturating_sub(at) as f64;
        self.latency_us.load(Ordering::Relaxed) as f64 * (-idle / LATENCY_DECAY_MS).exp()
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request sent to this endpoint; the guard counts it out,
    /// and reports how it went ([`InFlight::succeeded`],
    /// [`InFlight::failed`]). Back from an ejection, the first request
    /// claims the half-open probe.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let now = self.clock.now_ms();
        let until = self.ejected_until.load(Ordering::Relaxed);
        let probe = until != 0
            && now >= until
            && self
                .probing
                .compare_exchange(false, true, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        InFlight {
            endpoint: Arc::clone(self),
            started_ms: now,
            probe,
        }
    }

    /// A request to this endpoint failed in a way that another endpoint
    /// is trying again.
    pub fn count_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn report_orca_waiting(&self, waiting: u32) {
        self.orca_waiting.store(waiting, Ordering::Relaxed);
        self.orca_at.store(self.clock.now_ms(), Ordering::Relaxed);
    }

    /// A request started at `started_ms` got an answer that was not the
    /// server's fault. One started after the current ejection closes it
    /// and resets the back-off; one started before proves nothing new.
    fn passive_success(&self, started_ms: u64) {
        if self.ejected_until.load(Ordering::Relaxed) == 0 {
            return;
        }
        if started_ms > self.ejected_at.load(Ordering::Relaxed) {
            self.ejected_until.store(0, Ordering::Relaxed);
            self.backoff_level.store(0, Ordering::Relaxed);
        }
    }

    /// A refused or reset connection, or a 5xx: out of rotation at once,
    /// for a back-off that doubles with each ejection in a row. Requests
    /// that fail together (all those in flight when a server dies) eject
    /// it once.
    fn passive_failure(&self, why: &str) {
        let now = self.clock.now_ms();
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until > now {
            return;
        }
        let level = self.backoff_level.load(Ordering::Relaxed);
        let backoff = BASE_BACKOFF
            .saturating_mul(1 << level.min(5))
            .min(MAX_BACKOFF);
        let new_until = now + backoff.as_millis() as u64;
        if self
            .ejected_until
            .compare_exchange(until, new_until, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        // Only the failure that won the exchange moves the back-off.
        self.ejected_at.store(now, Ordering::Relaxed);
        self.backoff_level
            .store(level.saturating_add(1), Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            role = self.role.as_str(),
            endpoint = %self.authority,
            backoff_ms = backoff.as_millis() as u64,
            reason = why,
            "endpoint ejected"
        );
    }

    /// Applies one active check's result. Returns whether the endpoint
    /// changed sides (for tests and logs).
    pub fn check_result(&self, passed: bool, detail: &str) -> bool {
        let mut checks = self.checks.lock().unwrap_or_else(PoisonError::into_inner);
        let was_ok = self.active_ok.load(Ordering::Relaxed);
        self.last_check_passed.store(passed, Ordering::Relaxed);
        if passed {
            checks.fails = 0;
            checks.passes = checks.passes.saturating_add(1);
            let needed = if checks.ever_passed {
                PASSES_TO_RESTORE
            } else {
                1
            };
            checks.ever_passed = true;
            if !was_ok && checks.passes >= needed {
                // A server that was down and is back (a restart, a new
                // pod) is judged afresh: its passive back-off goes too.
                self.ejected_until.store(0, Ordering::Relaxed);
                self.backoff_level.store(0, Ordering::Relaxed);
                self.active_ok.store(true, Ordering::Relaxed);
                tracing::info!(
                    role = self.role.as_str(),
                    endpoint = %self.authority,
                    "endpoint healthy: taking requests"
                );
                return true;
            }
        } else {
            checks.passes = 0;
            checks.fails = checks.fails.saturating_add(1);
            if was_ok && checks.fails >= FAILS_TO_EJECT {
                self.active_ok.store(false, Ordering::Relaxed);
                self.ejections.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    role = self.role.as_str(),
                    endpoint = %self.authority,
                    error = detail,
                    "endpoint ejected: {FAILS_TO_EJECT} health checks failed in a row"
                );
                return true;
            }
            if !checks.ever_passed {
                tracing::debug!(endpoint = %self.authority, error = detail, "new endpoint not healthy yet");
            }
        }
        false
    }

    /// The per-endpoint counters, for the metrics page.
    pub fn stats(&self) -> EndpointSample<'_> {
        EndpointSample {
            role: self.role.label_value(),
            endpoint: &self.authority,
            healthy: self.healthy(),
            in_flight: self.in_flight(),
            requests: self.requests.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            ejections: self.ejections.load(Ordering::Relaxed),
        }
    }
}

/// One request in flight at an endpoint; dropping it counts the request
/// out, however it ended. It also keeps a removed endpoint alive until its
/// last request is done.
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    /// When it was sent ([`Clock`] ms).
    started_ms: u64,
    /// This request is the half-open probe; dropping it lets another be.
    probe: bool,
}

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The server answered (4xx included: the client's fault, not its).
    pub fn succeeded(&self) {
        self.endpoint.passive_success(self.started_ms);
    }

    /// The server refused, reset or failed the request (`why`, for the
    /// log): passive ejection.
    pub fn failed(&self, why: &str) {
        self.endpoint.passive_failure(why);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.probe {
            self.endpoint.probing.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Arc<Endpoint> {
        Endpoint::new(
            Role::Prefiller,
            "127.0.0.1:8100".parse().unwrap(),
            Clock::new(),
        )
    }

    #[test]
    fn a_new_endpoint_joins_after_one_pass_and_leaves_after_three_failures() {
        let e = endpoint();
        assert!(!e.healthy(), "unchecked endpoints take no traffic");
        e.check_result(false, "refused");
        assert!(!e.healthy());
        assert!(e.check_result(true, ""));
        assert!(e.healthy());
        e.check_result(false, "x");
        e.check_result(false, "x");
        assert!(e.healthy(), "two failures are not enough");
        assert!(e.check_result(false, "x"));
        assert!(!e.healthy());
        assert_eq!(e.stats().ejections, 1);
        e.check_result(true, "");
        assert!(!e.healthy(), "one pass does not restore");
        e.check_result(true, "");
        assert!(e.healthy(), "two passes do");
    }

    #[test]
    fn passive_ejection_backs_off_and_is_counted_once_per_burst() {
        let e = endpoint();
        e.check_result(true, "");
        let old = e.start();
        e.passive_failure("refused");
        e.passive_failure("refused");
        assert!(!e.healthy());
        assert_eq!(e.stats().ejections, 1, "one burst, one ejection");
        assert_eq!(e.backoff_level.load(Ordering::Relaxed), 1);
        let first = e.ejected_until.load(Ordering::Relaxed);
        // As if the back-off ran out: the next failure doubles it.
        e.ejected_until.store(1, Ordering::Relaxed);
        e.passive_failure("refused");
        let second = e.ejected_until.load(Ordering::Relaxed);
        let now = e.clock.now_ms();
        assert!(second - now > first - now + 500, "{first} {second} {now}");
        // A request sent before the ejection proves nothing new.
        old.succeeded();
        assert!(e.ejected_until.load(Ordering::Relaxed) > 1);
        drop(old);
        // Back from the ejection: one request at a time, whatever else was
        // in flight before, until one started since succeeds.
        let _older: Vec<_> = (0..3).map(|_| e.start()).collect();
        e.ejected_until.store(1, Ordering::Relaxed);
        e.ejected_at.store(0, Ordering::Relaxed);
        let probe = e.start();
        assert!(!e.healthy(), "half-open: the probe is under way");
        drop(probe);
        assert!(
            e.healthy(),
            "the probe ended without a verdict: another may go"
        );
        let probe = e.start();
        probe.succeeded();
        assert_eq!(e.backoff_level.load(Ordering::Relaxed), 0);
        assert!(e.healthy(), "closed again after a success");
    }

    #[test]
    fn failures_together_raise_the_back_off_once() {
        let e = endpoint();
        e.check_result(true, "");
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| e.passive_failure("reset"));
            }
        });
        assert_eq!(e.stats().ejections, 1);
        assert_eq!(e.backoff_level.load(Ordering::Relaxed), 1);
        let until = e.ejected_until.load(Ordering::Relaxed);
        assert!(
            until - e.clock.now_ms() <= 1_000,
            "the first back-off is 1 s"
        );
    }

    #[test]
    fn in_flight_guard_counts_out() {
        let e = endpoint();
        let a = e.start();
        let b = e.start();
        assert_eq!(e.load(e.clock.now_ms()), 2);
        drop(a);
        drop(b);
        assert_eq!(e.in_flight(), 0);
        assert_eq!(e.stats().requests, 2);
        e.report_orca_waiting(7);
        assert_eq!(e.load(e.clock.now_ms()), 7);
    }
}
