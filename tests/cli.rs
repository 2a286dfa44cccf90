//! The binary's command line: bad configuration is one line and exit code
//! 2; every flag can come from `PD_PROXY_<FLAG>`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pd-proxy");

fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}");
    assert!(out.stdout.is_empty());
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn bad_config_is_one_line_and_exit_code_2() {
    let err = refused(&["--decoder-host", "a,b,c", "--decoder-port", "1,2"], &[]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("pd-proxy: error: --decoder-host has 3 entries"),
        "{err}"
    );
    let err = refused(&["--kv-ready-timeout=-1"], &[]);
    assert!(err.contains("--kv-ready-timeout"), "{err}");
    // clap's own errors (unknown value) also exit 2.
    let err = refused(&["--on-kv-timeout", "maybe"], &[]);
    assert!(err.contains("maybe"), "{err}");
}

#[test]
fn flags_come_from_the_environment_too() {
    let err = refused(&[], &[("PD_PROXY_ON_KV_TIMEOUT", "maybe")]);
    assert!(err.contains("maybe"), "{err}");
    let err = refused(
        &[],
        &[
            ("PD_PROXY_NUM_DECODERS", "2"),
            ("PD_PROXY_DECODER_PORT", "65535"),
        ],
    );
    assert!(err.contains("past 65535"), "{err}");
}

#[test]
fn serves_on_ports_given_by_environment() {
    let (port, telemetry) = (free_port(), free_port());
    let mut child = Command::new(BIN)
        .env("PD_PROXY_HOST", "127.0.0.1")
        .env("PD_PROXY_PORT", port.to_string())
        .env("PD_PROXY_TELEMETRY_PORT", telemetry.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let up = |p: u16| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok();
    while !(up(port) && up(telemetry)) {
        assert!(
            Instant::now() < deadline,
            "pd-proxy did not listen on {port} and {telemetry}"
        );
        assert!(child.try_wait().unwrap().is_none(), "pd-proxy exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn an_upstream_that_is_the_proxy_itself_is_refused() {
    let (port, telemetry) = (free_port(), free_port());
    let (port_s, telemetry_s) = (port.to_string(), telemetry.to_string());
    for (host, upstream_port) in [("127.0.0.1", &port_s), ("127.0.0.1", &telemetry_s)] {
        let err = refused(
            &[
                "--host",
                "127.0.0.1",
                "--port",
                &port_s,
                "--telemetry-port",
                &telemetry_s,
                "--prefiller-host",
                host,
                "--prefiller-port",
                upstream_port,
            ],
            &[],
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("own listening address"), "{err}");
    }
    // On the unspecified address every local address is the proxy's.
    let err = refused(
        &[
            "--host",
            "0.0.0.0",
            "--port",
            &port_s,
            "--telemetry-port",
            &telemetry_s,
            "--decoder-host",
            "127.0.0.1",
            "--decoder-port",
            &port_s,
        ],
        &[],
    );
    assert!(err.contains("decoder 127.0.0.1"), "{err}");
}

#[test]
fn a_telemetry_port_equal_to_the_api_port_is_refused() {
    let err = refused(&["--port", "8000", "--telemetry-port", "8000"], &[]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--telemetry-port 8000"), "{err}");
}

/// Starts the binary under `ulimit -Sn 256` and waits until it listens.
fn spawn_listening(args: &[String], port: u16, telemetry: u16) -> std::process::Child {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 256; exec \"$0\" \"$@\"")
        .arg(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("OPENAI_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let up = |p: u16| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok();
    while !(up(port) && up(telemetry)) {
        assert!(Instant::now() < deadline, "pd-proxy did not listen");
        assert!(child.try_wait().unwrap().is_none(), "pd-proxy exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn sigterm(child: &std::process::Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits (bounded) for the exit; returns its code and stderr.
fn exited(mut child: std::process::Child) -> (Option<i32>, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("pd-proxy did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (child.wait().unwrap().code(), err)
}

/// The proxy on `port` and `telemetry`, its prefiller and decoder at
/// `upstream` (prefiller port, decoder port) on 127.0.0.1.
fn proxy_args(port: u16, telemetry: u16, upstream: (u16, u16), extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--telemetry-port",
        &telemetry.to_string(),
        "--prefiller-port",
        &upstream.0.to_string(),
        "--decoder-port",
        &upstream.1.to_string(),
        "--prefiller-host",
        "127.0.0.1",
        "--decoder-host",
        "127.0.0.1",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// pd-sim's prefiller and decoder on `upstream`, posting telemetry to
/// `telemetry`, with `extra` flags.
fn spawn_sim(upstream: (u16, u16), telemetry: u16, extra: &[&str]) -> std::process::Child {
    Command::new(pd_sim::binary())
        .args([
            "--prefiller-port",
            &upstream.0.to_string(),
            "--decoder-port",
            &upstream.1.to_string(),
            "--telemetry-url",
            &format!("http://127.0.0.1:{telemetry}/api/v1/telemetry"),
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn raises_its_file_limit_and_exits_zero_after_a_clean_drain() {
    let (port, telemetry, upstream) = (free_port(), free_port(), free_port());
    let child = spawn_listening(
        &proxy_args(port, telemetry, (upstream, upstream), &[]),
        port,
        telemetry,
    );
    sigterm(&child);
    let (code, err) = exited(child);
    assert_eq!(code, Some(0), "{err}");
    let hard = Command::new("sh")
        .args(["-c", "ulimit -Hn"])
        .output()
        .unwrap();
    let hard = String::from_utf8(hard.stdout).unwrap();
    let fd_limit = err
        .split("fd_limit=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no fd_limit in the log: {err}"));
    match hard.trim().parse::<u64>() {
        Ok(hard) if hard > 256 => assert_eq!(fd_limit, hard.to_string(), "{err}"),
        _ => assert!(fd_limit.parse::<u64>().unwrap() >= 256, "{err}"),
    }
}

#[test]
fn exits_non_zero_when_the_drain_cuts_a_stream() {
    let (port, telemetry) = (free_port(), free_port());
    let upstream = (free_port(), free_port());
    let mut sim = spawn_sim(
        upstream,
        telemetry,
        &["--token-delay-ms", "200", "--default-tokens", "1000"],
    );
    let args = proxy_args(port, telemetry, upstream, &["--drain-timeout", "0.5"]);
    let child = spawn_listening(&args, port, telemetry);
    // A long stream, read slowly in the background.
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body = r#"{"model":"sim-model","prompt":"Tell me a long story.","stream":true}"#;
    std::io::Write::write_all(
        &mut tcp,
        format!(
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let mut first = [0u8; 64];
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let n = std::io::Read::read(&mut tcp, &mut first).unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &first[..n]);
    sigterm(&child);
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut tcp, &mut rest);
    let (code, err) = exited(child);
    sim.kill().unwrap();
    sim.wait().unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cut"), "{err}");
    assert!(
        rest.contains("shutting down"),
        "the stream ends with the cut's error event: {rest}"
    );
    assert!(rest.contains("data: [DONE]"), "{rest}");
}

/// POSTs `body` to /v1/completions until the answer starts with `want`:
/// the decoder may not have passed its first health check yet, so a 503 or
/// 502 is retried, bounded. Returns the whole answer.
fn post_until(port: u16, body: &str, want: &str) -> String {
    let mut answer = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !answer.starts_with(want) {
        assert!(Instant::now() < deadline, "no {want}: {answer}");
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::io::Write::write_all(
            &mut tcp,
            format!(
                "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        answer.clear();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        std::io::Read::read_to_string(&mut tcp, &mut answer).unwrap();
    }
    answer
}

/// pd-sim and pd-proxy with `--log-format json`; `send` gets the proxy's
/// port. Returns every log line of the proxy, parsed, once it exited 0 on
/// SIGTERM (each line must be one JSON object).
fn json_log_of(send: impl FnOnce(u16), upstream: (u16, u16)) -> Vec<serde_json::Value> {
    let (port, telemetry) = (free_port(), free_port());
    let mut sim = spawn_sim(upstream, telemetry, &[]);
    let args = proxy_args(port, telemetry, upstream, &["--log-format", "json"]);
    let child = spawn_listening(&args, port, telemetry);
    send(port);
    sigterm(&child);
    let (code, err) = exited(child);
    sim.kill().unwrap();
    sim.wait().unwrap();
    assert_eq!(code, Some(0), "{err}");
    err.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// A refused request's log line says which upstream refused it and what it
/// said, for a prefiller's refusal and for a decoder's.
#[test]
fn a_refusal_logs_what_the_upstream_said() {
    let upstream = (free_port(), free_port());
    let lines = json_log_of(
        |port| {
            // The prefiller checks the model first.
            let answer = post_until(
                port,
                r#"{"model":"no-such-model","prompt":"Say hello.","max_tokens":4}"#,
                "HTTP/1.1 404",
            );
            assert!(answer.contains("does not exist"), "{answer}");
            // The prefill copy asks for one token: only the decoder sees this.
            let answer = post_until(
                port,
                r#"{"model":"sim-model","prompt":"Say hello.","max_tokens":99999999}"#,
                "HTTP/1.1 400",
            );
            assert!(answer.contains("max_model_len"), "{answer}");
        },
        upstream,
    );
    let finished: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["message"] == "request finished")
        .collect();
    // Which upstream, then its message.
    let said = |status: u64, want: String| {
        let line = finished
            .iter()
            .rfind(|l| l["status"] == status)
            .unwrap_or_else(|| panic!("no {status} line: {finished:?}"));
        assert_eq!(line["outcome"], "Refused", "{line}");
        let said = line["upstream_said"].as_str().unwrap_or_default();
        assert!(said.starts_with(&want), "{line}");
    };
    said(
        404,
        format!(
            "prefiller 127.0.0.1:{}: The model `no-such-model` does not exist",
            upstream.0
        ),
    );
    said(
        400,
        format!("decoder 127.0.0.1:{}: max_tokens=99999999", upstream.1),
    );
    assert!(finished.iter().all(|l| l["status"] != 200), "{finished:?}");
}

#[test]
fn json_logs_are_one_object_a_line_with_the_request_fields() {
    let lines = json_log_of(
        |port| {
            post_until(
                port,
                r#"{"model":"sim-model","prompt":"Say hello.","max_tokens":4}"#,
                "HTTP/1.1 200",
            );
        },
        (free_port(), free_port()),
    );
    let finished = lines
        .iter()
        .rfind(|l| l["message"] == "request finished")
        .unwrap_or_else(|| panic!("no request line: {lines:?}"));
    assert_eq!(finished["status"], 200, "{finished}");
    assert_eq!(finished["level"], "INFO");
    assert_eq!(finished["span"]["api"], "completions", "{finished}");
    assert_eq!(
        finished["span"]["id"].as_str().unwrap().len(),
        32,
        "{finished}"
    );
    for field in ["prefill_ms", "kv_wait_ms", "decode_ttfb_ms", "total_ms"] {
        assert!(finished[field].is_number(), "{field}: {finished}");
    }
}
