"""A trainable LoRA on a UNet's attention projections with ``peft``, put in for a training run and taken out after.

:func:`attach` injects peft's LoRA layers (``peft.inject_adapter_in_model``, what diffusers' ``add_adapter``
calls) into the UNet's ``to_q``/``to_k``/``to_v``/``to_out.0`` linears, with ``lora_alpha = rank``, no
dropout, and factors initialised from a seeded CPU generator (peft's rule: ``down`` uniform in
``+-1/sqrt(in)``, ``up`` zero, so training starts from the base model), kept in float32 whatever the UNet's
dtype. :func:`detach` puts the original linear modules back, so the caller's UNet is as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .lora import TARGET_MODULES

__all__ = ["LoraLayers", "attach", "detach", "require_peft", "target_names"]

_ADAPTER = "dafusion_aug"


def target_names(unet: nn.Module) -> list[str]:
    """The names of the UNet's linear attention projections a class LoRA adapts, in module order."""
    return [name for name, m in unet.named_modules()
            if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGET_MODULES)
            and ".attn" in f".{name}"]


@dataclass
class LoraLayers:
    """The injected layers: module name -> ``(down, up)`` weights (the trained parameters)."""

    names: list[str]
    down: list[nn.Parameter]
    up: list[nn.Parameter]
    rank: int

    def params(self) -> list[nn.Parameter]:
        """Every factor, module by module (down, up): the optimizer's order."""
        return [p for pair in zip(self.down, self.up) for p in pair]


def require_peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("lora_rank > 0 needs peft: pip install 'dafusion-aug[lora]' (or pip install peft)") from e
    return peft


def attach(unet: nn.Module, rank: int, seed: int) -> LoraLayers:
    """Inject a rank-``rank`` LoRA into every attention projection of ``unet`` (see the module's docstring).

    Raises:
        ValueError: the UNet has no attention projections, or already holds peft layers.
        ImportError: peft is not installed.
    """
    peft = require_peft()
    names = target_names(unet)
    if not names:
        raise ValueError("the UNet has no attention projections (to_q, to_k, to_v, to_out.0) to put a LoRA on")
    if any(hasattr(unet.get_submodule(n), "base_layer") for n in names) or getattr(unet, "_hf_peft_config_loaded", False):
        raise ValueError("the UNet already holds LoRA adapters (peft layers); fit tokens with LoRA on a pipeline without them")
    config = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=names, init_lora_weights=True)
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    peft.inject_adapter_in_model(config, unet, adapter_name=_ADAPTER)
    for p, flag in flags:  # peft freezes every other parameter; the caller's flags are the caller's
        p.requires_grad_(flag)
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    layers = LoraLayers(names, [], [], rank)
    try:
        for name in names:
            module = unet.get_submodule(name)
            a, b = module.lora_A[_ADAPTER], module.lora_B[_ADAPTER]
            fan_in = a.weight.shape[1]
            with torch.no_grad():
                down = (torch.rand(a.weight.shape, generator=gen) * 2 - 1) / math.sqrt(fan_in)
                a.weight = nn.Parameter(down.to(a.weight.device))
                b.weight = nn.Parameter(torch.zeros(b.weight.shape, device=b.weight.device))
            layers.down.append(a.weight)
            layers.up.append(b.weight)
    except BaseException:
        detach(unet, names)
        raise
    return layers


def detach(unet: nn.Module, names: list[str]) -> None:
    """Put the original linear modules back where :func:`attach` wrapped them (the wrapped weights are the
    originals themselves, untouched)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        module = getattr(parent, child)
        if hasattr(module, "base_layer"):
            setattr(parent, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in unet.__dict__:
            delattr(unet, attr)
