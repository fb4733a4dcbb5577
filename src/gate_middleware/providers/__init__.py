"""Model backends behind the `Provider` protocol."""
