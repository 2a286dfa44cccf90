//! One error type for everything the proxy answers on its own, so every
//! failure reaches clients in the shape OpenAI SDKs parse
//! (`{"error":{"message","type","param","code"}}`) with the status that says
//! whose fault it was: the client's (4xx), an upstream's (502/504) or ours.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};

/// Which upstream call failed; labels metrics and error messages so an
/// operator can tell a dead prefiller from a dead decoder at a glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    Prefill,
    Decode,
    Models,
}

impl Leg {
    pub fn as_str(self) -> &'static str {
        match self {
            Leg::Prefill => "prefill",
            Leg::Decode => "decode",
            Leg::Models => "models",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client sent something we refuse before any upstream sees it.
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    NotFound(String),
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    /// An upstream could not be reached, failed, or answered nonsense. The
    /// detail is logged, the client gets only which leg broke.
    #[error("{} upstream failed: {detail}", leg.as_str())]
    Upstream { leg: Leg, detail: String },
    #[error("{} upstream did not answer within {secs:.1}s", leg.as_str())]
    UpstreamTimeout { leg: Leg, secs: f64 },
    /// No endpoint of a role is known: every name failed to resolve so far
    /// (pods not started yet) or answered with no address.
    #[error("no {0} is known yet; discovery has found no address")]
    NoUpstream(&'static str),
    /// `/ready` while a role has no healthy endpoint.
    #[error("{0}")]
    NotReady(String),
    /// The request came from a pd-proxy: forwarding it would loop.
    #[error("request loop: this request was already forwarded by a pd-proxy (x-pd-proxy-hop); is an upstream pointing back at a proxy?")]
    LoopDetected,
    /// `--on-kv-timeout fail`: the prefiller's KV never reported as stored.
    #[error("KV cache was not reported stored within {secs:.1}s (--kv-ready-timeout)")]
    KvTimeout { secs: f64 },
    /// No key, or not one of `--api-key`'s.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A telemetry post without the right `?token=`.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The body did not arrive within its time.
    #[error("{0}")]
    RequestTimeout(String),
    /// A limit of the proxy's own (parked requests, connections) is full;
    /// the client may try again after `retry_after` seconds.
    #[error("{message}")]
    Overloaded { message: String, retry_after: u32 },
}

impl ProxyError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ProxyError::BadRequest {
            message: message.into(),
            param,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ProxyError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NotFound(_) => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } | ProxyError::KvTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::NoUpstream(_) | ProxyError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::LoopDetected => StatusCode::LOOP_DETECTED,
            ProxyError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `type` field, named like vLLM's own errors so that a client sees
    /// one vocabulary whether the proxy or the engine refused it.
    fn kind(&self) -> &'static str {
        match self {
            ProxyError::BadRequest { .. } => "BadRequestError",
            ProxyError::PayloadTooLarge { .. } => "RequestTooLargeError",
            ProxyError::NotFound(_) => "NotFoundError",
            ProxyError::MethodNotAllowed(_) => "MethodNotAllowedError",
            ProxyError::Upstream { .. } => "BadGatewayError",
            ProxyError::UpstreamTimeout { .. } | ProxyError::KvTimeout { .. } => {
                "GatewayTimeoutError"
            }
            ProxyError::NoUpstream(_) | ProxyError::NotReady(_) => "ServiceUnavailableError",
            ProxyError::LoopDetected => "LoopDetectedError",
            // OpenAI's own words for a bad key.
            ProxyError::Unauthorized(_) => "invalid_request_error",
            ProxyError::Forbidden(_) => "PermissionDeniedError",
            ProxyError::RequestTimeout(_) => "RequestTimeoutError",
            ProxyError::Overloaded { .. } => "ServiceUnavailableError",
        }
    }

    /// The `code` field: the status, except where OpenAI names the case
    /// (SDKs match `invalid_api_key`).
    fn code(&self) -> serde_json::Value {
        match self {
            ProxyError::Unauthorized(_) => "invalid_api_key".into(),
            other => other.status().as_u16().into(),
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            ProxyError::BadRequest { param, .. } => *param,
            _ => None,
        }
    }

    /// The message shown to the client. Upstream failure details (addresses,
    /// OS errors) stay in the log.
    fn public_message(&self) -> String {
        match self {
            ProxyError::Upstream { leg, .. } => {
                format!("the {} upstream failed; see the proxy log", leg.as_str())
            }
            other => other.to_string(),
        }
    }

    /// The error as a JSON object `{"error":{...}}`.
    pub fn body(&self) -> Bytes {
        error_value(
            &self.public_message(),
            self.kind(),
            self.param(),
            self.code(),
        )
    }
}

/// Serialises the OpenAI error object. Also used for the SSE error event a
/// broken decoder stream ends with.
pub fn error_json(message: &str, kind: &str, param: Option<&str>, code: u16) -> Bytes {
    error_value(message, kind, param, code.into())
}

fn error_value(message: &str, kind: &str, param: Option<&str>, code: serde_json::Value) -> Bytes {
    let value = serde_json::json!({
        "error": { "message": message, "type": kind, "param": param, "code": code }
    });
    Bytes::from(serde_json::to_vec(&value).expect("a JSON value always serialises"))
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        if self.status().is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        let mut response = (self.status(), self.body()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match &self {
            ProxyError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ProxyError::Overloaded { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            _ => {}
        }
        response
    }
}
