"""LightningModules: thin wrappers that call the plain modules in fastsample.diffusion / models."""
