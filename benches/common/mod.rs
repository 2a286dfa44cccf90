//! What the benchmarks share: free loopback ports, the processes they
//! start (pd-proxy, pd-sim), read from /proc and killed when dropped, and
//! the HTTP/1.1 client calls their load loops make.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The benches' request: a 16-token streamed chat completion.
pub const CHAT_16: &[u8] = br#"{"model":"sim-model","messages":[{"role":"user","content":"Explain how KV cache reuse helps long-context serving."}],"max_tokens":16,"stream":true}"#;

/// One keep-alive HTTP/1.1 connection to `addr`, with TCP_NODELAY.
pub async fn connect(addr: SocketAddr) -> Option<http1::SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    tcp.set_nodelay(true).ok()?;
    let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await.ok()?;
    tokio::spawn(conn);
    Some(sender)
}

/// The body of `GET path` on a fresh connection, when it is a 200.
pub async fn get_text(addr: SocketAddr, path: &str) -> Option<String> {
    let mut sender = connect(addr).await?;
    let req = http::Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.ok()?;
    if resp.status() != 200 {
        return None;
    }
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8(body.to_vec()).ok()
}

/// Polls `GET /health` until 200 (bounded).
pub async fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while get_text(addr, "/health").await.is_none() {
        assert!(Instant::now() < deadline, "{addr} never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port nothing listens on: bound once, then released.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Clock ticks per second, the unit of /proc's CPU times.
pub fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// `program` started on the CPUs `cpus` (a `taskset -c` list), or on the
/// bench's own CPUs (children inherit them) when `None`. taskset execs
/// `program`, so the child's pid, /proc entries and CPU time are
/// `program`'s own.
pub fn command_on(cpus: Option<&str>, program: impl AsRef<OsStr>) -> Command {
    match cpus {
        Some(list) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(list).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// A child process, killed (and reaped) when dropped, so a bench that
/// panics leaves nothing running.
pub struct Proc(pub Child);

impl Proc {
    /// Starts `bin` with `args`, stdout discarded.
    pub fn spawn(bin: &str, args: &[String]) -> Proc {
        Proc::spawn_on(None, bin, args)
    }

    /// [`Proc::spawn`] on the CPUs `cpus` (see [`command_on`]).
    pub fn spawn_on(cpus: Option<&str>, bin: &str, args: &[String]) -> Proc {
        Proc::start(command_on(cpus, bin).args(args).stdout(Stdio::null()))
    }

    /// Starts `cmd` with `RUST_LOG=warn`; stdout and stderr as `cmd` has
    /// them (by default the bench's).
    pub fn start(cmd: &mut Command) -> Proc {
        let bin = cmd.get_program().to_string_lossy().into_owned();
        Proc(
            cmd.env("RUST_LOG", "warn")
                .spawn()
                .unwrap_or_else(|e| panic!("starting {bin}: {e}")),
        )
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    /// user + system CPU time so far, from /proc.
    pub fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).unwrap();
        // Fields after the ")" closing the command name; utime and stime
        // are fields 14 and 15 of the whole line.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
    }

    /// A `kB` field of /proc/PID/status (`VmRSS`, `VmHWM`), in KiB.
    pub fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.0.id()))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
