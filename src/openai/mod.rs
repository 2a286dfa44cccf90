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
//!
//! Here: the request as the proxy routes it. The walk and the visitors the
//! measures share are in `json.rs`; the prompt's measures in `chat.rs` and
//! `completions.rs`; the prefiller's copy and its contract in `prefill.rs`.

use std::fmt;

use crate::error::ProxyError;
use crate::metrics::LabelValue;
use crate::tokens::PromptSize;

mod chat;
mod completions;
mod json;
mod prefill;
#[cfg(test)]
mod proptests;

use chat::{chat_size, MessagesSeed};
use completions::{completion_size, prompt_count, PromptSeed};
use json::{measure, walk};
pub use prefill::check_prefill_copy;

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
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    pub(super) struct Parsed {
        pub(super) stream: bool,
        pub(super) prompts: usize,
        pub(super) size: PromptSize,
        pub(super) copy: Vec<u8>,
    }

    pub(super) fn parse(api: Api, v: Value) -> Parsed {
        parse_raw(api, &serde_json::to_vec(&v).unwrap())
    }

    pub(super) fn parse_raw(api: Api, raw: &[u8]) -> Parsed {
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

    pub(super) fn copy_of(raw: &str) -> String {
        String::from_utf8(parse_raw(Api::Chat, raw.as_bytes()).copy).unwrap()
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
}
