"""The demo upstream: an OpenAI- and Ollama-speaking server for `make run`, the tests and the
benchmarks, answering Responses and Anthropic calls from a real vLLM's recorded answers."""
