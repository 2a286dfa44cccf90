//! Where tests and benches find the pd-sim executable. Cargo tells a test
//! where the binaries of its own package are (`CARGO_BIN_EXE_<name>`), not
//! those of a dependency, and `cargo bench --bench load` builds no binary
//! of pd-sim's; so the first call asks the cargo running the caller to
//! build it, into the caller's target directory and profile. That is a
//! no-op when it is fresh, and never leaves a stale one in use.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// The pd-sim executable of the calling test's or bench's build:
/// `target/debug/pd-sim` under `cargo test`, `target/release/pd-sim`
/// under `cargo bench`, built first. `PD_SIM_BIN` names another one
/// instead, and nothing is built: for a bench binary carried to another
/// host without cargo. Panics, naming the command to run, where it can be
/// neither built nor found.
pub fn binary() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| match std::env::var("PD_SIM_BIN") {
        Ok(path) if !path.is_empty() => path,
        _ => build(),
    })
}

fn build() -> String {
    let exe = std::env::current_exe().expect("the running test has a path");
    // Cargo runs tests and benches as TARGET/PROFILE_DIR/deps/NAME-HASH.
    let profile_dir = exe
        .parent()
        .filter(|deps| deps.ends_with("deps"))
        .and_then(Path::parent)
        .unwrap_or_else(|| {
            panic!(
                "{} is not in a cargo target directory: set PD_SIM_BIN to a pd-sim binary",
                exe.display()
            )
        });
    let target_dir = profile_dir.parent().unwrap_or(profile_dir);
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(name) => name,
    };
    let bin = profile_dir.join(format!("pd-sim{}", std::env::consts::EXE_SUFFIX));
    let command = format!("cargo build --profile {profile} --bin pd-sim");
    // Set by cargo for what it runs; absent when the caller was started by
    // hand, which gets whatever was built last.
    if let Some(cargo) = std::env::var_os("CARGO") {
        // Over the whole workspace and with a test target (pd-sim's own,
        // which is small), so that the dependencies' features are unified
        // as in the `cargo test` or `cargo bench` at the root that built
        // the caller: a build without dev-dependencies would compile every
        // shared dependency again, and relink the binary each time.
        let status = Command::new(cargo)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--workspace", "--bin", "pd-sim", "--test", "sim"])
            .args(["--profile", profile, "--target-dir"])
            .arg(target_dir)
            .status();
        match status {
            Ok(status) if status.success() => {}
            other => panic!("building pd-sim ({command}) failed: {other:?}"),
        }
    }
    assert!(
        bin.is_file(),
        "no pd-sim at {}: run `{command}` at the repository root, or set PD_SIM_BIN",
        bin.display()
    );
    bin.into_os_string()
        .into_string()
        .unwrap_or_else(|p| panic!("pd-sim's path {p:?} is not UTF-8"))
}
