//! The metrics page as a real Prometheus reads it: `promtool check
//! metrics` on a scrape taken under load, and a Prometheus server that
//! scrapes a running proxy and answers queries about it afterwards.
//! Skipped, saying why, where Debian's `prometheus` package is absent
//! (`.ci/run` installs it).

mod common;

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{chat_body, start};
use pd_sim::SimConfig;
use serde_json::Value;

const PROMTOOL: &str = "/usr/bin/promtool";
const PROMETHEUS: &str = "/usr/bin/prometheus";

fn installed(test: &str, tool: &str) -> bool {
    if Path::new(tool).exists() {
        return true;
    }
    common::skip(
        &format!("prometheus::{test}"),
        &format!("{tool} is absent (`apt-get install prometheus`, as .ci/run does)"),
    );
    false
}

/// Keeps `clients` requests in flight until dropped.
fn load(s: &common::Stack, clients: usize) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|i| {
            let (client, url) = (s.client.clone(), s.url.clone());
            tokio::spawn(async move {
                loop {
                    let resp = client
                        .post(format!("{url}/v1/chat/completions"))
                        .json(&chat_body(i % 2 == 0))
                        .send()
                        .await;
                    if let Ok(resp) = resp {
                        let _ = resp.bytes().await;
                    }
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_a_scrape_taken_under_load() {
    if !installed("promtool_accepts_a_scrape_taken_under_load", PROMTOOL) {
        return;
    }
    let sim = SimConfig {
        token_delay: Duration::from_millis(2),
        ..SimConfig::default()
    };
    let s = start(sim, &[]).await;
    let clients = load(&s, 8);
    common::wait_until("requests under way", || async {
        s.app.pending.len() + s.app.requests.load(std::sync::atomic::Ordering::Relaxed) > 0
            && common::metric_value(
                &s.app.metrics.render(),
                "pd_proxy_routes_total{route=\"pd\"}",
            ) > 20.0
    })
    .await;
    let scrape = s.metrics().await;
    for c in &clients {
        c.abort();
    }
    assert!(scrape.contains("pd_proxy_request_duration_seconds_bucket"));
    let mut promtool = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Prometheus server for the test's life.
struct Server {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_server_scrapes_the_proxy_and_answers_queries() {
    if !installed(
        "a_prometheus_server_scrapes_the_proxy_and_answers_queries",
        PROMETHEUS,
    ) {
        return;
    }
    let s = start(SimConfig::default(), &[]).await;
    let target = s.url.trim_start_matches("http://").to_owned();
    let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let web_addr = web.local_addr().unwrap();
    drop(web);
    let dir = std::env::temp_dir().join(format!("pd-proxy-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 200ms\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: pd-proxy\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new(PROMETHEUS)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web_addr}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _server = Server {
        child,
        dir: dir.clone(),
    };
    let api = format!("http://{web_addr}/api/v1/query");
    let client = reqwest::Client::new();
    let query = |q: &'static str| {
        let (client, api) = (client.clone(), api.clone());
        async move {
            let resp = client.get(&api).query(&[("query", q)]).send().await.ok()?;
            let v: Value = resp.json().await.ok()?;
            let value = v["data"]["result"][0]["value"][1].as_str()?;
            value.parse::<f64>().ok()
        }
    };
    for i in 0..12 {
        let resp = s.post("/v1/chat/completions", chat_body(i % 2 == 0)).await;
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let total = query("sum(pd_proxy_requests_total{job=\"pd-proxy\",status=\"200\"})").await;
        // Over the whole histogram, not a rate: the requests may all have
        // finished before the first scrape.
        let p50 = query(
            "histogram_quantile(0.5, sum by (le) (pd_proxy_request_duration_seconds_bucket{job=\"pd-proxy\"}))",
        )
        .await;
        if let (Some(total), Some(p50)) = (total, p50) {
            if total >= 12.0 && p50.is_finite() {
                assert!(p50 > 0.0 && p50 < 10.0, "p50 {p50}");
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus never saw the requests: total {total:?}, p50 {p50:?}; log: {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let up = query("up{job=\"pd-proxy\"}").await;
    assert_eq!(up, Some(1.0), "the scrape itself succeeded");
}
