"""rankwise.adapters.methods."""
