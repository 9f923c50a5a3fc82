"""Routing on what the engines hold: vLLM's KV-cache events decoded (`events`), the block index
they feed (`index`), the subscription per provider (`subscriber`), prompts cut into the same
block keys (`tokens`) and the kv_aware decision (`score`). Pure but for `subscriber` (ZMQ)."""
