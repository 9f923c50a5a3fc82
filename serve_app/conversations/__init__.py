"""Conversations that span requests: the OpenAI Responses the router keeps, so that
`previous_response_id` works on any provider of a model (and survives a provider's restart),
the id routes (GET, DELETE, cancel, input items) and background mode.

chain.py: what a stored response holds and how a continuation is expanded (pure);
store.py: the SQLite store, bounded by age and size (pure, no Ray);
actor.py: the named actor that owns the store, so every ingress replica sees one;
service.py: the ingress replica's side (a turn begun, its answer recorded, background runs).
"""
