"""`daamkit vqvae ...`: train, evaluate, reconstruct, encode and decode the DAAM VQ-VAE."""

from daamkit.cli.app import new_app

app = new_app("DAAM-enhanced VQ-VAE image tokenizer: train, evaluate, reconstruct, encode, decode.")
