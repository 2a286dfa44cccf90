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
    /// detail is logged, the client gets only which leg broke. Boxed: the
    /// error is rare and every phase's `Result` carries its size.
    #[error("{leg} upstream failed: {0}", leg = .0.leg.as_str())]
    Upstream(Box<UpstreamError>),
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
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
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
            ProxyError::Upstream(_) => "BadGatewayError",
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
            ProxyError::Upstream(err) => {
                format!(
                    "the {} upstream failed; see the proxy log",
                    err.leg.as_str()
                )
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

/// How an upstream call failed. The kind decides whether another endpoint
/// may take the request over; the source keeps the cause chain for the log.
#[derive(Debug)]
pub struct UpstreamError {
    pub leg: Leg,
    /// The endpoint's `host:port`; `None` when no endpoint was asked.
    pub endpoint: Option<String>,
    pub kind: UpstreamKind,
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamKind {
    /// No connection could be made: the server never saw the request.
    Connect,
    /// The connection was refused, reset or closed before any of the
    /// answer came back.
    Reset,
    /// The answer broke off, or its body could not be read: the server may
    /// have done the work.
    Broken,
    /// The server answered with an error status; `said` is the start of
    /// its body.
    Status { status: StatusCode, said: String },
    /// Nothing was asked: no endpoint is known.
    NoEndpoint,
}

impl UpstreamError {
    pub fn new(leg: Leg, endpoint: &str, kind: UpstreamKind) -> Self {
        UpstreamError {
            leg,
            endpoint: Some(endpoint.to_owned()),
            kind,
            source: None,
        }
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Classifies a failed call of the HTTP client: a connect error, a
    /// connection that closed before any answer, or anything else.
    pub fn from_client(leg: Leg, endpoint: &str, err: hyper_util::client::legacy::Error) -> Self {
        let kind = if err.is_connect() {
            UpstreamKind::Connect
        } else if closed_before_answer(&err) {
            UpstreamKind::Reset
        } else {
            UpstreamKind::Broken
        };
        UpstreamError::new(leg, endpoint, kind).with_source(err)
    }

    /// Another endpoint may take the request over: it never reached an
    /// engine, or the engine turned it away as unavailable (503).
    pub fn retryable(&self) -> bool {
        match &self.kind {
            UpstreamKind::Connect | UpstreamKind::Reset => true,
            UpstreamKind::Status { status, .. } => *status == StatusCode::SERVICE_UNAVAILABLE,
            UpstreamKind::Broken | UpstreamKind::NoEndpoint => false,
        }
    }

    /// No connection was made, so no engine can have started the work.
    pub fn never_sent(&self) -> bool {
        self.kind == UpstreamKind::Connect
    }

    /// The endpoint itself is at fault (it refused, reset or failed the
    /// request): passive ejection counts it.
    pub fn endpoint_failed(&self) -> bool {
        match &self.kind {
            UpstreamKind::Connect | UpstreamKind::Reset => true,
            UpstreamKind::Status { status, .. } => status.is_server_error(),
            UpstreamKind::Broken | UpstreamKind::NoEndpoint => false,
        }
    }

    /// Why the endpoint failed, for its ejection's log line.
    pub fn why(&self) -> String {
        match (&self.kind, &self.source) {
            (UpstreamKind::Status { status, .. }, _) => format!("answered {status}"),
            (_, Some(source)) => {
                let mut why = String::new();
                let _ = write_chain(&mut why, source.as_ref());
                why.trim_start_matches(": ").to_owned()
            }
            (kind, None) => format!("{kind:?}"),
        }
    }

    /// The status the upstream answered, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match &self.kind {
            UpstreamKind::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let endpoint = self.endpoint.as_deref().unwrap_or("no upstream");
        match (&self.kind, &self.source) {
            (UpstreamKind::Status { status, said }, _) => {
                write!(f, "{endpoint} answered {status}: {said}")
            }
            (UpstreamKind::NoEndpoint, _) => f.write_str("no upstream is known yet"),
            (_, Some(source)) => {
                write!(f, "{endpoint}")?;
                write_chain(f, source.as_ref())
            }
            (kind, None) => write!(f, "{endpoint}: {kind:?}"),
        }
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<UpstreamError> for ProxyError {
    fn from(err: UpstreamError) -> Self {
        ProxyError::Upstream(Box::new(err))
    }
}

/// Whether the client's connection closed before any of the answer came:
/// hyper says the message was incomplete or cancelled, or the OS says the
/// connection was reset, aborted, refused or broken.
fn closed_before_answer(err: &hyper_util::client::legacy::Error) -> bool {
    use std::error::Error as _;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = err.source();
    while let Some(e) = cause {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::BrokenPipe
            ) {
                return true;
            }
        }
        cause = e.source();
    }
    false
}

/// Writes `: cause` for an error and each of its sources, so a log line
/// says what hyper-util said and what the OS said under it.
fn write_chain(
    out: &mut impl std::fmt::Write,
    err: &(dyn std::error::Error + 'static),
) -> std::fmt::Result {
    let mut cause = Some(err);
    while let Some(e) = cause {
        write!(out, ": {e}")?;
        cause = e.source();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_is_a_retryable_connect_error_with_its_cause() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let uri: http::Uri = format!("http://{addr}/health").parse().unwrap();
        let err = crate::upstream::client()
            .request(crate::upstream::get(&uri, None))
            .await
            .unwrap_err();
        let err = UpstreamError::from_client(Leg::Prefill, &addr.to_string(), err);
        assert_eq!(err.kind, UpstreamKind::Connect);
        assert!(err.retryable() && err.never_sent() && err.endpoint_failed());
        let text = err.to_string();
        assert!(text.starts_with(&format!("{addr}: ")), "{text}");
        assert!(
            text.to_lowercase().contains("refused"),
            "the OS's cause is kept: {text}"
        );
        assert!(!err.why().starts_with(':'), "{}", err.why());
        let public = ProxyError::from(err);
        assert_eq!(public.status(), StatusCode::BAD_GATEWAY);
        let body = String::from_utf8(public.body().to_vec()).unwrap();
        assert!(
            !body.contains("127.0.0.1"),
            "addresses stay in the log: {body}"
        );
    }

    #[test]
    fn only_a_503_among_answers_may_move_to_another_endpoint() {
        let status = |code: u16| {
            UpstreamError::new(
                Leg::Prefill,
                "10.0.0.1:8100",
                UpstreamKind::Status {
                    status: StatusCode::from_u16(code).unwrap(),
                    said: "busy".into(),
                },
            )
        };
        assert!(status(503).retryable() && !status(503).never_sent());
        assert!(!status(500).retryable() && status(500).endpoint_failed());
        assert!(!status(429).endpoint_failed());
        assert_eq!(
            status(503).to_string(),
            "10.0.0.1:8100 answered 503 Service Unavailable: busy"
        );
        assert_eq!(status(500).why(), "answered 500 Internal Server Error");
        let broken = UpstreamError::new(Leg::Decode, "10.0.0.2:8200", UpstreamKind::Broken);
        assert!(!broken.retryable() && !broken.endpoint_failed());
    }
}
