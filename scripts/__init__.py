"""Operator entry points (`python -m scripts.<name>`)."""
