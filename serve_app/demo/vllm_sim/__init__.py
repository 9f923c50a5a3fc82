"""A simulated vLLM server, many per process, for judging routers on a fleet this host cannot run.

Faithful where a router can see or cause a difference: the paged KV cache with prefix caching and
LRU eviction (kv_cache), the V1 scheduler's continuous batching, chunked prefill and preemption
on a simulated clock (engine), step times from a named GPU profile (profiles), KV events in
vLLM's wire format (publisher, with the router's routing.kv.events), the OpenAI surface and
/metrics under vLLM's names (server) and the prompt tokenized as the real server would (the
router's routing.kv.tokens). The pure parts never sleep; the server runs their clock
`--time-scale` times faster than the wall's.
"""
