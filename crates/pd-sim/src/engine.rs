//! What an engine does with a completions request: the configured and
//! drawn failures, then a prefill (and its telemetry) or a generation.

use std::io;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header::CONTENT_TYPE, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::body::{
    sleep_if, DecodeGuard, EventGen, Hooks, OnceBody, PrefillGuard, TelemetryTrigger, Timing,
};
use crate::posting::Posting;
use crate::request::{self, ApiError, Kind, Plan};
use crate::{render, Fault, Role, Sim};

impl Sim {
    pub(crate) async fn handle(
        self: Arc<Self>,
        role: Role,
        kind: Kind,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let header_id = request::header_request_id(&headers);
        let orca = headers
            .get("endpoint-load-metrics-format")
            .is_some_and(|f| f.as_bytes().eq_ignore_ascii_case(b"json"));
        self.record(role, headers, body.clone());
        let fault = self.draw_fault(role);
        let drawn_error = match fault {
            Some(Fault::Prefill503) => Some(503),
            Some(Fault::Prefill500 | Fault::Decoder500) => Some(500),
            _ => None,
        };
        let injected = match role {
            Role::Prefiller => self.config.prefill_error,
            Role::Decoder => self.config.decoder_error,
        };
        if let Some(code) = injected.or(drawn_error) {
            return ApiError::injected(code).into_response();
        }
        let plan = match request::parse(
            kind,
            header_id,
            &body,
            &self.config.model,
            self.config.default_tokens,
        ) {
            Ok(plan) => plan,
            Err(e) => return e.into_response(),
        };
        let stream = plan.stream;
        let waiting = self.config.reported_waiting;
        let mut response = match role {
            Role::Prefiller => self.prefill(plan, fault).await,
            Role::Decoder => self.decode(plan, fault).await,
        };
        if let (true, false, Some(waiting)) = (orca, stream, waiting) {
            let report = format!(
                "JSON {{\"named_metrics\": {{\"num_requests_waiting\": {waiting}.0, \"kv_cache_usage_perc\": 0.0}}}}"
            );
            if let Ok(value) = http::HeaderValue::try_from(report) {
                response
                    .headers_mut()
                    .insert("endpoint-load-metrics", value);
            }
        }
        response
    }

    async fn prefill(self: Arc<Self>, plan: Plan, fault: Option<Fault>) -> Response {
        let guard = PrefillGuard::new(Arc::clone(&self));
        sleep_if(self.config.prefill_delay).await;
        let posting = Posting {
            lost_rank: (fault == Some(Fault::LostRank))
                .then(|| self.dice.below(self.config.world_size)),
            duplicate: self.config.duplicate_telemetry || fault == Some(Fault::DuplicateTelemetry),
        };
        let mut hooks = Hooks::default();
        if self.telemetry.is_some() {
            let ids = plan.internal_ids(self.config.random_suffix);
            if self.config.telemetry_before_response {
                let ids: Arc<[String]> = ids.into();
                let posts = self.rank_schedule(posting).map(|(rank, delay)| {
                    Arc::clone(&self).post_rank(Arc::clone(&ids), rank, delay, posting)
                });
                futures_util::future::join_all(posts).await;
            } else {
                hooks.telemetry = Some(TelemetryTrigger::new(Arc::clone(&self), ids, posting));
            }
        }
        guard.disarm();
        self.respond(plan, Timing::default(), hooks)
    }

    async fn decode(self: Arc<Self>, plan: Plan, fault: Option<Fault>) -> Response {
        let hooks = Hooks {
            decode: Some(DecodeGuard::new(Arc::clone(&self))),
            telemetry: None,
        };
        let mut timing = Timing {
            first_token: self.config.first_token_delay,
            between_tokens: self.config.token_delay,
            die_after: self.config.die_after_tokens,
            stall_after: None,
        };
        // Where a broken body stops: somewhere among its token events.
        let events = plan
            .max_tokens
            .saturating_mul(u32::try_from(plan.prompt_tokens.len()).unwrap_or(u32::MAX));
        match fault {
            Some(Fault::SlowFirstToken) => {
                timing.first_token += self.config.faults.slow_first_token;
            }
            Some(Fault::DecoderDies) => {
                let at = self.dice.below(events);
                timing.die_after = Some(timing.die_after.map_or(at, |n| n.min(at)));
            }
            Some(Fault::DecoderStalls) => timing.stall_after = Some(self.dice.below(events)),
            _ => {}
        }
        if !plan.stream {
            // A non-streaming vLLM answers only when generation is over.
            let rest = timing
                .between_tokens
                .saturating_mul(plan.max_tokens.saturating_sub(1));
            sleep_if(timing.first_token.saturating_add(rest)).await;
            if matches!(fault, Some(Fault::DecoderDies | Fault::DecoderStalls)) {
                return self.respond_broken(&plan, hooks, fault == Some(Fault::DecoderStalls));
            }
        }
        self.respond(plan, timing, hooks)
    }

    /// A JSON answer whose headers promise the whole body but whose bytes
    /// stop half way: then the connection breaks (`stall` false) or goes
    /// silent for good.
    fn respond_broken(&self, plan: &Plan, mut hooks: Hooks, stall: bool) -> Response {
        hooks.aborted();
        drop(hooks);
        let json = render::full(plan, &self.config.model, &self.fingerprint);
        let length = json.len();
        let half = json.slice(..length / 2);
        let head = futures_util::stream::once(std::future::ready(Ok::<_, io::Error>(half)));
        let body = if stall {
            Body::from_stream(head.chain(futures_util::stream::pending()))
        } else {
            let err = io::Error::other("pd-sim: decoder died mid-answer");
            Body::from_stream(head.chain(futures_util::stream::once(std::future::ready(Err(err)))))
        };
        (
            StatusCode::OK,
            [
                (CONTENT_TYPE, "application/json".to_owned()),
                (http::header::CONTENT_LENGTH, length.to_string()),
            ],
            body,
        )
            .into_response()
    }

    fn respond(self: Arc<Self>, plan: Plan, timing: Timing, hooks: Hooks) -> Response {
        if plan.stream {
            let body = EventGen::new(self, plan, timing, hooks).into_body();
            (
                StatusCode::OK,
                [(CONTENT_TYPE, "text/event-stream; charset=utf-8")],
                body,
            )
                .into_response()
        } else {
            let json = render::full(&plan, &self.config.model, &self.fingerprint);
            (
                StatusCode::OK,
                [(CONTENT_TYPE, "application/json")],
                Body::new(OnceBody::new(json, hooks)),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::Router;

    use super::*;
    use crate::{Faults, SimConfig};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn faulty(kinds: &[Fault]) -> Arc<Sim> {
        Sim::new(SimConfig {
            faults: Faults {
                rate: 1.0,
                kinds: kinds.to_vec(),
                seed: Some(1),
                ..Faults::default()
            },
            ..SimConfig::default()
        })
    }

    async fn post(router: Router, body: &'static str) -> Response {
        let request = http::Request::post("/v1/completions")
            .header(CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap();
        router.oneshot(request).await.unwrap()
    }

    const STREAM: &str = r#"{"model":"sim-model","prompt":"a b c","max_tokens":8,"stream":true}"#;
    const JSON: &str = r#"{"model":"sim-model","prompt":"a b c","max_tokens":8}"#;

    #[tokio::test]
    async fn drawn_errors_answer_as_the_fixed_knobs_do() {
        let sim = faulty(&[Fault::Prefill503, Fault::Decoder500]);
        assert_eq!(post(sim.prefiller_router(), JSON).await.status(), 503);
        assert_eq!(post(sim.decoder_router(), JSON).await.status(), 500);
        assert_eq!(sim.faults_injected(Fault::Prefill503), 1);
        assert_eq!(sim.faults_injected(Fault::Decoder500), 1);
        let text = sim.metrics_text(Role::Decoder);
        assert!(
            text.contains("pdsim_faults_total{fault=\"decoder-500\"} 1\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_stalled_stream_stops_short_and_never_ends() {
        let sim = faulty(&[Fault::DecoderStalls]);
        let mut body = post(sim.decoder_router(), STREAM).await.into_body();
        let mut got = Vec::new();
        let wait = Duration::from_millis(200);
        while let Ok(Some(frame)) = tokio::time::timeout(wait, body.frame()).await {
            got.extend_from_slice(frame.unwrap().data_ref().unwrap());
        }
        let text = String::from_utf8(got).unwrap();
        assert!(!text.contains("[DONE]"), "{text}");
        assert!(text.matches("data: ").count() < 8, "{text}");
        drop(body);
        assert_eq!(
            sim.decode_streams_cancelled(),
            0,
            "a stall is no client cancel"
        );
    }

    #[tokio::test]
    async fn a_dying_json_answer_breaks_half_way() {
        let sim = faulty(&[Fault::DecoderDies]);
        let response = post(sim.decoder_router(), JSON).await;
        assert_eq!(response.status(), 200);
        assert!(response.into_body().collect().await.is_err());
    }
}
