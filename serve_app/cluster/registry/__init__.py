"""The adapter registry: one detached Ray actor owning the manifest; replicas follow it."""
