"""The DAAM-enhanced VQ-VAE image tokenizer.

Modules: `config` (VQVAEConfig, TrainConfig), `model` (VQVAE, DownSampleBlock, UpSampleBlock,
DAAMResidualBlock), `quantizer` (VectorQuantizer, nearest_codes), `data`, `losses` (LPIPS from local
weights), `metrics`, `train` (train, Trainer), `evaluate` (evaluate_checkpoint, reconstruct_files),
`tokens` (encode_files, decode_file), `io` (load_model). Nothing is imported here, so the CLI starts fast.
"""
