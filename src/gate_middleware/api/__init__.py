"""One module per API surface the gateway serves."""
