"""rankwise.analysis."""
