#!/usr/bin/env python3
"""Make a tiny random-weight Qwen2 model with its own tokenizer, offline.

No model hub is reachable here, so the CPU profile of deploy/up.sh serves a
model made locally: a ByteLevel BPE tokenizer (16,384 tokens; special tokens
<|endoftext|>, <|im_start|>, <|im_end|>, a ChatML chat template) and a
2-layer Qwen2 (hidden 128, 4 heads, 2 KV heads, head_dim 32 -- vLLM's CPU
attention backend rejects 16) in bfloat16 with a 4,096-token context. The
weights are random: the answers are gibberish, but every byte of the
prefill/KV-transfer/decode path is real.

The tokenizer learns English from text every machine with Python has
offline: the Python reference manual that pydoc ships (pydoc_data.topics),
the docstrings of the standard library and, where Debian installed them,
the licence texts in /usr/share/common-licenses -- about 2.5 MB. Ordinary
English then costs about 1.6 tokens a word (a tokenizer trained on a
60-word list cost 3.3 and turned a 330-word prompt into a refusal), so a
demo prompt of a few paragraphs fits the context with room to spare.

    python make_tiny_model.py OUT_DIR

Deterministic (fixed seed); writes OUT_DIR atomically (OUT_DIR.tmp, rename).
"""

import ast
import glob
import json
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterator

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB = 16384
CONTEXT = 4096


def english() -> Iterator[str]:
    """Broad English text found offline, in a fixed order (the tokenizer is
    the same wherever the same Python and licence files are installed)."""
    import pydoc_data.topics

    for name in sorted(pydoc_data.topics.topics):
        yield pydoc_data.topics.topics[name]
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, stdlib)
        if rel.startswith(("test", "site-packages")) or "/test" in rel:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = os.path.abspath(sys.argv[1])
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    # Imported here so that `--help`-like misuse fails fast without torch.
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1234)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(english(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = CONTEXT
    fast.save_pretrained(tmp)

    vocab = len(fast)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=True,
        bos_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
        torch_dtype="bfloat16",
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump(
            {
                "eos_token_id": config.eos_token_id,
                "pad_token_id": config.pad_token_id,
                "bos_token_id": config.bos_token_id,
            },
            f,
        )

    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    print(f"tiny model: {out} (vocab {vocab}, context {CONTEXT}, hidden 128, 2 layers, head_dim 32, bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
