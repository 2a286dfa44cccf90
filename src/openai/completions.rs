//! What a completions `prompt` holds, as far as routing goes: how many
//! engine requests it makes and how long its longest prompt is.

use std::fmt;

use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};

use super::json::lenient;
use crate::tokens::PromptSize;

/// A completions prompt, or an item of one, as far as counting goes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Prompt {
    Number,
    /// A string's UTF-8 bytes.
    Text(u64),
    /// A list: its length, whether all its items are numbers (a token
    /// list, not a batch), and its size by [`completion_size`]'s rule.
    List {
        len: usize,
        tokens: bool,
        size: PromptSize,
    },
    Other,
}

pub(super) struct PromptSeed;

impl<'de> DeserializeSeed<'de> for PromptSeed {
    type Value = Prompt;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Prompt, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PromptSeed {
    type Value = Prompt;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a prompt")
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Prompt, E> {
        Ok(Prompt::Number)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Prompt, E> {
        Ok(Prompt::Number)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Prompt, E> {
        Ok(Prompt::Number)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Prompt, E> {
        Ok(Prompt::Text(text.len() as u64))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
        let (mut len, mut tokens) = (0, true);
        let mut longest = PromptSize::default();
        while let Some(item) = seq.next_element_seed(PromptSeed)? {
            len += 1;
            tokens &= matches!(item, Prompt::Number);
            let one = completion_size(&item);
            longest.text_bytes = longest.text_bytes.max(one.text_bytes);
            longest.token_ids = longest.token_ids.max(one.token_ids);
        }
        let size = match tokens {
            true => PromptSize {
                token_ids: len as u64,
                ..Default::default()
            },
            false => longest,
        };
        Ok(Prompt::List { len, tokens, size })
    }

    lenient!(Prompt::Other; bool, unit, map);
}

/// vLLM's completions `prompt` forms: a string or a token list is one
/// prompt; a list of strings or of token lists is a batch.
pub(super) fn prompt_count(prompt: &Prompt) -> usize {
    match *prompt {
        Prompt::List {
            len, tokens: false, ..
        } => len.max(1),
        _ => 1,
    }
}

/// A completions prompt's size: a string's bytes, a token list's length;
/// for a batch, the longest of each, since sending a batch direct gives
/// up the reuse of all its prompts.
pub(super) fn completion_size(prompt: &Prompt) -> PromptSize {
    match *prompt {
        Prompt::Text(bytes) => PromptSize {
            text_bytes: bytes,
            single_text: true,
            ..Default::default()
        },
        Prompt::List { size, .. } => size,
        Prompt::Number | Prompt::Other => PromptSize::default(),
    }
}
