//! The sidecar fleet across hosts: three pd-proxy replicas, each its own
//! process in its own network namespace with its own address, and pd-sim
//! (prefiller and decoder) in a fourth, all on one bridge. Each replica
//! listens on `0.0.0.0` and learns the address its ids name from `POD_IP`,
//! as in a pod; pd-sim's LMCache telemetry goes to one replica only (as a
//! telemetry Service that happened to pick it), so the other two replicas'
//! events reach them only by being forwarded across the namespaces to the
//! addresses in their ids.
//!
//! Needs root and iproute2 (`ip netns`, veth, bridge). Where namespaces
//! cannot be made the test is skipped (common::skip: the reason on stderr and in the skip list) and returns;
//! with `PD_TEST_NO_SKIP=1` that is a failure instead.
//!
//! Layout (the bridge lives in a namespace of its own, so the host's
//! firewall never sees the traffic between the namespaces; the test process
//! reaches them through one veth whose root-namespace end has `.254`):
//!
//! ```text
//! root ns: pdn<pid> 10.233.N.254 ──┐
//!                      <tag>-sw: br0 ─┬─ <tag>-r0  10.233.N.1  pd-proxy (gets all telemetry)
//!                                     ├─ <tag>-r1  10.233.N.2  pd-proxy
//!                                     ├─ <tag>-r2  10.233.N.3  pd-proxy
//!                                     └─ <tag>-sim 10.233.N.4  pd-sim
//! ```

mod common;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{chat_body, forwarded, get_text, metric_value};

const PROXY: &str = env!("CARGO_BIN_EXE_pd-proxy");
const KEY: &str = "a netns test cluster key, 32 b!!";

/// Every namespace has its own ports: the same ones everywhere, as pods.
const API_PORT: u16 = 8000;
const TELEMETRY_PORT: u16 = 5768;
const PREFILL_PORT: u16 = 8100;
const DECODE_PORT: u16 = 8200;

const REPLICAS: usize = 3;
const REQUESTS_PER_REPLICA: usize = 8;
/// Each namespace's last octet: replicas 1..=3, pd-sim 4; the root
/// namespace's end of the uplink 254.
const SIM_HOST: u8 = 4;
const ROOT_HOST: u8 = 254;

/// Why the test cannot run here.
struct Skip(String);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

fn ip_output(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A process started in a namespace, with its log.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

/// The namespaces, links and processes of one run; dropping it removes
/// them all, whatever state the setup reached.
struct Net {
    tag: String,
    /// The third octet of this run's 10.233.N.0/24.
    subnet: u8,
    dir: PathBuf,
    /// Created, in order; deleted in reverse.
    namespaces: Vec<String>,
    /// The root namespace's end of the uplink veth.
    uplink: Option<String>,
    procs: Vec<Proc>,
}

impl Net {
    fn addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 233, self.subnet, host)
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    /// Builds the bridge, the uplink and one namespace per host. Any
    /// failure is a reason to skip; what was made is removed on drop.
    fn build(&mut self, hosts: &[(&str, u8)]) -> Result<(), String> {
        let sw = self.ns("sw");
        ip(&["netns", "add", &sw])?;
        self.namespaces.push(sw.clone());
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &sw,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "forward_delay",
            "0",
        ])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;

        let uplink = self.tag.clone();
        ip(&[
            "link", "add", &uplink, "type", "veth", "peer", "name", "upl", "netns", &sw,
        ])?;
        self.uplink = Some(uplink.clone());
        let root_addr = format!("{}/24", self.addr(ROOT_HOST));
        ip(&["addr", "add", &root_addr, "dev", &uplink])?;
        ip(&["link", "set", &uplink, "up"])?;
        ip(&[
            "-n", &sw, "link", "set", "dev", "upl", "master", "br0", "up",
        ])?;

        for (i, (name, host)) in hosts.iter().enumerate() {
            let ns = self.ns(name);
            ip(&["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let port = format!("p{i}");
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&[
                "-n", &sw, "link", "set", "dev", &port, "master", "br0", "up",
            ])?;
            let addr = format!("{}/24", self.addr(*host));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// Starts `program args` inside namespace `name`, its output in a log.
    fn spawn(&mut self, name: &str, program: &str, args: &[String], env: &[(&str, String)]) {
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(name), program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        // Only what this test says: no flag from the caller's environment.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PD_PROXY_") || key == "OPENAI_API_KEY" {
                cmd.env_remove(key);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            log,
        });
    }

    /// Panics, with its log, if any process has exited.
    fn check_alive(&mut self) {
        for p in &mut self.procs {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({status}):\n{}",
                    p.name,
                    std::fs::read_to_string(&p.log).unwrap_or_default()
                );
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let started = Instant::now();
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if std::thread::panicking() {
            for p in &self.procs {
                let log = std::fs::read_to_string(&p.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                eprintln!("--- {} log (last 40 lines)\n{}", p.name, tail.join("\n"));
            }
        }
        let mut left = Vec::new();
        if let Some(uplink) = self.uplink.take() {
            // Usually gone already with its peer's namespace; deleted
            // first so that no route outlives the run.
            if ip(&["link", "del", &uplink]).is_err() && ip(&["link", "show", &uplink]).is_ok() {
                left.push(format!("link {uplink}"));
            }
        }
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                left.push(e);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        eprintln!("cleanup took {:?}", started.elapsed());
        if !left.is_empty() && !std::thread::panicking() {
            panic!("not cleaned up: {left:?}");
        }
    }
}

/// A 10.233.N.0/24 that nothing on this host uses, N from the pid so that
/// runs side by side pick different ones.
fn free_subnet() -> Result<u8, String> {
    let start = std::process::id() % 224;
    for step in 0..224 {
        let n = (16 + (start + step) % 224) as u8;
        let prefix = format!("10.233.{n}.0/24");
        let routes = ip_output(&["-4", "route", "show", "table", "all", "root", &prefix])?;
        let addrs = ip_output(&["-4", "-o", "addr", "show", "to", &prefix])?;
        if routes.trim().is_empty() && addrs.trim().is_empty() {
            return Ok(n);
        }
    }
    Err("every 10.233.N.0/24 (N in 16..240) is in use here".into())
}

fn setup(tag: &str, hosts: &[(&str, u8)]) -> Result<Net, Skip> {
    match Command::new("ip").arg("-V").stdout(Stdio::null()).status() {
        Ok(s) if s.success() => {}
        Ok(s) => return Err(Skip(format!("`ip -V` failed ({s})"))),
        Err(e) => return Err(Skip(format!("no `ip` binary (iproute2): {e}"))),
    }
    let subnet = free_subnet().map_err(Skip)?;
    let mut net = Net {
        tag: tag.to_owned(),
        subnet,
        dir: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(tag),
        namespaces: Vec::new(),
        uplink: None,
        procs: Vec::new(),
    };
    // `net` is dropped on failure: whatever was made goes with it.
    net.build(hosts)
        .map_err(|e| Skip(format!("cannot make network namespaces: {e}")))?;
    // The processes' logs.
    std::fs::create_dir_all(&net.dir).unwrap();
    Ok(net)
}

fn skip(reason: &str) {
    common::skip(
        "netns::replicas_in_their_own_namespaces_forward_telemetry_to_each_other",
        reason,
    );
}

/// The first 36 hex digits of an owner-routed id: the owner's address,
/// IPv4 mapped, and port.
fn owner_hex(ip: Ipv4Addr, port: u16) -> String {
    let mut bytes = [0u8; 18];
    bytes[..16].copy_from_slice(&ip.to_ipv6_mapped().octets());
    bytes[16..].copy_from_slice(&port.to_be_bytes());
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn metrics(client: &reqwest::Client, api: &str) -> String {
    get_text(client, &format!("{api}/metrics")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_in_their_own_namespaces_forward_telemetry_to_each_other() {
    let t0 = Instant::now();
    let tag = format!("pdn{}", std::process::id());
    let hosts: Vec<(String, u8)> = (0..REPLICAS)
        .map(|i| (format!("r{i}"), i as u8 + 1))
        .chain([("sim".to_owned(), SIM_HOST)])
        .collect();
    let host_refs: Vec<(&str, u8)> = hosts.iter().map(|(n, h)| (n.as_str(), *h)).collect();
    let mut net = match setup(&tag, &host_refs) {
        Ok(net) => net,
        Err(Skip(reason)) => return skip(&reason),
    };
    let setup_took = t0.elapsed();

    let sim_ip = net.addr(SIM_HOST);
    let replica_ip = |i: usize| net.addr(i as u8 + 1);
    let replica_ips: Vec<Ipv4Addr> = (0..REPLICAS).map(replica_ip).collect();
    // Every event to replica 0's telemetry address, across the bridge.
    let telemetry_url = format!(
        "http://{}:{TELEMETRY_PORT}/api/v1/telemetry",
        replica_ips[0]
    );
    let sim_args: Vec<String> = [
        "--host",
        &sim_ip.to_string(),
        "--prefiller-port",
        &PREFILL_PORT.to_string(),
        "--decoder-port",
        &DECODE_PORT.to_string(),
        "--telemetry-url",
        &telemetry_url,
    ]
    .map(String::from)
    .to_vec();
    net.spawn(
        "sim",
        pd_sim::binary(),
        &sim_args,
        &[("RUST_LOG", "warn".into())],
    );
    for (i, ip) in replica_ips.iter().enumerate() {
        let args: Vec<String> = [
            // Not concrete: the ids must name $POD_IP.
            "--host",
            "0.0.0.0",
            "--port",
            &API_PORT.to_string(),
            "--telemetry-port",
            &TELEMETRY_PORT.to_string(),
            "--prefiller-host",
            &sim_ip.to_string(),
            "--prefiller-port",
            &PREFILL_PORT.to_string(),
            "--decoder-host",
            &sim_ip.to_string(),
            "--decoder-port",
            &DECODE_PORT.to_string(),
            "--kv-ready-timeout",
            "10",
        ]
        .map(String::from)
        .to_vec();
        net.spawn(
            &format!("r{i}"),
            PROXY,
            &args,
            &[
                ("PD_PROXY_CLUSTER_KEY", KEY.into()),
                ("POD_IP", ip.to_string()),
                ("RUST_LOG", "info".into()),
            ],
        );
    }

    // Straight to the namespaces: never through an HTTP proxy of the
    // environment.
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let apis: Vec<String> = replica_ips
        .iter()
        .map(|ip| format!("http://{ip}:{API_PORT}"))
        .collect();

    // Ready: serving, with pd-sim's prefiller and decoder healthy.
    let deadline = Instant::now() + Duration::from_secs(30);
    for api in &apis {
        loop {
            net.check_alive();
            let ready = client.get(format!("{api}/ready")).send().await;
            if ready.is_ok_and(|r| r.status() == 200) {
                break;
            }
            assert!(Instant::now() < deadline, "{api} not ready in 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let ready_took = t0.elapsed() - setup_took;

    // Clients in the root namespace, spread over the three API addresses.
    let sent = Instant::now();
    let mut requests = tokio::task::JoinSet::new();
    for (i, api) in apis.iter().enumerate() {
        for _ in 0..REQUESTS_PER_REPLICA {
            let (client, url) = (client.clone(), format!("{api}/v1/chat/completions"));
            requests.spawn(async move {
                let started = Instant::now();
                let resp = client.post(url).json(&chat_body(false)).send().await;
                let resp = resp.unwrap_or_else(|e| panic!("replica {i}: {e}"));
                let status = resp.status();
                let id = resp
                    .headers()
                    .get("x-request-id")
                    .map(|v| v.to_str().unwrap().to_owned());
                let body = resp.text().await.unwrap();
                (i, status, id, body, started.elapsed())
            });
        }
    }
    let mut slowest = Duration::ZERO;
    while let Some(done) = requests.join_next().await {
        let (i, status, id, body, took) = done.unwrap();
        assert_eq!(status, 200, "replica {i}: {body}");
        let id = id.unwrap_or_else(|| panic!("replica {i}: no x-request-id"));
        assert_eq!(id.len(), pd_proxy::owner::ROUTED_LEN, "{id}");
        assert!(
            id.starts_with(&owner_hex(replica_ips[i], TELEMETRY_PORT)),
            "replica {i}'s id {id} does not name $POD_IP {}:{TELEMETRY_PORT}",
            replica_ips[i]
        );
        slowest = slowest.max(took);
    }
    let requests_took = sent.elapsed();
    net.check_alive();

    // The forwards are counted once each owner has answered: wait for them
    // (bounded), then the exact figures.
    let expected = ((REPLICAS - 1) * REQUESTS_PER_REPLICA) as f64;
    let deadline = Instant::now() + Duration::from_secs(10);
    let m0 = loop {
        let m = metrics(&client, &apis[0]).await;
        if forwarded(&m, "delivered") >= expected || Instant::now() >= deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        forwarded(&m0, "delivered"),
        expected,
        "replica 0 forwarded the other two replicas' events:\n{m0}"
    );
    for outcome in ["unknown_at_owner", "unreachable", "queue_full", "misrouted"] {
        assert_eq!(forwarded(&m0, outcome), 0.0, "{outcome}:\n{m0}");
    }
    for (i, api) in apis.iter().enumerate() {
        let m = metrics(&client, api).await;
        assert_eq!(
            metric_value(&m, "pd_proxy_kv_ready_timeouts_total"),
            0.0,
            "replica {i}: every request released by its event"
        );
        assert_eq!(
            metric_value(&m, "pd_proxy_telemetry_invalid_ids_total"),
            0.0,
            "replica {i}"
        );
        assert_eq!(
            metric_value(&m, "pd_proxy_pending_requests"),
            0.0,
            "replica {i}"
        );
        if i > 0 {
            assert_eq!(
                forwarded(&m, "delivered"),
                0.0,
                "replica {i} received no event but forwarded ones"
            );
        }
    }
    let count = metric_value(&m0, "pd_proxy_telemetry_forward_seconds_count");
    let sum = metric_value(&m0, "pd_proxy_telemetry_forward_seconds_sum");
    assert_eq!(count, expected, "{m0}");
    eprintln!(
        "netns: subnet 10.233.{}.0/24; setup {setup_took:?}, start to ready {ready_took:?}, \
         {} requests in {requests_took:?} (slowest {slowest:?}), {expected} forwarded, \
         mean forward {:.3} ms",
        net.subnet,
        REPLICAS * REQUESTS_PER_REPLICA,
        sum / count * 1e3,
    );
    drop(net);
}
