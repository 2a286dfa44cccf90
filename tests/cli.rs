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
