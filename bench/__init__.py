"""`make bench`: the router against a direct call to the same upstream, in one run."""
