//! A whole stack in-process over real sockets: pd-sim's prefiller and
//! decoder, and pd-proxy in front of them, all on 127.0.0.1:0.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use pd_proxy::fleet::Resolve;
use pd_proxy::{App, Args, Bound, Config, Listeners};
use pd_sim::{Sim, SimConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub struct Stack {
    pub url: String,
    pub telemetry_url: String,
    pub prefiller: Arc<Sim>,
    pub decoder: Arc<Sim>,
    pub app: Arc<App>,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<pd_proxy::server::Drained>>>,
}

/// The proxy's flags for one prefiller and one decoder.
pub fn upstream_flags(
    prefill_host: &str,
    prefill_port: u16,
    decode_host: &str,
    decode_port: u16,
) -> Vec<String> {
    [
        "--prefiller-host",
        prefill_host,
        "--prefiller-port",
        &prefill_port.to_string(),
        "--decoder-host",
        decode_host,
        "--decoder-port",
        &decode_port.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

pub async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// A port nothing listens on: bound once, then released.
pub async fn dead_port() -> u16 {
    bind().await.local_addr().unwrap().port()
}

fn port(l: &TcpListener) -> u16 {
    l.local_addr().unwrap().port()
}

/// Starts one prefiller sim and one decoder sim sharing `sim` (the
/// prefiller posts telemetry to the proxy), and the proxy with `extra`
/// flags on top of the ports.
pub async fn start(sim: SimConfig, extra: &[&str]) -> Stack {
    start_with(sim, extra, |_, _| None).await
}

/// Like [`start`]; `ports` may replace the upstream flags given the sims'
/// ports (prefiller, decoder).
pub async fn start_with(
    mut sim: SimConfig,
    extra: &[&str],
    ports: impl FnOnce(u16, u16) -> Option<Vec<String>>,
) -> Stack {
    let public = bind().await;
    let telemetry = bind().await;
    let telemetry_addr: SocketAddr = telemetry.local_addr().unwrap();
    sim.telemetry_url = Some(format!("http://{telemetry_addr}/api/v1/telemetry"));
    let decoder_config = SimConfig {
        telemetry_url: None,
        ..sim.clone()
    };
    let prefiller = Sim::new(sim);
    let decoder = Sim::new(decoder_config);
    let p = bind().await;
    let d = bind().await;
    let (pp, dp) = (port(&p), port(&d));
    tokio::spawn(Arc::clone(&prefiller).serve_prefiller(p));
    tokio::spawn(Arc::clone(&decoder).serve_decoder(d));

    let mut flags =
        ports(pp, dp).unwrap_or_else(|| upstream_flags("127.0.0.1", pp, "127.0.0.1", dp));
    flags.extend(extra.iter().map(|s| s.to_string()));
    let app = build_app(config(flags), &public, &telemetry);
    let url = format!("http://{}", public.local_addr().unwrap());
    let (stop, server) = serve_app(Arc::clone(&app), public, telemetry);
    Stack {
        url,
        telemetry_url: format!("http://{telemetry_addr}/api/v1/telemetry"),
        prefiller,
        decoder,
        app,
        client: reqwest::Client::new(),
        stop: Some(stop),
        server: Some(server),
    }
}

/// The proxy's configuration from its flags, parsed as the binary does.
pub fn config(flags: Vec<String>) -> Config {
    let mut argv: Vec<String> = vec!["pd-proxy".into()];
    argv.extend(flags);
    Args::try_parse_from(argv).unwrap().resolve(None).unwrap().0
}

/// The app for `config`, to be served on `public` and `telemetry`.
pub fn build_app(config: Config, public: &TcpListener, telemetry: &TcpListener) -> Arc<App> {
    App::build(config, &Bound::new(public, telemetry).unwrap()).unwrap()
}

/// Like [`build_app`], with names resolved by `resolver`.
pub fn build_app_with_resolver(
    config: Config,
    public: &TcpListener,
    telemetry: &TcpListener,
    resolver: Arc<dyn Resolve>,
) -> Arc<App> {
    App::build_with_resolver(config, &Bound::new(public, telemetry).unwrap(), resolver).unwrap()
}

/// Serves `app` on the two listeners until the sender fires or is dropped.
pub fn serve_app(
    app: Arc<App>,
    public: TcpListener,
    telemetry: TcpListener,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<pd_proxy::server::Drained>>,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    let signals = futures_util::stream::once(async move {
        let _ = stopped.await;
    });
    let server = tokio::spawn(pd_proxy::serve(
        Listeners {
            public,
            telemetry,
            metrics: None,
        },
        app,
        Box::pin(signals),
    ));
    (stop, server)
}

impl Stack {
    /// Signals shutdown and waits (bounded) for `serve` to return.
    pub async fn shutdown(&mut self) -> std::io::Result<pd_proxy::server::Drained> {
        let _ = self.stop.take().expect("shut down once").send(());
        let server = self.server.take().expect("shut down once");
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve returns once drained")
            .expect("serve does not panic")
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.text().await.unwrap()
    }

    /// The value of an unlabelled metric line, 0 when absent.
    pub async fn metric(&self, name: &str) -> f64 {
        metric_value(&self.metrics().await, name)
    }

    /// Waits until no request is parked, as seen by the map and by the
    /// exported gauge. Bounded: panics after 10 s.
    pub async fn assert_drained(&self) {
        wait_until("no parked request", || async {
            self.app.pending.is_empty() && self.metric("pd_proxy_pending_requests").await == 0.0
        })
        .await;
    }
}

pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == name).then(|| value.parse().unwrap())
        })
        .unwrap_or(0.0)
}

/// Polls `cond` every 5 ms for up to 10 s.
pub async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn chat_body(stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "sim-model",
        "messages": [{"role": "user", "content": "Explain KV cache reuse."}],
        "max_tokens": 8,
        "stream": stream,
    })
}

/// Splits an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// Asserts an OpenAI-shaped error body and returns its message.
pub fn assert_openai_error(body: &serde_json::Value, code: u16) -> String {
    let err = &body["error"];
    assert!(err.is_object(), "not an OpenAI error: {body}");
    for key in ["message", "type", "param", "code"] {
        assert!(err.get(key).is_some(), "error lacks {key}: {body}");
    }
    assert_eq!(err["code"], code, "{body}");
    err["message"].as_str().unwrap().to_owned()
}

/// Telemetry ids forwarded to another replica with `outcome`, from a
/// metrics page.
pub fn forwarded(metrics: &str, outcome: &str) -> f64 {
    metric_value(
        metrics,
        &format!("pd_proxy_telemetry_forwarded_ids_total{{outcome=\"{outcome}\"}}"),
    )
}

/// A GET's body as text.
pub async fn get_text(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

/// Where [`skip`] lists the tests that could not run; `.ci/run` prints it
/// after `cargo test`, whose own summary counts such a test as passed.
pub const SKIPS: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/skipped-tests.txt");

/// Says that `test` cannot run here, and why: on stderr, past the
/// harness's capture, and as a line of [`SKIPS`]. The caller returns
/// right after. With `PD_TEST_NO_SKIP=1` (where every tool is known to be
/// installed) a skip is a failure instead.
pub fn skip(test: &str, reason: &str) {
    use std::io::Write;
    if std::env::var("PD_TEST_NO_SKIP").as_deref() == Ok("1") {
        panic!("PD_TEST_NO_SKIP=1, but {test} cannot run: {reason}");
    }
    let line = format!("SKIPPED {test}: {reason}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(SKIPS)
    {
        let _ = f.write_all(line.as_bytes());
    }
}
