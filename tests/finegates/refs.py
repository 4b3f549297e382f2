"""Hand-written references of the FineGates equations (spec: shared/design/methods/finegates.md), in float64 with
plain torch ops. Nothing here calls peft_ext's FineGates helpers: the tests compare the tuner against these."""

from __future__ import annotations

import math

import torch
from torch import nn

from peft_ext import FineGatesConfig  # (importing peft_ext registers FINEGATES with PEFT)

F64 = torch.float64
OPEN_AT = math.atanh(0.5)  # 0.5493: eval gate is 1 from here up, 0 from -here down


# ------------------------------------------------------------------------------------------------ gate math
def eval_gate(theta: torch.Tensor) -> torch.Tensor:
    """z = clamp(tanh(theta) + 0.5, 0, 1)."""
    return torch.clamp(torch.tanh(theta.detach().to(F64)) + 0.5, 0.0, 1.0)


def train_gate(theta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = clamp(tanh(theta) + eps + 0.5, 0, 1)."""
    return torch.clamp(torch.tanh(theta.detach().to(F64)) + eps.to(F64) + 0.5, 0.0, 1.0)


def phi(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF, element by element with math.erf."""
    flat = [0.5 * (1.0 + math.erf(float(v) / math.sqrt(2.0))) for v in x.reshape(-1).tolist()]
    return torch.tensor(flat, dtype=F64).reshape(x.shape)


def keep_prob(theta: torch.Tensor, reg_sigma: float = 0.5) -> torch.Tensor:
    """p = Phi((tanh(theta) + 0.5) / reg_sigma)."""
    return phi((torch.tanh(theta.detach().to(F64)) + 0.5) / reg_sigma)


def target_loss(theta_r, theta_c, target_sparsity: float, reg_sigma: float = 0.5) -> float:
    """1/2 (|mean p_r - k| + |mean p_c - k|), k = 1 - target_sparsity."""
    k = 1.0 - target_sparsity
    pr, pc = keep_prob(theta_r, reg_sigma), keep_prob(theta_c, reg_sigma)
    return 0.5 * (abs(pr.mean().item() - k) + abs(pc.mean().item() - k))


def l0_loss(theta_r, theta_c, reg_sigma: float = 0.5) -> float:
    """The mean of all of the layer's keep probabilities (rows and columns together)."""
    return torch.cat([keep_prob(theta_r, reg_sigma), keep_prob(theta_c, reg_sigma)]).mean().item()


def official_kurtosis(matrix: torch.Tensor) -> torch.Tensor:
    """jsvir/FineGates model.py SparseLayer.kurtosis(matrix, dim=0): sqrt(mean over dim 0 of z-score^4), unbiased
    std, NaN z-scores (zero std) set to 0."""
    std = torch.std(matrix, 0, keepdim=True)
    mu = torch.mean(matrix, 0, keepdim=True)
    z = (matrix - mu) / std
    z = torch.where(torch.isnan(z), torch.zeros_like(z), z)
    return torch.mean(z.pow(4), 0).sqrt()


def official_kurtosis_loss(x, weight, theta_r, theta_c, target_sparsity, tau) -> float:
    """The official SparseLayer.forward (kurt=True) + compute_kurtosis_weights + sparsity_loss, in float64."""
    x_reduced = x.to(F64).mean(0).mean(0).unsqueeze(0)  # (B, T, n) -> (1, n)
    rows_open = torch.nonzero(eval_gate(theta_r) > 0, as_tuple=True)[0]
    cols_open = torch.nonzero(eval_gate(theta_c) > 0, as_tuple=True)[0]
    activations = (x_reduced * weight.detach().to(F64))[rows_open][:, cols_open]
    col_w = torch.softmax(-official_kurtosis(activations) / tau, dim=0)
    row_w = torch.softmax(-official_kurtosis(activations.T) / tau, dim=0)
    # official GatesVector.sparsity_loss: 0.5 - 0.5 erf((-0.5 - mu) / (0.5 sqrt 2)) = Phi((mu + 0.5) / 0.5)
    pr = 0.5 - 0.5 * torch.erf((-0.5 - torch.tanh(theta_r.detach().to(F64))) / (0.5 * math.sqrt(2)))
    pc = 0.5 - 0.5 * torch.erf((-0.5 - torch.tanh(theta_c.detach().to(F64))) / (0.5 * math.sqrt(2)))
    means = torch.stack(((pr[rows_open] * row_w).sum(), (pc[cols_open] * col_w).sum()))
    return (means - (1.0 - target_sparsity)).abs().mean().item()


# --------------------------------------------------------------------------------------------- layer maths
def dense_weight(module: nn.Module) -> torch.Tensor:
    """(out, in) float64 weight of nn.Linear / transformers Conv1D (stored (in, out))."""
    w = module.weight.detach().to(F64)
    return w.T if type(module).__name__ == "Conv1D" else w


def adapter_parts(layer, name: str, scale: float = 1.0) -> dict:
    """What a FineGatesLayer holds for adapter `name`, in float64: eval gates (1 for an ungated side), LoRA
    product s B A with s = `scale` = lora_alpha / lora_r from the test's config (zeros without LoRA), bias delta
    (zeros without)."""
    m, n = layer.out_features, layer.in_features
    zr = eval_gate(layer.gates_row_logits[name]) if name in layer.gates_row_logits else torch.ones(m, dtype=F64)
    zc = eval_gate(layer.gates_col_logits[name]) if name in layer.gates_col_logits else torch.ones(n, dtype=F64)
    lora = torch.zeros(m, n, dtype=F64)
    if name in layer.gates_lora_A:
        a, b = layer.gates_lora_A[name].weight.detach().to(F64), layer.gates_lora_B[name].weight.detach().to(F64)
        lora = scale * b @ a
    delta = layer.gates_bias[name].detach().to(F64) if name in layer.gates_bias else torch.zeros(m, dtype=F64)
    return {"zr": zr, "zc": zc, "lora": lora, "delta": delta}


def gated_linear(x, weight, bias, zr, zc, lora=None, delta=None) -> torch.Tensor:
    """y = z_r * ((x * z_c) (W + s B A)^T + b + delta), float64; weight (out, in)."""
    x = x.to(F64)
    w = weight.to(F64) + (lora if lora is not None else 0.0)
    y = (x * zc) @ w.T
    if bias is not None:
        y = y + bias.detach().to(F64)
    if delta is not None:
        y = y + delta
    return y * zr


def folded_weight(weight, zr, zc, lora=None) -> torch.Tensor:
    """W' = diag(z_r) (W + s B A) diag(z_c)."""
    w = weight.to(F64) + (lora if lora is not None else 0.0)
    return zr[:, None] * w * zc[None, :]


# -------------------------------------------------------------------------------------------- small models
class Net(nn.Module):
    """One linear layer (name `lin`) plus a second one (`lin2`), for layer-level checks on plain modules."""

    def __init__(self, n_in=16, n_mid=24, n_out=8, bias=True):
        super().__init__()
        self.lin = nn.Linear(n_in, n_mid, bias=bias)
        self.lin2 = nn.Linear(n_mid, n_out, bias=bias)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin(x)))


def net(seed=0, **kw) -> Net:
    torch.manual_seed(seed)
    model = Net(**kw).eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0, 0.2)
    return model


def config(**kw) -> FineGatesConfig:
    return FineGatesConfig(**{"target_modules": ["lin", "lin2"], "seed": 0, **kw})


def gated_layers(model) -> dict:
    """name (without the PEFT prefix) -> FineGatesLayer."""
    from peft_ext.tuners.finegates import FineGatesLayer

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, FineGatesLayer):
            out[name.removeprefix("base_model.model.")] = mod
    return out


def set_logits(param: torch.Tensor, values) -> None:
    with torch.no_grad():
        param.copy_(torch.as_tensor(values, dtype=param.dtype))


def randomize_biases(model, seed=1, std=0.1) -> None:
    """HF initialises biases to 0; random ones make the bias handling visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            b = getattr(mod, "bias", None)
            if isinstance(b, nn.Parameter) and b.dim() == 1 and not isinstance(mod, nn.LayerNorm):
                b.copy_(torch.randn(b.shape, generator=g) * std)
