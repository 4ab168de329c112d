"""Vector quantizer: chunked nearest-code search, straight-through gradients, EMA codebook, dead-code restart.

The search expands `|z - e|^2 = |z|^2 - 2 z.e + |e|^2` into one matmul per chunk of rows, so the distance
matrix never exceeds `chunk_elements` floats (64 MiB by default) however big the codebook; it always runs
in float32, also under autocast. Under torch.distributed the EMA statistics are all-reduced and restarted
codes are broadcast from rank 0, so every process keeps the same codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def nearest_codes(vectors: torch.Tensor, codebook: torch.Tensor, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for every row of `vectors` [N, D]; codebook [K, D].

    Works on row chunks of `max(1, chunk_elements // K)` so peak extra memory is ~chunk_elements floats.
    """
    device_type = vectors.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        vectors = vectors.float()
        codebook = codebook.float()
        code_sq = codebook.pow(2).sum(dim=1)
        rows = max(1, chunk_elements // codebook.shape[0])
        out = torch.empty(vectors.shape[0], dtype=torch.long, device=vectors.device)
        for start in range(0, vectors.shape[0], rows):
            chunk = vectors[start:start + rows]
            # |z|^2 is constant per row, so it does not change the argmin; addmm fuses -2 z.e + |e|^2.
            dist_chunk = torch.addmm(code_sq, chunk, codebook.t(), beta=1.0, alpha=-2.0)
            out[start:start + rows] = dist_chunk.argmin(dim=1)
    return out


def codebook_usage_and_perplexity(counts: torch.Tensor) -> tuple[float, float]:
    """Usage (% of codes hit at least once) and perplexity exp(H(p)) of a histogram of code indices."""
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        return 0.0, 0.0
    probs = counts / total
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return float((counts > 0).double().mean() * 100.0), float(entropy.exp())


@dataclass
class QuantizerOutput:
    """What the quantizer returns: straight-through codes, ids, loss terms and batch code statistics."""

    quantized: torch.Tensor          # [B, D, H, W], gradients flow to the encoder (straight-through)
    indices: torch.Tensor            # [B, H, W] long
    loss: torch.Tensor               # beta * commitment (+ codebook term without EMA)
    commitment: torch.Tensor
    counts: torch.Tensor             # [K] float, code histogram of this batch (this process)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    """VQ layer on NCHW latents with EMA or gradient-trained codebook.

    - `ema=True`: codebook is a buffer updated by exponential moving averages of assigned vectors
      (Laplace-smoothed counts); the loss is only beta * commitment.
    - `ema=False`: codebook is a parameter trained by the codebook term |sg(z) - e|^2.
    - Dead-code restart: a code whose moving-average count falls below `dead_code_threshold` is moved onto
      a random encoder output of the current batch (the first training batch initialises every code so).
    - `l2_normalize=True`: search and codes live on the unit sphere (cosine-similarity codebook).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, beta: float = 0.25, ema: bool = True,
                 decay: float = 0.99, l2_normalize: bool = False, dead_code_threshold: float = 1.0,
                 chunk_elements: int = 1 << 24, eps: float = 1e-5):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.beta, self.ema, self.decay, self.eps = beta, ema, decay, eps
        self.l2_normalize, self.dead_code_threshold, self.chunk_elements = l2_normalize, dead_code_threshold, chunk_elements
        init = torch.randn(num_embeddings, embedding_dim)
        if ema:
            self.register_buffer("embedding", init)
            self.register_buffer("embed_sum", init.clone())
        else:
            self.embedding = nn.Parameter(init)
        self.register_buffer("cluster_size", torch.ones(num_embeddings))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def codebook(self) -> torch.Tensor:
        """The codebook as used for search and decoding ([K, D], unit rows when l2-normalised)."""
        return F.normalize(self.embedding, dim=1) if self.l2_normalize else self.embedding

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for an index grid [B, H, W] -> [B, D, H, W]."""
        return F.embedding(indices, self.codebook()).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.l2_normalize:
            flat = F.normalize(flat.float(), dim=1).to(flat.dtype)
        if self.training:
            self._maybe_initialize(flat)
        indices = nearest_codes(flat.detach(), self.codebook().detach(), self.chunk_elements)
        counts = torch.bincount(indices, minlength=self.num_embeddings).float()
        codes = F.embedding(indices, self.codebook()).to(flat.dtype)
        commitment = F.mse_loss(flat.float(), codes.detach().float())
        loss = self.beta * commitment
        if not self.ema:
            loss = loss + F.mse_loss(codes.float(), flat.detach().float())
        if self.training:
            self._update_statistics(flat.detach().float(), indices, counts)
        quantized = flat + (codes - flat).detach()
        quantized = quantized.reshape(b, h, w, d).permute(0, 3, 1, 2)
        return QuantizerOutput(quantized, indices.reshape(b, h, w), loss, commitment, counts)

    @torch.no_grad()
    def _random_rows(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """`n` random rows of `flat` (rank 0's choice under torch.distributed)."""
        pick = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        rows = flat[pick].float().contiguous()
        if _distributed():
            dist.broadcast(rows, src=0)
        return rows

    @torch.no_grad()
    def _maybe_initialize(self, flat: torch.Tensor) -> None:
        if bool(self.initialized):
            return
        rows = self._random_rows(flat.detach(), self.num_embeddings)
        self.embedding.data.copy_(rows)
        if self.ema:
            self.embed_sum.copy_(rows)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update_statistics(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA counts (and EMA codebook when `ema`), then restart codes that went dead."""
        counts = counts.clone()
        sums = None
        if self.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)
        if _distributed():
            dist.all_reduce(counts)
            if sums is not None:
                dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.ema:
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (total + self.num_embeddings * self.eps) * total
            self.embedding.copy_(self.embed_sum / smoothed.unsqueeze(1))
        dead = self.cluster_size < self.dead_code_threshold
        num_dead = int(dead.sum())
        if num_dead:
            rows = self._random_rows(flat, num_dead)
            self.embedding.data[dead] = rows
            self.cluster_size[dead] = self.dead_code_threshold
            if self.ema:
                self.embed_sum[dead] = rows * self.dead_code_threshold
