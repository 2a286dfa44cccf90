//! pd-proxy: the front door of a disaggregated vLLM deployment.
//!
//! ```text
//! client ──POST /v1/chat/completions──▶ pd-proxy :8000
//!   ├─ park the request under a fresh 32-hex id (pending.rs)
//!   ├─ pick a healthy, lightly loaded prefiller (fleet/)
//!   ├─ copy with max_tokens=1, stream=false, X-Request-Id: id ──▶ prefiller
//!   │      prefiller's LMCache, once per TP rank:
//!   │      POST :5768/api/v1/telemetry {request_store_finished, [chatcmpl-id-xxxxxxxx]}
//!   │      ──▶ telemetry.rs counts ranks, wakes the parked request
//!   ├─ wait for every rank, bounded by --kv-ready-timeout
//!   └─ original body ──▶ decoder (picked likewise) ──SSE──▶ relayed ──▶ client
//! ```
//!
//! The fleet behind it changes at run time: names are re-resolved, every
//! endpoint is health-checked, failures eject, and a prefill that never
//! reached an engine moves to another prefiller.
//!
//! The decoder finds the prompt's KV in LMCache and skips the prefill. The
//! request path is the phase list of `proxy::run` (`proxy/mod.rs`);
//! ARCHITECTURE.md walks one request through the rooms.

pub mod app;
pub mod auth;
pub mod config;
pub mod conn;
pub mod error;
pub mod fleet;
pub mod forward;
pub mod metrics;
pub mod openai;
pub mod owner;
pub mod pending;
pub mod proxy;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tokens;
pub mod trace;
pub mod upstream;

pub use app::{App, Bound};
pub use config::{Args, Balance, Config, KvTimeoutPolicy, ListenAddrs};
pub use server::{bind, listen, public_router, serve, telemetry_router, Listeners};
