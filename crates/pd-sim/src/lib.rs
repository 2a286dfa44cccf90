//! pd-sim: a vLLM prefiller + decoder stand-in for testing and benchmarking
//! pd-proxy without GPUs.
//!
//! It reproduces the wire behaviour a P/D proxy depends on (vLLM 0.32 as
//! captured in shared/captures-vllm-0.32): request-id rules including the
//! engine's random suffix, validation errors and their bodies, SSE chunk
//! layout, and — on the prefiller — LMCache's per-rank
//! `request_store_finished` telemetry, sent after the response like the real
//! asynchronous KV store. Knobs inject the failures a proxy must survive
//! (late, lost, duplicated telemetry; upstream errors; engines dying
//! mid-stream), and counters show what the proxy did to upstream work
//! (streams completed or abandoned, prefills cancelled).
//!
//! One [`Sim`] serves both roles, so a test holds one handle to everything
//! that reached "the engines".

mod binary;
mod body;
mod config;
mod engine;
mod fault;
mod metrics;
mod posting;
mod render;
mod request;
mod server;
mod telemetry;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use axum::http::HeaderMap;
use bytes::Bytes;

pub use binary::binary;
pub use config::SimConfig;
use fault::Dice;
pub use fault::{Fault, Faults};
pub use server::{bind, Running};

/// A request as it reached a completions endpoint, for asserting what the
/// proxy sent upstream.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub at: Instant,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// One telemetry POST attempt. `status` is 0 when no HTTP reply came back
/// (connect failure, timeout): LMCache does not retry, so neither do we.
#[derive(Clone, Debug)]
pub struct TelemetryPost {
    /// When the reply came back (or the attempt failed).
    pub at: Instant,
    pub payload: serde_json::Value,
    pub status: u16,
}

#[derive(Default)]
struct Counters {
    prefill_requests: AtomicU64,
    decode_requests: AtomicU64,
    decode_completed: AtomicU64,
    decode_cancelled: AtomicU64,
    prefills_cancelled: AtomicU64,
    telemetry_ok: AtomicU64,
    telemetry_failed: AtomicU64,
    /// Per [`Fault`], in [`Fault::ALL`]'s order.
    faults: [AtomicU64; Fault::ALL.len()],
}

/// The simulated prefiller and decoder, with everything they observed.
pub struct Sim {
    pub config: SimConfig,
    /// `system_fingerprint`, fixed per instance like a real server's.
    fingerprint: String,
    telemetry: Option<Result<telemetry::Target, String>>,
    prefill_log: Mutex<Vec<Recorded>>,
    decode_log: Mutex<Vec<Recorded>>,
    telemetry_log: Mutex<Vec<TelemetryPost>>,
    counters: Counters,
    dice: Dice,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Prefiller,
    Decoder,
}

fn snapshot<T: Clone>(log: &Mutex<Vec<T>>) -> Vec<T> {
    log.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

impl Sim {
    pub fn new(config: SimConfig) -> Arc<Sim> {
        let telemetry = config.telemetry_url.as_deref().map(|url| {
            let target = telemetry::Target::parse(url);
            if let Err(e) = &target {
                tracing::warn!("pd-sim: {e}; telemetry posts will fail");
            }
            target
        });
        let dice = Dice::new(&config.faults);
        Arc::new(Sim {
            config,
            dice,
            fingerprint: format!("vllm-0.32.0-{:08x}", rand::random::<u32>()),
            telemetry,
            prefill_log: Mutex::default(),
            decode_log: Mutex::default(),
            telemetry_log: Mutex::default(),
            counters: Counters::default(),
        })
    }

    /// Every request that reached a prefiller completions endpoint, in
    /// arrival order (empty when `record` is off).
    pub fn prefill_requests(&self) -> Vec<Recorded> {
        snapshot(&self.prefill_log)
    }

    /// Every request that reached a decoder completions endpoint.
    pub fn decode_requests(&self) -> Vec<Recorded> {
        snapshot(&self.decode_log)
    }

    /// Every telemetry POST attempt, in the order their replies came back.
    pub fn telemetry_posts(&self) -> Vec<TelemetryPost> {
        snapshot(&self.telemetry_log)
    }

    /// Decoder response bodies dropped before their last byte was handed
    /// over: the client (proxy) went away and the engine's work was
    /// abandoned, as a proxy should on client disconnect.
    pub fn decode_streams_cancelled(&self) -> u64 {
        self.counters.decode_cancelled.load(Ordering::Relaxed)
    }

    /// Decoder response bodies (streamed or not) handed over to the end.
    pub fn decode_streams_completed(&self) -> u64 {
        self.counters.decode_completed.load(Ordering::Relaxed)
    }

    /// Prefill handlers dropped before answering (client went away during
    /// `prefill_delay` or while telemetry was posted before the response).
    pub fn prefills_cancelled(&self) -> u64 {
        self.counters.prefills_cancelled.load(Ordering::Relaxed)
    }

    /// How many times `fault` was injected.
    pub fn faults_injected(&self, fault: Fault) -> u64 {
        self.counters.faults[fault.index()].load(Ordering::Relaxed)
    }

    /// Draws this request's fault and counts it.
    fn draw_fault(&self, role: Role) -> Option<Fault> {
        let fault = self.dice.draw(role == Role::Prefiller)?;
        self.counters.faults[fault.index()].fetch_add(1, Ordering::Relaxed);
        Some(fault)
    }

    fn record(&self, role: Role, headers: HeaderMap, body: Bytes) {
        let (counter, log) = match role {
            Role::Prefiller => (&self.counters.prefill_requests, &self.prefill_log),
            Role::Decoder => (&self.counters.decode_requests, &self.decode_log),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if self.config.record {
            let entry = Recorded {
                at: Instant::now(),
                headers,
                body,
            };
            log.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(entry);
        }
    }
}
