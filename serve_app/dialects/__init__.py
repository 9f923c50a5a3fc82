"""Client dialects (Ollama API, OpenAI Responses, Anthropic Messages) and their translation to and
from the router's internal form, OpenAI chat/completions/embeddings. Pure: no Ray, no HTTP."""
