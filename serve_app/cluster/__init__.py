"""Cluster state, one named Ray actor each: the registry (the manifest: models config,
profiles, adapters, keys), the broker (slots and counts shared by picker replicas) and the
monitor (provider health and load, metrics); replicas follow them by long-poll (follow)."""
