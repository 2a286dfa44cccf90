//! Who may use the proxy: clients with one of `--api-key`'s keys on the
//! API port, LMCache with `--telemetry-token` on the telemetry port.
//!
//! Secrets are kept only as SHA-256 digests and a presented secret is
//! hashed before it is compared, in constant time, with every configured
//! digest: neither the time taken nor an early exit tells an attacker how
//! many leading bytes were right, how long a key is, or which key nearly
//! matched. The separate `--metrics-port` needs nothing from here: it is
//! open by design (a scraper without a key), and serves `/metrics` only.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use crate::error::ProxyError;
use crate::metrics::{AuthFailure, Metrics};

/// Digests of configured secrets; a presented secret matches if its digest
/// equals any of them.
#[derive(Clone)]
pub struct Secrets {
    digests: Vec<[u8; 32]>,
}

impl Secrets {
    pub fn new<S: AsRef<[u8]>>(secrets: impl IntoIterator<Item = S>) -> Self {
        Secrets {
            digests: secrets
                .into_iter()
                .map(|s| Sha256::digest(s.as_ref()).into())
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Every digest is compared, whatever the earlier ones gave, so the
    /// time taken is the same for any wrong or right secret.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = Choice::from(0);
        for known in &self.digests {
            found |= known[..].ct_eq(&digest[..]);
        }
        found.into()
    }
}

/// Paths a client may use without a key: probes (kubelet, load balancers)
/// carry none and learn nothing from them.
const OPEN_PATHS: [&str; 2] = ["/health", "/ready"];

/// The state of [`require_api_key`].
pub struct ApiKeys {
    keys: Secrets,
    metrics: Arc<Metrics>,
}

impl ApiKeys {
    /// `None` when no key is configured: the API is open and no layer is
    /// needed.
    pub fn new(keys: &[String], metrics: Arc<Metrics>) -> Option<Arc<Self>> {
        if keys.is_empty() {
            return None;
        }
        Some(Arc::new(ApiKeys {
            keys: Secrets::new(keys),
            metrics,
        }))
    }

    /// Checks the request's `Authorization: Bearer KEY`.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), AuthFailure> {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            // None, or two: a client never sends two, and which one an
            // upstream would believe is anybody's guess.
            return Err(if headers.contains_key(header::AUTHORIZATION) {
                AuthFailure::Invalid
            } else {
                AuthFailure::Missing
            });
        };
        let key = bearer(value.as_bytes()).ok_or(AuthFailure::Invalid)?;
        if self.keys.matches(key) {
            Ok(())
        } else {
            Err(AuthFailure::Invalid)
        }
    }
}

/// The key of an `Authorization: Bearer KEY` value; the scheme is
/// case-insensitive (RFC 9110 §11.1).
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer";
    if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let rest = &value[SCHEME.len()..];
    if !matches!(rest.first(), Some(b' ' | b'\t')) {
        return None;
    }
    let key = rest.trim_ascii();
    (!key.is_empty()).then_some(key)
}

/// Middleware of the API port: a request without a valid key is answered
/// 401 (OpenAI's `invalid_api_key`) here and reaches no handler, so
/// nothing goes upstream. Unknown paths need a key too: without one, a
/// client cannot map which routes exist.
pub async fn require_api_key(
    State(keys): State<Arc<ApiKeys>>,
    request: Request,
    next: Next,
) -> Response {
    if OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    match keys.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(failure) => {
            keys.metrics.auth_failure(failure);
            tracing::debug!(
                ?failure,
                path = request.uri().path(),
                "refused: no valid API key"
            );
            ProxyError::Unauthorized(match failure {
                AuthFailure::Missing => {
                    "You didn't provide an API key. Send it as `Authorization: Bearer KEY`."
                }
                AuthFailure::Invalid => "Incorrect API key provided.",
            })
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_needs_a_key() {
        assert_eq!(bearer(b"Bearer k1"), Some(&b"k1"[..]));
        assert_eq!(bearer(b"bEaReR   k1 "), Some(&b"k1"[..]));
        assert_eq!(bearer(b"Bearer\tk1"), Some(&b"k1"[..]));
        for bad in [
            &b"Bearer"[..],
            b"Bearer ",
            b"Bearerk1",
            b"Basic azE6",
            b"k1",
            b"",
        ] {
            assert_eq!(bearer(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn every_configured_key_works_and_nothing_else() {
        let keys = ApiKeys::new(&["first-key".into(), "second-key".into()], Metrics::new())
            .expect("keys are configured");
        let with = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            }
            keys.check(&headers)
        };
        assert_eq!(with(&["Bearer first-key"]), Ok(()));
        assert_eq!(with(&["bearer second-key"]), Ok(()));
        assert_eq!(with(&[]), Err(AuthFailure::Missing));
        assert_eq!(with(&["Bearer first-ke"]), Err(AuthFailure::Invalid));
        assert_eq!(with(&["Bearer first-keyy"]), Err(AuthFailure::Invalid));
        assert_eq!(with(&["first-key"]), Err(AuthFailure::Invalid));
        assert_eq!(
            with(&["Bearer first-key", "Bearer first-key"]),
            Err(AuthFailure::Invalid)
        );
        assert!(ApiKeys::new(&[], Metrics::new()).is_none());
    }

    #[test]
    fn secrets_compare_whole_values() {
        let s = Secrets::new(["0123456789abcdef"]);
        assert!(s.matches(b"0123456789abcdef"));
        assert!(!s.matches(b"0123456789abcde"));
        assert!(!s.matches(b""));
        assert!(!Secrets::new::<&str>([]).matches(b""));
    }
}
