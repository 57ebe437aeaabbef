"""rankwise.optim."""
