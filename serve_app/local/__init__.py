"""The router on one machine (`make run`, tests, bench): loopback-only listeners, port checks
before start, and an orderly stop."""
