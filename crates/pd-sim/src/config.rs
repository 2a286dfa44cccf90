//! The simulated engines' knobs.

use std::time::Duration;

use crate::Faults;

/// How the simulated engines behave. Defaults give a well-behaved
/// single-rank deployment that answers instantly.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The only model name accepted; others get vLLM's 404.
    pub model: String,
    /// Where the prefiller's LMCache posts `request_store_finished`, e.g.
    /// `http://127.0.0.1:5768/api/v1/telemetry`; `None` posts nothing.
    pub telemetry_url: Option<String>,
    /// Tensor-parallel ranks: each posts its own event, and the KV is only
    /// complete once all have.
    pub world_size: u32,
    /// Prefill compute time, before the prefill response.
    pub prefill_delay: Duration,
    /// Store latency: after the prefill response, before rank 0's POST.
    pub telemetry_delay: Duration,
    /// Rank k posts k * this after rank 0.
    pub rank_stagger: Duration,
    /// Post (and await replies for) all ranks before answering the prefill:
    /// the race where telemetry beats the response.
    pub telemetry_before_response: bool,
    /// Ranks whose events are lost.
    pub drop_ranks: Vec<u32>,
    /// Post every event twice.
    pub duplicate_telemetry: bool,
    /// The prefiller answers every request with this status and an OpenAI
    /// error body.
    pub prefill_error: Option<u16>,
    /// The decoder answers every request with this status and an OpenAI
    /// error body.
    pub decoder_error: Option<u16>,
    /// Decoder: before the first SSE event (streams) or, added to the token
    /// delays, before the JSON response.
    pub first_token_delay: Duration,
    /// Decoder: between tokens.
    pub token_delay: Duration,
    /// Tokens generated when neither `max_tokens` nor
    /// `max_completion_tokens` is given.
    pub default_tokens: u32,
    /// Decoder streams: after this many token events the connection is cut
    /// without terminating the chunked body, as when an engine dies.
    pub die_after_tokens: Option<u32>,
    /// Append `-xxxxxxxx` to engine-internal ids, as vLLM >= 0.14 does.
    pub random_suffix: bool,
    /// The queue length reported in vLLM's ORCA header
    /// (`endpoint-load-metrics: JSON {"named_metrics":
    /// {"num_requests_waiting": N, ...}}`) on non-streaming answers to
    /// requests that ask with `endpoint-load-metrics-format: JSON`, as
    /// vLLM 0.32 does; `None` sends no header.
    pub reported_waiting: Option<u32>,
    /// Keep request and telemetry logs. Benchmarks turn it off so memory
    /// stays flat; counters are kept either way.
    pub record: bool,
    /// Failures drawn per request, on top of the fixed knobs above; off
    /// unless `faults.rate` is above 0.
    pub faults: Faults,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            model: "sim-model".to_owned(),
            telemetry_url: None,
            world_size: 1,
            prefill_delay: Duration::ZERO,
            telemetry_delay: Duration::ZERO,
            rank_stagger: Duration::ZERO,
            telemetry_before_response: false,
            drop_ranks: Vec::new(),
            duplicate_telemetry: false,
            prefill_error: None,
            decoder_error: None,
            first_token_delay: Duration::ZERO,
            token_delay: Duration::ZERO,
            default_tokens: 16,
            die_after_tokens: None,
            random_suffix: true,
            reported_waiting: None,
            record: true,
            faults: Faults::default(),
        }
    }
}
