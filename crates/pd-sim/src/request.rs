//! Reading an OpenAI request the way vLLM's OpenAI server does: same id
//! rules, same checks, same error bodies, so a proxy tested against the
//! simulator sees what it would see from a real engine.

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};

/// vLLM reports this in `/v1/models`; requests asking for more output than
/// this are rejected as a real engine would. Large on purpose: the simulator
/// must not get in the way of long benchmark generations.
pub(crate) const MAX_MODEL_LEN: u64 = 131_072;

/// Which OpenAI endpoint a request came in on; it decides id prefixes and
/// the response shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Completions,
}

/// Everything the simulator needs to answer one valid request, decided once
/// so the streaming body does no parsing.
#[derive(Debug)]
pub(crate) struct Plan {
    pub kind: Kind,
    /// `B`: the caller's id (header, then body `request_id`) or a random one.
    pub base_id: String,
    /// `chatcmpl-B` / `cmpl-B`: what clients see as `id`.
    pub response_id: String,
    pub created: u64,
    /// Prompt token counts, one per prompt (chat always has one).
    pub prompt_tokens: Vec<u32>,
    /// Tokens generated for each prompt; the simulator always runs to length.
    pub max_tokens: u32,
    pub stream: bool,
    pub include_usage: bool,
}

impl Plan {
    /// The ids the engine (and so LMCache telemetry) uses: vLLM >= 0.14
    /// appends a random suffix, which is exactly what breaks naive proxies.
    pub fn internal_ids(&self, random_suffix: bool) -> Vec<String> {
        let suffix = || {
            if random_suffix {
                format!("-{:08x}", rand::random::<u32>())
            } else {
                String::new()
            }
        };
        match self.kind {
            Kind::Chat => vec![format!("chatcmpl-{}{}", self.base_id, suffix())],
            Kind::Completions => (0..self.prompt_tokens.len())
                .map(|i| format!("cmpl-{}-{}{}", self.base_id, i, suffix()))
                .collect(),
        }
    }
}

/// An error answered before any generation, in vLLM's OpenAI error shape.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// vLLM uses `BadRequestError`/`NotFoundError` for its own checks but the
    /// HTTP phrase (`Bad Request`) for request-schema (pydantic) failures.
    pub kind: &'static str,
    pub param: Option<String>,
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: u16,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, param: Option<&str>, message: String) -> Self {
        ApiError {
            status,
            message,
            kind,
            param: param.map(str::to_owned),
        }
    }

    /// A check vLLM itself performs (sampling params, model name).
    pub fn bad_request(param: &str, message: String) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "BadRequestError",
            Some(param),
            message,
        )
    }

    /// A request-schema failure, reported by vLLM's pydantic handler.
    fn schema(param: &str, kind: &str, msg: &str) -> Self {
        let message = format!(
            "1 validation error:\n  {{'type': '{kind}', 'loc': '{param}', 'msg': '{msg}'}}"
        );
        Self::new(StatusCode::BAD_REQUEST, "Bad Request", Some(param), message)
    }

    /// An injected failure (`prefill_error` / `decoder_error`): any status,
    /// with the OpenAI error type a client library would map it to.
    pub fn injected(code: u16) -> Self {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let kind = match status.as_u16() {
            400 => "BadRequestError",
            401 => "AuthenticationError",
            403 => "PermissionDeniedError",
            404 => "NotFoundError",
            409 => "ConflictError",
            422 => "UnprocessableEntityError",
            429 => "RateLimitError",
            503 => "ServiceUnavailableError",
            _ => "InternalServerError",
        };
        Self::new(
            status,
            kind,
            None,
            format!("pd-sim injected error (status {})", status.as_u16()),
        )
    }

    pub fn body(&self) -> Vec<u8> {
        let envelope = ErrorEnvelope {
            error: ErrorBody {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.status.as_u16(),
            },
        };
        // Serializing plain strings and integers cannot fail.
        serde_json::to_vec(&envelope).unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

/// The id from `X-Request-Id`, read before the headers are moved into the
/// request log.
pub(crate) fn header_request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Validates `body` in the order vLLM does (schema, then model, then
/// sampling parameters) and decides what to generate.
pub(crate) fn parse(
    kind: Kind,
    header_id: Option<String>,
    body: &[u8],
    model: &str,
    default_tokens: u32,
) -> Result<Plan, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::schema(
            "body",
            "json_invalid",
            &format!("JSON decode error: {}", e.to_string().replace('\'', "")),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(ApiError::schema(
            "body",
            "model_attributes_type",
            "Input should be a valid dictionary or object to extract fields from",
        ));
    };

    let stream = opt_bool(&obj, "stream")?.unwrap_or(false);
    let include_usage = include_usage(&obj, stream)?;
    let prompt_tokens = match kind {
        Kind::Chat => vec![chat_prompt_tokens(&obj)?],
        Kind::Completions => completion_prompt_tokens(&obj)?,
    };
    let body_id = body_request_id(&obj)?;
    check_model(&obj, model)?;
    let max_tokens = max_tokens(&obj, default_tokens)?;

    let base_id = header_id
        .or(body_id)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
    let response_id = match kind {
        Kind::Chat => format!("chatcmpl-{base_id}"),
        Kind::Completions => format!("cmpl-{base_id}"),
    };
    Ok(Plan {
        kind,
        base_id,
        response_id,
        created: unix_now(),
        prompt_tokens,
        max_tokens,
        stream,
        include_usage,
    })
}

/// `stream_options.include_usage`, which vLLM only takes on a stream.
fn include_usage(obj: &Map<String, Value>, stream: bool) -> Result<bool, ApiError> {
    Ok(match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(_) if !stream => {
            return Err(ApiError::schema(
                "body",
                "value_error",
                "Value error, Stream options can only be defined when `stream=True`.",
            ))
        }
        Some(Value::Object(opts)) => opt_bool(opts, "include_usage")?.unwrap_or(false),
        Some(_) => {
            return Err(ApiError::schema(
                "body.stream_options",
                "model_type",
                "Input should be a valid dictionary",
            ))
        }
    })
}

/// The body's own `request_id`, which vLLM uses when no header gives one.
fn body_request_id(obj: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    Ok(match obj.get("request_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(ApiError::schema(
                "body.request_id",
                "string_type",
                "Input should be a valid string",
            ))
        }
    })
}

/// vLLM's 404 for a model it does not serve; no model means its own.
fn check_model(obj: &Map<String, Value>, model: &str) -> Result<(), ApiError> {
    match obj.get("model") {
        None | Some(Value::Null) => {}
        Some(Value::String(m)) if m == model => {}
        Some(Value::String(m)) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFoundError",
                Some("model"),
                format!("The model `{m}` does not exist. Valid aliases: {model}."),
            ))
        }
        Some(_) => {
            return Err(ApiError::schema(
                "body.model",
                "string_type",
                "Input should be a valid string",
            ))
        }
    }
    Ok(())
}

/// The tokens to generate: `max_completion_tokens` or `max_tokens`,
/// within vLLM's bounds and above `min_tokens`, else `default_tokens`.
fn max_tokens(obj: &Map<String, Value>, default_tokens: u32) -> Result<u32, ApiError> {
    let max_tokens = opt_int(obj, "max_tokens")?;
    let max_completion_tokens = opt_int(obj, "max_completion_tokens")?;
    for value in [max_tokens, max_completion_tokens].into_iter().flatten() {
        if value < 1 {
            return Err(ApiError::bad_request(
                "max_tokens",
                format!(
                    "max_tokens must be at least 1, got {value}. (parameter=max_tokens, value={value})"
                ),
            ));
        }
        if value as u64 > MAX_MODEL_LEN {
            return Err(ApiError::bad_request(
                "max_tokens",
                format!(
                    "max_tokens={value} cannot be greater than max_model_len={MAX_MODEL_LEN}. \
                     Please request fewer output tokens. (parameter=max_tokens, value={value})"
                ),
            ));
        }
    }
    // vLLM's chat endpoint prefers the newer name when both are given.
    let requested = max_completion_tokens.or(max_tokens);
    let min_tokens = opt_int(obj, "min_tokens")?;
    if let Some(min) = min_tokens {
        if min < 0 {
            return Err(ApiError::bad_request(
                "min_tokens",
                format!(
                    "min_tokens must be greater than or equal to 0, got {min}. \
                     (parameter=min_tokens, value={min})"
                ),
            ));
        }
        if let Some(max) = requested {
            if min > max {
                return Err(ApiError::bad_request(
                    "min_tokens",
                    format!(
                        "min_tokens must be less than or equal to max_tokens={max}, got {min}. \
                         (parameter=min_tokens, value={min})"
                    ),
                ));
            }
        }
    }
    // Both bounds were checked against MAX_MODEL_LEN or u32 above, so the
    // conversions cannot truncate.
    Ok(match requested {
        Some(n) => n as u32,
        None => default_tokens.max(min_tokens.unwrap_or(0).min(MAX_MODEL_LEN as i64) as u32),
    })
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::schema(
            &format!("body.{key}"),
            "bool_type",
            "Input should be a valid boolean",
        )),
    }
}

/// Integers as pydantic accepts them: JSON integers, or floats with no
/// fractional part.
fn opt_int(obj: &Map<String, Value>, key: &str) -> Result<Option<i64>, ApiError> {
    let invalid = || {
        ApiError::schema(
            &format!("body.{key}"),
            "int_type",
            "Input should be a valid integer",
        )
    };
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15) {
                Ok(Some(f as i64))
            } else if n.is_u64() {
                // Larger than i64: certainly over any length limit.
                Ok(Some(i64::MAX))
            } else {
                Err(invalid())
            }
        }
        Some(_) => Err(invalid()),
    }
}

/// A word count stands in for a tokenizer: deterministic, proportional to
/// the prompt, and never zero (a chat template always adds tokens).
/// The count `/tokenize` answers for a completions-style `prompt` or a
/// chat-style `messages` body.
pub(crate) fn tokenize_count(body: &[u8]) -> Option<u32> {
    let Value::Object(obj) = serde_json::from_slice::<Value>(body).ok()? else {
        return None;
    };
    if obj.contains_key("messages") {
        return chat_prompt_tokens(&obj).ok();
    }
    match obj.get("prompt")? {
        Value::String(text) => Some(words(text)),
        _ => None,
    }
}

fn words(text: &str) -> u32 {
    text.split_whitespace().count().max(1) as u32
}

fn chat_prompt_tokens(obj: &Map<String, Value>) -> Result<u32, ApiError> {
    let messages = match obj.get("messages") {
        Some(Value::Array(messages)) => messages,
        None | Some(Value::Null) => {
            return Err(ApiError::schema(
                "body.messages",
                "missing",
                "Field required",
            ))
        }
        Some(_) => {
            return Err(ApiError::schema(
                "body.messages",
                "list_type",
                "Input should be a valid list",
            ))
        }
    };
    let mut count = 0u32;
    for (i, message) in messages.iter().enumerate() {
        let Value::Object(message) = message else {
            return Err(ApiError::schema(
                &format!("body.messages.{i}"),
                "model_type",
                "Input should be a valid dictionary",
            ));
        };
        count = count.saturating_add(match message.get("content") {
            Some(Value::String(text)) => words(text),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .map(words)
                .sum(),
            _ => 0,
        });
    }
    Ok(count.max(1))
}

fn completion_prompt_tokens(obj: &Map<String, Value>) -> Result<Vec<u32>, ApiError> {
    let empty = || {
        ApiError::bad_request(
            "prompt",
            "Either prompt or prompt_embeds must be provided and non-empty.".to_owned(),
        )
    };
    let invalid = || {
        ApiError::schema(
            "body.prompt",
            "union_type",
            "Input should be a string, a list of strings, a list of token ids \
             or a list of lists of token ids",
        )
    };
    let is_token = |v: &Value| v.as_u64().is_some_and(|t| t <= u32::MAX as u64);
    match obj.get("prompt") {
        None | Some(Value::Null) => Err(empty()),
        Some(Value::String(text)) => Ok(vec![words(text)]),
        Some(Value::Array(items)) if items.is_empty() => Err(empty()),
        Some(Value::Array(items)) => {
            if items.iter().all(Value::is_string) {
                Ok(items
                    .iter()
                    .map(|v| words(v.as_str().unwrap_or_default()))
                    .collect())
            } else if items.iter().all(is_token) {
                Ok(vec![items.len() as u32])
            } else if items.iter().all(|v| {
                v.as_array()
                    .is_some_and(|toks| !toks.is_empty() && toks.iter().all(is_token))
            }) {
                Ok(items
                    .iter()
                    .map(|v| v.as_array().map_or(0, |toks| toks.len() as u32))
                    .collect())
            } else {
                Err(invalid())
            }
        }
        Some(_) => Err(invalid()),
    }
}
