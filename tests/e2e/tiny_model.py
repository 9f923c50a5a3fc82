"""A tiny Llama and three LoRA adapters, made locally with fixed seeds (no model hub).

Run with the vLLM environment's Python: `python tests/e2e/tiny_model.py OUT_DIR`. Writes
OUT_DIR/base (model + tokenizer) and OUT_DIR/a1..a3 (adapters that each change the output).
The shapes are ones vLLM's CPU attention accepts (head size 32). The tokenizer alone needs only
the `tokenizers` package (`write_tokenizer`), so the fleet benchmark and its tests make it
without the vLLM environment.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

ADAPTERS = ("a1", "a2", "a3")
SPECIAL_TOKENS = {
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
}
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def train_tokenizer() -> Tokenizer:
    """A byte-level BPE of 1,024 ids trained on a fixed corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [f"The quick brown fox jumps over the lazy dog {i}." for i in range(500)]
    corpus.append(Path(__file__).read_text())
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=list(SPECIAL_TOKENS.values()),  # ids 0-3 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def write_tokenizer(out: Path) -> None:
    """The tokenizer as `main` saves it, for the files a server reads: `tokenizer.json`,
    `tokenizer_config.json` (the special tokens) and `chat_template.jinja`."""
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def main(out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    fast = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(), **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    LlamaForCausalLM(config).save_pretrained(out / "base")
    fast.save_pretrained(out / "base")
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(100 + i)
        lora = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        get_peft_model(LlamaForCausalLM.from_pretrained(out / "base"), lora).save_pretrained(
            out / name
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
