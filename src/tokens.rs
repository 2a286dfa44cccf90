//! How many tokens a prompt is, guessed before any engine sees it, for
//! `--direct-below-tokens`.
//!
//! No tokenizer runs in the proxy: counting exactly would need the model's
//! `tokenizer.json` and its Jinja chat template, and the per-request cost
//! of both on the async workers. Instead the guess is the prompt's text
//! length over a bytes-per-token ratio, plus the chat template's tokens
//! per message and for the generation prompt, all three taken from the
//! engines themselves:
//! - at start, from the first healthy prefiller's `/tokenize` (vLLM's
//!   tokenizer and chat template) on a paragraph of English;
//! - then from every prefill answer's `usage.prompt_tokens`, the exact
//!   count for a prompt whose length the proxy knows, which keeps the
//!   ratio on the deployment's real traffic.
//!
//! Until then the ratio is 4 bytes per token, the usual figure for English
//! under large vocabularies (the CPU stack's tiny one packs 1.4).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Uri};
use http_body_util::BodyExt;
use metrics::Gauge;
use serde::Deserialize;

use crate::upstream::{self, HttpClient};

/// What the estimate needs of a prompt, measured while the body is parsed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptSize {
    /// UTF-8 bytes of text: a chat's message texts together; a
    /// completions prompt's text (a batch's longest).
    pub text_bytes: u64,
    /// Tokens given as ids, counted exactly (a batch's longest list).
    pub token_ids: u64,
    /// Chat messages, each wrapped in the template's markers; 0 for
    /// completions, which vLLM tokenizes as given.
    pub messages: u64,
    /// One text prompt: its engine count can teach the ratio.
    pub single_text: bool,
    /// Holds what text length says nothing about (images, audio, tool
    /// schemas): counted as long, so it keeps the PD route, and never
    /// taught from.
    pub opaque: bool,
}

/// Tokens a chat template adds per message (role markers, separators)
/// and once for the generation prompt, until calibrated: Qwen's
/// `<|im_start|>role\n`, `<|im_end|>\n` and `<|im_start|>assistant\n`.
pub const TEMPLATE_TOKENS_PER_MESSAGE: u32 = 5;
pub const TEMPLATE_TOKENS_FIXED: u32 = 3;
/// A template claiming more than this per message or in all is not
/// believed.
const MAX_TEMPLATE_TOKENS: u64 = 64;

/// The calibration text: ordinary English prose, about 1 KB.
pub const CALIBRATION_TEXT: &str = "The history of the printing press is, in many ways, the history of how ideas travel. \
Before movable type, a book was copied by hand, and a single copy could take a scribe many months of careful work. \
When Gutenberg combined metal type, oil-based ink and a screw press in the middle of the fifteenth century, the cost of a page fell sharply, \
and within fifty years presses were running in more than two hundred cities across Europe. \
Pamphlets, calendars, grammar books and maps reached readers who had never owned a book before. \
Scholars could compare identical copies of a text, so errors were found and corrected instead of being copied again. \
Merchants printed price lists and shipping schedules, and governments printed laws so that everyone could read the same words. \
Not everyone welcomed the change: some worried that cheap books would spread rumours as quickly as knowledge. \
Yet the habit of reading grew steadily, schools multiplied, and by the seventeenth century weekly newspapers were sold in the streets of London and Amsterdam. \
Today we face a similar question with new tools: how do we keep what is useful, and learn to doubt what is not?";

/// The ratio before anything was learned, in thousandths of a byte.
const INITIAL_MILLI_BYTES: u32 = 4_000;
/// Bounds on what may be learned: any real tokenizer falls inside.
const MIN_MILLI_BYTES: u64 = 250;
const MAX_MILLI_BYTES: u64 = 16_000;
/// Prompts shorter than this teach nothing: rounding and the template
/// dominate their counts.
const MIN_LEARN_TOKENS: u64 = 32;
/// Each sample moves the ratio by this fraction of its distance.
const LEARN_SHIFT: u32 = 4; // 1/16

pub struct TokenEstimate {
    milli_bytes_per_token: AtomicU32,
    per_message: AtomicU32,
    fixed: AtomicU32,
    /// `pd_proxy_prompt_bytes_per_token`, the ratio now in use.
    gauge: Gauge,
}

impl TokenEstimate {
    pub fn new(gauge: Gauge) -> Self {
        gauge.set(f64::from(INITIAL_MILLI_BYTES) / 1000.0);
        TokenEstimate {
            milli_bytes_per_token: AtomicU32::new(INITIAL_MILLI_BYTES),
            per_message: AtomicU32::new(TEMPLATE_TOKENS_PER_MESSAGE),
            fixed: AtomicU32::new(TEMPLATE_TOKENS_FIXED),
            gauge,
        }
    }

    pub fn bytes_per_token(&self) -> f64 {
        f64::from(self.milli_bytes_per_token.load(Ordering::Relaxed)) / 1000.0
    }

    pub fn tokens(&self, size: &PromptSize) -> u64 {
        if size.opaque {
            return u64::MAX;
        }
        let milli = u64::from(self.milli_bytes_per_token.load(Ordering::Relaxed));
        let text = size.text_bytes.saturating_mul(1000).div_ceil(milli);
        (text + self.template_tokens(size)).max(size.token_ids)
    }

    /// Folds in the engine's exact count for a prompt of `size`.
    pub fn learn(&self, size: &PromptSize, prompt_tokens: u64) {
        if !size.single_text || size.opaque || size.token_ids > 0 {
            return;
        }
        let text_tokens = prompt_tokens.saturating_sub(self.template_tokens(size));
        if text_tokens < MIN_LEARN_TOKENS {
            return;
        }
        let sample = (size.text_bytes.saturating_mul(1000) / text_tokens)
            .clamp(MIN_MILLI_BYTES, MAX_MILLI_BYTES) as i64;
        // Concurrent learners may overwrite each other's step: harmless
        // for an average of many samples.
        let old = i64::from(self.milli_bytes_per_token.load(Ordering::Relaxed));
        let new = old + ((sample - old) >> LEARN_SHIFT);
        let new = new.clamp(MIN_MILLI_BYTES as i64, MAX_MILLI_BYTES as i64) as u32;
        self.set_ratio(new);
    }

    fn set_ratio(&self, milli: u32) {
        self.milli_bytes_per_token.store(milli, Ordering::Relaxed);
        self.gauge.set(f64::from(milli) / 1000.0);
    }

    fn template_tokens(&self, size: &PromptSize) -> u64 {
        if size.messages == 0 {
            return 0;
        }
        let per_message = u64::from(self.per_message.load(Ordering::Relaxed));
        u64::from(self.fixed.load(Ordering::Relaxed)) + per_message * size.messages
    }

    /// Sets the ratio and the template from three counts of
    /// [`CALIBRATION_TEXT`]: alone, as one user message, and as a user and
    /// an assistant message (both with the generation prompt).
    pub fn set_calibration(&self, text: u64, one: u64, two: u64) -> Result<(), String> {
        if text < MIN_LEARN_TOKENS {
            return Err(format!(
                "{text} tokens for {} bytes of text",
                CALIBRATION_TEXT.len()
            ));
        }
        let per_message = two.saturating_sub(one).saturating_sub(text);
        let fixed = one.saturating_sub(text).saturating_sub(per_message);
        if per_message > MAX_TEMPLATE_TOKENS || fixed > MAX_TEMPLATE_TOKENS {
            return Err(format!(
                "a chat template of {per_message} tokens per message and {fixed} more"
            ));
        }
        let milli = (CALIBRATION_TEXT.len() as u64 * 1000 / text)
            .clamp(MIN_MILLI_BYTES, MAX_MILLI_BYTES) as u32;
        self.per_message
            .store(per_message as u32, Ordering::Relaxed);
        self.fixed.store(fixed as u32, Ordering::Relaxed);
        self.set_ratio(milli);
        tracing::info!(
            bytes_per_token = f64::from(milli) / 1000.0,
            template_per_message = per_message,
            template_fixed = fixed,
            "prompt-length estimate calibrated from a prefiller's /tokenize"
        );
        Ok(())
    }

    /// Asks a prefiller's `/tokenize` (`tokenize_uri`) for the three
    /// counts of [`set_calibration`](Self::set_calibration), each bounded
    /// by `limit`.
    pub async fn calibrate(
        &self,
        client: &HttpClient,
        tokenize_uri: &Uri,
        auth: Option<&HeaderValue>,
        limit: Duration,
    ) -> Result<(), String> {
        let message = |role| serde_json::json!({"role": role, "content": CALIBRATION_TEXT});
        let bodies = [
            serde_json::json!({"prompt": CALIBRATION_TEXT, "add_special_tokens": false}),
            serde_json::json!({"messages": [message("user")], "add_generation_prompt": true}),
            serde_json::json!({"messages": [message("user"), message("assistant")], "add_generation_prompt": true}),
        ];
        let mut counts = [0u64; 3];
        for (count, body) in counts.iter_mut().zip(bodies) {
            let req = upstream::post_json(tokenize_uri, Bytes::from(body.to_string()), auth, None);
            let call = async {
                let response = client.request(req).await.map_err(|e| e.to_string())?;
                let status = response.status();
                let body = http_body_util::Limited::new(response.into_body(), 1 << 20)
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                if !status.is_success() {
                    return Err(format!("/tokenize answered {status}"));
                }
                #[derive(Deserialize)]
                struct Count {
                    count: u64,
                }
                serde_json::from_slice::<Count>(&body)
                    .map(|c| c.count)
                    .map_err(|e| format!("/tokenize answered {e}"))
            };
            *count = tokio::time::timeout(limit, call)
                .await
                .map_err(|_| format!("/tokenize gave no answer in {limit:?}"))??;
        }
        self.set_calibration(counts[0], counts[1], counts[2])
    }
}

/// `usage.prompt_tokens` of an OpenAI answer (vLLM's prefill answer).
pub fn prompt_tokens(answer: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Usage {
        prompt_tokens: u64,
    }
    #[derive(Deserialize)]
    struct Answer {
        usage: Option<Usage>,
    }
    let answer: Answer = serde_json::from_slice(answer).ok()?;
    Some(answer.usage?.prompt_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(bytes: u64, messages: u64) -> PromptSize {
        PromptSize {
            text_bytes: bytes,
            messages,
            single_text: true,
            ..Default::default()
        }
    }

    #[test]
    fn starts_at_four_bytes_per_token_plus_the_template() {
        let e = TokenEstimate::new(Gauge::noop());
        assert_eq!(e.tokens(&chat(400, 1)), 100 + 5 + 3);
        let completion = PromptSize {
            text_bytes: 401,
            single_text: true,
            ..Default::default()
        };
        assert_eq!(e.tokens(&completion), 101);
        let ids = PromptSize {
            text_bytes: 40,
            token_ids: 300,
            ..Default::default()
        };
        assert_eq!(e.tokens(&ids), 300, "a batch goes by its longest prompt");
    }

    #[test]
    fn learns_the_engines_ratio_and_ignores_what_cannot_teach() {
        let e = TokenEstimate::new(Gauge::noop());
        // The CPU stack's tokenizer: 1.4 bytes per token.
        for _ in 0..100 {
            e.learn(&chat(1400, 2), 1000 + 13);
        }
        assert!(
            (e.bytes_per_token() - 1.4).abs() < 0.05,
            "{}",
            e.bytes_per_token()
        );
        assert!((e.tokens(&chat(1400, 2)) as i64 - 1013).abs() < 40);
        let before = e.bytes_per_token();
        e.learn(&chat(20, 1), 12);
        e.learn(
            &PromptSize {
                token_ids: 500,
                ..chat(2000, 0)
            },
            500,
        );
        e.learn(
            &PromptSize {
                single_text: false,
                ..chat(2000, 0)
            },
            50,
        );
        e.learn(&chat(100_000, 1), 10_000_000);
        assert!(e.bytes_per_token() >= 0.25);
        assert!(
            e.bytes_per_token() <= before,
            "only the last sample counted, and it is clamped"
        );
    }

    #[test]
    fn calibration_sets_ratio_and_template() {
        let e = TokenEstimate::new(Gauge::noop());
        let bytes = CALIBRATION_TEXT.len() as u64;
        // The CPU stack's shape: 1.4 bytes per token, 8 per message, 8 more.
        let text = bytes * 10 / 14;
        e.set_calibration(text, text + 16, 2 * text + 24).unwrap();
        assert!((e.bytes_per_token() - 1.4).abs() < 0.01);
        let estimate = e.tokens(&chat(bytes, 1)) as i64;
        assert!(
            (estimate - (text + 16) as i64).abs() <= 1,
            "{estimate} for {text} + 16"
        );
        assert!(
            e.set_calibration(3, 10, 20).is_err(),
            "too few tokens to tell"
        );
        assert!(
            e.set_calibration(200, 500, 900).is_err(),
            "an absurd template"
        );
    }

    #[test]
    fn opaque_prompts_count_as_long_and_teach_nothing() {
        let e = TokenEstimate::new(Gauge::noop());
        let image = PromptSize {
            opaque: true,
            ..chat(10, 1)
        };
        assert_eq!(e.tokens(&image), u64::MAX);
        e.learn(&image, 5_000);
        assert_eq!(e.bytes_per_token(), 4.0);
    }

    #[test]
    fn reads_usage_from_an_answer() {
        let answer = br#"{"id":"chatcmpl-x","choices":[],"usage":{"prompt_tokens":17,"total_tokens":18,"completion_tokens":1,"prompt_tokens_details":null}}"#;
        assert_eq!(prompt_tokens(answer), Some(17));
        assert_eq!(prompt_tokens(b"{}"), None);
        assert_eq!(prompt_tokens(b"nonsense"), None);
    }
}
