//! The sidecar fleet for real (issue 10, test a): three pd-proxy
//! processes sharing one cluster key, over one pd-sim process whose
//! prefiller posts its LMCache telemetry to a real HAProxy that spreads
//! the connections round-robin over the three replicas' telemetry ports.
//! Clients spread requests over the three API ports, so about two thirds
//! of the events land on a replica that did not park the request and must
//! be forwarded to its owner. None may be lost: with `--kv-ready-timeout
//! 10` a lost event shows as a KV-ready timeout, not as a quiet pass.
//!
//! Skipped, with the reason printed, where /usr/sbin/haproxy is absent
//! (`.ci/run` installs Debian's `haproxy`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{chat_body, forwarded, metric_value, sse_data};
use serde_json::{json, Value};

const PD_PROXY: &str = env!("CARGO_BIN_EXE_pd-proxy");
const HAPROXY: &str = "/usr/sbin/haproxy";
/// Reaches the replicas through the environment only, never argv.
const KEY: &str = "haproxy test cluster key, 32 b!!";
const REPLICAS: usize = 3;
/// A multiple of [`REPLICAS`]. The forwarded share is about binomial
/// (p = 2/3): at 180 its standard deviation is about 0.04, so the
/// asserted 0.5..=0.8 is 3 or more of them away on either side.
const REQUESTS: usize = 180;
const CONCURRENCY: usize = 8;
/// Longest wait for any one process to come up.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for all the clients' requests.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for the forwards' outcomes to be counted once every
/// request has been answered.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Every process the test started, killed and reaped when dropped, on
/// success and on panic alike (on panic, each one's stderr tail is
/// printed first); then the temp dir is removed.
struct Procs {
    dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Procs {
    fn new() -> Procs {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("pd-proxy-haproxy-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Procs {
            dir,
            children: Vec::new(),
        }
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// Starts `cmd` with its stderr in `<name>.log` in the temp dir.
    fn spawn(&mut self, name: &str, cmd: &mut Command) -> &mut Child {
        let log = std::fs::File::create(self.log(name)).unwrap();
        cmd.stdin(Stdio::null()).stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.children.push((name.to_owned(), child));
        &mut self.children.last_mut().unwrap().1
    }

    /// Panics, with its log, if `name` has exited.
    fn assert_running(&mut self, name: &str) {
        let child = &mut self
            .children
            .iter_mut()
            .find(|(n, _)| n == name)
            .expect("a started process")
            .1;
        if let Some(status) = child.try_wait().unwrap() {
            let log = std::fs::read_to_string(self.log(name)).unwrap_or_default();
            panic!("{name} exited ({status}):\n{log}");
        }
    }

    /// Polls `ready` every 20 ms until it holds; panics after
    /// [`START_TIMEOUT`], or at once if `name` has exited.
    async fn wait_ready<F, Fut>(&mut self, name: &str, what: &str, mut ready: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.assert_running(name);
            if ready().await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: {what} not within {START_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for (name, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
            if panicking {
                let log = std::fs::read_to_string(self.dir.join(format!("{name}.log")))
                    .unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                eprintln!("---- {name} stderr, last 30 lines:\n{tail}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` distinct free ports on 127.0.0.1: all bound at once, then released.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Reads pd-sim's two printed addresses (prefiller, decoder).
fn sim_addresses(procs: &mut Procs, lines: &mpsc::Receiver<String>) -> (SocketAddr, SocketAddr) {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut next = |role: &str| -> SocketAddr {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(_) => {
                procs.assert_running("pd-sim");
                panic!("pd-sim printed no {role} address within {START_TIMEOUT:?}");
            }
        };
        let prefix = format!("pd-sim {role} listening on http://");
        line.strip_prefix(&prefix)
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("pd-sim printed {line:?}, not {prefix}ADDR"))
    };
    (next("prefiller"), next("decoder"))
}

/// One command on HAProxy's admin socket.
fn haproxy_admin(socket: &Path, command: &str) -> std::io::Result<String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    let mut out = String::new();
    stream.read_to_string(&mut out)?;
    Ok(out)
}

/// Connections HAProxy handed to each replica (`stot` of `show stat`).
fn haproxy_sessions(socket: &Path) -> Vec<(String, u64)> {
    let stat = haproxy_admin(socket, "show stat").expect("HAProxy's admin socket answers");
    let mut lines = stat.lines();
    let header: Vec<&str> = lines
        .next()
        .expect("a header")
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (px, sv, stot) = (col("pxname"), col("svname"), col("stot"));
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() > stot && f[px] == "replicas" && f[sv].starts_with('r'))
        .map(|f| (f[sv].to_owned(), f[stot].parse().unwrap()))
        .collect()
}

/// Sum of every sample of `name` (any labels) whose line contains `with`.
fn metric_sum(text: &str, name: &str, with: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(with))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let bare = key.split('{').next()?;
            (bare == name).then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}

const EVENTS: &str = "pd_proxy_telemetry_events_total{event=\"request_store_finished\"}";

/// Which replica each request goes to: round-robin in blocks of
/// [`REPLICAS`], each block in a random order. HAProxy's round-robin is
/// strict; were the clients' too, the share forwarded would hang on how
/// the two rotations line up (events arriving in request order would be
/// all forwarded, or none) instead of being two thirds.
fn spread() -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut rng = rand::rng();
    (0..REQUESTS / REPLICAS)
        .flat_map(|_| {
            let mut block: Vec<usize> = (0..REPLICAS).collect();
            block.shuffle(&mut rng);
            block
        })
        .collect()
}

/// Request `i` to replica `replica`: chat or completions, streamed or
/// not, by block, so that every replica gets every kind.
async fn one_request(
    client: &reqwest::Client,
    apis: &[String],
    replica: usize,
    i: usize,
) -> Result<(), String> {
    let api = &apis[replica];
    let kind = (i / apis.len()) % 4;
    let stream = kind % 2 == 1;
    let (path, body) = if kind < 2 {
        ("/v1/chat/completions", chat_body(stream))
    } else {
        (
            "/v1/completions",
            json!({"model": "sim-model", "prompt": "Explain KV cache reuse.",
                   "max_tokens": 8, "stream": stream}),
        )
    };
    let what = format!("request {i} ({path}, stream {stream}) to {api}");
    let resp = client
        .post(format!("{api}{path}"))
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let status = resp.status();
    let id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = resp.text().await.map_err(|e| format!("{what}: {e}"))?;
    if status != 200 {
        return Err(format!("{what}: {status}: {text}"));
    }
    if id.len() != pd_proxy::owner::ROUTED_LEN {
        return Err(format!("{what}: x-request-id {id:?} is not owner-routed"));
    }
    if stream {
        let data = sse_data(&text);
        if data.last().map(String::as_str) != Some("[DONE]") || data.len() < 2 {
            return Err(format!("{what}: stream not whole: {text}"));
        }
    } else {
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{what}: {e}: {text}"))?;
        if !v["choices"][0].is_object() {
            return Err(format!("{what}: no choice: {text}"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_behind_haproxy_release_every_request_by_telemetry() {
    if !Path::new(HAPROXY).exists() {
        common::skip(
            "haproxy::three_replicas_behind_haproxy_release_every_request_by_telemetry",
            &format!("{HAPROXY} is absent (`apt-get install haproxy`, as .ci/run does)"),
        );
        return;
    }
    let mut procs = Procs::new();
    let ports = free_ports(2 * REPLICAS + 1);
    let lb_port = ports[2 * REPLICAS];

    // pd-sim: one prefiller and one decoder, telemetry to HAProxy.
    let sim = procs.spawn(
        "pd-sim",
        Command::new(pd_sim::binary())
            .args(["--host", "127.0.0.1", "--prefiller-port", "0"])
            .args(["--decoder-port", "0", "--telemetry-url"])
            .arg(format!("http://127.0.0.1:{lb_port}/api/v1/telemetry"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped()),
    );
    let stdout = sim.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (prefiller, decoder) = sim_addresses(&mut procs, &lines);

    // Three replicas, the key in their environment only.
    let mut replicas: Vec<(String, SocketAddr)> = Vec::new();
    for r in 0..REPLICAS {
        let (api, telemetry) = (ports[2 * r], ports[2 * r + 1]);
        let mut cmd = Command::new(PD_PROXY);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PD_PROXY_") {
                cmd.env_remove(name);
            }
        }
        cmd.env_remove("OPENAI_API_KEY")
            .env_remove("POD_IP")
            .env("PD_PROXY_CLUSTER_KEY", KEY)
            .env("RUST_LOG", "warn")
            .args(["--host", "127.0.0.1", "--port", &api.to_string()])
            .args(["--telemetry-port", &telemetry.to_string()])
            .args(["--prefiller-host", &prefiller.ip().to_string()])
            .args(["--prefiller-port", &prefiller.port().to_string()])
            .args(["--decoder-host", &decoder.ip().to_string()])
            .args(["--decoder-port", &decoder.port().to_string()])
            .args(["--kv-ready-timeout", "10"])
            .stdout(Stdio::null());
        let child = procs.spawn(&format!("replica{r}"), &mut cmd);
        let argv = std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&argv).contains(KEY),
            "the key is not on the command line"
        );
        replicas.push((
            format!("http://127.0.0.1:{api}"),
            SocketAddr::from(([127, 0, 0, 1], telemetry)),
        ));
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for (r, (api, _)) in replicas.iter().enumerate() {
        let health = format!("{api}/health");
        procs
            .wait_ready(&format!("replica{r}"), "GET /health 200", || async {
                let probe = client.get(&health).timeout(Duration::from_secs(1)).send();
                matches!(probe.await, Ok(resp) if resp.status() == 200)
            })
            .await;
    }

    // HAProxy: TCP, round-robin over the telemetry ports, no health
    // checks (they would be telemetry connections of their own).
    let admin = procs.dir.join("admin.sock");
    let servers: String = replicas
        .iter()
        .enumerate()
        .map(|(r, (_, telemetry))| format!("    server r{r} {telemetry}\n"))
        .collect();
    let config = format!(
        "global\n    maxconn 4096\n    stats socket {} mode 600 level admin\n\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\n\
         frontend telemetry\n    bind 127.0.0.1:{lb_port}\n    default_backend replicas\n\n\
         backend replicas\n    balance roundrobin\n{servers}",
        admin.display()
    );
    let config_path = procs.dir.join("haproxy.cfg");
    std::fs::write(&config_path, &config).unwrap();
    let check = Command::new(HAPROXY)
        .arg("-c")
        .arg("-f")
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "haproxy -c refused the config:\n{config}\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    procs.spawn(
        "haproxy",
        Command::new(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&config_path)
            .stdout(Stdio::null()),
    );
    procs
        .wait_ready("haproxy", "its port accepting", || async {
            TcpStream::connect(("127.0.0.1", lb_port)).is_ok()
        })
        .await;
    procs
        .wait_ready("haproxy", "its admin socket answering", || async {
            haproxy_admin(&admin, "show info").is_ok()
        })
        .await;

    // The clients: REQUESTS over the three API ports, CONCURRENCY at once.
    let apis: Arc<Vec<String>> = Arc::new(replicas.iter().map(|(api, _)| api.clone()).collect());
    let plan = Arc::new(spread());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (client, apis, plan, next) = (
                client.clone(),
                Arc::clone(&apis),
                Arc::clone(&plan),
                Arc::clone(&next),
            );
            tokio::spawn(async move {
                let mut failures = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= REQUESTS {
                        return failures;
                    }
                    if let Err(e) = one_request(&client, &apis, plan[i], i).await {
                        failures.push(e);
                    }
                }
            })
        })
        .collect();
    let failures: Vec<String> = tokio::time::timeout(RUN_TIMEOUT, async {
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.expect("a client task does not panic"));
        }
        all
    })
    .await
    .unwrap_or_else(|_| panic!("{REQUESTS} requests not answered within {RUN_TIMEOUT:?}"));
    let elapsed = started.elapsed();
    assert!(failures.is_empty(), "failed requests: {failures:#?}");

    let scrape = || async {
        let mut out = Vec::new();
        for api in apis.iter() {
            let m = client.get(format!("{api}/metrics")).send().await;
            out.push(m.unwrap().text().await.unwrap());
        }
        out
    };
    let metrics = scrape().await;
    for (r, m) in metrics.iter().enumerate() {
        assert_eq!(
            metric_value(m, "pd_proxy_kv_ready_timeouts_total"),
            0.0,
            "replica {r}: a request waited for an event that never came"
        );
        assert_eq!(
            metric_sum(m, "pd_proxy_requests_total", "status=\"200\""),
            (REQUESTS / REPLICAS) as f64,
            "replica {r}: its share of the requests, all 200"
        );
        assert_eq!(metric_value(m, "pd_proxy_pending_requests"), 0.0);
    }

    // Every event reached a replica from HAProxy (REQUESTS of them, one id
    // each), and each forward is counted at its owner as an event too; the
    // sender counts the outcome once the owner's reply is in.
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let metrics = loop {
        let metrics = scrape().await;
        let events: f64 = metrics.iter().map(|m| metric_value(m, EVENTS)).sum();
        let reached: f64 = metrics
            .iter()
            .map(|m| {
                ["delivered", "unknown_at_owner", "unreachable"]
                    .iter()
                    .map(|o| forwarded(m, o))
                    .sum::<f64>()
            })
            .sum();
        if events - REQUESTS as f64 == reached {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "forward outcomes never settled: {events} events received, \
             {reached} forwards counted; metrics:\n{}",
            metrics.join("\n----\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let mut delivered = 0.0;
    let (mut fwd_sum, mut fwd_count) = (0.0, 0.0);
    let mut per_replica = Vec::new();
    for (r, m) in metrics.iter().enumerate() {
        for outcome in ["unknown_at_owner", "unreachable", "queue_full", "misrouted"] {
            assert_eq!(forwarded(m, outcome), 0.0, "replica {r}: {outcome}");
        }
        assert_eq!(
            metric_value(m, "pd_proxy_telemetry_invalid_ids_total"),
            0.0,
            "replica {r}"
        );
        let d = forwarded(m, "delivered");
        let count = metric_value(m, "pd_proxy_telemetry_forward_seconds_count");
        let sum = metric_value(m, "pd_proxy_telemetry_forward_seconds_sum");
        assert!(count > 0.0, "replica {r} forwarded nothing");
        assert_eq!(count, d, "replica {r}: one id per forwarded event");
        let kv_count = metric_value(m, "pd_proxy_kv_ready_wait_seconds_count");
        let kv_sum = metric_value(m, "pd_proxy_kv_ready_wait_seconds_sum");
        per_replica.push(format!(
            "replica{r}: {} events in, {d} forwarded and delivered, forward mean {:.3} ms, \
             kv wait mean {:.3} ms over {kv_count}",
            metric_value(m, EVENTS),
            1e3 * sum / count,
            1e3 * kv_sum / kv_count.max(1.0)
        ));
        delivered += d;
        fwd_sum += sum;
        fwd_count += count;
    }
    let share = delivered / REQUESTS as f64;
    // The histogram's lowest buckets, over the fleet: where its median lies.
    let within = |le: &str| -> f64 {
        let bucket = format!("le=\"{le}\"");
        metrics
            .iter()
            .map(|m| metric_sum(m, "pd_proxy_telemetry_forward_seconds_bucket", &bucket))
            .sum()
    };
    let (under_1ms, under_5ms) = (within("0.001"), within("0.005"));
    let sessions = haproxy_sessions(&admin);
    eprintln!(
        "haproxy fleet: {REQUESTS} requests ({CONCURRENCY} at a time) in {elapsed:.2?}; \
         forwarded share {delivered}/{REQUESTS} = {share:.3}; \
         forward added wait: mean {:.3} ms over {fwd_count} forwards (sum {fwd_sum:.6} s), \
         {under_1ms} within 1 ms, {under_5ms} within 5 ms; \
         HAProxy sessions per replica {sessions:?} (one is the readiness probe)\n  {}",
        1e3 * fwd_sum / fwd_count,
        per_replica.join("\n  ")
    );
    assert!(
        (0.5..=0.8).contains(&share),
        "forwarded share {share:.3}: round-robin should forward about two thirds"
    );
    assert_eq!(sessions.len(), REPLICAS, "{sessions:?}");
    assert!(
        sessions.iter().map(|(_, n)| n).sum::<u64>() >= REQUESTS as u64,
        "every event went through HAProxy: {sessions:?}"
    );
    assert!(
        sessions
            .iter()
            .all(|(_, n)| *n >= (REQUESTS / REPLICAS) as u64),
        "round-robin: {sessions:?}"
    );
    drop(procs);
}
