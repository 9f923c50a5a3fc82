"""Flow control: when every provider of a model is full, its requests wait in the picker (a
queue per model and picker replica) instead of being refused, ordered by priority, then fair
share between tenants, then arrival (queue.py, pure)."""
