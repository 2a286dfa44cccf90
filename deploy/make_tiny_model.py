#!/usr/bin/env python3
"""Make a tiny random-weight Qwen2 model with its own tokenizer, offline.

No model hub is reachable here, so the CPU profile of deploy/up.sh serves a
model made locally: a ByteLevel BPE tokenizer trained on a few KB of
generated text (special tokens <|endoftext|>, <|im_start|>, <|im_end|>, a
ChatML chat template) and a 2-layer Qwen2 (hidden 128, 4 heads, 2 KV heads,
head_dim 32 -- vLLM's CPU attention backend rejects 16) in bfloat16. The
weights are random: the answers are gibberish, but every byte of the
prefill/KV-transfer/decode path is real.

    python make_tiny_model.py OUT_DIR

Deterministic (fixed seed); writes OUT_DIR atomically (OUT_DIR.tmp, rename).
"""

import json
import os
import random
import shutil
import sys

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = (
    "the cache stores keys and values for every token of a prompt so that a "
    "decoder can skip the prefill a prefiller already did lmcache moves the "
    "chunks between servers mooncake keeps them in a distributed store vllm "
    "serves the model and the proxy parks each request until its kv is ready "
    "long context serving gets faster when the same prefix is reused across "
    "requests tokens layers heads attention memory transfer latency throughput"
).split()


def corpus(rng: random.Random, lines: int = 400) -> list[str]:
    out = []
    for i in range(lines):
        n = rng.randint(8, 24)
        words = [rng.choice(WORDS) for _ in range(n)]
        out.append(f"{i} " + " ".join(words) + f" {rng.randint(0, 99999)}.")
    return out


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

    rng = random.Random(1234)
    torch.manual_seed(1234)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(rng), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 512
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
        max_position_embeddings=512,
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
    print(f"tiny model: {out} (vocab {vocab}, hidden 128, 2 layers, head_dim 32, bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
