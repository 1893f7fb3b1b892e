"""Neural networks and analytic models (nn.Modules); wrapped into denoisers elsewhere."""
