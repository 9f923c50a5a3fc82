"""The deciding side: one picker deployment per model type plans each request (strategies in
serve_app.routing, slot leases and counts shared with the other replicas, circuits, cooldowns,
adapter versions in use) and books what it planned until the ingress reports it done."""
