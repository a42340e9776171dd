"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): a frozen linear layer W plus a trained
low-rank update, y = W x + b + (alpha / r) B A dropout(x), A of shape (r, in), B of shape (out, r).

`LoRALinear` is an nn.Linear with two more parameters, so the base weights keep their names
(`layers.0.attention.wq.weight`) and a LoRA run loads any base checkpoint; the adapters are
`...wq.lora_A` and `...wq.lora_B`. A starts like nn.Linear's default (Kaiming-uniform) and B at
zero, so the adapted model computes exactly the base model before the first step (PEFT's default).

Merging folds the update into W (W + (alpha / r) B A) and swaps each LoRALinear back for a plain
nn.Linear: `lmforge.load`, `lmforge generate` and the exports use the merged model, which runs at
the base model's speed. `merge_state` does the same on a state dict (for exports).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import LoraConfig
from lmforge.errors import ConfigError
from lmforge.models import blocks, spec_of

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


class LoRALinear(nn.Linear):
    """An nn.Linear (weight, bias: the base, frozen) with adapters lora_A (r, in) and lora_B (out, r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base's parameters are reused, not allocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, device=device, dtype=dtype))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A: Kaiming-uniform as nn.Linear's default init (PEFT's too); B: zeros (the update starts at 0)."""
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.dropout, nn.Dropout) and self.training:  # the adapters see another input
            update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
            return F.linear(x, self.weight, self.bias) + self.scaling * update
        return _LoRALinearFn.apply(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing W + scaling * B A (the same parameters' device and dtype)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            linear.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype))
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.shape[0]}, scaling={self.scaling:g}"


class _LoRALinearFn(torch.autograd.Function):
    """x W^T + b + s (x A^T) B^T with the update added by the matmul itself (addmm's alpha), and a
    backward that computes only what autograd asks for: the frozen W's gradient never. Against
    the composite (linear, linear, linear, mul, add) it saves the (tokens, out) scale-and-add
    passes forward and backward and one read of x; measured in benchmarks/lora_bench.py.
    In the autocast dtype when autocast is on, as nn.Linear."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scaling: float) -> Tensor:  # fmt: skip
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in)
        weight_c, a_c, b_c = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        with torch.autocast(device, enabled=False):
            h = x2 @ a_c.t()  # (N, r)
            out = x2 @ weight_c.t() if bias is None else torch.addmm(bias.to(dtype), x2, weight_c.t())
            out.addmm_(h, b_c.t(), alpha=scaling)  # (N, out)
        ctx.save_for_backward(x2, h, weight_c, a_c, b_c)
        ctx.scaling, ctx.x_dtype, ctx.has_bias = scaling, x.dtype, bias is not None
        ctx.param_dtypes = (weight.dtype, lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x2, h, weight_c, a_c, b_c = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)  # (N, out)
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        gh = g @ b_c  # (N, r): the gradient at x A^T, before the scale
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x = (g @ weight_c).addmm_(gh, a_c, alpha=s).view(*grad_out.shape[:-1], -1).to(ctx.x_dtype)
        if need_w:
            grad_w = (g.t() @ x2).to(ctx.param_dtypes[0])
        if need_b and ctx.has_bias:
            grad_bias = g.sum(0).to(ctx.param_dtypes[0])
        if need_a:
            grad_a = (gh.t() @ x2).mul_(s).to(ctx.param_dtypes[1])  # (r, in)
        if need_lb:
            grad_b = (g.t() @ h).mul_(s).to(ctx.param_dtypes[2])  # (out, r)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


def target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """The block-relative names of the linear layers that `targets` select (sorted, each once).

    A target is a group of the family (`attention`, `mlp`: its FamilySpec's lora_groups) or a
    module name matched on whole name parts at either end: `wq` selects attention.wq, `c_proj`
    selects both attn.c_proj and mlp.c_proj, `attn.c_proj` only the first. A target that selects
    nothing is an error naming it and what exists.
    """
    spec = spec_of(model)
    block = next(iter(blocks(model).values()), None)
    if block is None:  # a pipeline stage without blocks
        return []
    linears = [name for name, module in block.named_modules() if isinstance(module, nn.Linear)]
    chosen: set[str] = set()
    for target in targets:
        if target in spec.lora_groups:
            chosen.update(spec.lora_groups[target])
            continue
        parts = target.split(".")
        found = [
            n for n in linears if n.split(".")[: len(parts)] == parts or n.split(".")[-len(parts) :] == parts
        ]
        if not found:
            raise ConfigError(
                f"config key 'lora.targets': {target!r} names no linear layer of a {spec.name} block "
                f"(groups: {', '.join(spec.lora_groups)}; layers: {', '.join(linears)})"
            )
        chosen.update(found)
    return sorted(chosen)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> None:
    """With cfg.rank > 0: freeze every parameter of `model` (a whole model or a pipeline stage) and
    swap the target linears of every block for LoRALinear; the adapters alone train."""
    if cfg.rank == 0:
        return
    names = target_modules(model, cfg.targets)
    model.requires_grad_(False)
    if getattr(model, "classifier", None) is not None:  # a new head trains whole (PEFT's modules_to_save)
        model.classifier.requires_grad_(True)
    if cfg.embeddings:  # new tokens' rows must learn: the embedding and output head train whole
        stages = spec_of(model).stages
        for name in (stages.embedding, stages.head):
            module = getattr(model, name)
            if module is not None:
                module.requires_grad_(True)
    for block in blocks(model).values():
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            base = getattr(parent, child)
            if type(base) is not nn.Linear:  # a fused or float8 swap got there first
                raise ConfigError(
                    f"config key 'lora.targets': {name} is a {type(base).__name__}, not an nn.Linear "
                    "(LoRA does not combine with train.fused_projections or train.float8)"
                )
            setattr(parent, child, LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout))


def reset_adapters(model: nn.Module) -> None:
    """Initialise every adapter again (after a meta-device build is materialised with to_empty)."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.reset_adapter()


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear of `model` by its merged nn.Linear, in place; returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged())
    return model


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter's (`...lora_A`, `...lora_B`)."""
    return name.endswith(ADAPTER_SUFFIXES)


def merge_state(state: Mapping[str, Tensor], cfg: LoraConfig) -> dict[str, Tensor]:
    """A state dict with adapters -> the merged one: each `X.weight` gets scaling * `X.lora_B` @
    `X.lora_A` added, and the adapters are left out."""
    scaling = cfg.alpha / cfg.rank if cfg.rank else 0.0
    out = {name: tensor for name, tensor in state.items() if not is_adapter(name)}
    for name in (n for n in state if n.endswith(".lora_A")):
        module = name.removesuffix(".lora_A")
        weight = out[f"{module}.weight"]
        delta = (state[f"{module}.lora_B"].float() @ state[name].float()) * scaling
        out[f"{module}.weight"] = (weight.float() + delta).to(weight.dtype)
    return out


def adapter_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Only the adapters of a state dict."""
    return {name: tensor for name, tensor in state.items() if is_adapter(name)}
