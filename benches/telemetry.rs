//! The telemetry hot path without sockets: resolving LMCache's engine ids
//! to parked requests and waking them, with 10,000 requests parked; with
//! plain ids and with owner-routed ids (a cluster key: one HMAC check per
//! id).
//!
//! `cargo bench --bench telemetry`

use std::time::{Duration, Instant};

use metrics::Gauge;
use pd_proxy::owner::{Ids, Owner};
use pd_proxy::pending::{Pending, Recorded, RequestId};
use pd_proxy::telemetry::parse_engine_id;

const PARKED: usize = 10_000;
const ROUNDS: usize = 50;

fn run(name: &str, ids: &Ids) {
    let pending = Pending::new(Gauge::noop(), usize::MAX);
    let mut best = Duration::MAX;
    let mut total = Duration::ZERO;
    for _ in 0..ROUNDS {
        let request_ids: Vec<RequestId> = (0..PARKED).map(|_| RequestId::random()).collect();
        let mut parked: Vec<_> = request_ids
            .iter()
            .map(|&id| pending.park(id, 1).unwrap())
            .collect();
        // What LMCache posts: the engine id with vLLM's random suffix.
        let events: Vec<String> = request_ids
            .iter()
            .map(|&id| format!("chatcmpl-{}-9a895ec2", ids.wire(id)))
            .collect();
        let started = Instant::now();
        for event in &events {
            let e = parse_engine_id(event).expect("a well-formed engine id");
            let Owner::Local(id) = ids.resolve(e.token) else {
                panic!("our own id");
            };
            let outcome = pending.record(id, e.prompt, 1, 0);
            assert_eq!(outcome, Recorded::Ready);
        }
        let elapsed = started.elapsed();
        best = best.min(elapsed);
        total += elapsed;
        for (_, rx) in &mut parked {
            assert!(rx.try_recv().is_ok(), "every waiter was woken");
        }
        drop(parked);
        assert!(pending.is_empty());
    }
    let per_event_best = best.as_secs_f64() / PARKED as f64;
    let per_event_mean = total.as_secs_f64() / (PARKED * ROUNDS) as f64;
    println!(
        "telemetry path, {name}: {PARKED} parked, {ROUNDS} rounds (parse engine id + resolve + count rank + wake)"
    );
    println!(
        "  best {:.0} ns/event = {:.2} M events/s; mean {:.0} ns/event = {:.2} M events/s",
        per_event_best * 1e9,
        1e-6 / per_event_best,
        per_event_mean * 1e9,
        1e-6 / per_event_mean
    );
}

fn main() {
    run("plain ids", &Ids::local());
    let routed = Ids::routed(
        b"a cluster key of thirty-two bytes",
        "10.0.0.7:5768".parse().unwrap(),
    )
    .expect("a long enough key");
    run("owner-routed ids", &routed);
}
