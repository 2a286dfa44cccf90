//! The secrets the proxy checks others by: client keys on the API, the
//! token on the telemetry URL, the key that signs owner-routed ids. Each
//! may come from a flag, its environment variable or a mounted file.

use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct SecurityArgs {
    /// Secret shared by every replica of a fleet behind one telemetry URL:
    /// ids then name their owner and carry a MAC, and events for another
    /// replica's ids are forwarded to it. Better given as
    /// PD_PROXY_CLUSTER_KEY or --cluster-key-file than here, where `ps`
    /// shows it. At least 16 bytes.
    #[arg(
        long,
        env = "PD_PROXY_CLUSTER_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub cluster_key: Option<String>,
    /// File holding the cluster key (a Kubernetes Secret mounted as a
    /// file); surrounding whitespace is ignored.
    #[arg(long, env = "PD_PROXY_CLUSTER_KEY_FILE", value_name = "PATH")]
    pub cluster_key_file: Option<std::path::PathBuf>,
    /// Keys clients must send as `Authorization: Bearer KEY` on every API
    /// route, comma separated. Better given as PD_PROXY_API_KEY or
    /// --api-key-file than here, where `ps` shows them. Without any, the
    /// API is open.
    #[arg(
        long,
        env = "PD_PROXY_API_KEY",
        hide_env_values = true,
        value_delimiter = ',',
        value_name = "KEY"
    )]
    pub api_key: Vec<String>,
    /// File of client keys, one per line (a Kubernetes Secret mounted as a
    /// file); blank lines and lines starting with `#` are skipped.
    #[arg(long, env = "PD_PROXY_API_KEY_FILE", value_name = "PATH")]
    pub api_key_file: Option<std::path::PathBuf>,
    /// The token LMCache must send as `?token=` on the telemetry URL
    /// (`LMCACHE_REQUEST_TELEMETRY_ENDPOINT=http://proxy:5768/api/v1/telemetry?token=...`);
    /// other posts are refused with 403. Better given as
    /// PD_PROXY_TELEMETRY_TOKEN or --telemetry-token-file.
    #[arg(
        long,
        env = "PD_PROXY_TELEMETRY_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub telemetry_token: Option<String>,
    /// File holding the telemetry token; surrounding whitespace is ignored.
    #[arg(long, env = "PD_PROXY_TELEMETRY_TOKEN_FILE", value_name = "PATH")]
    pub telemetry_token_file: Option<std::path::PathBuf>,
}

/// The secrets, read and validated.
#[derive(Debug, Clone)]
pub struct SecurityConfig {
    /// `--cluster-key` (or its file): owner-routed ids.
    pub cluster_key: Option<Vec<u8>>,
    /// Client keys (`--api-key`, its env and file); empty: the API is open.
    pub api_keys: Vec<String>,
    /// `--telemetry-token`: the `?token=` every telemetry post must carry.
    pub telemetry_token: Option<String>,
}

impl SecurityArgs {
    pub(super) fn resolve(self) -> Result<SecurityConfig, String> {
        let cluster_key = secret("--cluster-key", self.cluster_key, self.cluster_key_file)?
            .map(String::into_bytes);
        if let Some(key) = &cluster_key {
            if key.len() < crate::owner::MIN_KEY_BYTES {
                return Err(format!(
                    "the cluster key has {} bytes; at least {}",
                    key.len(),
                    crate::owner::MIN_KEY_BYTES
                ));
            }
        }
        let api_keys = api_keys(&self.api_key, self.api_key_file.as_ref())?;
        let telemetry_token = secret(
            "--telemetry-token",
            self.telemetry_token,
            self.telemetry_token_file,
        )?;
        if let Some(token) = &telemetry_token {
            // It travels in a URL's query: only characters that need no
            // escaping there, so LMCache's URL and ours agree byte for byte.
            let url_safe = token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'));
            if token.len() < MIN_TOKEN_BYTES || token.len() > MAX_SECRET_BYTES || !url_safe {
                return Err(format!(
                    "the telemetry token must be {MIN_TOKEN_BYTES} to {MAX_SECRET_BYTES} characters of A-Z a-z 0-9 - _ . ~ (it goes in a URL), got {} bytes",
                    token.len()
                ));
            }
        }
        Ok(SecurityConfig {
            cluster_key,
            api_keys,
            telemetry_token,
        })
    }
}

/// The client keys of `--api-key` and of `--api-key-file`, together.
fn api_keys(given: &[String], file: Option<&PathBuf>) -> Result<Vec<String>, String> {
    let mut api_keys: Vec<String> = given
        .iter()
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .collect();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--api-key-file {}: {e}", path.display()))?;
        api_keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
        if api_keys.is_empty() {
            return Err(format!("--api-key-file {} holds no key", path.display()));
        }
    }
    if let Some(bad) = api_keys
        .iter()
        .find(|k| k.len() > MAX_SECRET_BYTES || !k.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(format!(
            "an API key of {} bytes is not printable ASCII of at most {MAX_SECRET_BYTES} bytes",
            bad.len()
        ));
    }
    Ok(api_keys)
}

/// A secret given by `flag` or by `{flag}-file` (a mounted Secret), never
/// both; surrounding whitespace is ignored.
fn secret(
    flag: &str,
    value: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<String>, String> {
    match (value, file) {
        (Some(_), Some(_)) => Err(format!("give {flag} or {flag}-file, not both")),
        (Some(value), None) => Ok(Some(value.trim().to_owned())),
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map(|text| Some(text.trim().to_owned()))
            .map_err(|e| format!("{flag}-file {}: {e}", path.display())),
        (None, None) => Ok(None),
    }
}

/// Secrets longer than this are a mistake (a whole file pasted in).
const MAX_SECRET_BYTES: usize = 512;

/// A telemetry token shorter than this could be guessed.
const MIN_TOKEN_BYTES: usize = 16;
