"""Built-in text conditioning: a byte-level tokenizer and a small transformer encoder.

Both are self-contained (no downloads), so the foundation milestone trains end to end on a
laptop. A pretrained encoder (T5, CLIP) can replace them later behind the same
`(ids, mask) -> [B, L, dim]` contract.

    >>> tok = ByteTokenizer()
    >>> ids, mask = tok(["a red square moves left"], max_len=32)
    >>> enc = TextEncoder(TextEncoderArgs(dim=64, depth=2, num_heads=4))
    >>> enc(ids, mask).shape
    torch.Size([1, 32, 64])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from worldline.models.attention import attention
from worldline.models.init import reset_default_parameters

__all__ = ["ByteTokenizer", "TextEncoderArgs", "TextEncoder"]


class ByteTokenizer:
    """UTF-8 byte tokenizer: ids 0/1/2 are pad/bos/eos, byte b maps to id b + 3 (vocab 259).

    No training and no vocabulary file, so it never drifts between runs or machines.
    """

    pad_id = 0
    bos_id = 1
    eos_id = 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        """Token ids of one string, without bos/eos."""
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int] | Tensor) -> str:
        """Inverse of `encode`; special ids are dropped."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        data = bytes(i - self.offset for i in ids if i >= self.offset)
        return data.decode("utf-8", errors="replace")

    def __call__(self, texts: list[str], max_len: int) -> tuple[Tensor, Tensor]:
        """Tokenize a batch to a fixed length (static shapes keep compile and FSDP happy).

        Returns:
            ids [B, max_len] long: bos, bytes (truncated to max_len - 2), eos, pad...
            mask [B, max_len] bool: True on real tokens (bos..eos).
        """
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold bos and eos, got {max_len}")
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_len), dtype=torch.bool)
        for i, text in enumerate(texts):
            toks = [self.bos_id] + self.encode(text)[: max_len - 2] + [self.eos_id]
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[i, : len(toks)] = True
        return ids, mask


@dataclass
class TextEncoderArgs:
    vocab_size: int = 259
    max_len: int = 64
    dim: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0


class _EncoderBlock(nn.Module):
    """Pre-norm transformer block with a key-padding mask (bidirectional)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v, key_padding_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class TextEncoder(nn.Module):
    """Small bidirectional transformer over byte tokens with learned absolute positions."""

    def __init__(self, args: TextEncoderArgs) -> None:
        super().__init__()
        if args.dim % args.num_heads:
            raise ValueError(f"text dim {args.dim} not divisible by num_heads {args.num_heads}")
        self.args = args
        self.tok_emb = nn.Embedding(args.vocab_size, args.dim)
        self.pos_emb = nn.Parameter(torch.zeros(args.max_len, args.dim))
        self.blocks = nn.ModuleList(
            _EncoderBlock(args.dim, args.num_heads, args.mlp_ratio) for _ in range(args.depth)
        )
        self.norm = nn.LayerNorm(args.dim)
        # The layers' constructors already drew torch's default init; only ours is left.
        self._init_custom()

    def init_weights(self) -> None:
        """Re-initialize every parameter from scratch, drawing from the RNG exactly as
        construction did (torch's default layer init, then ours); see models/init.py."""
        reset_default_parameters(self)
        self._init_custom()

    @torch.no_grad()
    def _init_custom(self) -> None:
        """Our init on top of torch's defaults: small normal embeddings, xavier linears."""
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids [B, L] long, mask [B, L] bool (True = real token) -> [B, L, dim].

        Outputs at padded positions are zeroed so downstream pooling or caching never sees
        stale values.
        """
        length = ids.shape[1]
        if length > self.args.max_len:
            raise ValueError(f"text length {length} exceeds max_len {self.args.max_len}")
        x = self.tok_emb(ids) + self.pos_emb[:length]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x) * mask[..., None].to(x.dtype)

    def num_params(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self, text_len: int) -> float:
        """Training FLOPs (fwd+bwd) for one sequence of `text_len` tokens.

        6 * P_matmul * L + 12 * depth * L^2 * dim, where P_matmul counts the Linear weights
        (embeddings are lookups, not matmuls).
        """
        p_matmul = sum(m.weight.numel() for m in self.blocks.modules() if isinstance(m, nn.Linear))
        d = self.args.dim
        return float(6 * p_matmul * text_len + 12 * self.args.depth * text_len**2 * d)
