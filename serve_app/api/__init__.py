"""The HTTP API surfaces, one module each (OpenAI, Ollama, Responses, Anthropic, admin, ops):
FastAPI routers that the ingress replica mounts. Inference requests go through `gateway`."""
