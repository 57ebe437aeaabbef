"""rankwise.adapters."""
