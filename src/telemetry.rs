//! LMCache's request telemetry (`LMCACHE_REQUEST_TELEMETRY_TYPE=fastapi`):
//! each TP rank of the prefiller POSTs `request_store_finished` with vLLM's
//! engine-internal ids once its share of the KV is stored. The endpoint maps
//! each id back to a parked request by parsing, counts ranks, and answers at
//! once: LMCache's sender is fire-and-forget with a 5 s timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use http::HeaderMap;
use serde::Deserialize;

use crate::app::App;
use crate::error::ProxyError;
use crate::forward::{Job, FORWARDED_HEADER};
use crate::metrics::ForwardOutcome;
use crate::owner::{Owner, ROUTED_LEN};
use crate::pending::{Recorded, ID_LEN, MAX_WORLD_SIZE};

/// The largest event forwarded byte for byte; larger ones are rebuilt
/// from their ids.
const VERBATIM_MAX: usize = 4096;

/// The one event that releases requests.
pub const STORE_FINISHED: &str = "request_store_finished";

#[derive(Debug, Deserialize)]
struct Payload {
    event: String,
    request_ids_set: Vec<String>,
    #[serde(default)]
    model_name: Option<String>,
    #[serde(default = "one")]
    world_size: u32,
    #[serde(default)]
    kv_rank: u32,
}

fn one() -> u32 {
    1
}

/// Where an engine id points: the proxy's id token (plain or
/// owner-routed, see [`crate::owner`]) and which of the request's prompts.
#[derive(Debug, PartialEq, Eq)]
pub struct EngineId<'a> {
    pub token: &'a str,
    pub prompt: usize,
}

/// Parses vLLM's engine-internal ids for requests the proxy sent:
/// `chatcmpl-ID`, `chatcmpl-ID-xxxxxxxx`, `cmpl-ID-i`, `cmpl-ID-i-xxxxxxxx`,
/// where `ID` is the proxy's id (hex, no `-`) and `-xxxxxxxx` the random
/// suffix vLLM ≥ 0.14 appends. Constant time: no scan of parked requests.
pub fn parse_engine_id(engine_id: &str) -> Option<EngineId<'_>> {
    let (rest, chat) = if let Some(rest) = engine_id.strip_prefix("chatcmpl-") {
        (rest, true)
    } else {
        (engine_id.strip_prefix("cmpl-")?, false)
    };
    let token = rest.split('-').next()?;
    if token.len() != ID_LEN && token.len() != ROUTED_LEN {
        return None;
    }
    let tail = &rest[token.len()..];
    let mut parts = tail.split('-');
    // `tail` is empty or starts with '-': the first piece is empty.
    if parts.next() != Some("") {
        return None;
    }
    let prompt = if chat {
        0
    } else {
        let index = parts.next()?;
        if index.is_empty() || index.len() > 9 || !index.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        index.parse().ok()?
    };
    match (parts.next(), parts.next()) {
        (None, _) => {}
        (Some(suffix), None)
            if !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_alphanumeric()) => {}
        _ => return None,
    }
    Some(EngineId { token, prompt })
}

/// `POST /api/v1/telemetry`. Replies like the Python proxy:
/// `{"status":"ok","notified":n,"total":m}`, `notified` being the ids that
/// belonged to a request parked here. Ids of another replica's requests
/// are queued for it and not waited for.
pub async fn handle(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let received = Instant::now();
    let payload: Payload = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return ProxyError::bad_request(format!("malformed telemetry payload: {e}"), None)
                .into_response()
        }
    };
    if payload.world_size == 0
        || payload.world_size > MAX_WORLD_SIZE
        || payload.kv_rank >= payload.world_size
    {
        return ProxyError::bad_request(
            format!(
                "telemetry kv_rank {} / world_size {} out of range (world_size 1..={MAX_WORLD_SIZE}, kv_rank below it)",
                payload.kv_rank, payload.world_size
            ),
            Some("kv_rank"),
        )
        .into_response();
    }
    let metrics = &app.metrics;
    metrics.telemetry_event(&payload.event);
    let total = payload.request_ids_set.len();
    if payload.event != STORE_FINISHED {
        tracing::debug!(event = %payload.event, "ignoring telemetry event");
        return reply(0, total);
    }
    let ids = app.ids();
    // Sent by a replica that found these ids were not its own: they are
    // never sent on again, whatever they say.
    let forwarded_in = headers.contains_key(&FORWARDED_HEADER);
    let mut remote: Vec<(SocketAddr, Vec<&str>)> = Vec::new();
    let mut notified = 0;
    for engine_id in &payload.request_ids_set {
        let owner = match parse_engine_id(engine_id) {
            Some(e) => (ids.resolve(e.token), e.prompt),
            None => (Owner::Invalid, 0),
        };
        let outcome = match owner {
            (Owner::Local(id), prompt) => {
                app.pending
                    .record(id, prompt, payload.world_size, payload.kv_rank)
            }
            (Owner::Remote(owner, _), _) => {
                if forwarded_in {
                    metrics.forwarded(ForwardOutcome::Misrouted, 1);
                } else {
                    match remote.iter_mut().find(|(o, _)| *o == owner) {
                        Some((_, group)) => group.push(engine_id),
                        None => remote.push((owner, vec![engine_id])),
                    }
                }
                continue;
            }
            (Owner::Invalid, _) if ids.is_routed() => {
                metrics.invalid_ids.increment(1);
                tracing::debug!(%engine_id, "telemetry id not made by this cluster");
                continue;
            }
            (Owner::Invalid, _) => Recorded::Unknown,
        };
        match outcome {
            Recorded::Unknown | Recorded::Rejected => {
                metrics.telemetry_unknown_ids.increment(1);
                tracing::debug!(%engine_id, ?outcome, "telemetry for no parked request");
            }
            Recorded::Partial | Recorded::Duplicate | Recorded::Ready => {
                notified += 1;
                tracing::debug!(%engine_id, rank = payload.kv_rank, ?outcome, "telemetry");
            }
        }
    }
    // An event all of whose ids are one owner's (LMCache posts one event
    // per request) goes on as it came, if it is no bigger than such an
    // event: padding must not ride along.
    let whole = remote.len() == 1 && remote[0].1.len() == total && body.len() <= VERBATIM_MAX;
    for (owner, group) in remote {
        let body = if whole {
            body.clone()
        } else {
            let event = serde_json::json!({
                "event": payload.event,
                "request_ids_set": group,
                "model_name": payload.model_name,
                "world_size": payload.world_size,
                "kv_rank": payload.kv_rank,
            });
            Bytes::from(event.to_string())
        };
        app.forwarder.send(Job {
            owner,
            ids: group.len(),
            body,
            received,
        });
    }
    reply(notified, total)
}

fn reply(notified: usize, total: usize) -> Response {
    Json(serde_json::json!({"status": "ok", "notified": notified, "total": total})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_id_forms() {
        let id = crate::pending::RequestId::random();
        let hex = id.to_string();
        let ok = |s: String, prompt| {
            assert_eq!(
                parse_engine_id(&s),
                Some(EngineId {
                    token: &hex,
                    prompt
                }),
                "{s}"
            );
        };
        ok(format!("chatcmpl-{id}"), 0);
        ok(format!("chatcmpl-{id}-bb69c56a"), 0);
        ok(format!("cmpl-{id}-0"), 0);
        ok(format!("cmpl-{id}-0-a6fff269"), 0);
        ok(format!("cmpl-{id}-12-a6fff269"), 12);
        let routed = "a".repeat(ROUTED_LEN);
        assert_eq!(
            parse_engine_id(&format!("chatcmpl-{routed}-bb69c56a")).map(|e| e.token.len()),
            Some(ROUTED_LEN)
        );
        for bad in [
            format!("{id}"),
            format!("chatcmpl-{id}x"),
            format!("chatcmpl-{id}-"),
            format!("chatcmpl-{id}-a-b"),
            format!("cmpl-{id}"),
            format!("cmpl-{id}-x"),
            format!("cmpl-{id}-0-a-b"),
            format!("cmpl-{id}-99999999999999999999"),
            "chatcmpl-short-1-9a895ec2".to_string(),
            "cmpl-".to_string(),
            format!("chatcmpl-{}", &id.to_string()[..31]),
        ] {
            assert_eq!(parse_engine_id(&bad), None, "{bad}");
        }
    }
}
