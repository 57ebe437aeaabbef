"""rankwise.compress."""
