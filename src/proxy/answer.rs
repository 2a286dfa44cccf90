//! Upstream answers read whole and handed to the client, and what a log
//! line says of them. Below every phase: nothing here calls back up.

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::error::{error_json, Leg, UpstreamError, UpstreamKind};
use crate::fleet::Endpoint;
use crate::openai::Api;
use crate::upstream;

/// Largest upstream body the proxy reads whole (prefill answers, errors,
/// model lists); streamed decoder bodies are not read whole.
const MAX_UPSTREAM_BODY_BYTES: usize = 64 << 20;

/// Longest upstream message a log line carries: enough for vLLM's
/// "This model's maximum context length is ..." with its numbers.
const SAID_CHARS: usize = 240;

/// An upstream answer read whole.
pub struct Whole {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub fn uri(endpoint: &Endpoint, api: Api) -> &Uri {
    match api {
        Api::Chat => &endpoint.chat_uri,
        Api::Completions => &endpoint.completions_uri,
    }
}

/// Reads an answer's body whole, within [`MAX_UPSTREAM_BODY_BYTES`]; a body
/// that breaks off is the endpoint's `Broken` failure on `leg`.
pub async fn read_whole(
    leg: Leg,
    endpoint: &str,
    response: http::Response<Incoming>,
) -> Result<Whole, UpstreamError> {
    let headers = upstream::relayed_headers(&response);
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_UPSTREAM_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            UpstreamError::new(leg, endpoint, UpstreamKind::Broken).with_source(ReadBody(e))
        })?
        .to_bytes();
    Ok(Whole {
        status: parts.status,
        headers,
        body,
    })
}

/// A body that could not be read; says so in the log as it always did.
#[derive(Debug, thiserror::Error)]
#[error("reading the body: {0}")]
struct ReadBody(Box<dyn std::error::Error + Send + Sync>);

/// An upstream's answer as it came. An error without a body gets one in
/// OpenAI's shape saying so: a client's SDK has nothing to show for an
/// empty 400, and every error the client sees has one shape.
pub fn passthrough(answer: Whole) -> Response {
    let Whole {
        status,
        mut headers,
        body,
    } = answer;
    let body = if body.is_empty() && (status.is_client_error() || status.is_server_error()) {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        error_json(
            &format!("the upstream answered {status} with no body"),
            if status.is_client_error() {
                "BadRequestError"
            } else {
                "BadGatewayError"
            },
            None,
            status.as_u16(),
        )
    } else {
        body
    };
    let mut out = Response::new(Body::from(body));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// What an upstream said when it turned a request down, for the request's
/// log line: without it an operator sees `status=400` and must reproduce
/// the request to learn why. The message of an OpenAI- or vLLM-shaped
/// error (`{"error":{"message"}}`, `{"message"}`), else the body's start;
/// cut to [`SAID_CHARS`] characters.
pub fn upstream_said(role: &str, authority: &str, body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Shape<'a> {
        #[serde(borrow)]
        error: Option<Inner<'a>>,
        #[serde(borrow)]
        message: Option<std::borrow::Cow<'a, str>>,
    }
    #[derive(serde::Deserialize)]
    struct Inner<'a> {
        #[serde(borrow)]
        message: Option<std::borrow::Cow<'a, str>>,
    }
    let parsed = serde_json::from_slice::<Shape>(body).ok();
    let message = parsed
        .and_then(|s| s.error.and_then(|e| e.message).or(s.message))
        .map(|m| m.into_owned())
        .unwrap_or_else(|| {
            String::from_utf8_lossy(&body[..body.len().min(4 * SAID_CHARS)]).into_owned()
        });
    let message = message.trim();
    let mut cut: String = message.chars().take(SAID_CHARS).collect();
    if cut.len() < message.len() {
        cut.push('…');
    }
    if cut.is_empty() {
        cut.push_str("(no body)");
    }
    format!("{role} {authority}: {cut}")
}

/// The start of an upstream body, for a log line.
pub fn snippet(body: &[u8]) -> String {
    let end = body.len().min(300);
    String::from_utf8_lossy(&body[..end]).into_owned()
}

/// An error status as the endpoint's failure, with the start of its body.
pub fn status_error(leg: Leg, endpoint: &str, status: StatusCode, body: &[u8]) -> UpstreamError {
    UpstreamError::new(
        leg,
        endpoint,
        UpstreamKind::Status {
            status,
            said: snippet(body),
        },
    )
}
