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

    /// Healthy endpoints and all endpoints.
    pub fn counts(&self) -> (usize, usize) {
        let all = self.snapshot();
        let now = self.clock.now_ms();
        (all.iter().filter(|e| e.eligible(now)).count(), all.len())
    }

    /// Chooses an endpoint other than those in `tried`: among the healthy
    /// ones if any; else among those whose last health check passed (back
    /// from the dead, not yet restored); else among all. `None` when
    /// nothing is left.
    pub fn pick(&self, tried: &[Arc<Endpoint>]) -> Option<Pick> {
        self.pick_from(&self.snapshot(), tried)
    }

    /// [`pick`](Self::pick) among `all` instead of the role's set: the
    /// prefillers a request's gateway named.
    pub fn pick_from(&self, all: &[Arc<Endpoint>], tried: &[Arc<Endpoint>]) -> Option<Pick> {
        let now = self.clock.now_ms();
        let untried = |e: &&Arc<Endpoint>| !tried.iter().any(|t| Arc::ptr_eq(t, e));
        let healthy = |e: &&Arc<Endpoint>| untried(e) && e.eligible(now);
        let n = all.iter().filter(healthy).count();
        if n > 0 {
            return Some(Pick {
                endpoint: self.choose(all, healthy, n, now),
                panic: false,
            });
        }
        let answering = |e: &&Arc<Endpoint>| untried(e) && e.last_check_passed();
        let n = all.iter().filter(answering).count();
        if n > 0 {
            return Some(Pick {
                endpoint: self.choose(all, answering, n, now),
                panic: true,
            });
        }
        let n = all.iter().filter(untried).count();
        (n > 0).then(|| Pick {
            endpoint: self.choose(all, untried, n, now),
            panic: true,
        })
    }

    /// Picks among the `n` endpoints of `all` that pass `candidate`.
    fn choose(
        &self,
        all: &[Arc<Endpoint>],
        candidate: impl Fn(&&Arc<Endpoint>) -> bool,
        n: usize,
        now: u64,
    ) -> Arc<Endpoint> {
        let nth = |i: usize| {
            Arc::clone(
                all.iter()
                    .filter(&candidate)
                    .nth(i)
                    .expect("n candidates were counted"),
            )
        };
        if n == 1 {
            return nth(0);
        }
        match self.balance {
            Balance::RoundRobin => nth(self.next.fetch_add(1, Ordering::Relaxed) % n),
            Balance::LeastLoaded => {
                let i = rand::random_range(0..n);
                let mut j = rand::random_range(0..n - 1);
                if j >= i {
                    j += 1;
                }
                let (a, b) = (nth(i), nth(j));
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
        }
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
        eps[0].passive_failure("refused");
        for _ in 0..20 {
            let pick = set.pick(&[]).unwrap();
            assert!(!pick.panic);
            assert_eq!(pick.endpoint.addr, eps[1].addr);
        }
        eps[1].passive_failure("refused");
        let pick = set.pick(&[]).unwrap();
        assert!(pick.panic, "both ejected: panic mode");
        assert_eq!(set.counts(), (0, 2));
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
