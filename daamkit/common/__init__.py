"""The DAAM core shared by the VQ-VAE and the classifier suite (no imports from vqvae/classify)."""

from daamkit.common.density_attention import DensityAdaptiveAttention
from daamkit.common.grouped_query_attention import GQDAAM, GroupedQueryAttention
from daamkit.common.importance import (
    ImportanceAccumulator,
    importance_factor,
    importance_figures,
    layer_shares,
    rank_layers,
    save_importance_figures,
)
from daamkit.common.mixture_attention import DensityBlock, MixtureDensityAdaptiveAttention

__all__ = [
    "DensityAdaptiveAttention",
    "MixtureDensityAdaptiveAttention",
    "DensityBlock",
    "GroupedQueryAttention",
    "GQDAAM",
    "ImportanceAccumulator",
    "importance_factor",
    "importance_figures",
    "layer_shares",
    "rank_layers",
    "save_importance_figures",
]
