//! LMCache's request telemetry (`LMCACHE_REQUEST_TELEMETRY_TYPE=fastapi`):
//! each TP rank of the prefiller POSTs `request_store_finished` with vLLM's
//! engine-internal ids once its share of the KV is stored. The endpoint maps
//! each id back to a parked request by parsing, counts ranks, and answers at
//! once: LMCache's sender is fire-and-forget with a 5 s timeout.
//!
//! With `--telemetry-token`, only posts to `?token=TOKEN` count: LMCache
//! sends no header of its own, but it posts to the exact URL it is given,
//! query included. The token is checked before a byte of the body is read,
//! and every body is read under a size and a time bound.

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Uri};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::{Deserializer, Visitor};
use serde::Deserialize;

use crate::app::App;
use crate::auth::Secrets;
use crate::error::ProxyError;
use crate::forward::{Job, FORWARDED_HEADER};
use crate::metrics::{ForwardOutcome, TelemetryRefusal, TimeoutKind};
use crate::owner::{Owner, ROUTED_LEN};
use crate::pending::{Recorded, ID_LEN, MAX_WORLD_SIZE};

/// The largest event forwarded byte for byte; larger ones are rebuilt
/// from their ids.
const VERBATIM_MAX: usize = 4096;

/// The one event that releases requests.
pub const STORE_FINISHED: &str = "request_store_finished";

/// The largest telemetry body read (413 past it). LMCache posts one event
/// per finished batch of a rank: a few hundred bytes per request id, so
/// thousands of ids still fit.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// The longest a telemetry body may take to arrive, whatever
/// `--body-timeout` allows: LMCache's sender gives up after 5 s (its
/// urllib timeout), so a slower body is no event anyone still sends.
pub const MAX_EVENT_WAIT: Duration = Duration::from_secs(5);

/// One LMCache event. Strings are borrowed from the body unless JSON
/// escapes forced a copy: an event costs no allocation per id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    pub event: Cow<'a, str>,
    pub request_ids: Vec<Cow<'a, str>>,
    pub model_name: Option<Cow<'a, str>>,
    /// 1..=[`MAX_WORLD_SIZE`].
    pub world_size: u32,
    /// Below `world_size`.
    pub kv_rank: u32,
}

#[derive(Deserialize)]
struct Payload<'a> {
    #[serde(borrow)]
    event: Text<'a>,
    #[serde(borrow)]
    request_ids_set: Vec<Text<'a>>,
    #[serde(default, borrow)]
    model_name: Option<Text<'a>>,
    #[serde(default = "one")]
    world_size: u32,
    #[serde(default)]
    kv_rank: u32,
}

fn one() -> u32 {
    1
}

/// A JSON string, borrowed where it has no escapes. serde's own
/// `Cow<str>` always copies inside a `Vec`.
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Str;
        impl<'de> Visitor<'de> for Str {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                v: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v))
            }
        }
        deserializer.deserialize_str(Str).map(Text)
    }
}

/// Reads one LMCache event (`{"event","request_ids_set","model_name",
/// "world_size","kv_rank"}`; unknown fields are ignored, a missing
/// `world_size` is 1 and `kv_rank` 0, as from LMCache before TP support).
/// Pure, so the fuzzer drives it exactly as the endpoint does.
pub fn parse_event(body: &[u8]) -> Result<Event<'_>, String> {
    let payload: Payload<'_> =
        serde_json::from_slice(body).map_err(|e| format!("malformed telemetry payload: {e}"))?;
    if payload.world_size == 0
        || payload.world_size > MAX_WORLD_SIZE
        || payload.kv_rank >= payload.world_size
    {
        return Err(format!(
            "telemetry kv_rank {} / world_size {} out of range (world_size 1..={MAX_WORLD_SIZE}, kv_rank below it)",
            payload.kv_rank, payload.world_size
        ));
    }
    Ok(Event {
        event: payload.event.0,
        request_ids: payload.request_ids_set.into_iter().map(|t| t.0).collect(),
        model_name: payload.model_name.map(|t| t.0),
        world_size: payload.world_size,
        kv_rank: payload.kv_rank,
    })
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

/// The value of the query's `token` parameter, taken as it is (a token is
/// URL-safe, so nothing needs decoding); `None` when there is none, or
/// more than one: which of two a checker would believe is anybody's guess.
pub fn query_token(query: Option<&str>) -> Option<&str> {
    let mut found = None;
    for pair in query?.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "token" {
            if found.is_some() {
                return None;
            }
            found = Some(value);
        }
    }
    found
}

/// What the telemetry endpoint needs besides the app, made once per
/// router: the token's digest is not recomputed per post.
pub struct Intake {
    app: Arc<App>,
    token: Option<Secrets>,
    /// The token as forwards to other replicas carry it (they share the
    /// configuration); shared, so a forward job copies a pointer.
    forward_token: Option<Arc<str>>,
    body_timeout: Duration,
}

impl Intake {
    pub fn new(app: Arc<App>) -> Arc<Self> {
        let token = app.config.security.telemetry_token.as_deref();
        Arc::new(Intake {
            token: token.map(|t| Secrets::new([t])),
            forward_token: token.map(Arc::from),
            body_timeout: app.config.limits.body_timeout.min(MAX_EVENT_WAIT),
            app,
        })
    }
}

/// `POST /api/v1/telemetry`. Replies like the Python proxy:
/// `{"status":"ok","notified":n,"total":m}`, `notified` being the ids that
/// belonged to a request parked here. Ids of another replica's requests
/// are queued for it and not waited for.
pub async fn handle(
    State(intake): State<Arc<Intake>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let received = Instant::now();
    let app = &intake.app;
    if let Some(token) = &intake.token {
        if !query_token(uri.query()).is_some_and(|t| token.matches(t.as_bytes())) {
            return refuse(
                app,
                TelemetryRefusal::Token,
                ProxyError::Forbidden(
                    "telemetry must be posted to this endpoint's URL with its ?token= (LMCACHE_REQUEST_TELEMETRY_ENDPOINT=http://HOST:PORT/api/v1/telemetry?token=TOKEN)",
                ),
            );
        }
    }
    let body = match read_body(&headers, body, intake.body_timeout).await {
        Ok(body) => body,
        Err((reason, error)) => {
            if reason == TelemetryRefusal::Timeout {
                app.metrics.guards.timeout(TimeoutKind::Body);
            }
            let mut response = refuse(app, reason, error);
            // The rest of the body was never read: the connection cannot
            // carry another request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    };
    let payload = match parse_event(&body) {
        Ok(p) => p,
        Err(e) => {
            let param = e.contains("kv_rank").then_some("kv_rank");
            return refuse(
                app,
                TelemetryRefusal::Malformed,
                ProxyError::bad_request(e, param),
            );
        }
    };
    app.metrics.telemetry_event(&payload.event);
    let total = payload.request_ids.len();
    if payload.event != STORE_FINISHED {
        tracing::debug!(event = %payload.event, "ignoring telemetry event");
        return reply(0, total);
    }
    // Sent by a replica that found these ids were not its own: they are
    // never sent on again, whatever they say.
    let forwarded_in = headers.contains_key(&FORWARDED_HEADER);
    let delivered = deliver(app, &payload, forwarded_in);
    forward(&intake, &body, &payload, delivered.remote, received);
    reply(delivered.notified, total)
}

/// What became of an event's ids here.
struct Delivered<'a> {
    /// Ids of parked requests of this replica the event counted for.
    notified: usize,
    /// Ids of other replicas' requests, grouped by owner.
    remote: Vec<(SocketAddr, Vec<&'a str>)>,
}

/// Records the event for each of its ids that names a request parked here,
/// and groups the ids that name another replica's by their owner.
fn deliver<'a>(app: &App, payload: &'a Event<'a>, forwarded_in: bool) -> Delivered<'a> {
    let metrics = &app.metrics;
    let ids = app.ids();
    let mut delivered = Delivered {
        notified: 0,
        remote: Vec::new(),
    };
    let mut world_size_raised = false;
    for engine_id in &payload.request_ids {
        let engine_id: &str = engine_id;
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
                    match delivered.remote.iter_mut().find(|(o, _)| *o == owner) {
                        Some((_, group)) => group.push(engine_id),
                        None => delivered.remote.push((owner, vec![engine_id])),
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
            Recorded::WorldSizeRaised => {
                world_size_raised = true;
                if throttled(TelemetryRefusal::WorldSize) {
                    tracing::warn!(
                        %engine_id,
                        world_size = payload.world_size,
                        rank = payload.kv_rank,
                        "refused a telemetry event whose world_size exceeds the first event's for its request; the request waits for the ranks of the first"
                    );
                }
            }
            Recorded::Partial | Recorded::Duplicate | Recorded::Ready => {
                delivered.notified += 1;
                tracing::debug!(%engine_id, rank = payload.kv_rank, ?outcome, "telemetry");
            }
        }
    }
    if world_size_raised {
        metrics.telemetry_refused(TelemetryRefusal::WorldSize);
    }
    delivered
}

/// Hands each owner's ids to the forwarder. An event all of whose ids are
/// one owner's (LMCache posts one event per request) goes on as it came,
/// if it is no bigger than such an event: padding must not ride along.
fn forward(
    intake: &Intake,
    body: &Bytes,
    payload: &Event<'_>,
    remote: Vec<(SocketAddr, Vec<&str>)>,
    received: Instant,
) {
    let total = payload.request_ids.len();
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
        intake.app.forwarder.send(Job {
            owner,
            ids: group.len(),
            body,
            received,
            token: intake.forward_token.clone(),
        });
    }
}

/// The body, whole, within [`MAX_EVENT_BYTES`] and `wait`.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    wait: Duration,
) -> Result<Bytes, (TelemetryRefusal, ProxyError)> {
    let too_large = || {
        (
            TelemetryRefusal::TooLarge,
            ProxyError::PayloadTooLarge {
                limit: MAX_EVENT_BYTES,
            },
        )
    };
    // A declared length past the limit is refused before any byte is read.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_EVENT_BYTES as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(wait, Limited::new(body, MAX_EVENT_BYTES).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err((
            TelemetryRefusal::Malformed,
            ProxyError::bad_request(format!("telemetry body could not be read: {e}"), None),
        )),
        Err(_) => Err((
            TelemetryRefusal::Timeout,
            ProxyError::RequestTimeout(format!(
                "telemetry body not received within {:.1}s",
                wait.as_secs_f64()
            )),
        )),
    }
}

fn refuse(app: &App, reason: TelemetryRefusal, error: ProxyError) -> Response {
    app.metrics.telemetry_refused(reason);
    if throttled(reason) {
        tracing::warn!(reason = reason.as_str(), error = %error, "refused a telemetry post");
    } else {
        tracing::debug!(reason = reason.as_str(), error = %error, "refused a telemetry post");
    }
    error.into_response()
}

/// True at most once a second per reason: the first refusal names a
/// misconfigured sender (a URL without the token) in the log at once,
/// and a flood of them does not flood the log; the counters count all.
fn throttled(reason: TelemetryRefusal) -> bool {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    static LAST: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
    let slot = match reason {
        TelemetryRefusal::Token => 0,
        TelemetryRefusal::WorldSize => 1,
        TelemetryRefusal::TooLarge => 2,
        TelemetryRefusal::Timeout => 3,
        TelemetryRefusal::Malformed => 4,
    };
    // Milliseconds since the first call, plus one so that 0 means "never".
    let now = EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1;
    let last = LAST[slot].load(Ordering::Relaxed);
    (last == 0 || now.saturating_sub(last) >= 1000)
        && LAST[slot]
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
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

    #[test]
    fn events_borrow_their_ids_and_are_checked() {
        let body = br#"{"event": "request_store_finished", "request_ids_set": ["chatcmpl-a-1", "cmpl-\u0062"], "model_name": "m", "world_size": 2, "kv_rank": 1, "extra": [1]}"#;
        let e = parse_event(body).unwrap();
        assert_eq!(e.event, STORE_FINISHED);
        assert!(matches!(e.request_ids[0], Cow::Borrowed("chatcmpl-a-1")));
        assert_eq!(e.request_ids[1], "cmpl-b", "escapes are decoded");
        assert_eq!(e.model_name.as_deref(), Some("m"));
        assert_eq!((e.world_size, e.kv_rank), (2, 1));
        let e = parse_event(br#"{"event":"x","request_ids_set":[],"model_name":null}"#).unwrap();
        assert_eq!((e.world_size, e.kv_rank, e.model_name), (1, 0, None));
        for bad in [
            &b""[..],
            b"not json",
            br#"{"event":"x"}"#,
            br#"{"event":"x","request_ids_set":"a"}"#,
            br#"{"event":1,"request_ids_set":[]}"#,
            br#"{"event":"x","request_ids_set":[1]}"#,
            br#"{"event":"x","request_ids_set":[],"world_size":0}"#,
            br#"{"event":"x","request_ids_set":[],"world_size":129,"kv_rank":0}"#,
            br#"{"event":"x","request_ids_set":[],"world_size":2,"kv_rank":2}"#,
            br#"{"event":"x","request_ids_set":[],"world_size":-1}"#,
        ] {
            assert!(
                parse_event(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_token_is_the_one_token_parameter() {
        assert_eq!(query_token(Some("token=abc")), Some("abc"));
        assert_eq!(query_token(Some("x=1&token=abc&y")), Some("abc"));
        assert_eq!(query_token(Some("token=")), Some(""));
        assert_eq!(query_token(Some("token")), Some(""));
        assert_eq!(query_token(Some("token=a&token=a")), None, "duplicated");
        assert_eq!(query_token(Some("tokens=abc")), None);
        assert_eq!(query_token(Some("")), None);
        assert_eq!(query_token(None), None);
    }

    #[tokio::test]
    async fn bodies_are_read_within_their_bounds() {
        use futures_util::stream;

        let headers = HeaderMap::new();
        let wait = Duration::from_secs(5);
        let ok = read_body(&headers, Body::from("{}"), wait).await.unwrap();
        assert_eq!(&ok[..], b"{}");
        // No declared length: the limit still holds as the bytes come.
        let chunks = (0..=MAX_EVENT_BYTES / 65_536)
            .map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 65_536])));
        let body = Body::from_stream(stream::iter(chunks));
        let err = read_body(&headers, body, wait).await.unwrap_err();
        assert_eq!(err.0, TelemetryRefusal::TooLarge);
        let mut declared = HeaderMap::new();
        declared.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from(MAX_EVENT_BYTES + 1),
        );
        let err = read_body(&declared, Body::empty(), wait).await.unwrap_err();
        assert_eq!(err.0, TelemetryRefusal::TooLarge);
        let stalled = Body::from_stream(stream::pending::<Result<Bytes, std::io::Error>>());
        let err = read_body(&headers, stalled, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert_eq!(err.0, TelemetryRefusal::Timeout);
        let broken = Body::from_stream(stream::iter([Err::<Bytes, _>(std::io::Error::other(
            "reset",
        ))]));
        let err = read_body(&headers, broken, wait).await.unwrap_err();
        assert_eq!(err.0, TelemetryRefusal::Malformed);
    }

    mod properties {
        use super::super::*;
        use crate::pending::RequestId;
        use proptest::prelude::*;

        fn suffix() -> impl Strategy<Value = Option<String>> {
            prop::option::of("[0-9a-zA-Z]{1,12}")
        }

        fn token() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<u128>().prop_map(|n| RequestId::from_bytes(n.to_be_bytes()).to_string()),
                "[0-9a-f]{92}",
            ]
        }

        proptest! {
            #[test]
            fn engine_ids_round_trip(
                token in token(),
                chat in any::<bool>(),
                prompt in 0usize..1_000_000_000,
                suffix in suffix(),
            ) {
                let mut id = if chat {
                    format!("chatcmpl-{token}")
                } else {
                    format!("cmpl-{token}-{prompt}")
                };
                if let Some(s) = &suffix {
                    id.push('-');
                    id.push_str(s);
                }
                let parsed = parse_engine_id(&id).expect("a well-formed engine id");
                prop_assert_eq!(parsed.token, token.as_str());
                prop_assert_eq!(parsed.prompt, if chat { 0 } else { prompt });
            }

            #[test]
            fn engine_id_parsing_never_panics(s in any::<String>()) {
                check_engine_id(&s);
            }

            #[test]
            fn near_miss_engine_ids_never_panic(s in "(chatcmpl|cmpl)-[0-9a-f-]{0,130}") {
                check_engine_id(&s);
            }

            #[test]
            fn event_parsing_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
                if let Ok(e) = parse_event(&bytes) {
                    prop_assert!(e.world_size >= 1 && e.world_size <= MAX_WORLD_SIZE);
                    prop_assert!(e.kv_rank < e.world_size);
                }
            }

            #[test]
            fn valid_events_parse_to_their_fields(
                event in "[a-z_]{1,30}",
                ids in prop::collection::vec(any::<String>(), 0..8),
                model in prop::option::of(any::<String>()),
                world_size in 1u32..=MAX_WORLD_SIZE,
                rank in any::<u32>(),
                python_separators in any::<bool>(),
            ) {
                let kv_rank = rank % world_size;
                let value = serde_json::json!({
                    "event": event,
                    "request_ids_set": ids,
                    "model_name": model,
                    "world_size": world_size,
                    "kv_rank": kv_rank,
                });
                let mut body = value.to_string();
                if python_separators {
                    // json.dumps writes ", " and ": "; pretty-printing is
                    // as good a test of whitespace between tokens.
                    body = serde_json::to_string_pretty(&value).unwrap();
                }
                let e = parse_event(body.as_bytes()).expect("a valid event");
                prop_assert_eq!(e.event.as_ref(), event.as_str());
                let parsed: Vec<&str> = e.request_ids.iter().map(|c| c.as_ref()).collect();
                let expected: Vec<&str> = ids.iter().map(String::as_str).collect();
                prop_assert_eq!(parsed, expected);
                prop_assert_eq!(e.model_name.as_deref(), model.as_deref());
                prop_assert_eq!((e.world_size, e.kv_rank), (world_size, kv_rank));
            }
        }

        fn check_engine_id(s: &str) {
            if let Some(e) = parse_engine_id(s) {
                assert!(
                    e.token.len() == ID_LEN || e.token.len() == ROUTED_LEN,
                    "{s}"
                );
                assert!(s.contains(e.token), "{s}");
                assert!(!e.token.contains('-'), "{s}");
            }
        }
    }
}
