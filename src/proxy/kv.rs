//! The wait between the legs: the request stays parked until every TP rank
//! of the prefiller's LMCache reported every prompt's KV stored.

use std::time::Instant;

use tokio::sync::oneshot;
use tokio::time::timeout;

use super::ctx::RequestCtx;
use crate::config::KvTimeoutPolicy;
use crate::error::ProxyError;
use crate::pending::ParkedGuard;

/// Waits for the KV-ready event, then gives up the parked entry. Timing
/// out follows `--on-kv-timeout`.
pub async fn await_ready(
    ctx: &mut RequestCtx,
    guard: ParkedGuard,
    kv_ready: oneshot::Receiver<()>,
) -> Result<(), ProxyError> {
    let app = &ctx.app;
    let started = Instant::now();
    let mut span = ctx.trace.phase("kv_wait");
    let ready = timeout(app.config.telemetry.kv_ready_timeout, kv_ready).await;
    // Asked before the guard gives the entry up.
    let report = app.pending.report(ctx.id);
    drop(guard);
    let waited = started.elapsed();
    ctx.record.kv_wait = Some(waited);
    app.metrics.kv_wait_seconds.record(waited);
    span.set("pd.kv_ready", matches!(ready, Ok(Ok(()))));
    span.set("pd.world_size", i64::from(report.world_size));
    span.set("pd.ranks_reported", i64::from(report.ranks));
    span.set("pd.events_refused", i64::from(report.refused));
    // The sender lives in the entry our guard owned, so it cannot have been
    // dropped before the guard: Ok(Err(_)) does not happen.
    if matches!(ready, Ok(Ok(()))) {
        return Ok(());
    }
    app.metrics.kv_timeouts.increment(1);
    let secs = app.config.telemetry.kv_ready_timeout.as_secs_f64();
    let reason = missing_reason(ctx, report.refused);
    match ctx.app.config.telemetry.on_kv_timeout {
        KvTimeoutPolicy::Decode => {
            tracing::warn!(
                secs,
                reason,
                "KV-ready timed out; decoding without it (the decoder recomputes the prompt)"
            );
            ctx.record.kv_timed_out = true;
            Ok(())
        }
        KvTimeoutPolicy::Fail => {
            tracing::warn!(secs, reason, "KV-ready timed out; failing the request");
            Err(ProxyError::KvTimeout { secs })
        }
    }
}

/// Why a request's KV was not reported in time, as far as the proxy can
/// tell: a refused event or a full telemetry port is a fault to fix, not
/// a slow store, and must not pass for one.
fn missing_reason(ctx: &RequestCtx, refused_events: u16) -> &'static str {
    if refused_events > 0 {
        return "events for it were refused (a world_size larger than its first event's): see pd_proxy_telemetry_refused_total";
    }
    if ctx
        .app
        .metrics
        .guards
        .refused_lately(crate::metrics::Port::Telemetry)
    {
        return "the telemetry port refused connections at its cap: see pd_proxy_connections_refused_total";
    }
    "no store-finished event from every rank arrived in time (late, lost, or refused for a bad token)"
}
