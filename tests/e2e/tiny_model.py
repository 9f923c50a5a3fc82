"""A tiny Llama and three LoRA adapters, made locally with fixed seeds (no model hub).

Run with the vLLM environment's Python: `python tests/e2e/tiny_model.py OUT_DIR`. Writes
OUT_DIR/base (model + tokenizer) and OUT_DIR/a1..a3 (adapters that each change the output).
The shapes are ones vLLM's CPU attention accepts (head size 32).
"""

from __future__ import annotations

import sys
from pathlib import Path

ADAPTERS = ("a1", "a2", "a3")


def main(out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    corpus = [f"The quick brown fox jumps over the lazy dog {i}." for i in range(500)]
    corpus.append(Path(__file__).read_text())
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
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
