"""BitDelta's format: a delta stored as alpha * sign(dW), one bit per weight plus one fp32 scale per matrix.

The signs are bit-packed along in_features with the same int32 words as delta_format (bit i % 32 of word
(i // 32, o) is 1 where dW[o, i] > 0). It is the baseline Delta-CoMe is compared with; its forward
(`sign_delta_part`) unpacks to a dense +-alpha matrix, which is fine for a baseline and not a serving path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .delta_format import pack_bitplanes, unpack_bitplanes, words_per_column


@dataclass
class SignDelta:
    out_features: int
    in_features: int
    words: torch.Tensor  # int32 (ceil(in / 32), out)
    alpha: torch.Tensor  # fp32 scalar tensor (shape (1,))

    @classmethod
    def from_delta(cls, delta: torch.Tensor) -> "SignDelta":
        """alpha initialised to mean |dW| (BitDelta's closed-form start; distillation may refine it)."""
        out_features, in_features = delta.shape
        words = pack_bitplanes((delta > 0).T.to(torch.int64), 1)[0]
        return cls(out_features, in_features, words, delta.abs().float().mean().reshape(1))

    @classmethod
    def empty(cls, out_features: int, in_features: int, device=None) -> "SignDelta":
        words = torch.zeros(words_per_column(in_features), out_features, dtype=torch.int32, device=device)
        return cls(out_features, in_features, words, torch.zeros(1, device=device))

    @property
    def nbytes(self) -> int:
        return self.words.numel() * 4 + self.alpha.numel() * 4

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        signs = unpack_bitplanes(self.words.unsqueeze(0), self.in_features).T.float() * 2 - 1
        return (signs * self.alpha).to(dtype)


def sign_delta_part(x: torch.Tensor, delta: SignDelta) -> torch.Tensor:
    return x.float() @ delta.dense(torch.float32).T
