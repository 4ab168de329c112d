"""daamkit: Density Adaptive Attention (DAAM) for PyTorch, a DAAM VQ-VAE and DAT classifiers."""

__version__ = "0.1.0"
