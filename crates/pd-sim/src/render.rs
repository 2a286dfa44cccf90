//! Response bodies, byte-compatible in key set and key order with vLLM 0.32
//! (see shared/captures-vllm-0.32). Typed structs rather than
//! `serde_json::Value`, because `Value` sorts keys and a proxy that relays
//! bytes must be tested against the real order.
//!
//! `()` serializes as `null`; `Option<()>` with `skip_serializing_if` is a
//! key that vLLM emits as `null` on some chunks and omits on others.

use bytes::Bytes;
use serde::Serialize;

use crate::request::{Kind, Plan};

/// The SSE terminator every vLLM stream ends with.
pub(crate) const DONE: &[u8] = b"data: [DONE]\n\n";

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u32,
    total_tokens: u32,
    completion_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens_details: Option<()>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion_tokens_details: Option<()>,
}

impl Usage {
    /// Streams report the bare counts; full responses also carry the
    /// (always null) detail objects.
    fn new(plan: &Plan, full: bool) -> Self {
        let prompt: u32 = plan
            .prompt_tokens
            .iter()
            .fold(0, |a, b| a.saturating_add(*b));
        let completion = plan
            .max_tokens
            .saturating_mul(plan.prompt_tokens.len() as u32);
        Usage {
            prompt_tokens: prompt,
            total_tokens: prompt.saturating_add(completion),
            completion_tokens: completion,
            prompt_tokens_details: full.then_some(()),
            completion_tokens_details: full.then_some(()),
        }
    }
}

#[derive(Serialize)]
struct ChatChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChatChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_token_ids: Option<()>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_text: Option<()>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<&'a str>,
}

#[derive(Serialize)]
struct ChatChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: (),
    finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_reason: Option<()>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_ids: Option<()>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    content: &'a str,
}

#[derive(Serialize)]
struct CmplChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [CmplChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<&'a str>,
}

#[derive(Serialize)]
struct CmplChunkChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: (),
    finish_reason: Option<&'static str>,
    stop_reason: (),
    prompt_token_ids: (),
    token_ids: (),
}

#[derive(Serialize)]
struct ChatFull<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [ChatFullChoice; 1],
    service_tier: (),
    system_fingerprint: &'a str,
    usage: Usage,
    prompt_logprobs: (),
    prompt_token_ids: (),
    prompt_text: (),
    kv_transfer_params: (),
    ec_transfer_params: (),
    metrics: (),
}

#[derive(Serialize)]
struct ChatFullChoice {
    index: u32,
    message: Message,
    logprobs: (),
    finish_reason: &'static str,
    stop_reason: (),
    token_ids: (),
    routed_experts: (),
}

#[derive(Serialize)]
struct Message {
    role: &'static str,
    content: String,
    refusal: (),
    annotations: (),
    audio: (),
    function_call: (),
    reasoning: (),
}

#[derive(Serialize)]
struct CmplFull<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<CmplFullChoice>,
    service_tier: (),
    system_fingerprint: &'a str,
    usage: Usage,
    kv_transfer_params: (),
    ec_transfer_params: (),
    metrics: (),
}

#[derive(Serialize)]
struct CmplFullChoice {
    index: u32,
    text: String,
    logprobs: (),
    finish_reason: &'static str,
    stop_reason: (),
    token_ids: (),
    prompt_logprobs: (),
    prompt_token_ids: (),
    routed_experts: (),
}

/// Deterministic token text, so tests can predict content exactly.
pub(crate) fn token_text(i: u32) -> String {
    format!(" tok{i}")
}

fn generated_text(n: u32) -> String {
    use std::fmt::Write;
    let mut text = String::with_capacity(n as usize * 8);
    for i in 0..n {
        // Writing to a String cannot fail.
        let _ = write!(text, " tok{i}");
    }
    text
}

/// Serializes one SSE event into its own buffer, ready to be one body frame.
fn event<T: Serialize>(value: &T) -> Bytes {
    let mut buf = Vec::with_capacity(320);
    buf.extend_from_slice(b"data: ");
    // Our structs hold only strings, integers and nulls: cannot fail.
    let _ = serde_json::to_writer(&mut buf, value);
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

/// The non-streaming response body.
pub(crate) fn full(plan: &Plan, model: &str, fingerprint: &str) -> Bytes {
    let text = generated_text(plan.max_tokens);
    let body = match plan.kind {
        Kind::Chat => serde_json::to_vec(&ChatFull {
            id: &plan.response_id,
            object: "chat.completion",
            created: plan.created,
            model,
            choices: [ChatFullChoice {
                index: 0,
                message: Message {
                    role: "assistant",
                    content: text,
                    refusal: (),
                    annotations: (),
                    audio: (),
                    function_call: (),
                    reasoning: (),
                },
                logprobs: (),
                finish_reason: "length",
                stop_reason: (),
                token_ids: (),
                routed_experts: (),
            }],
            service_tier: (),
            system_fingerprint: fingerprint,
            usage: Usage::new(plan, true),
            prompt_logprobs: (),
            prompt_token_ids: (),
            prompt_text: (),
            kv_transfer_params: (),
            ec_transfer_params: (),
            metrics: (),
        }),
        Kind::Completions => serde_json::to_vec(&CmplFull {
            id: &plan.response_id,
            object: "text_completion",
            created: plan.created,
            model,
            choices: (0..plan.prompt_tokens.len() as u32)
                .map(|index| CmplFullChoice {
                    index,
                    text: text.clone(),
                    logprobs: (),
                    finish_reason: "length",
                    stop_reason: (),
                    token_ids: (),
                    prompt_logprobs: (),
                    prompt_token_ids: (),
                    routed_experts: (),
                })
                .collect(),
            service_tier: (),
            system_fingerprint: fingerprint,
            usage: Usage::new(plan, true),
            kv_transfer_params: (),
            ec_transfer_params: (),
            metrics: (),
        }),
    };
    Bytes::from(body.unwrap_or_default())
}

/// Chat's opening chunk: the assistant role with empty content, before any
/// token, exactly as vLLM sends it.
pub(crate) fn chat_role_chunk(plan: &Plan, model: &str) -> Bytes {
    event(&ChatChunk {
        id: &plan.response_id,
        object: "chat.completion.chunk",
        created: plan.created,
        model,
        choices: &[ChatChunkChoice {
            index: 0,
            delta: Delta {
                role: Some("assistant"),
                content: "",
            },
            logprobs: (),
            finish_reason: None,
            stop_reason: None,
            token_ids: None,
        }],
        usage: None,
        prompt_token_ids: Some(()),
        prompt_text: Some(()),
        system_fingerprint: None,
    })
}

/// The event carrying token `step` for prompt `index`; the last step carries
/// `finish_reason` (and, for chat, the fingerprint), like vLLM.
pub(crate) fn token_event(
    plan: &Plan,
    model: &str,
    fingerprint: &str,
    step: u32,
    index: u32,
) -> Bytes {
    let last = step + 1 >= plan.max_tokens;
    let text = token_text(step);
    let finish_reason = last.then_some("length");
    match plan.kind {
        Kind::Chat => event(&ChatChunk {
            id: &plan.response_id,
            object: "chat.completion.chunk",
            created: plan.created,
            model,
            choices: &[ChatChunkChoice {
                index,
                delta: Delta {
                    role: None,
                    content: &text,
                },
                logprobs: (),
                finish_reason,
                stop_reason: last.then_some(()),
                token_ids: Some(()),
            }],
            usage: None,
            prompt_token_ids: None,
            prompt_text: None,
            system_fingerprint: last.then_some(fingerprint),
        }),
        Kind::Completions => event(&CmplChunk {
            id: &plan.response_id,
            object: "text_completion",
            created: plan.created,
            model,
            choices: &[CmplChunkChoice {
                index,
                text: &text,
                logprobs: (),
                finish_reason,
                stop_reason: (),
                prompt_token_ids: (),
                token_ids: (),
            }],
            usage: None,
            system_fingerprint: None,
        }),
    }
}

/// The `stream_options.include_usage` chunk: no choices, totals only.
pub(crate) fn usage_chunk(plan: &Plan, model: &str, fingerprint: &str) -> Bytes {
    match plan.kind {
        Kind::Chat => event(&ChatChunk {
            id: &plan.response_id,
            object: "chat.completion.chunk",
            created: plan.created,
            model,
            choices: &[],
            usage: Some(Usage::new(plan, false)),
            prompt_token_ids: None,
            prompt_text: None,
            system_fingerprint: Some(fingerprint),
        }),
        Kind::Completions => event(&CmplChunk {
            id: &plan.response_id,
            object: "text_completion",
            created: plan.created,
            model,
            choices: &[],
            usage: Some(Usage::new(plan, false)),
            system_fingerprint: Some(fingerprint),
        }),
    }
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: [ModelCard<'a>; 1],
}

#[derive(Serialize)]
struct ModelCard<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    root: &'a str,
    parent: (),
    max_model_len: u64,
    permission: [Permission; 1],
}

#[derive(Serialize)]
struct Permission {
    id: String,
    object: &'static str,
    created: u64,
    allow_create_engine: bool,
    allow_sampling: bool,
    allow_logprobs: bool,
    allow_search_indices: bool,
    allow_view: bool,
    allow_fine_tuning: bool,
    organization: &'static str,
    group: (),
    is_blocking: bool,
}

/// `/v1/models`, shaped like vLLM's (models.json in the captures).
pub(crate) fn models(model: &str, created: u64) -> Bytes {
    let list = ModelList {
        object: "list",
        data: [ModelCard {
            id: model,
            object: "model",
            created,
            owned_by: "vllm",
            root: model,
            parent: (),
            max_model_len: crate::request::MAX_MODEL_LEN,
            permission: [Permission {
                id: format!("modelperm-{:016x}", rand::random::<u64>()),
                object: "model_permission",
                created,
                allow_create_engine: false,
                allow_sampling: true,
                allow_logprobs: true,
                allow_search_indices: false,
                allow_view: true,
                allow_fine_tuning: false,
                organization: "*",
                group: (),
                is_blocking: false,
            }],
        }],
    };
    Bytes::from(serde_json::to_vec(&list).unwrap_or_default())
}
