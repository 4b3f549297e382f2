"""S'MoRE's router: the top-down gates that build each token's tree, and their load-balance losses.

Plain functions on tensors (no module state), so tests compare them with hand-written references of the spec's
formulas. A "row" is one (token, parent path) pair: layer l routes T x F_{l+1} rows, each picking f_l children.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

CV_EPS = 1e-10


@dataclass
class GateOut:
    idx: torch.Tensor  # (T, R, f) long: the chosen experts of each row
    alpha: torch.Tensor  # (T, R, f): their weights
    keys: torch.Tensor  # (T, R, f, m): the chosen experts' keys, appended to the children's queries
    aux: Optional[torch.Tensor]  # scalar load-balance loss (gamma included), None for the dense gate or in eval
    load: Optional[torch.Tensor]  # (s,) detached share of the valid rows' picks that went to each expert (sums to 1)
    entropy: Optional[torch.Tensor]  # detached mean entropy (nats) of the router's distribution over valid rows


def row_mask(token_mask: Optional[torch.Tensor], T: int, R: int, device) -> torch.Tensor:
    """(T, R) float weights of the rows: the token's mask (1 = counted) repeated over its parent paths."""
    if token_mask is None:
        return torch.ones(T, R, device=device)
    return token_mask.reshape(T, 1).to(device=device, dtype=torch.float32).expand(T, R)


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var/mean^2 (unbiased variance, as the official code; 0 for one expert)."""
    x = x.float()
    if x.numel() == 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + CV_EPS)


def _entropy(probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    ent = -(probs.float() * probs.float().clamp_min(1e-20).log()).sum(-1)
    return (ent * rows).sum() / rows.sum().clamp_min(1.0)


def switch_gate(z, keys, fanout: int, gamma: float, rows: torch.Tensor, stats: bool) -> GateOut:
    """MixLoRA's switch gate: pi = softmax(z K^T), top-f of pi renormalised (f > 1), aux = gamma * s * sum_e frac_e *
    mean_pi_e over the valid rows (frac_e = share of rows that pick e; sums to f)."""
    logits = z @ keys.t()
    probs = F.softmax(logits.float(), dim=-1)
    alpha, idx = probs.topk(fanout, dim=-1)
    if fanout > 1:
        alpha = alpha / alpha.sum(-1, keepdim=True)
    s = keys.shape[0]
    aux = load = entropy = None
    if stats:
        n = rows.sum().clamp_min(1.0)
        picks = F.one_hot(idx, s).float() * rows[..., None, None]  # (T, R, f, s)
        frac = picks.sum(dim=(0, 1, 2)) / n
        mean_p = (probs * rows[..., None]).sum(dim=(0, 1)) / n
        aux = gamma * s * (frac * mean_p).sum()
        load = (frac / fanout).detach()
        entropy = _entropy(probs, rows).detach()
    return GateOut(idx, alpha.to(z.dtype), keys[idx], aux, load, entropy)


def dense_gate(z, keys, rows: torch.Tensor, stats: bool) -> GateOut:
    """HydraLoRA-style: every expert, weighted by softmax(z K^T); no auxiliary loss."""
    probs = F.softmax((z @ keys.t()).float(), dim=-1)
    T, R, s = probs.shape
    idx = torch.arange(s, device=z.device).expand(T, R, s)
    load = entropy = None
    if stats:
        n = rows.sum().clamp_min(1.0)
        load = ((probs * rows[..., None]).sum(dim=(0, 1)) / n).detach()
        entropy = _entropy(probs, rows).detach()
    return GateOut(idx, probs.to(z.dtype), keys[idx], None, load, entropy)


def noisy_topk_gate(
    z, q, keys, noise_weight, fanout: int, gamma: float, epsilon: float, rows: torch.Tensor, training: bool, stats: bool
) -> GateOut:
    """Shazeer et al. (2017) as the official code: g = cos(z, K); in training + eps_noise * (softplus(q N^T) + epsilon)
    with eps_noise ~ N(0, 1); alpha = softmax over the f selected logits (the raw logit when f = 1); aux = gamma *
    (cv^2(importance) + cv^2(load)) with the smooth load estimate in training."""
    zn = F.normalize(z, p=2, dim=-1)
    kn = F.normalize(keys, p=2, dim=-1)
    clean = zn @ kn.t()
    noise_std = None
    if training:
        noise_std = F.softplus(q @ noise_weight.t()) + epsilon
        logits = clean + torch.randn_like(clean) * noise_std
    else:
        logits = clean
    s = keys.shape[0]
    top_logits, top_idx = logits.topk(min(fanout + 1, s), dim=-1)
    idx = top_idx[..., :fanout]
    sel = top_logits[..., :fanout]
    alpha = F.softmax(sel.float(), dim=-1).to(z.dtype) if fanout > 1 else sel
    aux = load = entropy = None
    if stats:
        scattered = torch.zeros_like(logits).scatter(-1, idx, alpha.to(logits.dtype))
        importance = (scattered * rows[..., None].to(scattered.dtype)).sum(dim=(0, 1))
        if training and noise_std is not None:
            threshold_in = top_logits[..., fanout : fanout + 1]
            threshold_out = top_logits[..., fanout - 1 : fanout]
            normal = torch.distributions.Normal(0.0, 1.0)
            p_in = normal.cdf((clean - threshold_in) / noise_std)
            p_out = normal.cdf((clean - threshold_out) / noise_std)
            prob = torch.where(logits > threshold_in, p_in, p_out)
            smooth_load = (prob * rows[..., None]).sum(dim=(0, 1))
        else:
            # picks counted (the official code's `scattered > 0` misses a top-1 pick whose raw logit is <= 0)
            smooth_load = (F.one_hot(idx, s).to(logits.dtype) * rows[..., None, None]).sum(dim=(0, 1, 2))
        aux = gamma * (cv_squared(importance) + cv_squared(smooth_load))
        counts = (F.one_hot(idx, s).float() * rows[..., None, None]).sum(dim=(0, 1, 2))
        load = (counts / counts.sum().clamp_min(1.0)).detach()
        entropy = _entropy(F.softmax(logits.float(), dim=-1), rows).detach()
    return GateOut(idx, alpha, kn[idx], aux, load, entropy)
