"""Named engine profiles: a cache size, the scheduler's limits and a step time model.

A step's duration is what a router can cause: it grows with the prompt tokens it prefills (and
their attention over the context already in cache), with the sequences it decodes and with the
KV-cache those sequences read. A prefix-cache hit removes prefill work, so it shortens the
step; a busy engine's steps grow, so its queue waits longer. The figures are derived in
docs/performance.md ("Routing on a simulated fleet") from the GPU's datasheet and the model's
shape, with the efficiencies stated there.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Profile(BaseModel):
    """An engine and the cost of its steps, in seconds of the simulated clock."""

    model_config = ConfigDict(frozen=True)

    name: str
    block_size: int = Field(16, ge=1)
    num_gpu_blocks: int = Field(ge=2)  # the null block included, as vLLM counts them
    max_num_seqs: int = Field(ge=1)
    max_num_batched_tokens: int = Field(ge=1)
    max_model_len: int = Field(ge=1)
    step_overhead_s: float = Field(ge=0)  # weights read once per step, launch, scheduling
    prefill_token_s: float = Field(ge=0)  # the matmuls of one computed token
    attention_pair_s: float = Field(ge=0)  # one new token attending to one context token
    decode_seq_s: float = Field(ge=0)  # the matmuls of one decoded token
    kv_read_token_s: float = Field(ge=0)  # reading one cached token's K and V in a decode step

    def step_seconds(
        self, prefill_tokens: int, attention_pairs: int, decode_seqs: int, decode_kv_tokens: int
    ) -> float:
        """The duration of one step of the engine."""
        return (
            self.step_overhead_s
            + prefill_tokens * self.prefill_token_s
            + attention_pairs * self.attention_pair_s
            + decode_seqs * self.decode_seq_s
            + decode_kv_tokens * self.kv_read_token_s
        )


# The profiles, a row each: the engine's limits (vLLM's flags), then a step's costs (seconds).
# h100-llama-3.1-8b: Llama-3.1-8B-Instruct in BF16 on one H100 SXM 80 GB (docs/performance.md
# has the derivation): 16.06 GB of weights read per step at 70 % of 3.35 TB/s, 16.1 GFLOP per
# token at 50 % of 989 TFLOP/s, 128 KiB of K and V per token, 25,000 blocks of 16 (400k tokens)
# left for the KV cache at gpu_memory_utilization 0.9; vLLM's defaults on an H100 for the API
# server. tiny-cpu: the e2e tiny model on a CPU vLLM (block 32, as its CPU attention needs), for
# the conformance test, where only the accounting is compared, not the time.
_COLUMNS = (
    *("name", "block_size", "num_gpu_blocks", "max_num_seqs", "max_num_batched_tokens"),
    *("max_model_len", "step_overhead_s", "prefill_token_s", "attention_pair_s"),
    *("decode_seq_s", "kv_read_token_s"),
)
# fmt: off
_ROWS = (
    ("h100-llama-3.1-8b", 16, 25_000, 1024, 8192, 131_072, 0.007, 32.5e-6, 1.06e-9, 32.5e-6, 56e-9),
    ("tiny-cpu",          32,     64,  256, 2048,   2048,  0.002, 1e-6,    0.0,     1e-5,    0.0),
)
# fmt: on
H100_LLAMA_8B, TINY_CPU = (Profile(**dict(zip(_COLUMNS, row, strict=True))) for row in _ROWS)
PROFILES = {p.name: p for p in (H100_LLAMA_8B, TINY_CPU)}
