"""The HTTP API surfaces, one module each (OpenAI, Ollama, Responses, Anthropic, admin, keys,
ops): FastAPI routers that the ingress replica mounts. Inference requests go through
serve_app.ingress.gateway."""
