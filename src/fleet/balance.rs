//! One role's endpoints and the choice among them.
//!
//! Hand-written rather than `tower::balance::p2c`: tower's balancer owns
//! the dispatch (a `Service` per endpoint, polled for readiness), while a
//! PD request needs the endpoint itself — to park before the prefill, to
//! leave out the prefillers a retry already tried, to fall back to every
//! endpoint when none is healthy, and to weigh vLLM's own queue report.
//! The choice is a few atomic loads over a snapshot; no lock is held.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use super::endpoint::{Clock, Endpoint, Role};
use crate::config::Balance;

/// A role's endpoints: a snapshot replaced whole by discovery, so a pick
/// reads it without waiting for a writer.
pub struct RoleSet {
    pub role: Role,
    balance: Balance,
    clock: Clock,
    endpoints: RwLock<Arc<[Arc<Endpoint>]>>,
    next: AtomicUsize,
}

/// What a pick found.
pub struct Pick {
    pub endpoint: Arc<Endpoint>,
    /// No endpoint was healthy, so every one was a candidate (Envoy's
    /// panic mode): better to try a server that may be back than to
    /// refuse everything.
    pub panic: bool,
}

impl RoleSet {
    pub fn new(role: Role, balance: Balance, clock: Clock) -> Self {
        RoleSet {
            role,
            balance,
            clock,
            endpoints: RwLock::new(Arc::from(Vec::new())),
            next: AtomicUsize::new(0),
        }
    }

    pub fn snapshot(&self) -> Arc<[Arc<Endpoint>]> {
        Arc::clone(
            &self
                .endpoints
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    pub fn replace(&self, endpoints: Vec<Arc<Endpoint>>) {
        *self
            .endpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::from(endpoints);
    }

    /// Chooses an endpoint other than those in `tried`: among the healthy
    /// ones if the role has any (none left untried: `None`, and the caller
    /// fails with the last error rather than try a server known to be
    /// down); with none healthy, among those whose last health check
    /// passed (back from the dead, not yet restored), else among all.
    pub fn pick(&self, tried: &[Arc<Endpoint>]) -> Option<Pick> {
        self.pick_from(&self.snapshot(), tried)
    }

    /// [`pick`](Self::pick) among `all` instead of the role's set: the
    /// prefillers a request's gateway named.
    pub fn pick_from(&self, all: &[Arc<Endpoint>], tried: &[Arc<Endpoint>]) -> Option<Pick> {
        let now = self.clock.now_ms();
        let untried = |e: &Arc<Endpoint>| !tried.iter().any(|t| Arc::ptr_eq(t, e));
        // Each endpoint's state is read once: concurrent requests change
        // it (a half-open probe starts, an ejection lands) while we look.
        let healthy: Vec<bool> = all.iter().map(|e| e.eligible(now)).collect();
        if healthy.iter().any(|h| *h) {
            let candidates: Vec<&Arc<Endpoint>> = all
                .iter()
                .zip(&healthy)
                .filter(|(e, h)| **h && untried(e))
                .map(|(e, _)| e)
                .collect();
            return self.choose(&candidates, now).map(|endpoint| Pick {
                endpoint,
                panic: false,
            });
        }
        let answering: Vec<&Arc<Endpoint>> = all
            .iter()
            .filter(|e| untried(e) && e.last_check_passed())
            .collect();
        let candidates = if answering.is_empty() {
            all.iter().filter(|e| untried(e)).collect()
        } else {
            answering
        };
        self.choose(&candidates, now).map(|endpoint| Pick {
            endpoint,
            panic: true,
        })
    }

    fn choose(&self, candidates: &[&Arc<Endpoint>], now: u64) -> Option<Arc<Endpoint>> {
        let n = candidates.len();
        let chosen = match (n, self.balance) {
            (0, _) => return None,
            (1, _) => candidates[0],
            (_, Balance::RoundRobin) => candidates[self.next.fetch_add(1, Ordering::Relaxed) % n],
            (_, Balance::LeastLoaded) => {
                let i = rand::random_range(0..n);
                let mut j = rand::random_range(0..n - 1);
                if j >= i {
                    j += 1;
                }
                let (a, b) = (candidates[i], candidates[j]);
                // Fewer in flight wins; at equal load the faster lately
                // (which matters most when clients are few and loads are
                // mostly 0).
                let (la, lb) = (a.load(now), b.load(now));
                if lb < la || (lb == la && b.latency(now) < a.latency(now)) {
                    b
                } else {
                    a
                }
            }
        };
        Some(Arc::clone(chosen))
    }

    /// Endpoints whose health checks pass, and all endpoints.
    pub fn counts(&self) -> (usize, usize) {
        let all = self.snapshot();
        (all.iter().filter(|e| e.passes_checks()).count(), all.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(balance: Balance, n: u16) -> (RoleSet, Vec<Arc<Endpoint>>) {
        let clock = Clock::new();
        let set = RoleSet::new(Role::Prefiller, balance, clock);
        let eps: Vec<_> = (0..n)
            .map(|i| {
                let e = Endpoint::new(
                    Role::Prefiller,
                    format!("127.0.0.1:{}", 8100 + i).parse().unwrap(),
                    clock,
                );
                e.check_result(true, "");
                e
            })
            .collect();
        set.replace(eps.clone());
        (set, eps)
    }

    #[test]
    fn least_loaded_avoids_the_busy_endpoint() {
        let (set, eps) = set(Balance::LeastLoaded, 2);
        let _busy: Vec<_> = (0..5).map(|_| eps[0].start()).collect();
        for _ in 0..50 {
            assert_eq!(set.pick(&[]).unwrap().endpoint.addr, eps[1].addr);
        }
    }

    #[test]
    fn at_equal_load_the_faster_wins() {
        let (set, eps) = set(Balance::LeastLoaded, 2);
        eps[0].observe_latency(std::time::Duration::from_millis(100));
        eps[1].observe_latency(std::time::Duration::from_millis(20));
        for _ in 0..50 {
            assert_eq!(set.pick(&[]).unwrap().endpoint.addr, eps[1].addr);
        }
        // One more in flight outweighs any latency.
        let _busy = eps[1].start();
        assert_eq!(set.pick(&[]).unwrap().endpoint.addr, eps[0].addr);
    }

    #[test]
    fn round_robin_takes_each_in_turn_and_retries_skip_the_tried() {
        let (set, eps) = set(Balance::RoundRobin, 3);
        let picks: Vec<_> = (0..6)
            .map(|_| set.pick(&[]).unwrap().endpoint.addr.port())
            .collect();
        assert_eq!(picks, [8100, 8101, 8102, 8100, 8101, 8102]);
        let tried = vec![Arc::clone(&eps[0]), Arc::clone(&eps[1])];
        for _ in 0..5 {
            assert_eq!(set.pick(&tried).unwrap().endpoint.addr.port(), 8102);
        }
        assert!(set.pick(&eps).is_none());
    }

    #[test]
    fn with_none_healthy_every_endpoint_is_a_candidate() {
        let (set, eps) = set(Balance::LeastLoaded, 2);
        eps[0].start().failed("refused");
        for _ in 0..20 {
            let pick = set.pick(&[]).unwrap();
            assert!(!pick.panic);
            assert_eq!(pick.endpoint.addr, eps[1].addr);
        }
        // A retry does not fall back to a server known to be down while
        // another is healthy.
        assert!(set.pick(std::slice::from_ref(&eps[1])).is_none());
        eps[1].start().failed("refused");
        let pick = set.pick(&[]).unwrap();
        assert!(pick.panic, "both ejected: panic mode");
        assert_eq!(set.counts(), (2, 2), "readiness goes by the checks");
        // Both fail their checks; then one answers again: it is tried
        // first, before its second pass restores it.
        for e in &eps {
            for _ in 0..3 {
                e.check_result(false, "refused");
            }
        }
        eps[1].check_result(true, "");
        assert!(!eps[1].healthy());
        for _ in 0..20 {
            assert_eq!(set.pick(&[]).unwrap().endpoint.addr, eps[1].addr);
        }
    }
}
