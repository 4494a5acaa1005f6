"""The CTR model families: `dcn_v2` (teacher or small student) and `mlp` (student)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.encoder import FeatureEncoder, mlp


class CrossNetworkV2(nn.Module):
    """DCN-v2 cross layers (Wang et al., 2021): x_{l+1} = x_0 * (W_l x_l + b_l) + x_l."""

    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x  # (B, K)
        return x


class DCNv2(nn.Module):
    """Parallel DCN-v2: cross network and deep MLP over the encoded features, then one logit."""

    def __init__(self, encoder: FeatureEncoder, hidden: list[int], cross_layers: int):
        super().__init__()
        self.encoder = encoder
        width = encoder.output_dim
        self.cross = CrossNetworkV2(width, cross_layers)
        self.deep = mlp(width, hidden)
        self.head = nn.Linear(width + hidden[-1], 1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x0 = self.encoder(inputs)  # (B, K)
        joined = torch.cat([self.cross(x0), self.deep(x0)], dim=1)
        return self.head(joined).squeeze(-1)  # (B,) logits


class MLPStudent(nn.Module):
    """Embeddings + MLP: the cheap student most teams serve."""

    def __init__(self, encoder: FeatureEncoder, hidden: list[int]):
        super().__init__()
        self.encoder = encoder
        self.deep = mlp(encoder.output_dim, hidden)
        self.head = nn.Linear(hidden[-1], 1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.deep(self.encoder(inputs))).squeeze(-1)  # (B,) logits
