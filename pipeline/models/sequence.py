"""`bst`: Behavior Sequence Transformer (Chen et al., 2019), a teacher that reads the click history.

A transformer encoder runs over [target item, history items] with learned position embeddings and
padding masked; its pooled output joins the other field embeddings and dense features in an MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.encoder import FeatureEncoder, as_logits, mlp


class BST(nn.Module):
    """Sequence and target item share the embedding table of `sequence_field` (via the encoder).

    `pooling`: "attention" reads the transformer output at the target position; "mean" averages it
    over the target and the non-padded history. hidden: the MLP tower's output (B, h).
    """

    def __init__(self, encoder: FeatureEncoder, sequence_field: int, sequence_length: int, hidden: list[int],
                 heads: int, layers: int, pooling: str = "mean", out_dim: int = 1, dropout: float = 0.0):
        super().__init__()
        dim = encoder.dim
        if dim % heads:
            raise ValueError(f"bst: embedding_dim {dim} must be divisible by attention_heads {heads}")
        self.encoder = encoder  # built without sequence pooling: the transformer replaces it
        self.sequence_field, self.pooling = sequence_field, pooling
        self.positions = nn.Embedding(sequence_length + 1, dim)  # position 0 is the target item
        nn.init.normal_(self.positions.weight, std=0.01)
        block = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout, batch_first=True)
        # No nested-tensor fast path: it would zero padded outputs only in eval mode; the mask suffices.
        self.transformer = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.deep = mlp(encoder.output_dim + dim, hidden, dropout)
        self.hidden_dim = hidden[-1]
        self.head = nn.Linear(self.hidden_dim, out_dim)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_with_hidden(inputs)[0]

    def forward_with_hidden(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        behaviour = self._encode_sequence(inputs["categorical"][:, self.sequence_field], inputs["sequence"])
        hidden = self.deep(torch.cat([behaviour, self.encoder(inputs)], dim=1))  # (B, h)
        return as_logits(self.head(hidden)), hidden

    def _encode_sequence(self, target: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([target.unsqueeze(1), seq], dim=1)  # (B, 1 + L)
        tokens = self.encoder.lookup(ids, self.sequence_field)  # (B, 1 + L, dim)
        tokens = tokens + self.positions(torch.arange(ids.shape[1], device=ids.device))
        padding = torch.cat([torch.zeros_like(target, dtype=torch.bool).unsqueeze(1), seq == 0], dim=1)
        out = self.transformer(tokens, src_key_padding_mask=padding)  # (B, 1 + L, dim); target never masked
        if self.pooling == "attention":
            return out[:, 0]  # (B, dim)
        keep = (~padding).to(out.dtype).unsqueeze(-1)  # (B, 1 + L, 1)
        return (out * keep).sum(1) / keep.sum(1)  # (B, dim); >= 1 token (the target) per row
