"""Infrastructure shared by every daamkit package: checkpoint I/O, config files, progress, errors, local weights.

Uses nothing else of daamkit, so the DAAM core (`daamkit.common`), the VQ-VAE and the classifier suite can
all depend on it.
"""
