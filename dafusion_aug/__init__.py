"""dafusion-aug: generative data augmentation with diffusion models (DA-Fusion)."""

__version__ = "0.1.0.dev0"
