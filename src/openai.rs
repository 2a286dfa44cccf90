//! What the proxy reads from and rewrites in an OpenAI request body. The
//! body is parsed once; the decoder gets the client's original bytes, only
//! the prefiller gets a rewritten copy.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::error::ProxyError;
use crate::tokens::PromptSize;

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

/// A client request body, validated just enough to route it. Deeper
/// validation is vLLM's job: its 4xx answers reach the client unchanged.
#[derive(Debug)]
pub struct ClientRequest {
    pub body: Map<String, Value>,
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

impl ClientRequest {
    pub fn parse(api: Api, raw: &[u8]) -> Result<Self, ProxyError> {
        let value: Value = serde_json::from_slice(raw).map_err(|e| {
            ProxyError::bad_request(format!("request body is not valid JSON: {e}"), None)
        })?;
        let Value::Object(body) = value else {
            return Err(ProxyError::bad_request(
                "request body must be a JSON object",
                None,
            ));
        };
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ProxyError::bad_request(
                    "`stream` must be a boolean",
                    Some("stream"),
                ))
            }
        };
        let prompts = match api {
            Api::Chat => 1,
            Api::Completions => prompt_count(body.get("prompt")),
        };
        let mut size = match api {
            Api::Chat => chat_size(body.get("messages")),
            Api::Completions => completion_size(body.get("prompt")),
        };
        // Tool schemas go through the chat template too, at a length the
        // text does not tell.
        if ["tools", "functions"]
            .iter()
            .any(|k| body.get(*k).is_some_and(|v| !v.is_null()))
        {
            size.opaque = true;
        }
        Ok(ClientRequest {
            body,
            stream,
            prompts,
            size,
        })
    }

    /// The prefiller's copy: compute the prompt's KV and one token, nothing
    /// more, in a form vLLM accepts whatever the client asked for.
    pub fn prefill_body(&self) -> Bytes {
        let mut body = self.body.clone();
        body.insert("max_tokens".into(), Value::from(1));
        if body.contains_key("max_completion_tokens") {
            body.insert("max_completion_tokens".into(), Value::from(1));
        }
        // vLLM rejects min_tokens > max_tokens with a 400.
        for key in ["min_tokens", "min_completion_tokens"] {
            if let Some(v) = body.get_mut(key) {
                if v.as_u64().is_some_and(|n| n > 1) {
                    *v = Value::from(1);
                }
            }
        }
        body.insert("stream".into(), Value::Bool(false));
        // vLLM rejects stream_options on a request that does not stream.
        body.remove("stream_options");
        body.insert("n".into(), Value::from(1));
        Bytes::from(serde_json::to_vec(&body).expect("a JSON map always serialises"))
    }
}

/// vLLM's completions `prompt` forms: a string or a token list is one
/// prompt; a list of strings or of token lists is a batch.
fn prompt_count(prompt: Option<&Value>) -> usize {
    match prompt {
        Some(Value::Array(items)) if items.iter().all(|i| i.is_number()) => 1,
        Some(Value::Array(items)) => items.len().max(1),
        _ => 1,
    }
}

/// A chat prompt's size: every message's text (a string, or the `text`
/// of its content parts) and the number of messages.
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
                        // An image, audio, a file: its tokens are not
                        // in its JSON's length.
                        _ => size.opaque = true,
                    }
                }
            }
            _ => {}
        }
        // Tool calls and their results: templated at lengths of their own.
        if message.get("tool_calls").is_some_and(|v| !v.is_null()) {
            size.opaque = true;
        }
    }
    size
}

/// A completions prompt's size: a string's bytes, a token list's length;
/// for a batch, the longest of each, since sending a batch direct gives
/// up the reuse of all its prompts.
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(api: Api, v: Value) -> ClientRequest {
        ClientRequest::parse(api, &serde_json::to_vec(&v).unwrap()).unwrap()
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
        let copy: Value = serde_json::from_slice(&req.prefill_body()).unwrap();
        assert_eq!(
            copy,
            json!({"model":"m","messages":[],"max_tokens":1,"max_completion_tokens":1,
                   "min_tokens":1,"min_completion_tokens":0,"stream":false,"n":1,"temperature":0.5})
        );
    }

    #[test]
    fn prefill_copy_does_not_invent_max_completion_tokens() {
        let req = parse(Api::Chat, json!({"messages":[]}));
        let copy: Value = serde_json::from_slice(&req.prefill_body()).unwrap();
        assert_eq!(copy["max_tokens"], 1);
        assert!(copy.get("max_completion_tokens").is_none());
        assert!(!req.stream);
    }

    #[test]
    fn completions_prompt_forms() {
        let n = |p: Value| parse(Api::Completions, json!({ "prompt": p })).prompts;
        assert_eq!(n(json!("hi")), 1);
        assert_eq!(n(json!([1, 2, 3])), 1);
        assert_eq!(n(json!(["a", "b", "c"])), 3);
        assert_eq!(n(json!([[1, 2], [3]])), 2);
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
            (chat.text_bytes, chat.messages, chat.single_text),
            (6, 2, true)
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
    }

    #[test]
    fn refuses_what_cannot_be_routed() {
        for raw in [
            &b"{not json"[..],
            b"[1,2]",
            b"\"s\"",
            b"{\"stream\":\"yes\"}",
        ] {
            let err = ClientRequest::parse(Api::Chat, raw).unwrap_err();
            assert_eq!(err.status(), http::StatusCode::BAD_REQUEST, "{raw:?}");
        }
    }
}
