//! What a chat request's `messages` hold, as far as routing goes: the
//! texts' length, the number of messages, and whether anything in them
//! has a length its JSON does not tell.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::json::{lenient, IsNull, KeySeed};
use crate::tokens::PromptSize;

/// A chat prompt's size: every message's text (a string, or the `text`
/// of its content parts) and the number of messages. `None`: no list of
/// messages.
pub(super) fn chat_size(messages: Option<(u64, u64, bool)>) -> PromptSize {
    let (messages, text_bytes, opaque) = messages.unwrap_or_default();
    PromptSize {
        text_bytes,
        messages,
        single_text: true,
        opaque,
        ..Default::default()
    }
}

pub(super) struct MessagesSeed;

impl<'de> DeserializeSeed<'de> for MessagesSeed {
    type Value = PromptSize;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<PromptSize, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MessagesSeed {
    type Value = PromptSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PromptSize, A::Error> {
        let (mut messages, mut text_bytes, mut opaque) = (0, 0, false);
        while let Some(message) = seq.next_element_seed(MessageSeed)? {
            messages += 1;
            text_bytes += message.text_bytes;
            opaque |= message.opaque;
        }
        Ok(chat_size(Some((messages, text_bytes, opaque))))
    }

    lenient!(chat_size(None); bool, i64, u64, f64, str, unit, map);
}

/// One message's part of a chat prompt's size.
#[derive(Debug, Clone, Copy, Default)]
struct Text {
    text_bytes: u64,
    /// Images, audio, files, tool calls: their tokens are not in their
    /// JSON's length.
    opaque: bool,
}

struct MessageSeed;

impl<'de> DeserializeSeed<'de> for MessageSeed {
    type Value = Text;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Text, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MessageSeed {
    type Value = Text;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text, A::Error> {
        let mut content = Text::default();
        let mut tool_calls = false;
        while let Some(key) = map.next_key_seed(KeySeed(&["content", "tool_calls"]))? {
            match key {
                Some(0) => content = map.next_value_seed(ContentSeed)?,
                // Tool calls and their results: templated at lengths of
                // their own.
                Some(_) => tool_calls = !map.next_value_seed(IsNull)?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        content.opaque |= tool_calls;
        Ok(content)
    }

    lenient!(Text::default(); bool, i64, u64, f64, str, unit, seq);
}

struct ContentSeed;

impl<'de> DeserializeSeed<'de> for ContentSeed {
    type Value = Text;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Text, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ContentSeed {
    type Value = Text;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message's content")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Text, E> {
        Ok(Text {
            text_bytes: text.len() as u64,
            opaque: false,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
        let mut all = Text::default();
        while let Some(text) = seq.next_element_seed(PartSeed)? {
            match text {
                Some(bytes) => all.text_bytes += bytes,
                None => all.opaque = true,
            }
        }
        Ok(all)
    }

    lenient!(Text::default(); bool, i64, u64, f64, unit, map);
}

/// A content part: its `text`'s bytes, `None` for anything else (an
/// image, audio, a file).
struct PartSeed;

impl<'de> DeserializeSeed<'de> for PartSeed {
    type Value = Option<u64>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PartSeed {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a content part")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<u64>, A::Error> {
        let mut text = None;
        while let Some(key) = map.next_key_seed(KeySeed(&["text"]))? {
            match key {
                Some(_) => text = map.next_value_seed(TextSeed)?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(text)
    }

    lenient!(None; bool, i64, u64, f64, str, unit, seq);
}

/// A string's UTF-8 bytes; `None` for any other value.
struct TextSeed;

impl<'de> DeserializeSeed<'de> for TextSeed {
    type Value = Option<u64>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TextSeed {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Option<u64>, E> {
        Ok(Some(text.len() as u64))
    }

    lenient!(None; bool, i64, u64, f64, unit, seq, map);
}
