"""rankwise.compress.methods."""
