"""Provisioning: making sure each role's model is on the providers that serve it."""
