"""PyTorch utilities: persistence (EDM network-pickle format), distributed
helpers, training statistics and small helpers (`misc`)."""
