//! What one large request costs the proxy in memory, against its body.
//!
//! A JSON tree once cost 23 to 34 times the body while parsing (a 10 MiB
//! list of empty arrays: 256 MiB; a 30 MiB token-id prompt: 1 GiB); the
//! proxy must now stay within about 4 times. For each case a fresh
//! release `pd-proxy` (with `pd-sim` behind it) gets one request; the
//! figure is the proxy's peak resident memory (`VmHWM`) after the answer
//! minus the same before the request. Then the same bodies are parsed
//! and rewritten in this process, timed.
//!
//! `cargo bench --bench body_memory`

mod common;

use common::{free_port, Proc};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use pd_proxy::openai::{Api, ClientRequest};

const PROXY: &str = env!("CARGO_BIN_EXE_pd-proxy");
const MIB: usize = 1 << 20;

struct Case {
    name: &'static str,
    api: Api,
    body: Vec<u8>,
}

/// `{"model":...,"<key>":[item,item,...],"max_tokens":1}` with items from
/// `item(i)` until the body is about `size` bytes (one item at least).
fn list_body(key: &str, size: usize, mut item: impl FnMut(usize) -> String) -> Vec<u8> {
    let mut body = format!(r#"{{"model":"sim-model","{key}":["#).into_bytes();
    let mut i = 0;
    while i == 0 || body.len() < size {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item(i).as_bytes());
        i += 1;
    }
    body.extend_from_slice(br#"],"max_tokens":1}"#);
    body
}

fn cases() -> Vec<Case> {
    // 120 levels: with the body's object and the prompt's list, within
    // serde_json's 127.
    let nest = format!("{}{}", "[".repeat(120), "]".repeat(120));
    vec![
        Case {
            name: "completions, prompt = 10 MiB of []",
            api: Api::Completions,
            body: list_body("prompt", 10 * MIB, |_| "[]".into()),
        },
        Case {
            name: "completions, prompt = 30 MiB of token ids",
            api: Api::Completions,
            body: list_body("prompt", 30 * MIB, |i| ((i * 7919) % 150_000).to_string()),
        },
        Case {
            name: "chat, one 10 MiB message",
            api: Api::Chat,
            body: list_body("messages", 0, |_| {
                format!(r#"{{"role":"user","content":"{}"}}"#, "a".repeat(10 * MIB))
            }),
        },
        Case {
            name: "chat, 100k small messages",
            api: Api::Chat,
            body: messages_body(100_000),
        },
        Case {
            name: "completions, prompt = 30 MiB of arrays 120 deep",
            api: Api::Completions,
            body: list_body("prompt", 30 * MIB, |_| nest.clone()),
        },
        Case {
            name: "completions, unread member = 30 MiB of arrays 120 deep",
            api: Api::Completions,
            body: {
                let mut body = list_body("x", 30 * MIB, |_| nest.clone());
                body.splice(1..1, br#""prompt":"Hello","#.iter().copied());
                body
            },
        },
    ]
}

fn messages_body(count: usize) -> Vec<u8> {
    let mut left = count;
    let mut body = br#"{"model":"sim-model","messages":["#.to_vec();
    while left > 0 {
        body.extend_from_slice(br#"{"role":"user","content":"Hello there, how are you?"}"#);
        left -= 1;
        if left > 0 {
            body.push(b',');
        }
    }
    body.extend_from_slice(br#"],"max_tokens":1}"#);
    body
}

/// One HTTP/1.1 exchange on a fresh connection; the status and the
/// answer's first bytes.
fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(180)))?;
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )?;
    tcp.write_all(body)?;
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let start = text.find("\r\n\r\n").map_or(0, |i| i + 4);
    let head: String = text[start..].chars().take(100).collect();
    Ok((status, head))
}

fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(exchange(addr, "GET", "/health", b""), Ok((200, _))) {
        assert!(Instant::now() < deadline, "{addr} never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The proxy's peak memory for one request with `case`'s body, over its
/// peak before it; with the answer's status and first bytes.
fn proxy_peak(case: &Case) -> (u64, u16, String) {
    let (pp, dp, api, tel) = (free_port(), free_port(), free_port(), free_port());
    let s = |p: u16| p.to_string();
    let sim_args: Vec<String> = [
        "--prefiller-port".into(),
        s(pp),
        "--decoder-port".into(),
        s(dp),
        "--telemetry-url".into(),
        format!("http://127.0.0.1:{tel}/api/v1/telemetry"),
    ]
    .to_vec();
    let _sim = Proc::spawn(pd_sim::binary(), &sim_args);
    let proxy_args: Vec<String> = [
        "--host",
        "127.0.0.1",
        "--port",
        &s(api),
        "--prefiller-host",
        "127.0.0.1",
        "--prefiller-port",
        &s(pp),
        "--decoder-host",
        "127.0.0.1",
        "--decoder-port",
        &s(dp),
        "--telemetry-port",
        &s(tel),
        "--max-body-bytes",
        "67108864",
        "--kv-ready-timeout",
        "10",
    ]
    .map(String::from)
    .to_vec();
    let proxy = Proc::spawn(PROXY, &proxy_args);
    let api_addr: SocketAddr = ([127, 0, 0, 1], api).into();
    for port in [pp, dp] {
        wait_ready(([127, 0, 0, 1], port).into());
    }
    wait_ready(api_addr);
    let before = proxy.status_kib("VmHWM") * 1024;
    let path = match case.api {
        Api::Chat => "/v1/chat/completions",
        Api::Completions => "/v1/completions",
    };
    let (status, head) = exchange(api_addr, "POST", path, &case.body)
        .unwrap_or_else(|e| (0, format!("no answer: {e}")));
    (
        (proxy.status_kib("VmHWM") * 1024).saturating_sub(before),
        status,
        head,
    )
}

/// Parse and prefill copy in this process, best of three.
fn parse_time(case: &Case) -> Duration {
    (0..3)
        .map(|_| {
            let started = Instant::now();
            let request = ClientRequest::parse(case.api, &case.body).expect("the proxy accepts it");
            std::hint::black_box(request.prefill_body());
            started.elapsed()
        })
        .min()
        .unwrap()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing here takes arguments.
    let mib = |b: u64| b as f64 / MIB as f64;
    println!("| case | body MiB | proxy peak Δ MiB | peak / body | status | parse + copy ms |");
    println!("|---|---:|---:|---:|---|---:|");
    for case in cases() {
        let (peak, status, head) = proxy_peak(&case);
        let body = case.body.len() as u64;
        let took = parse_time(&case);
        println!(
            "| {} | {:.1} | {:.1} | {:.2} | {status} | {:.0} |",
            case.name,
            mib(body),
            mib(peak),
            peak as f64 / body as f64,
            took.as_secs_f64() * 1e3,
        );
        if status != 200 {
            println!(
                "|  | answer: `{}` | | | | |",
                head.replace('|', "\\|").replace('\n', " ")
            );
        }
    }
}
