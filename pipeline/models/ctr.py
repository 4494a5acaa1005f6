"""Embedding + MLP families: `dcn_v2` (teacher or small student) and `mlp` (student).

Every model here maps the inputs dict to logits, (B,) for out_dim 1 or (B, C), and exposes
`forward_with_hidden` (logits plus the (B, hidden_dim) vector the head reads) for hint losses.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.encoder import FeatureEncoder, as_logits, mlp


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
    """Parallel DCN-v2: cross network and deep MLP over the encoded features, then the head."""

    def __init__(self, encoder: FeatureEncoder, hidden: list[int], cross_layers: int, out_dim: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        width = encoder.output_dim
        self.cross = CrossNetworkV2(width, cross_layers)
        self.deep = mlp(width, hidden, dropout)
        self.hidden_dim = width + hidden[-1]
        self.head = nn.Linear(self.hidden_dim, out_dim)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_with_hidden(inputs)[0]

    def forward_with_hidden(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = self.encoder(inputs)  # (B, K)
        joined = torch.cat([self.cross(x0), self.deep(x0)], dim=1)  # (B, K + h)
        return as_logits(self.head(joined)), joined


class MLPStudent(nn.Module):
    """Embeddings + MLP: the cheap student most teams serve."""

    def __init__(self, encoder: FeatureEncoder, hidden: list[int], out_dim: int = 1, dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.deep = mlp(encoder.output_dim, hidden, dropout)
        self.hidden_dim = hidden[-1]
        self.head = nn.Linear(self.hidden_dim, out_dim)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_with_hidden(inputs)[0]

    def forward_with_hidden(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.deep(self.encoder(inputs))  # (B, h)
        return as_logits(self.head(hidden)), hidden
