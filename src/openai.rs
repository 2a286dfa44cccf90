//! What the proxy reads from and rewrites in an OpenAI request body. The
//! decoder gets the client's original bytes, only the prefiller gets a
//! rewritten copy.
//!
//! No JSON tree is ever built: a `serde_json::Value` costs 23 to 34 times
//! the body it holds (a 30 MiB token-id prompt took 1 GiB), and it does
//! not carry numbers faithfully (an integer past u64 became a float, long
//! floats moved by an ulp). The top-level object is walked member by
//! member as raw key and value texts borrowed from the body, and walked
//! again for the prefill copy rather than kept: a list of members would
//! itself outweigh a body like `{"a":0,"a":0,...}`. The few values the
//! proxy needs (`stream`, the prompt) are measured by streaming visitors
//! that keep nothing per element; the prefill copy is spliced from the
//! original texts. Values the proxy does not read are only checked for
//! syntax, at any depth: vLLM validates them.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{
    self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde_json::value::RawValue;

use crate::error::ProxyError;
use crate::metrics::LabelValue;
use crate::tokens::PromptSize;

/// Visitor methods for the JSON types a visitor has no use for: they give
/// `$value`, skipping what they hold. Prompts of odd shapes are not
/// refused here; vLLM says what is wrong with them.
macro_rules! lenient {
    ($value:expr; $($kind:ident),*) => { $(lenient!(@ $kind $value);)* };
    (@bool $v:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> { Ok($v) }
    };
    (@i64 $v:expr) => {
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> { Ok($v) }
    };
    (@u64 $v:expr) => {
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> { Ok($v) }
    };
    (@f64 $v:expr) => {
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> { Ok($v) }
    };
    (@str $v:expr) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> { Ok($v) }
    };
    (@unit $v:expr) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> { Ok($v) }
    };
    (@seq $v:expr) => {
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok($v)
        }
    };
    (@map $v:expr) => {
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok($v)
        }
    };
}

/// The two OpenAI endpoints the proxy disaggregates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Completions => "completions",
        }
    }

    /// The prefix vLLM puts before the request id in its engine ids.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Api::Chat => "chatcmpl-",
            Api::Completions => "cmpl-",
        }
    }
}

impl LabelValue for Api {
    fn label_value(self) -> &'static str {
        self.as_str()
    }
}

/// A client request body, validated just enough to route it. Deeper
/// validation is vLLM's job: its 4xx answers reach the client unchanged.
///
/// It borrows the body rather than holding anything parsed, so that
/// what outlives parsing is the body alone.
pub struct ClientRequest<'a> {
    body: &'a str,
    /// The client asked for SSE; reported in the request's log line. The
    /// relay itself goes by the decoder's content type.
    pub stream: bool,
    /// Engine requests vLLM makes of it: one per prompt of a completions
    /// batch. Each one reports its KV separately.
    pub prompts: usize,
    /// What the token estimate needs of the prompt, for
    /// `--direct-below-tokens`.
    pub size: PromptSize,
}

impl fmt::Debug for ClientRequest<'_> {
    // The body can be tens of MiB: its length says enough.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientRequest")
            .field("body_bytes", &self.body.len())
            .field("stream", &self.stream)
            .field("prompts", &self.prompts)
            .field("size", &self.size)
            .finish()
    }
}

fn invalid_json(e: impl fmt::Display) -> ProxyError {
    ProxyError::bad_request(format!("request body is not valid JSON: {e}"), None)
}

impl<'a> ClientRequest<'a> {
    pub fn parse(api: Api, raw: &'a [u8]) -> Result<Self, ProxyError> {
        let body = std::str::from_utf8(raw).map_err(invalid_json)?;
        // The last of duplicate keys counts, as in vLLM's Python parser.
        let mut stream = None;
        let mut prompt = None;
        let mut tools = false;
        let mut functions = false;
        let prompt_key = match api {
            Api::Chat => "messages",
            Api::Completions => "prompt",
        };
        let object = walk(body, |entry| match &*entry.name {
            "stream" => stream = Some(entry.value),
            "tools" => tools = entry.value != "null",
            "functions" => functions = entry.value != "null",
            name if name == prompt_key => prompt = Some(entry.value),
            _ => {}
        })
        .map_err(invalid_json)?;
        if !object {
            return Err(ProxyError::bad_request(
                "request body must be a JSON object",
                None,
            ));
        }
        let stream = match stream {
            None | Some("null" | "false") => false,
            Some("true") => true,
            Some(_) => {
                return Err(ProxyError::bad_request(
                    "`stream` must be a boolean",
                    Some("stream"),
                ))
            }
        };
        let (prompts, mut size) = match (api, prompt) {
            (Api::Chat, None) => (1, chat_size(None)),
            (Api::Chat, Some(text)) => (1, measure(text, MessagesSeed).map_err(invalid_json)?),
            (Api::Completions, None) => (1, PromptSize::default()),
            (Api::Completions, Some(text)) => {
                let prompt = measure(text, PromptSeed).map_err(invalid_json)?;
                (prompt_count(&prompt), completion_size(&prompt))
            }
        };
        // Tool schemas go through the chat template too, at a length the
        // text does not tell.
        size.opaque |= tools || functions;
        Ok(ClientRequest {
            body,
            stream,
            prompts,
            size,
        })
    }

    /// The prefiller's copy: compute the prompt's KV and one token, nothing
    /// more, in a form vLLM accepts whatever the client asked for.
    ///
    /// Every other key and value is copied as the client wrote it, in its
    /// order: a seed past u64 or a float's last digit must reach the
    /// prefiller as they reach the decoder.
    pub fn prefill_body(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.body.len() + 48);
        out.push(b'{');
        let (mut max_tokens, mut stream, mut n) = (false, false, false);
        fn put(out: &mut Vec<u8>, key: &str, value: &str) {
            if out.len() > 1 {
                out.push(b',');
            }
            out.extend_from_slice(key.as_bytes());
            out.push(b':');
            out.extend_from_slice(value.as_bytes());
        }
        walk(self.body, |entry| {
            let value = match &*entry.name {
                "max_tokens" => {
                    max_tokens = true;
                    "1"
                }
                "max_completion_tokens" => "1",
                // vLLM rejects min_tokens > max_tokens with a 400.
                "min_tokens" | "min_completion_tokens" if exceeds_one(entry.value) => "1",
                "stream" => {
                    stream = true;
                    "false"
                }
                // vLLM rejects stream_options on a request that does not
                // stream.
                "stream_options" => return,
                "n" => {
                    n = true;
                    "1"
                }
                _ => entry.value,
            };
            put(&mut out, entry.key, value);
        })
        .expect("parse accepted this body");
        for (present, key, value) in [
            (max_tokens, "\"max_tokens\"", "1"),
            (stream, "\"stream\"", "false"),
            (n, "\"n\"", "1"),
        ] {
            if !present {
                put(&mut out, key, value);
            }
        }
        out.push(b'}');
        Bytes::from(out)
    }
}

/// A JSON number above 1, whatever its form (`5`, `5.0`, `1e30`).
fn exceeds_one(text: &str) -> bool {
    text.starts_with(|c: char| c == '-' || c.is_ascii_digit())
        && text.parse::<f64>().is_ok_and(|x| x > 1.0)
}

/// One member of the top-level object, as texts of the body.
struct Entry<'a> {
    /// The key as written, quotes and escapes included.
    key: &'a str,
    /// The key unescaped: `"max\u005ftokens"` is `max_tokens` to vLLM.
    name: Cow<'a, str>,
    /// The value as written, without the whitespace around it.
    value: &'a str,
}

/// Calls `each` for every member of the top-level object, in order,
/// duplicates included. `Ok(false)`: valid JSON, but not an object.
fn walk<'a>(body: &'a str, each: impl FnMut(Entry<'a>)) -> serde_json::Result<bool> {
    let mut de = serde_json::Deserializer::from_str(body);
    let object = (&mut de).deserialize_any(Walk(each))?;
    de.end()?;
    Ok(object)
}

struct Walk<F>(F);

impl<'de, F: FnMut(Entry<'de>)> Visitor<'de> for Walk<F> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<bool, A::Error> {
        while let Some(key) = map.next_key::<&'de RawValue>()? {
            let key = key.get();
            let name = match key.contains('\\') {
                false => Cow::Borrowed(&key[1..key.len() - 1]),
                true => Cow::Owned(serde_json::from_str(key).map_err(de::Error::custom)?),
            };
            let value = map.next_value::<&'de RawValue>()?.get();
            (self.0)(Entry { key, name, value });
        }
        Ok(true)
    }

    lenient!(false; bool, i64, u64, f64, str, unit, seq);
}

/// Runs `seed` over one value's text.
fn measure<'a, S: DeserializeSeed<'a>>(text: &'a str, seed: S) -> serde_json::Result<S::Value> {
    seed.deserialize(&mut serde_json::Deserializer::from_str(text))
}

/// A completions prompt, or an item of one, as far as counting goes.
#[derive(Debug, Clone, Copy)]
enum Prompt {
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

struct PromptSeed;

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
fn prompt_count(prompt: &Prompt) -> usize {
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
fn completion_size(prompt: &Prompt) -> PromptSize {
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

/// A chat prompt's size: every message's text (a string, or the `text`
/// of its content parts) and the number of messages. `None`: no list of
/// messages.
fn chat_size(messages: Option<(u64, u64, bool)>) -> PromptSize {
    let (messages, text_bytes, opaque) = messages.unwrap_or_default();
    PromptSize {
        text_bytes,
        messages,
        single_text: true,
        opaque,
        ..Default::default()
    }
}

struct MessagesSeed;

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

/// Whether a value is `null`.
struct IsNull;

impl<'de> DeserializeSeed<'de> for IsNull {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for IsNull {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(true)
    }

    lenient!(false; bool, i64, u64, f64, str, seq, map);
}

/// Which of a few names a key is (`None`: another), without keeping it.
struct KeySeed(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Option<usize>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|name| *name == key))
    }
}

/// Keys the prefill copy may change or drop.
const REWRITTEN: [&str; 7] = [
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "min_completion_tokens",
    "stream",
    "stream_options",
    "n",
];

/// The prefill copy's contract, for the unit and property tests and the
/// fuzz target (which cannot reach `#[cfg(test)]` code): `Err` tells what
/// `copy` breaks of it for the body `raw`.
#[doc(hidden)]
pub fn check_prefill_copy(raw: &[u8], copy: &[u8]) -> Result<(), String> {
    type Members = Vec<(String, String, String)>;
    fn members(body: &[u8]) -> Result<Members, String> {
        let body = std::str::from_utf8(body).map_err(|e| e.to_string())?;
        let mut all = Vec::new();
        let object = walk(body, |e| {
            all.push((e.name.into_owned(), e.key.to_owned(), e.value.to_owned()))
        })
        .map_err(|e| e.to_string())?;
        object.then_some(all).ok_or_else(|| "not an object".into())
    }
    fn values<'m>(members: &'m Members, name: &str) -> Vec<&'m str> {
        members
            .iter()
            .filter(|m| m.0 == name)
            .map(|m| m.2.as_str())
            .collect()
    }
    fn others(members: &Members) -> Vec<(&str, &str)> {
        members
            .iter()
            .filter(|m| !REWRITTEN.contains(&m.0.as_str()))
            .map(|m| (m.1.as_str(), m.2.as_str()))
            .collect()
    }
    let original = members(raw)?;
    let copied = members(copy).map_err(|e| format!("the copy is not a JSON object: {e}"))?;
    if others(&original) != others(&copied) {
        return Err("other members differ".into());
    }
    for (name, value) in [("max_tokens", "1"), ("stream", "false"), ("n", "1")] {
        let got = values(&copied, name);
        let want = vec![value; values(&original, name).len().max(1)];
        if got != want {
            return Err(format!("{name}: {got:?}, want {want:?}"));
        }
    }
    let completion = values(&copied, "max_completion_tokens");
    if completion != vec!["1"; values(&original, "max_completion_tokens").len()] {
        return Err(format!("max_completion_tokens: {completion:?}"));
    }
    if !values(&copied, "stream_options").is_empty() {
        return Err("stream_options kept".into());
    }
    for name in ["min_tokens", "min_completion_tokens"] {
        let want: Vec<&str> = values(&original, name)
            .into_iter()
            .map(|v| if exceeds_one(v) { "1" } else { v })
            .collect();
        if values(&copied, name) != want {
            return Err(format!(
                "{name}: {:?}, want {want:?}",
                values(&copied, name)
            ));
        }
    }
    for api in [Api::Chat, Api::Completions] {
        if let Ok(asked) = ClientRequest::parse(api, raw) {
            let copy = ClientRequest::parse(api, copy)
                .map_err(|e| format!("the copy is refused for {api:?}: {e}"))?;
            if copy.stream || (copy.prompts, copy.size) != (asked.prompts, asked.size) {
                return Err(format!("the copy reads otherwise: {copy:?}, not {asked:?}"));
            }
        }
    }
    let full = |body| serde_json::from_slice::<serde_json::Value>(body);
    if full(raw).is_ok() {
        full(copy).map_err(|e| format!("serde_json refuses the copy: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    struct Parsed {
        stream: bool,
        prompts: usize,
        size: PromptSize,
        copy: Vec<u8>,
    }

    fn parse(api: Api, v: Value) -> Parsed {
        parse_raw(api, &serde_json::to_vec(&v).unwrap())
    }

    fn parse_raw(api: Api, raw: &[u8]) -> Parsed {
        let request = ClientRequest::parse(api, raw).unwrap();
        let copy = request.prefill_body().to_vec();
        check_prefill_copy(raw, &copy).unwrap();
        Parsed {
            stream: request.stream,
            prompts: request.prompts,
            size: request.size,
            copy,
        }
    }

    fn copy_of(raw: &str) -> String {
        String::from_utf8(parse_raw(Api::Chat, raw.as_bytes()).copy).unwrap()
    }

    #[test]
    fn prefill_copy_asks_for_one_token_without_streaming() {
        let req = parse(
            Api::Chat,
            json!({"model":"m","messages":[],"max_tokens":50,"max_completion_tokens":50,
                   "min_tokens":10,"min_completion_tokens":0,"stream":true,
                   "stream_options":{"include_usage":true},"n":3,"temperature":0.5}),
        );
        assert!(req.stream);
        let copy: Value = serde_json::from_slice(&req.copy).unwrap();
        assert_eq!(
            copy,
            json!({"model":"m","messages":[],"max_tokens":1,"max_completion_tokens":1,
                   "min_tokens":1,"min_completion_tokens":0,"stream":false,"n":1,"temperature":0.5})
        );
    }

    #[test]
    fn prefill_copy_does_not_invent_max_completion_tokens() {
        let req = parse(Api::Chat, json!({"messages":[]}));
        let copy: Value = serde_json::from_slice(&req.copy).unwrap();
        assert_eq!(copy["max_tokens"], 1);
        assert!(copy.get("max_completion_tokens").is_none());
        assert!(!req.stream);
    }

    #[test]
    fn prefill_copy_keeps_numbers_and_order_byte_for_byte() {
        assert_eq!(
            copy_of(
                r#"{"model":"m","seed":218446744073709551616,"temperature":0.30000000000000004,
                "logit_bias":{"z":1,"a":-0.0e-0},"top_p":1.0,"max_tokens":5}"#
            ),
            r#"{"model":"m","seed":218446744073709551616,"temperature":0.30000000000000004,"logit_bias":{"z":1,"a":-0.0e-0},"top_p":1.0,"max_tokens":1,"stream":false,"n":1}"#
        );
        // Whitespace inside values is theirs; between members it goes.
        assert_eq!(
            copy_of("{ \"b\" : [1, 2] ,\n \"a\":{ \"y\" : 1 , \"x\":\"\\u00e9\" } }"),
            r#"{"b":[1, 2],"a":{ "y" : 1 , "x":"\u00e9" },"max_tokens":1,"stream":false,"n":1}"#
        );
    }

    #[test]
    fn prefill_copy_rewrites_every_duplicate_and_escaped_key() {
        assert_eq!(
            copy_of(r#"{"max_tokens":5,"n":2,"max_tokens":7,"stream":true,"stream":false}"#),
            r#"{"max_tokens":1,"n":1,"max_tokens":1,"stream":false,"stream":false}"#
        );
        // vLLM reads `max\u005ftokens` as max_tokens, so it is one.
        let req = parse_raw(
            Api::Chat,
            br#"{"max\u005ftokens":50,"str\u0065am":true,"\u006e":4}"#,
        );
        assert!(req.stream);
        assert_eq!(
            String::from_utf8(req.copy).unwrap(),
            r#"{"max\u005ftokens":1,"str\u0065am":false,"\u006e":1}"#
        );
    }

    #[test]
    fn prefill_copy_drops_stream_options_wherever_they_are() {
        assert_eq!(
            copy_of(r#"{"stream_options":{"include_usage":true}}"#),
            r#"{"max_tokens":1,"stream":false,"n":1}"#
        );
        assert_eq!(
            copy_of(r#"{"a":1,"stream_options":null,"b":2,"stream_options":{}}"#),
            r#"{"a":1,"b":2,"max_tokens":1,"stream":false,"n":1}"#
        );
        assert_eq!(copy_of("{}"), r#"{"max_tokens":1,"stream":false,"n":1}"#);
    }

    #[test]
    fn prefill_copy_clamps_min_tokens_above_one_only() {
        assert_eq!(
            copy_of(
                r#"{"min_tokens":5.0,"min_tokens":1,"min_tokens":"9","min_tokens":-3,"min_completion_tokens":1e3,"min_completion_tokens":0.5}"#
            ),
            r#"{"min_tokens":1,"min_tokens":1,"min_tokens":"9","min_tokens":-3,"min_completion_tokens":1,"min_completion_tokens":0.5,"max_tokens":1,"stream":false,"n":1}"#
        );
    }

    #[test]
    fn completions_prompt_forms() {
        let n = |p: Value| parse(Api::Completions, json!({ "prompt": p })).prompts;
        assert_eq!(n(json!("hi")), 1);
        assert_eq!(n(json!([1, 2, 3])), 1);
        assert_eq!(n(json!(["a", "b", "c"])), 3);
        assert_eq!(n(json!([[1, 2], [3]])), 2);
        assert_eq!(n(json!([])), 1);
        assert_eq!(parse(Api::Chat, json!({"prompt":["a","b"]})).prompts, 1);
    }

    #[test]
    fn prompt_sizes() {
        let size = |api, v: Value| parse(api, v).size;
        let chat = size(
            Api::Chat,
            json!({"messages":[{"role":"system","content":"abcd"},
                               {"role":"user","content":[{"type":"text","text":"xy"},{"type":"image_url"}]}]}),
        );
        assert_eq!(
            (
                chat.text_bytes,
                chat.messages,
                chat.single_text,
                chat.opaque
            ),
            (6, 2, true, true)
        );
        let batch = size(
            Api::Completions,
            json!({"prompt":["abc", "abcdef", [1, 2]]}),
        );
        assert_eq!(
            (batch.text_bytes, batch.token_ids, batch.single_text),
            (6, 2, false)
        );
        let one = size(Api::Completions, json!({"prompt":"héllo"}));
        assert_eq!(
            (one.text_bytes, one.messages, one.single_text),
            (6, 0, true)
        );
        let tools = size(Api::Chat, json!({"messages":[], "tools":[{}]}));
        assert!(tools.opaque);
        let escaped = parse_raw(Api::Completions, br#"{"prompt":"\u00e9\n"}"#).size;
        assert_eq!(escaped.text_bytes, 3);
    }

    #[test]
    fn odd_prompt_shapes_are_left_to_vllm() {
        let chat = parse(
            Api::Chat,
            json!({"messages":["hi", 3, null, [1], {"content": 5}, {"content": {"text":"x"}},
                               {"content":"ab","tool_calls":null}]}),
        )
        .size;
        assert_eq!((chat.text_bytes, chat.messages, chat.opaque), (2, 7, false));
        let calls = parse(
            Api::Chat,
            json!({"messages":[{"content":"a","tool_calls":[]}]}),
        )
        .size;
        assert!(calls.opaque);
        let parts = parse(Api::Chat, json!({"messages":[{"content":["a"]}]})).size;
        assert!(parts.opaque);
        let messages = parse(Api::Chat, json!({"messages":{"content":"abc"}})).size;
        assert_eq!((messages.messages, messages.text_bytes), (0, 0));
        let prompt = parse(Api::Completions, json!({"prompt":{"a":[1]}}));
        assert_eq!((prompt.prompts, prompt.size), (1, PromptSize::default()));
    }

    #[test]
    fn refuses_what_cannot_be_routed() {
        for raw in [
            &b"{not json"[..],
            b"[1,2]",
            b"\"s\"",
            b"{\"stream\":\"yes\"}",
            b"{\"stream\":1,\"stream\":true} x",
            b"{\"a\":\"\xff\"}",
            b"",
        ] {
            let err = ClientRequest::parse(Api::Chat, raw).unwrap_err();
            assert_eq!(err.status(), http::StatusCode::BAD_REQUEST, "{raw:?}");
        }
        // The last of duplicates counts, as in vLLM.
        assert!(parse_raw(Api::Chat, br#"{"stream":1,"stream":true}"#).stream);
    }

    /// The Value-based measures this module had before it stopped
    /// building trees: what the streaming visitors must still compute.
    fn reference(api: Api, body: &Value) -> Option<(bool, usize, PromptSize)> {
        fn prompt_count(prompt: Option<&Value>) -> usize {
            match prompt {
                Some(Value::Array(items)) if items.iter().all(|i| i.is_number()) => 1,
                Some(Value::Array(items)) => items.len().max(1),
                _ => 1,
            }
        }
        fn chat_size(messages: Option<&Value>) -> PromptSize {
            let mut size = PromptSize {
                single_text: true,
                ..Default::default()
            };
            let Some(Value::Array(messages)) = messages else {
                return size;
            };
            size.messages = messages.len() as u64;
            for message in messages {
                match message.get("content") {
                    Some(Value::String(text)) => size.text_bytes += text.len() as u64,
                    Some(Value::Array(parts)) => {
                        for part in parts {
                            match part.get("text") {
                                Some(Value::String(text)) => size.text_bytes += text.len() as u64,
                                _ => size.opaque = true,
                            }
                        }
                    }
                    _ => {}
                }
                if message.get("tool_calls").is_some_and(|v| !v.is_null()) {
                    size.opaque = true;
                }
            }
            size
        }
        fn completion_size(prompt: Option<&Value>) -> PromptSize {
            let mut size = PromptSize::default();
            match prompt {
                Some(Value::String(text)) => {
                    size.text_bytes = text.len() as u64;
                    size.single_text = true;
                }
                Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
                    size.token_ids = items.len() as u64;
                }
                Some(Value::Array(items)) => {
                    for item in items {
                        let one = completion_size(Some(item));
                        size.text_bytes = size.text_bytes.max(one.text_bytes);
                        size.token_ids = size.token_ids.max(one.token_ids);
                    }
                }
                _ => {}
            }
            size
        }
        let body = body.as_object()?;
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return None,
        };
        let (prompts, mut size) = match api {
            Api::Chat => (1, chat_size(body.get("messages"))),
            Api::Completions => (
                prompt_count(body.get("prompt")),
                completion_size(body.get("prompt")),
            ),
        };
        size.opaque |= ["tools", "functions"]
            .iter()
            .any(|k| body.get(*k).is_some_and(|v| !v.is_null()));
        Some((stream, prompts, size))
    }

    fn ws() -> impl Strategy<Value = &'static str> {
        prop_oneof![6 => Just(""), 1 => Just(" "), 1 => Just("\r\n\t ")]
    }

    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            "-?(0|[1-9][0-9]{0,40})",
            "-?(0|[1-9][0-9]{0,5})(\\.[0-9]{1,25})?([eE][+-]?[0-9]{1,3})?",
            Just("0.30000000000000004".to_string()),
        ]
    }

    fn string() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            4 => "[a-z_ é😀]{0,4}",
            1 => prop::sample::select(vec![
                "\\n", "\\\"", "\\\\", "\\/", "\\u00e9", "\\u005f", "\\ud83d\\ude00", "\\u0000",
            ])
            .prop_map(String::from),
        ];
        prop::collection::vec(piece, 0..5).prop_map(|p| format!("\"{}\"", p.concat()))
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(vec![
                "max_tokens", "max_completion_tokens", "min_tokens", "min_completion_tokens",
                "stream_options", "n", "model", "seed", "temperature", "tools", "functions",
                "max\\u005ftokens", "\\u006e", "min_tok\\u0065ns", "text", "content",
            ])
            .prop_map(|k| format!("\"{k}\"")),
            1 => string(),
        ]
    }

    fn object(members: Vec<(&str, String, &str, &str, String)>) -> String {
        let members: Vec<String> = members
            .into_iter()
            .map(|(a, k, b, c, v)| format!("{a}{k}{b}:{c}{v}"))
            .collect();
        format!("{{{}}}", members.join(","))
    }

    fn array(items: Vec<(&str, String)>) -> String {
        let items: Vec<String> = items.into_iter().map(|(a, v)| format!("{a}{v}")).collect();
        format!("[{}]", items.join(","))
    }

    fn value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            number(),
            string(),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec((ws(), inner.clone()), 0..6).prop_map(array),
                prop::collection::vec((ws(), key(), ws(), ws(), inner), 0..6).prop_map(object),
            ]
        })
    }

    /// Completions prompts: texts, token lists, batches of them, and
    /// stranger nests.
    fn prompt() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![number(), string(), Just("null".to_string())];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec((ws(), inner), 0..6).prop_map(array),
                prop::collection::vec((Just(""), number()), 0..6).prop_map(array),
            ]
        })
    }

    fn messages() -> impl Strategy<Value = String> {
        let part = prop_oneof![
            string().prop_map(|t| format!(r#"{{"type":"text","text":{t}}}"#)),
            value().prop_map(|t| format!(r#"{{"text":{t},"type":"x"}}"#)),
            Just(r#"{"type":"image_url","image_url":{"url":"data:"}}"#.to_string()),
            value(),
        ];
        let content = prop_oneof![
            string(),
            prop::collection::vec((ws(), part), 0..4).prop_map(array),
            value(),
        ];
        let message = prop_oneof![
            (
                content.clone(),
                prop_oneof![Just("null".to_string()), value()]
            )
                .prop_map(|(c, t)| format!(r#"{{"role":"user","content":{c},"tool_calls":{t}}}"#)),
            content.prop_map(|c| format!(r#"{{"content":{c},"role":"assistant"}}"#)),
            value(),
        ];
        prop_oneof![
            6 => prop::collection::vec((ws(), message), 0..5).prop_map(array),
            1 => value(),
        ]
    }

    /// Request bodies: any members, and the ones the proxy reads with
    /// values of the shapes it reads (and others).
    fn body() -> impl Strategy<Value = String> {
        let member = prop_oneof![
            4 => (key(), value()),
            1 => prop::sample::select(vec!["true", "false", "null"])
                .prop_map(|v| ("\"stream\"".to_string(), v.to_string())),
            1 => prompt().prop_map(|v| ("\"prompt\"".to_string(), v)),
            1 => messages().prop_map(|v| ("\"messages\"".to_string(), v)),
        ];
        prop::collection::vec((ws(), member, ws(), ws()), 0..10).prop_map(|members| {
            object(
                members
                    .into_iter()
                    .map(|(a, (k, v), b, c)| (a, k, b, c, v))
                    .collect(),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn prefill_copy_keeps_all_else(body in body()) {
            let raw = body.as_bytes();
            let value: Option<Value> = serde_json::from_slice(raw).ok();
            for api in [Api::Chat, Api::Completions] {
                let parsed = ClientRequest::parse(api, raw);
                if let Ok(request) = &parsed {
                    let copy = request.prefill_body();
                    prop_assert_eq!(check_prefill_copy(raw, &copy), Ok(()), "{}", body);
                }
                // Where serde_json's tree reads the body, the visitors
                // read it the same.
                if let Some(value) = &value {
                    let want = reference(api, value);
                    let got = parsed.ok().map(|r| (r.stream, r.prompts, r.size));
                    prop_assert_eq!(got, want, "{}", body);
                }
            }
        }

        #[test]
        fn parse_survives_any_bytes(raw in prop::collection::vec(any::<u8>(), 0..256)) {
            for api in [Api::Chat, Api::Completions] {
                if let Ok(request) = ClientRequest::parse(api, &raw) {
                    prop_assert_eq!(check_prefill_copy(&raw, &request.prefill_body()), Ok(()));
                }
            }
        }

        #[test]
        fn parse_survives_damaged_bodies(
            body in body(),
            cuts in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..4),
        ) {
            let mut raw = body.into_bytes();
            for (at, byte, how) in cuts {
                let at = at.index(raw.len() + 1);
                match how {
                    0 => raw.insert(at, byte),
                    1 if at < raw.len() => raw[at] = byte,
                    _ => raw.truncate(at),
                }
            }
            for api in [Api::Chat, Api::Completions] {
                if let Ok(request) = ClientRequest::parse(api, &raw) {
                    prop_assert_eq!(check_prefill_copy(&raw, &request.prefill_body()), Ok(()));
                }
            }
        }
    }
}
