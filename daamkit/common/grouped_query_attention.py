"""Grouped-query self-attention over tokens (the DAT decoders attend across encoder layers) and GQDAAM."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from daamkit.common.density_attention import DensityAdaptiveAttention


class GroupedQueryAttention(nn.Module):
    """Self-attention with `num_query_heads` query heads sharing `num_kv_heads` key/value heads.

    Query heads are split into `num_kv_heads` contiguous groups; every query head of group g attends with
    key/value head g (each query head keeps its own output, nothing is summed). Scores are scaled once by
    1/sqrt(head_dim). Input `[B, N, in_features]` -> output `[B, N, out_features]`; the output projection
    maps the heads back to `out_features` (default `num_query_heads * head_dim`, the paper's; the input width
    for a residual stream `x + attention(x)`).
    `key_padding_mask` (`[B, N]` bool, True = valid) hides padded keys.
    """

    def __init__(self, in_features: int, num_query_heads: int = 8, num_kv_heads: int = 2, head_dim: int = 64,
                 out_features: Optional[int] = None):
        super().__init__()
        if num_query_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_query_heads ({num_query_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.num_query_heads, self.num_kv_heads, self.head_dim = num_query_heads, num_kv_heads, head_dim
        self.embed_dim = num_query_heads * head_dim
        self.q_proj = nn.Linear(in_features, num_query_heads * head_dim)
        self.k_proj = nn.Linear(in_features, num_kv_heads * head_dim)
        self.v_proj = nn.Linear(in_features, num_kv_heads * head_dim)
        self.out_features = self.embed_dim if out_features is None else out_features
        self.out_proj = nn.Linear(self.embed_dim, self.out_features)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        batch, tokens, _ = x.shape
        q = self.q_proj(x).view(batch, tokens, self.num_query_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        group_size = self.num_query_heads // self.num_kv_heads
        k = k.repeat_interleave(group_size, dim=1)  # query head j uses key/value head j // group_size
        v = v.repeat_interleave(group_size, dim=1)
        attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # scale = 1/sqrt(head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, self.embed_dim))


class GQDAAM(nn.Module):
    """DAAM gate across the layer axis, a projection to the attention width, then grouped-query attention.

    `[B, N_layers, num_features]` -> DensityAdaptiveAttention(num_heads, num_features, norm_axis=1)
    -> Linear(num_features -> num_query_heads * head_dim) -> GroupedQueryAttention over the layer tokens,
    whose output is `[B, N, num_query_heads * head_dim]` (the paper's). With `residual=True` the attention
    projects back to `num_features` and the gated input is added, `gated + attention(proj(gated))`, as in a
    transformer block: the output then carries every feature of the gated layers, not only what passes the
    key/value heads (2 x 64 = 128 values per layer by default).
    """

    def __init__(self, num_features: int, num_heads: int = 8, num_query_heads: int = 8, num_kv_heads: int = 2,
                 head_dim: int = 64, init_c: float = 2.0, residual: bool = False):
        super().__init__()
        self.daam = DensityAdaptiveAttention(num_heads, num_features, norm_axis=1, feature_axis=-1, init_c=init_c)
        self.proj = nn.Linear(num_features, num_query_heads * head_dim)
        self.attention = GroupedQueryAttention(num_query_heads * head_dim, num_query_heads, num_kv_heads, head_dim,
                                               out_features=num_features if residual else None)
        self.residual = residual
        self.out_features = self.attention.out_features

    def forward(self, x: Tensor, return_gate: bool = False):
        gated, gate = self.daam(x, return_gate=True)
        out = self.attention(self.proj(gated))
        if self.residual:
            out = gated + out
        return (out, gate) if return_gate else out
