//! The decode leg: the client's body, byte for byte, goes to a decoder,
//! and the leg ends at the answer's headers. A 5xx there is the decoder's
//! failure, not the client's. The decoder gets the same `X-Request-Id` as
//! the prefiller, so one id names the request in the proxy's and both
//! engines' logs and in the response's `id`.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hyper::body::Incoming;

use super::answer::{read_whole, status_error};
use super::ctx::RequestCtx;
use super::leg::{self, Plan};
use crate::error::{Leg, ProxyError, UpstreamError};
use crate::fleet::{InFlight, Role};

/// Decoders tried after the first when a connection cannot be made. The
/// KV is in the shared store, so any decoder can serve the request; but
/// once a decoder has the request, it may be generating, and it is never
/// sent again.
const DECODE_CONNECT_RETRIES: usize = 2;

/// The decoder's answer, its body not yet read.
pub struct DecoderAnswer {
    pub response: http::Response<Incoming>,
    /// When the decode leg started: the first byte's time counts from it.
    pub started: Instant,
    /// Counts the request at its decoder until the relayed body is done.
    pub in_flight: InFlight,
}

pub async fn run(ctx: &mut RequestCtx, raw: Bytes) -> Result<DecoderAnswer, ProxyError> {
    let started = Instant::now();
    let plan = Plan {
        leg: Leg::Decode,
        role: Role::Decoder,
        named: None,
        retries: DECODE_CONNECT_RETRIES,
        retry: UpstreamError::never_sent,
        deadline: leg::deadline(&ctx.app),
    };
    let deadline = plan.deadline;
    let answer = leg::call(ctx, plan, |decoder, traceparent| {
        let req = leg::request(ctx, decoder, raw.clone(), traceparent);
        let sent = leg::send(ctx, Leg::Decode, decoder, req);
        let decoder = Arc::clone(decoder);
        async move {
            let authority = &decoder.authority;
            let response = sent.await?;
            let status = response.status();
            if !status.is_server_error() {
                return Ok(response);
            }
            // What the decoder said, if it says it within the leg's time
            // (this wait, polled inside the leg's own, ends first); its
            // failure stands either way.
            let body =
                tokio::time::timeout_at(deadline, read_whole(Leg::Decode, authority, response))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|whole| whole.body)
                    .unwrap_or_default();
            Err(status_error(Leg::Decode, authority, status, &body))
        }
    })
    .await?;
    answer.in_flight.succeeded();
    answer
        .in_flight
        .endpoint()
        .observe_latency(answer.sent_at.elapsed());
    ctx.trace.hold_decode(answer.span);
    Ok(DecoderAnswer {
        response: answer.value,
        started,
        in_flight: answer.in_flight,
    })
}
