//! Traces: with `--otlp-endpoint`, one span per request (`request`) with a
//! child per phase (`prefill`, `kv_wait`, `decode` to the first byte,
//! `relay` to the last), sent to an OpenTelemetry collector by OTLP over
//! HTTP/protobuf.
//!
//! The request path only builds spans and, when one ends, offers it to a
//! bounded queue (`try_send`: never a wait). A thread of its own gathers
//! the queue into batches and exports them, each bounded by
//! `--otlp-timeout`; a span that finds the queue full, or whose batch the
//! collector refused or did not answer in time, is dropped and counted in
//! `pd_proxy_trace_spans_dropped_total`. A slow collector costs requests
//! nothing but their spans.
//!
//! W3C trace context: a client's valid `traceparent` is continued, and
//! each upstream leg carries a `traceparent` naming its own child span
//! (the prefill's, the decode's), so vLLM's spans join the trace under
//! the leg that caused them. Without an endpoint no span is made, and a
//! client's `traceparent` goes to both legs unchanged.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use metrics::Counter;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_otlp::{Protocol, RetryPolicy, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter as _, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tokio::sync::{mpsc, oneshot, Notify};

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Ended spans waiting for export, at most: about 1 KB each, so a
/// collector that is down holds a few MB, not the proxy's memory.
const QUEUE_SPANS: usize = 4096;

/// Spans per export call; what is queued also leaves every
/// [`BATCH_DELAY`].
const BATCH_SPANS: usize = 512;
const BATCH_DELAY: Duration = Duration::from_secs(1);

/// A W3C `traceparent` (version 00). Bytes, not OpenTelemetry's ids:
/// held by every request that brings one, it stays 25 bytes with no
/// alignment to pad for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    /// The span that is the parent of whoever receives this header.
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`, lowercase, nothing else:
    /// another version, an all-zero id or any stray byte is no parent.
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value.len() != 55 || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        if hex(&value[..2])? != 0 {
            return None;
        }
        let trace_id = hex(&value[3..35])?;
        let span_id = hex(&value[36..52])?;
        let flags = hex(&value[53..55])?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(TraceParent {
            trace_id: trace_id.to_be_bytes(),
            span_id: (span_id as u64).to_be_bytes(),
            flags: flags as u8,
        })
    }

    /// The client's parent, when it sent exactly one valid `traceparent`
    /// (several are no parent, as the W3C spec asks).
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let mut values = headers.get_all(&TRACEPARENT).iter();
        let value = values.next()?;
        if values.next().is_some() {
            return None;
        }
        Self::parse(value.as_bytes())
    }

    fn of(context: &SpanContext) -> Self {
        TraceParent {
            trace_id: context.trace_id().to_bytes(),
            span_id: context.span_id().to_bytes(),
            flags: context.trace_flags().to_u8(),
        }
    }

    pub fn header(&self) -> HeaderValue {
        let text = format!(
            "00-{:032x}-{:016x}-{:02x}",
            u128::from_be_bytes(self.trace_id),
            u64::from_be_bytes(self.span_id),
            self.flags
        );
        HeaderValue::try_from(text).expect("hex is a valid header value")
    }
}

/// Lowercase hex, up to 32 digits.
fn hex(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(n << 4 | u128::from(v))
    })
}

/// The OTLP traces URL for `--otlp-endpoint`: a collector's base URL
/// (`http://collector:4318`, as `OTEL_EXPORTER_OTLP_ENDPOINT` means it)
/// gets `/v1/traces`; a URL already ending there is kept. Plain HTTP
/// only: a collector (or agent) next to the proxy is the usual setup.
pub fn traces_url(value: &str) -> Result<Uri, String> {
    let uri: Uri = value
        .trim()
        .parse()
        .map_err(|e| format!("--otlp-endpoint {value:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(format!(
            "--otlp-endpoint {value:?} must be an http:// URL with a host (OTLP over HTTP; no TLS: point it at a collector or agent nearby)"
        ));
    }
    if uri.path().ends_with("/v1/traces") {
        return Ok(uri);
    }
    let path = format!("{}/v1/traces", uri.path().trim_end_matches('/'));
    let mut parts = uri.into_parts();
    parts.path_and_query = Some(
        path.parse()
            .map_err(|e| format!("--otlp-endpoint {value:?}: {e}"))?,
    );
    Uri::from_parts(parts).map_err(|e| format!("--otlp-endpoint {value:?}: {e}"))
}

/// One proxy's tracer and the export behind it.
pub struct Tracing {
    tracer: SdkTracer,
    /// Asks the export thread to send everything queued, then answers.
    flushes: mpsc::UnboundedSender<oneshot::Sender<()>>,
    _provider: SdkTracerProvider,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tracing")
    }
}

impl Tracing {
    /// Starts the export thread for `endpoint` (a full traces URL).
    /// `dropped` counts the spans that never reach the collector.
    pub fn start(endpoint: &Uri, timeout: Duration, dropped: Counter) -> Result<Arc<Self>, String> {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint.to_string())
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(timeout)
            .with_http_client(ExportClient {
                client: crate::upstream::client(),
                timeout,
            })
            // A failed batch is dropped and counted, not tried again: the
            // queue behind it matters more than one batch.
            .with_retry_policy(RetryPolicy::disabled())
            .build()
            .map_err(|e| format!("--otlp-endpoint: {e}"))?;
        let resource = resource();
        exporter.set_resource(&resource);
        let (spans, queued) = mpsc::channel(QUEUE_SPANS);
        let (flushes, flush_asks) = mpsc::unbounded_channel();
        let batch_ready = Arc::new(Notify::new());
        let ready = Arc::clone(&batch_ready);
        let exporting = Exporting {
            exporter,
            dropped: dropped.clone(),
            timeout,
            failing: false,
        };
        std::thread::Builder::new()
            .name("pd-proxy-otlp".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match runtime {
                    Ok(runtime) => runtime.block_on(exporting.run(queued, flush_asks, ready)),
                    Err(e) => tracing::error!(error = %e, "no runtime for the trace export; spans are dropped"),
                }
            })
            .map_err(|e| format!("could not start the trace export thread: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Queue {
                spans,
                dropped,
                batch_ready,
            })
            .with_resource(resource)
            .build();
        Ok(Arc::new(Tracing {
            tracer: provider.tracer("pd-proxy"),
            flushes,
            _provider: provider,
        }))
    }

    /// Sends every span ended so far; `false` when that took longer than
    /// `limit` (a collector that does not answer: the rest is lost).
    pub async fn flush(&self, limit: Duration) -> bool {
        let (done, sent) = oneshot::channel();
        if self.flushes.send(done).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(limit, sent).await, Ok(Ok(())))
    }
}

/// `service.name` is `pd-proxy` unless `OTEL_SERVICE_NAME` says otherwise;
/// `OTEL_RESOURCE_ATTRIBUTES` is honoured.
fn resource() -> Resource {
    let builder = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
        builder.build()
    } else {
        builder.with_service_name("pd-proxy").build()
    }
}

/// The span processor: an ended span is offered to the export queue and
/// dropped (counted) when the queue is full. Never blocks.
struct Queue {
    spans: mpsc::Sender<SpanData>,
    dropped: Counter,
    /// Told when a batch's worth is queued.
    batch_ready: Arc<Notify>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Queue")
    }
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.spans.try_send(span).is_err() {
            self.dropped.increment(1);
        } else if self.spans.capacity() <= QUEUE_SPANS - BATCH_SPANS {
            self.batch_ready.notify_one();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The export thread's side.
struct Exporting {
    exporter: opentelemetry_otlp::SpanExporter,
    dropped: Counter,
    timeout: Duration,
    /// The last export failed: the next failure is not logged again.
    failing: bool,
}

impl Exporting {
    /// Wakes once a second, when a batch's worth is queued, or for a
    /// flush — never per span: a wake-up per span would cost the request
    /// path a cross-thread wake each.
    async fn run(
        mut self,
        mut queued: mpsc::Receiver<SpanData>,
        mut flush_asks: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
        batch_ready: Arc<Notify>,
    ) {
        loop {
            let mut flushed = None;
            tokio::select! {
                biased;
                Some(done) = flush_asks.recv() => flushed = Some(done),
                () = batch_ready.notified() => {}
                () = tokio::time::sleep(BATCH_DELAY) => {}
            }
            let open = self.drain(&mut queued).await;
            if let Some(done) = flushed {
                let _ = done.send(());
            }
            if !open {
                return;
            }
        }
    }

    /// Exports everything queued, a batch at a time; `false` once the
    /// queue is closed (the proxy is gone) and empty.
    async fn drain(&mut self, queued: &mut mpsc::Receiver<SpanData>) -> bool {
        loop {
            let mut batch = Vec::with_capacity(BATCH_SPANS);
            let mut open = true;
            while batch.len() < BATCH_SPANS {
                match queued.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            let full = batch.len() == BATCH_SPANS;
            self.export(&mut batch).await;
            if !full {
                return open;
            }
        }
    }

    async fn export(&mut self, batch: &mut Vec<SpanData>) {
        if batch.is_empty() {
            return;
        }
        let spans = std::mem::replace(batch, Vec::with_capacity(BATCH_SPANS));
        let count = spans.len() as u64;
        // The client is bounded by the same timeout; this bounds the rest.
        let limit = self.timeout + Duration::from_secs(1);
        let error = match tokio::time::timeout(limit, self.exporter.export(spans)).await {
            Ok(Ok(())) => {
                if self.failing {
                    tracing::info!("trace export works again");
                }
                self.failing = false;
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the collector did not answer in time".to_owned(),
        };
        self.dropped.increment(count);
        if !self.failing {
            tracing::warn!(error, spans = count, "trace export failed; its spans are dropped (see pd_proxy_trace_spans_dropped_total)");
        }
        self.failing = true;
    }
}

/// OTLP's HTTP client trait over the proxy's own hyper client, on the
/// export thread's runtime; bounded by `--otlp-timeout`.
struct ExportClient {
    client: crate::upstream::HttpClient,
    timeout: Duration,
}

impl std::fmt::Debug for ExportClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportClient")
    }
}

/// A collector's answer is a small protobuf; anything past this is wrong.
const MAX_ANSWER_BYTES: usize = 1 << 20;

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: Request<Bytes>,
    ) -> Result<Response<Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, Full::new(body));
        let call = async {
            let response = self.client.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(Response::from_parts(parts, body))
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err("the collector did not answer within --otlp-timeout".into()),
        }
    }
}

/// A request's trace context. Off: nothing at all. `Propagate`: tracing
/// is off, and the client's `traceparent` goes upstream unchanged. `On`:
/// the request's spans.
#[derive(Default)]
pub enum Trace {
    #[default]
    Off,
    Propagate(TraceParent),
    On(Box<RequestTrace>),
}

pub struct RequestTrace {
    tracing: Arc<Tracing>,
    /// Holds the `request` span.
    root: Context,
    /// Open from the decode leg's send to its first byte.
    decode: Option<Box<Span>>,
    /// Open from the first byte to the last.
    relay: Option<Span>,
}

/// A phase's span; nothing when tracing is off. Boxed: the KV wait's is
/// held by every parked request, which must stay small.
pub struct Phase(Option<Box<Span>>);

impl Phase {
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        if let Some(span) = &mut self.0 {
            span.set_attribute(KeyValue::new(key, value));
        }
    }
}

impl Trace {
    /// Starts a request's `request` span, as a child of the client's
    /// `traceparent` when it sent a valid one.
    pub fn start(
        tracing: Option<&Arc<Tracing>>,
        parent: Option<TraceParent>,
        id: &str,
        api: &'static str,
    ) -> Trace {
        let Some(tracing) = tracing else {
            return parent.map_or(Trace::Off, Trace::Propagate);
        };
        let parent_cx = match parent {
            Some(p) => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(p.trace_id),
                SpanId::from_bytes(p.span_id),
                TraceFlags::new(p.flags),
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        let span = tracing
            .tracer
            .span_builder("request")
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("pd.request_id", id.to_owned()),
                KeyValue::new("pd.api", api),
            ])
            .start_with_context(&tracing.tracer, &parent_cx);
        Trace::On(Box::new(RequestTrace {
            tracing: Arc::clone(tracing),
            root: parent_cx.with_span(span),
            decode: None,
            relay: None,
        }))
    }

    /// A child span of the request, started now.
    pub fn phase(&self, name: &'static str) -> Phase {
        match self {
            Trace::On(t) => Phase(Some(Box::new(t.child(name, SpanKind::Internal)))),
            _ => Phase(None),
        }
    }

    /// A child span for an upstream leg, and the `traceparent` that leg
    /// sends: naming that span, or the client's own when tracing is off.
    pub fn leg(&self, name: &'static str) -> (Phase, Option<HeaderValue>) {
        match self {
            Trace::Off => (Phase(None), None),
            Trace::Propagate(parent) => (Phase(None), Some(parent.header())),
            Trace::On(t) => {
                let span = t.child(name, SpanKind::Client);
                let header = TraceParent::of(span.span_context()).header();
                (Phase(Some(Box::new(span))), Some(header))
            }
        }
    }

    /// Records where a leg went: on its span, and on the request's as
    /// `pd.<role>` and `pd.<role>_retries`.
    pub fn leg_done(
        &self,
        phase: &mut Phase,
        role: &'static str,
        endpoint: &str,
        retries: usize,
        status: u16,
    ) {
        let Trace::On(t) = self else {
            return;
        };
        let retries = i64::try_from(retries).unwrap_or(i64::MAX);
        phase.set("pd.endpoint", endpoint.to_owned());
        phase.set("pd.retries", retries);
        phase.set("http.response.status_code", i64::from(status));
        let root = t.root.span();
        let (key, retries_key) = match role {
            "prefiller" => ("pd.prefiller", "pd.prefill_retries"),
            _ => ("pd.decoder", "pd.decode_retries"),
        };
        root.set_attribute(KeyValue::new(key, endpoint.to_owned()));
        root.set_attribute(KeyValue::new(retries_key, retries));
    }

    /// Keeps the decode leg's span open until the answer's first byte.
    pub fn hold_decode(&mut self, phase: Phase) {
        if let (Trace::On(t), Some(span)) = (self, phase.0) {
            t.decode = Some(span);
        }
    }

    /// The decoder's first byte: `decode` ends, `relay` starts.
    pub fn first_byte(&mut self) {
        if let Trace::On(t) = self {
            if let Some(mut decode) = t.decode.take() {
                decode.end();
                t.relay = Some(t.child("relay", SpanKind::Internal));
            }
        }
    }

    /// The request's end: what is open ends, and the request span gets
    /// how it went.
    pub fn finish(&mut self, end: &Finish) {
        let Trace::On(t) = self else {
            return;
        };
        if let Some(mut span) = t.decode.take() {
            span.end();
        }
        if let Some(mut span) = t.relay.take() {
            span.set_attribute(KeyValue::new("pd.outcome", end.outcome));
            span.end();
        }
        let root = t.root.span();
        root.set_attributes([
            KeyValue::new("http.response.status_code", i64::from(end.status)),
            KeyValue::new("pd.outcome", end.outcome),
            KeyValue::new("pd.route", end.route),
            KeyValue::new("pd.stream", end.stream),
            KeyValue::new("pd.kv_timed_out", end.kv_timed_out),
        ]);
        if end.failed {
            root.set_status(Status::error(end.outcome));
        }
        root.end();
        *self = Trace::Off;
    }
}

/// How a request ended, for its span.
pub struct Finish {
    pub status: u16,
    pub outcome: &'static str,
    pub failed: bool,
    pub route: &'static str,
    pub stream: bool,
    pub kv_timed_out: bool,
}

impl RequestTrace {
    fn child(&self, name: &'static str, kind: SpanKind) -> Span {
        self.tracing
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .start_with_context(&self.tracing.tracer, &self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_round_trips() {
        let p = TraceParent::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(
            TraceId::from_bytes(p.trace_id),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(
            SpanId::from_bytes(p.span_id),
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert_eq!(p.flags, 1);
        assert_eq!(std::mem::size_of::<Trace>(), 32);
        assert_eq!(std::mem::size_of::<Phase>(), 8);
        assert_eq!(p.header(), GOOD);
    }

    #[test]
    fn anything_else_is_no_parent() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad:?}");
        }
        let mut twice = HeaderMap::new();
        twice.append(&TRACEPARENT, HeaderValue::from_static(GOOD));
        twice.append(&TRACEPARENT, HeaderValue::from_static(GOOD));
        assert_eq!(TraceParent::from_headers(&twice), None);
    }

    #[test]
    fn endpoints_become_traces_urls() {
        let url = |s| traces_url(s).map(|u| u.to_string());
        assert_eq!(
            url("http://collector:4318").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            url("http://collector:4318/").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            url("http://c:4318/otlp/v1/traces").unwrap(),
            "http://c:4318/otlp/v1/traces"
        );
        assert_eq!(url("http://c/otlp").unwrap(), "http://c/otlp/v1/traces");
        assert!(url("https://collector:4318").is_err());
        assert!(url("collector:4318").is_err());
        assert!(url("not a url").is_err());
    }
}
