"""fastsample: fast sampling of diffusion models behind one denoiser interface."""

__version__ = "0.1.0"
