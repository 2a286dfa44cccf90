//! How many tokens a prompt is, guessed before any engine sees it, for
//! `--direct-below-tokens`.
//!
//! No tokenizer runs in the proxy: counting exactly would need the model's
//! `tokenizer.json` and its Jinja chat template, and the per-request cost
//! of both on the async workers. Instead the guess is the prompt's text
//! length over a bytes-per-token ratio, plus the chat template's markers,
//! and the ratio is learned from the engines themselves: every prefill
//! answer reports `usage.prompt_tokens`, the exact count (template
//! included) for a prompt whose length the proxy knows. The ratio starts
//! at 4 bytes per token, the usual figure for English under large
//! vocabularies, and converges to the deployment's own tokenizer within a
//! few dozen prefills (the CPU stack's tiny vocabulary packs 1.4).

use std::sync::atomic::{AtomicU32, Ordering};

use metrics::Gauge;
use serde::Deserialize;

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
}

/// Tokens a chat template adds per message (role markers, separators)
/// and once for the generation prompt: Qwen's `<|im_start|>role\n`,
/// `<|im_end|>\n` and `<|im_start|>assistant\n`.
pub const TEMPLATE_TOKENS_PER_MESSAGE: u64 = 5;
pub const TEMPLATE_TOKENS_FIXED: u64 = 3;

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
    /// `pd_proxy_prompt_bytes_per_token`, the ratio now in use.
    gauge: Gauge,
}

impl TokenEstimate {
    pub fn new(gauge: Gauge) -> Self {
        gauge.set(f64::from(INITIAL_MILLI_BYTES) / 1000.0);
        TokenEstimate {
            milli_bytes_per_token: AtomicU32::new(INITIAL_MILLI_BYTES),
            gauge,
        }
    }

    pub fn bytes_per_token(&self) -> f64 {
        f64::from(self.milli_bytes_per_token.load(Ordering::Relaxed)) / 1000.0
    }

    pub fn tokens(&self, size: &PromptSize) -> u64 {
        let milli = u64::from(self.milli_bytes_per_token.load(Ordering::Relaxed));
        let text = size.text_bytes.saturating_mul(1000).div_ceil(milli);
        (text + template_tokens(size)).max(size.token_ids)
    }

    /// Folds in the engine's exact count for a prompt of `size`.
    pub fn learn(&self, size: &PromptSize, prompt_tokens: u64) {
        if !size.single_text || size.token_ids > 0 {
            return;
        }
        let text_tokens = prompt_tokens.saturating_sub(template_tokens(size));
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
        self.milli_bytes_per_token.store(new, Ordering::Relaxed);
        self.gauge.set(f64::from(new) / 1000.0);
    }
}

fn template_tokens(size: &PromptSize) -> u64 {
    if size.messages == 0 {
        0
    } else {
        TEMPLATE_TOKENS_FIXED + TEMPLATE_TOKENS_PER_MESSAGE * size.messages
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
    fn reads_usage_from_an_answer() {
        let answer = br#"{"id":"chatcmpl-x","choices":[],"usage":{"prompt_tokens":17,"total_tokens":18,"completion_tokens":1,"prompt_tokens_details":null}}"#;
        assert_eq!(prompt_tokens(answer), Some(17));
        assert_eq!(prompt_tokens(b"{}"), None);
        assert_eq!(prompt_tokens(b"nonsense"), None);
    }
}
