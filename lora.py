"""LoRA (Hu et al. 2021): low-rank adapters on a LLaMA's linear layers, off by default.

The paper trains every weight; --lora-rank on train_sft.py and train_rm.py trains adapters
instead, for a researcher with one GPU. A LoRALinear keeps its base weight under the weight's
own name, so a checkpoint's names are those of the plain model, and merge_lora folds each update
into its weight when a checkpoint is written (pretrained.save_model): every checkpoint is an
ordinary LLaMA. This file knows nothing of the model beyond nn.Linear and the name `.layers.`
its blocks sit under.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):
    """y = x·Wᵀ + (α/r)·x·Aᵀ·Bᵀ: a frozen weight W and a trainable low-rank update B·A (LoRA,
    Hu et al. 2021), for a researcher with one GPU (the paper trains every weight). A (r × in)
    starts random and B (out × r) at zero, so the adapted model starts as the base model. The
    weight keeps its name, so a checkpoint's names are unchanged; merged_weight() folds the
    update in for export (merge_lora), and every checkpoint stays a plain LLaMA."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.weight.requires_grad_(False)

    def forward(self, x):
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_b @ self.lora_a)


class SettingError(ValueError):
    """A setting that does not fit the model (LoRA's targets or rank): a command line prints it
    as one line and exits 2 (safety.run_main)."""

    for_the_user = True


def check_lora(model: nn.Module, rank: int, targets: list[str]):
    """LoRA's flags against a model (on the meta device: before any data or weight is read):
    every target is a linear layer of the blocks, and the rank is at most min(in, out) of each
    (an update B·A of a larger rank has no more freedom than the weight itself, only more
    memory)."""
    linears = {
        name.rsplit(".", 1)[-1]: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and ".layers." in f".{name}"
    }
    unknown = [t for t in targets if t not in linears]
    if unknown:
        raise SettingError(
            f"--lora-targets {' '.join(unknown)}: no such linear layer in the blocks (they have {', '.join(linears)})"
        )
    most = min(min(linears[t].in_features, linears[t].out_features) for t in targets)
    if not 1 <= rank <= most:
        raise SettingError(
            f"--lora-rank {rank}: must be between 1 and {most}, the smaller side of the smallest of {' '.join(targets)}"
        )


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> list[str]:
    """Replace the linear layers named `targets` (q_proj, v_proj, …) of every block of `model`
    (a Transformer, or a module holding one) by LoRALinear, keeping their weights, and freeze
    everything but the LoRA matrices. Works on the meta device, before sharding. Returns the
    names of the new trainable parameters (to be initialised by lora_init)."""
    check_lora(model, rank, targets)
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets and isinstance(mod, nn.Linear) and ".layers." in f".{name}"
    ]
    model.requires_grad_(False)
    for name, linear in found:
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        lora = LoRALinear(
            linear.in_features, linear.out_features, rank, alpha, device=linear.weight.device, dtype=linear.weight.dtype
        )
        lora.weight = linear.weight
        lora.weight.requires_grad_(False)
        setattr(parent, name.rsplit(".", 1)[-1], lora)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def lora_init(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Starting values of every LoRA matrix of `model`, by name: A ~ U(±1/√in) (the bound
    kaiming_uniform_(a=√5) gives, as PEFT initialises A), B = 0."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            bound = 1 / math.sqrt(mod.in_features)
            out[f"{name}.lora_a"] = (torch.rand(mod.rank, mod.in_features, generator=gen) * 2 - 1) * bound
            out[f"{name}.lora_b"] = torch.zeros(mod.out_features, mod.rank)
    return out


def merge_lora(model: nn.Module, state_dict: dict) -> dict:
    """`state_dict` (of `model`, full) with each LoRA layer's update folded into its weight,
    W + (α/r)·B·A computed in fp32 at least, and the LoRA matrices gone: an ordinary LLaMA's tensors."""
    sd = dict(state_dict)
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear) and f"{name}.lora_a" in sd:
            a, b, w = sd.pop(f"{name}.lora_a"), sd.pop(f"{name}.lora_b"), sd[f"{name}.weight"]
            acc = torch.promote_types(w.dtype, torch.float32)  # bf16 weights merge in fp32, fp64 stay fp64
            sd[f"{name}.weight"] = (w.to(acc) + mod.scale * (b.to(acc) @ a.to(acc))).to(w.dtype)
    return sd
