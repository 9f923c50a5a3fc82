"""How a request's provider is chosen: eligibility and tiers (selection), the strategies, and
what the cache- and load-aware ones look at (prompt prefixes, sessions, upstream load)."""
