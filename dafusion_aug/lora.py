"""Class LoRA: low-rank updates of the UNet's attention layers, trained beside the class tokens.

:func:`~dafusion_aug.fit_tokens` with ``lora_rank=r`` trains, with the tokens, a LoRA (Hu et al. 2021)
on every attention projection of the UNet (``to_q``, ``to_k``, ``to_v``, ``to_out.0``: diffusers' and
Diff-Mix's targets), with ``peft``. The result is a :class:`ClassLora`: its file is in diffusers' LoRA
layout (``unet.<module>.lora.down.weight`` ``(r, in)`` and ``unet.<module>.lora.up.weight`` ``(out, r)``,
``lora_alpha = r``), so plain diffusers loads it with ``pipe.load_lora_weights(path)``, with dafusion-aug's
facts in the header's metadata.

dafusion-aug applies a LoRA by fusing it: each targeted weight ``W`` becomes ``W + (alpha / r) * up @ down``
(computed in float32, cast to the weight's dtype) and the original tensors are kept on the pipeline, so
:meth:`ClassLora.restore` puts them back bitwise, as :class:`~dafusion_aug.Erasure` does. Like an erasure's,
the file records a digest of the base model's values of the targeted weights; a pipeline whose values
differ (another model) is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import TensorHeader, check_tensor_headers, read_safetensors, save_safetensors
from .erasure import _values_digest, base_digests
from .errors import LoraFileError, PipelineError
from .families import family_of, requires_family

__all__ = ["ClassLora", "LORA_FORMAT", "TARGET_MODULES", "LoraFileError"]

LORA_FORMAT = "dafusion-aug/lora/1"
#: The attention projections a class LoRA adapts (peft's ``target_modules``).
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
_MAX_RANK = 1024
_MAX_ELEMENTS = 1 << 26  # 64 Mi elements per matrix (SDXL's widest rank-1024 factor is 10 Mi)
_MAX_BYTES = 4 << 30
_BASE_DOMAIN = b"dafusion-aug/lora-base/1"
_KEY = re.compile(r"^(?:unet\.)?(?P<module>.+)\.(?:lora\.(?P<du>down|up)|lora_(?P<ab>A|B))\.weight$")


def _parse_key(key: str) -> tuple[str, str] | None:
    """``(module, "down" | "up")`` of a LoRA key in diffusers' or peft's spelling; ``None`` otherwise."""
    m = _KEY.match(key)
    if m is None:
        return None
    side = m.group("du") or {"A": "down", "B": "up"}[m.group("ab")]
    return m.group("module"), side


def _unet_of(pipe) -> nn.Module:
    unet = getattr(pipe, "unet", pipe)
    if not isinstance(unet, nn.Module):
        raise TypeError(f"expected a diffusers pipeline or its UNet, got {type(pipe).__name__}")
    return unet


def _linear(unet: nn.Module, name: str) -> nn.Linear | None:
    try:
        module = unet.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


class ClassLora:
    """A LoRA of a UNet's attention projections, applicable to and removable from a loaded pipeline.

    Args:
        layers: UNet module name (``"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"``) ->
            ``(down, up)``: float tensors of shapes ``(r, in)`` and ``(out, r)``, one rank ``r`` for all.
        alpha: LoRA's alpha; the update is scaled by ``alpha / r``. Default ``r`` (scale 1, what
            diffusers assumes of a file without alphas).
        base_digests: dtype name -> digest of the base model's values of the adapted weights (see
            :meth:`base_digests_of`); empty: the base model is not checked.
        base_model: fingerprint of the base pipeline (informational).
        family: the model family it was trained on (``"sd1"``, ``"sd2"``, ``"sdxl"``); ``None``: unchecked.
        metadata: JSON-able training information.

    Example:
        >>> tokens = fit_tokens("pocket", data, lora_rank=10)  # doctest: +SKIP
        >>> tokens.lora.save("lora.safetensors")  # doctest: +SKIP
        >>> pipe.load_lora_weights("lora.safetensors")  # plain diffusers  # doctest: +SKIP
    """

    def __init__(
        self,
        layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        *,
        alpha: float | None = None,
        base_digests: Mapping[str, str] | None = None,
        base_model: str | None = None,
        family: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(layers, Mapping) or not layers:
            raise ValueError("layers must be a non-empty mapping of UNet module name -> (down, up) tensors")
        clean: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        ranks = set()
        for name, pair in layers.items():
            if not isinstance(name, str) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"layers must map module names to (down, up) pairs, got {name!r}: {type(pair).__name__}")
            down, up = pair
            if not all(isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim == 2 for t in (down, up)):
                raise ValueError(f"layer {name!r}: down and up must be 2-d float tensors")
            if down.shape[0] != up.shape[1]:
                raise ValueError(f"layer {name!r}: down {tuple(down.shape)} and up {tuple(up.shape)} disagree on the rank")
            if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                raise ValueError(f"layer {name!r} has NaN or inf values")
            ranks.add(int(down.shape[0]))
            clean[name] = (down.detach().to("cpu", torch.float32, copy=True).contiguous(),
                           up.detach().to("cpu", torch.float32, copy=True).contiguous())
        if len(ranks) != 1:
            raise ValueError(f"every layer must have the same rank, got ranks {sorted(ranks)}")
        self.layers = dict(sorted(clean.items()))
        self.rank = ranks.pop()
        self.alpha = float(self.rank if alpha is None else alpha)
        if not 0.0 < self.alpha < float("inf"):
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        self.base_digests: dict[str, str] = dict(base_digests or {})
        self.base_model = base_model
        self.family = family
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._hash: str | None = None

    # -- facts -------------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor of the update."""
        return self.alpha / self.rank

    @property
    def num_parameters(self) -> int:
        """Trained numbers in all (``sum(r * (in + out))``)."""
        return sum(d.numel() + u.numel() for d, u in self.layers.values())

    def content_hash(self) -> str:
        """sha256 of the factors and the scale (what decides the fused weights); part of cache keys."""
        if self._hash is None:
            h = hashlib.sha256(f"{LORA_FORMAT}|{self.alpha!r}|{self.rank}".encode())
            for name, (down, up) in self.layers.items():
                h.update(f"|{name}".encode())
                h.update(down.numpy().tobytes())
                h.update(up.numpy().tobytes())
            self._hash = h.hexdigest()
        return self._hash

    def __repr__(self) -> str:
        return f"ClassLora(rank={self.rank}, alpha={self.alpha:g}, layers={len(self.layers)}, parameters={self.num_parameters})"

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors in diffusers' LoRA layout (``unet.<module>.lora.down.weight`` / ``.lora.up.weight``)."""
        out: dict[str, torch.Tensor] = {}
        for name, (down, up) in self.layers.items():
            out[f"unet.{name}.lora.down.weight"] = down
            out[f"unet.{name}.lora.up.weight"] = up
        return out

    @staticmethod
    def base_digests_of(weights: Mapping[str, torch.Tensor]) -> dict[str, str]:
        """Digests of a base model's adapted weights (module name -> weight), in their dtype and the
        narrower float dtypes, so a float16 pipeline still matches a LoRA trained in float32."""
        return base_digests(weights, _BASE_DOMAIN)[1]

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the LoRA as one safetensors file in diffusers' layout (atomically), with dafusion-aug's
        facts in the metadata. Returns the path."""
        path = Path(path)
        meta = {
            "format": LORA_FORMAT, "rank": str(self.rank), "alpha": repr(self.alpha),
            "base_digests": json.dumps(self.base_digests, sort_keys=True), "metadata": json.dumps(self.metadata, sort_keys=True),
        }
        if self.base_model is not None:
            meta["base_model"] = str(self.base_model)
        if self.family is not None:
            meta["family"] = str(self.family)
        save_safetensors(self.state_dict(), path, meta, what="LoRA file", error=LoraFileError)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassLora:
        """Read a LoRA file: dafusion-aug's, or a UNet LoRA of diffusers or peft (``lora.down``/``lora.up`` or
        ``lora_A``/``lora_B`` keys, with or without the ``unet.`` prefix; alpha = rank unless recorded).

        Raises:
            LoraFileError: a missing, pickled, truncated or corrupt file; keys that are no UNet LoRA's (a text
                encoder's, kohya's ``lora_unet_`` names); factors whose shapes disagree; tensors larger than
                a LoRA's (checked on the header, before any data is read).
        """
        path = os.fspath(path)
        tensors, meta = read_safetensors(path, "LoRA file", error=LoraFileError, check=_check_header,
                                         pickle_hint="Save LoRA weights with safe_serialization=True")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            parsed = _parse_key(key)
            if parsed is None or key.startswith(("text_encoder", "lora_te", "lora_unet")):
                raise LoraFileError(f"LoRA file {path!r} has the key {key!r}, which is not a UNet LoRA factor in diffusers' "
                                    "or peft's layout (dafusion-aug reads UNet LoRAs only)")
            pairs.setdefault(parsed[0], {})[parsed[1]] = t
        incomplete = [m for m, p in pairs.items() if set(p) != {"down", "up"}]
        if incomplete:
            raise LoraFileError(f"LoRA file {path!r} lacks the down or up factor of {incomplete[0]!r}")
        try:
            alpha = float(meta["alpha"]) if "alpha" in meta else None
            digests = json.loads(meta.get("base_digests", "{}"))
            info = json.loads(meta.get("metadata", "{}"))
            return cls({m: (p["down"], p["up"]) for m, p in pairs.items()}, alpha=alpha, base_digests=digests,
                       base_model=meta.get("base_model"), family=meta.get("family"), metadata=info)
        except (ValueError, TypeError) as e:
            raise LoraFileError(f"LoRA file {path!r} is not a valid LoRA: {e}") from e

    # -- applying ----------------------------------------------------------------------------------
    @staticmethod
    def active(pipe) -> ClassLora | None:
        """The LoRA fused into ``pipe`` by dafusion-aug, if any."""
        return getattr(pipe, "_dafusion_lora", None)

    def _modules(self, pipe) -> dict[str, nn.Linear]:
        unet = _unet_of(pipe)
        if self.family is not None and hasattr(pipe, "unet"):
            requires_family(self.family, family_of(pipe), f"the LoRA (rank {self.rank})", LoraFileError)
        modules: dict[str, nn.Linear] = {}
        for name, (down, up) in self.layers.items():
            module = _linear(unet, name)
            if module is None:
                raise LoraFileError(f"this LoRA was made for another model: the pipeline's UNet has no linear layer {name!r} "
                                    f"(base_model={self.base_model!r})")
            if tuple(module.weight.shape) != (up.shape[0], down.shape[1]):
                raise LoraFileError(f"this LoRA was made for another model: {name!r} is {tuple(module.weight.shape)} in the "
                                    f"pipeline's UNet, {(up.shape[0], down.shape[1])} in the LoRA")
            modules[name] = module
        return modules

    def _check_base(self, pipe, modules: Mapping[str, nn.Linear]) -> None:
        if not self.base_digests:
            return
        weights = {n: m.weight for n, m in modules.items()}
        dtype = str(next(iter(weights.values())).dtype).removeprefix("torch.")
        stamp = tuple((w.data_ptr(), w._version) for w in weights.values()) if not torch.is_inference_mode_enabled() else None
        memo = getattr(pipe, "_dafusion_lora_verified", {})
        key = self.base_digests.get(dtype)
        if key is not None and stamp is not None and memo.get(key) == stamp:
            return
        if key is None or _values_digest(weights, getattr(torch, dtype), _BASE_DOMAIN) != key:
            raise LoraFileError(f"this LoRA (rank {self.rank}) was made for another model: the pipeline's values of the "
                                f"{len(weights)} weights it adapts differ from those it was trained on (base_model={self.base_model!r})")
        if stamp is not None:
            pipe._dafusion_lora_verified = {**memo, key: stamp}

    def apply(self, pipe) -> None:
        """Fuse the LoRA into ``pipe``'s UNet in place; the original weights are kept for :meth:`restore`.

        Raises:
            LoraFileError: the pipeline is another model (a family, a layer, a shape or the base weights differ).
            PipelineError: another LoRA is fused already.
        """
        current = ClassLora.active(pipe)
        if current is self:
            return
        if current is not None:
            raise PipelineError(f"pipeline already has a LoRA fused ({current!r}); restore it first or use `with lora.applied(pipe):`")
        modules = self._modules(pipe)
        self._check_base(pipe, modules)
        originals: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            try:
                for name, module in modules.items():
                    down, up = self.layers[name]
                    w = module.weight
                    originals[name] = w.detach().clone()
                    delta = (up.to(w.device) @ down.to(w.device)) * self.scale
                    w.copy_((w.float() + delta).to(w.dtype))
            except BaseException:
                for name, value in originals.items():
                    modules[name].weight.copy_(value)
                raise
        fp = getattr(pipe, "_dafusion_fingerprint", None)
        pipe._dafusion_lora_state = (originals, fp)
        pipe._dafusion_lora = self
        if fp is not None:  # a memoised pipeline fingerprint must now name the fused weights
            from .hashing import stable_digest

            pipe._dafusion_fingerprint = stable_digest("lora", fp, self.content_hash())

    def restore(self, pipe) -> None:
        """Put the original weights back, bitwise. Does nothing when no LoRA is fused.

        Raises:
            PipelineError: a different LoRA is fused.
        """
        current = ClassLora.active(pipe)
        if current is None:
            return
        if current is not self:
            raise PipelineError(f"pipeline has another LoRA fused ({current!r}), not {self!r}")
        originals, fp = pipe._dafusion_lora_state
        unet = _unet_of(pipe)
        with torch.no_grad():
            for name, value in originals.items():
                unet.get_submodule(name).weight.copy_(value)
        del pipe._dafusion_lora, pipe._dafusion_lora_state
        if fp is not None:
            pipe._dafusion_fingerprint = fp
        elif hasattr(pipe, "_dafusion_fingerprint"):
            del pipe._dafusion_fingerprint

    @contextlib.contextmanager
    def applied(self, pipe) -> Iterator[Any]:
        """Fuse inside a ``with`` block and restore in ``finally`` (a block inside one of the same LoRA changes nothing)."""
        if ClassLora.active(pipe) is self:
            yield pipe
            return
        self.apply(pipe)
        try:
            yield pipe
        finally:
            self.restore(pipe)


def _check_header(path: str, what: str, tensors: Mapping[str, TensorHeader], meta: Mapping[str, str]) -> None:
    """Refuse, from the header alone, what no LoRA holds: a non-matrix, a rank above 1024, huge factors."""

    def rule(t: TensorHeader) -> str | None:
        parsed = _parse_key(t.name)
        if parsed is not None and min(t.shape) > _MAX_RANK:
            return f"{t.describe()} has no dimension <= {_MAX_RANK} (a LoRA factor's rank)"
        return None

    check_tensor_headers(tensors, path, what, error=LoraFileError, ranks=(2,), max_elements=_MAX_ELEMENTS,
                         max_bytes=_MAX_BYTES, max_tensors=4096, rule=rule)
    if meta.get("format", "pt") not in (LORA_FORMAT, "pt"):
        raise LoraFileError(f"{what} {path!r} has format {meta.get('format')!r}, not {LORA_FORMAT!r}")
