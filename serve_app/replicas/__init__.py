"""Ray Serve shells around the pure request path."""
