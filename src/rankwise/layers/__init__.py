"""rankwise.layers."""
