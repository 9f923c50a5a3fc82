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


# Llama-3.1-8B-Instruct in BF16 on one H100 SXM 80 GB (docs/performance.md has the derivation):
# 16.06 GB of weights read per step at 70 % of 3.35 TB/s, 16.1 GFLOP per token at 50 % of
# 989 TFLOP/s, 128 KiB of K and V per token, 25,000 blocks of 16 (400k tokens) left for the KV
# cache at gpu_memory_utilization 0.9; vLLM's defaults on an H100 for the API server.
H100_LLAMA_8B = Profile(
    name="h100-llama-3.1-8b",
    num_gpu_blocks=25_000,
    max_num_seqs=1024,
    max_num_batched_tokens=8192,
    max_model_len=131_072,
    step_overhead_s=0.0070,
    prefill_token_s=32.5e-6,
    attention_pair_s=1.06e-9,
    decode_seq_s=32.5e-6,
    kv_read_token_s=56e-9,
)
# The e2e tiny model on a CPU vLLM (block 32, as its CPU attention needs): for the conformance
# test, where only the accounting is compared, not the time.
TINY_CPU = Profile(
    name="tiny-cpu",
    block_size=32,
    num_gpu_blocks=64,
    max_num_seqs=256,
    max_num_batched_tokens=2048,
    max_model_len=2048,
    step_overhead_s=0.002,
    prefill_token_s=1e-6,
    attention_pair_s=0.0,
    decode_seq_s=1e-5,
    kv_read_token_s=0.0,
)
PROFILES = {p.name: p for p in (H100_LLAMA_8B, TINY_CPU)}
