"""The erasure file: trained UNet tensors that erase concepts, applied to a pipeline in place and restored.

An :class:`Erasure` holds only the tensors that :func:`~dafusion_aug.erase_concept` trained (keyed by
diffusers UNet parameter names) and swaps them into a loaded pipeline in place, keeping the originals to
restore bitwise, the way diffusers' ``load_*`` / ``unload_*`` loaders put weights in and take them out.
Training lives in :mod:`dafusion_aug.erase`; this module never trains. See docs/erasure.md.

File format: safetensors, one float tensor per trained UNet parameter, and metadata strings
``format=pt``, ``dafusion_format``, ``dafusion_aug_version``, ``method``, ``concepts`` (JSON object
concept -> list of prompts), ``base_model`` (fingerprint), ``base_dtype``, ``base_digests`` (JSON object
dtype -> digest of the original values of exactly these tensors) and ``training`` (JSON hyper-parameters).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from ._io import FLOAT_DTYPES, TensorHeader, check_tensor_headers, read_safetensors, save_safetensors
from .errors import ErasureFileError, PipelineError
from .families import family_of, requires_family
from .hashing import stable_digest

__all__ = ["Erasure", "base_digests", "normalize_concepts", "unet_of"]

_FORMAT = "dafusion-aug/erasure/1"
# Sane sizes, checked from the header before any tensor is read (the UNet, unknown at load, is checked on apply).
#: elements of one tensor: SDXL's largest UNet parameter (a 1280 x 1280 x 3 x 3 conv) has 14.7 M
_MAX_ELEMENTS = 2**27
#: tensors per file: SDXL's whole UNet has about 1,700 parameters
_MAX_TENSORS = 10_000
#: all tensors together: SDXL's whole UNet in float32 is 10.3 GB
_MAX_BYTES = 2**34
_NARROWER = {"float32": ("float32", "float16", "bfloat16"), "float16": ("float16",), "bfloat16": ("bfloat16",)}


def _values_digest(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, domain: bytes = b"dafusion-aug/erasure-base/1") -> str:
    h = hashlib.sha256(domain)
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").to(dtype).contiguous().reshape(-1)
        h.update(f"|{name}:{tuple(tensors[name].shape)}:{str(dtype)}|".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def base_digests(tensors: Mapping[str, torch.Tensor], domain: bytes = b"dafusion-aug/erasure-base/1") -> tuple[str, dict[str, str]]:
    """The digests an :class:`Erasure` records of the base model's original values of ``tensors``.

    For building an ``Erasure`` by hand: ``Erasure(trained, concepts=..., base_dtype=dtype,
    base_digests=digests)`` with ``dtype, digests = base_digests(originals)`` refuses to apply to a model
    whose values of these tensors differ.

    Args:
        tensors: UNet parameter name -> the base model's value.
        domain: the digest's domain prefix (a :class:`~dafusion_aug.ClassLora` has its own).

    Returns:
        ``(dtype name, {dtype name: digest})``: the digest in the tensors' own dtype and in every narrower
        one (so float16 pipelines still match an erasure trained in float32).
    """
    base = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    return base, {d: _values_digest(tensors, getattr(torch, d), domain) for d in _NARROWER.get(base, (base,))}


def _check_header(path: str, what: str, tensors: Mapping[str, TensorHeader], meta: Mapping[str, str]) -> None:
    """Refuse an erasure file from its header, before any tensor is read, unless every tensor could be a UNet
    parameter: floating-point, at most 4 dimensions (a conv weight) and 2**27 elements, at most 10,000
    tensors and 16 GiB in all. Whether each matches the parameter it names is checked when it is applied.

    Raises:
        ErasureFileError: naming the tensor, its shape and the limit.
    """
    check_tensor_headers(tensors, path, what, error=ErasureFileError, dtypes=FLOAT_DTYPES, ranks=range(5),
                         max_elements=_MAX_ELEMENTS, max_tensors=_MAX_TENSORS, max_bytes=_MAX_BYTES)


def _stamp(params: Mapping[str, torch.Tensor], names: Sequence[str]) -> tuple | None:
    """(storage, version) of each tensor: any in-place write or re-assignment changes it."""
    try:
        return tuple((params[n].data_ptr(), params[n]._version) for n in names)
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


class Erasure:
    """Trained UNet tensors that erase concepts, applicable to and removable from a loaded pipeline.

    Args:
        tensors: UNet parameter name (``"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"``)
            -> trained value; float tensors, stored on the CPU.
        concepts: the erased concepts: a name, a list of names, or a mapping name -> prompt(s).
        method: the parameter set the tensors came from (see :func:`parameter_names`), or ``"custom"``.
        base_dtype: dtype of the original values the digests were taken from.
        base_digests: dtype name -> digest of the base model's original values of exactly these tensors;
            empty means "do not check the base model".
        base_model: fingerprint of the base pipeline (informational).
        metadata: JSON-able training information (hyper-parameters, losses, ...).

    Example:
        >>> erasure = erase_concept("pocket", "seven", steps=200)  # doctest: +SKIP
        >>> with erasure.applied(pipe):  # doctest: +SKIP
        ...     images = pipe("a photo of a handwritten digit seven").images
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        concepts: str | Sequence[str] | Mapping[str, str | Sequence[str]],
        method: str = "custom",
        base_dtype: str = "float32",
        base_digests: Mapping[str, str] | None = None,
        base_model: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(tensors, Mapping) or not tensors:
            raise ValueError("tensors must be a non-empty mapping of UNet parameter name -> tensor")
        clean = {}
        for name, t in tensors.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"tensors must map names to float tensors, got {name!r}: {type(t).__name__}")
            if not torch.isfinite(t).all():
                raise ValueError(f"tensor {name!r} has NaN or inf values")
            clean[name] = t.detach().to("cpu", copy=True).contiguous()
        self.tensors: dict[str, torch.Tensor] = clean
        self.concepts: dict[str, list[str]] = normalize_concepts(concepts)
        self.method = str(method)
        self.base_dtype = str(base_dtype)
        self.base_digests: dict[str, str] = dict(base_digests or {})
        self.base_model = base_model
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._hash: str | None = None

    # -- facts -------------------------------------------------------------------------------------
    @property
    def family(self) -> str | None:
        """The model family it was trained on (``"sd2"``, ``"sdxl"``), ``None`` when unrecorded (SD 1.x files)."""
        return self.metadata.get("family")

    @property
    def num_parameters(self) -> int:
        """Number of trained scalars (elements over all tensors)."""
        return sum(t.numel() for t in self.tensors.values())

    @property
    def parameter_names(self) -> list[str]:
        return list(self.tensors)

    @property
    def base_digest(self) -> str | None:
        """Digest of the base model's original values of these tensors, in ``base_dtype``."""
        return self.base_digests.get(self.base_dtype)

    def content_hash(self) -> str:
        """Digest of the names, shapes, dtypes and values (what changes generated images); memoised."""
        if self._hash is None:
            h = hashlib.sha256(b"dafusion-aug/erasure/1")
            for name in sorted(self.tensors):
                t = self.tensors[name]
                h.update(f"|{name}:{tuple(t.shape)}:{t.dtype}|".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy())
            self._hash = h.hexdigest()
        return self._hash

    def __repr__(self) -> str:
        return f"Erasure(concepts={list(self.concepts)}, method={self.method!r}, {len(self.tensors)} tensors, {self.num_parameters:,} parameters)"

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the erasure to ``path`` (safetensors), atomically.

        Returns:
            The path.

        Raises:
            ErasureFileError: the file cannot be written (full disk, unwritable folder); nothing is left behind.
        """
        path = Path(path)
        meta = {
            "format": "pt",
            "dafusion_format": _FORMAT,
            "dafusion_aug_version": __version__,
            "method": self.method,
            "concepts": json.dumps(self.concepts),
            "base_model": self.base_model or "",
            "base_dtype": self.base_dtype,
            "base_digests": json.dumps(self.base_digests, sort_keys=True),
            "training": json.dumps(self.metadata, default=str),
        }
        save_safetensors(self.tensors, path, meta, what="erasure file", error=ErasureFileError)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Erasure:
        """Read an erasure file written by :meth:`save`.

        Raises:
            ErasureFileError: missing, a pickle (never loaded), corrupt, truncated, not an erasure file, or its
                header declares tensors no UNet has (not floating-point, over 4 dimensions or 2**27 elements,
                over 10,000 tensors or 16 GiB in all), refused before any tensor data is read.
        """
        path = os.fspath(path)
        tensors, meta = read_safetensors(path, "erasure file", error=ErasureFileError, check=_check_header)
        if not str(meta.get("dafusion_format", "")).startswith("dafusion-aug/erasure/"):
            raise ErasureFileError(f"{path!r} is a safetensors file but not an erasure file (no dafusion_format metadata)")
        try:
            return cls(
                tensors,
                concepts=json.loads(meta["concepts"]),
                method=meta.get("method", "custom"),
                base_dtype=meta.get("base_dtype", "float32"),
                base_digests=json.loads(meta.get("base_digests", "{}")),
                base_model=meta.get("base_model") or None,
                metadata=json.loads(meta.get("training", "{}") or "{}"),
            )
        except (KeyError, json.JSONDecodeError, ValueError, TypeError) as e:
            raise ErasureFileError(f"erasure file {path!r} is inconsistent: {e}") from e

    # -- pipelines ---------------------------------------------------------------------------------
    @staticmethod
    def active(pipe) -> Erasure | None:
        """The erasure currently applied to ``pipe``, or ``None``."""
        return getattr(pipe, "_dafusion_erasure", None)

    def _same(self, other: Erasure | None) -> bool:
        return other is not None and (other is self or other.content_hash() == self.content_hash())

    def _check_fits(self, params: Mapping[str, torch.Tensor]) -> None:
        missing = [n for n in self.tensors if n not in params]
        if missing:
            raise ErasureFileError(
                f"the pipeline's UNet has no parameters {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                f"({len(missing)} of {len(self.tensors)} missing); this erasure was trained on another architecture "
                f"(base_model={self.base_model!r})"
            )
        bad = [(n, tuple(params[n].shape), tuple(t.shape)) for n, t in self.tensors.items() if params[n].shape != t.shape]
        if bad:
            n, want, got = bad[0]
            raise ErasureFileError(f"shape mismatch for {n!r}: the UNet has {want}, the erasure {got} ({len(bad)} tensors differ)")

    def _base_key(self, params: Mapping[str, torch.Tensor]) -> tuple[str, torch.dtype] | None:
        if not self.base_digests:
            return None
        dtypes = {str(params[n].dtype).removeprefix("torch.") for n in self.tensors}
        name = next(iter(dtypes)) if len(dtypes) == 1 and next(iter(dtypes)) in self.base_digests else self.base_dtype
        if name not in self.base_digests:
            raise ErasureFileError(f"erasure file has no base digest for dtype {name!r} (has {sorted(self.base_digests)})")
        return self.base_digests[name], getattr(torch, name)

    def _check_base(self, host, params: Mapping[str, torch.Tensor]) -> str | None:
        key = self._base_key(params)
        if key is None:
            return None
        expected, dtype = key
        memo: dict[str, tuple] = getattr(host, "_dafusion_erasure_verified", {})
        stamp = _stamp(params, list(self.tensors))
        if stamp is None or memo.get(expected) != stamp:
            actual = _values_digest({n: params[n] for n in self.tensors}, dtype)
            if actual != expected:
                raise ErasureFileError(
                    f"this erasure (concepts {list(self.concepts)}, method {self.method!r}) was trained on another base "
                    f"model: the pipeline's values of its {len(self.tensors)} tensors differ from the originals it was "
                    f"trained from (base_model={self.base_model!r})"
                )
            if stamp is not None:
                memo[expected] = stamp
                host._dafusion_erasure_verified = memo
        return expected

    def apply(self, pipe, *, replace: bool = False) -> None:
        """Swap the trained tensors into ``pipe``'s UNet in place (cast to each parameter's dtype/device).

        The original values are kept on the pipe (same device and dtype as the UNet, only the erased
        tensors) for :meth:`restore`. Applying the same erasure again does nothing. The base-model check
        (a digest of the pipe's current values of these tensors) is memoised per pipe until a tensor is
        written in place or replaced (``param.data.copy_`` bypasses that; don't).

        Args:
            pipe: a diffusers pipeline (or its UNet).
            replace: if another erasure is active, restore it first instead of raising.

        Raises:
            ErasureFileError: the erasure was trained on another family (recorded for SD 2.x and SDXL), the UNet
                lacks a tensor, a shape differs, or the base model differs.
            PipelineError: another erasure is active and ``replace`` is False.
        """
        unet = unet_of(pipe)
        if self.family is not None and hasattr(pipe, "unet"):
            requires_family(self.family, family_of(pipe), f"the erasure of {list(self.concepts)} ({self.method})", ErasureFileError)
        current = Erasure.active(pipe)
        if self._same(current):
            return
        if current is not None:
            if not replace:
                raise PipelineError(
                    f"pipeline already has an erasure applied ({current!r}); restore it first, "
                    "pass replace=True, or use `with erasure.applied(pipe):`"
                )
            current.restore(pipe)
        params = dict(unet.named_parameters())
        self._check_fits(params)
        base_key = self._check_base(pipe, params)
        originals: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            try:
                for name, value in self.tensors.items():
                    originals[name] = params[name].detach().clone()
                    params[name].copy_(value)  # copy_ casts to the parameter's dtype and device
            except BaseException:
                for name, value in originals.items():
                    params[name].copy_(value)
                raise
        fp = getattr(pipe, "_dafusion_fingerprint", None)
        pipe._dafusion_erasure_state = (originals, base_key, fp)
        pipe._dafusion_erasure_originals = originals
        pipe._dafusion_erasure = self
        if fp is not None:  # a memoised pipeline fingerprint must now name the erased weights
            pipe._dafusion_fingerprint = stable_digest("erasure", fp, self.content_hash())

    def restore(self, pipe) -> None:
        """Put the original values back, bitwise. Does nothing when no erasure is active.

        Raises:
            PipelineError: a different erasure is active (restore that one: ``Erasure.active(pipe).restore(pipe)``).
        """
        current = Erasure.active(pipe)
        if current is None:
            return
        if not self._same(current):
            raise PipelineError(f"pipeline has another erasure applied ({current!r}), not {self!r}")
        originals, base_key, fp = pipe._dafusion_erasure_state
        params = dict(unet_of(pipe).named_parameters())
        with torch.no_grad():
            for name, value in originals.items():
                params[name].copy_(value)
        for attr in ("_dafusion_erasure", "_dafusion_erasure_originals", "_dafusion_erasure_state"):
            delattr(pipe, attr)
        if fp is not None:
            pipe._dafusion_fingerprint = fp
        elif hasattr(pipe, "_dafusion_fingerprint"):
            del pipe._dafusion_fingerprint
        if base_key is not None:  # the originals are back: no need to hash them on the next apply
            stamp = _stamp(params, list(originals))
            if stamp is not None:
                pipe._dafusion_erasure_verified = {**getattr(pipe, "_dafusion_erasure_verified", {}), base_key: stamp}

    @contextlib.contextmanager
    def applied(self, pipe) -> Iterator[Any]:
        """Apply inside a ``with`` block and restore in ``finally``.

        An erasure already active on ``pipe`` is swapped out for the block and put back after it, so
        blocks nest; if this erasure is the active one, the block changes nothing.
        """
        previous = Erasure.active(pipe)
        if self._same(previous):
            yield pipe
            return
        if previous is not None:
            previous.restore(pipe)
        try:
            self.apply(pipe)
            yield pipe
        finally:
            if self._same(Erasure.active(pipe)):
                self.restore(pipe)
            if previous is not None:
                previous.apply(pipe)


def unet_of(pipe) -> nn.Module:
    """The UNet of a pipeline (or the module itself), unwrapped from ``torch.compile``."""
    unet = getattr(pipe, "unet", None)
    if unet is None and isinstance(pipe, nn.Module):
        return getattr(pipe, "_orig_mod", pipe)
    if not isinstance(unet, nn.Module):
        raise TypeError(f"pipe must be a diffusers pipeline with a UNet (or the UNet itself), got {type(pipe).__name__}")
    return getattr(unet, "_orig_mod", unet)  # torch.compile'd UNets prefix their names with _orig_mod.


def normalize_concepts(concepts: str | Sequence[str] | Mapping[str, str | Sequence[str]]) -> dict[str, list[str]]:
    """``"zebra"`` / ``["zebra", "cat"]`` / ``{"zebra": ["a zebra", ...]}`` -> ``{concept: [prompts]}``."""
    if isinstance(concepts, str):
        concepts = [concepts]
    if isinstance(concepts, Mapping):
        out = {str(c): [p] if isinstance(p, str) else list(p) for c, p in concepts.items()}
    elif isinstance(concepts, Sequence):
        out = {}
        for c in concepts:
            if not isinstance(c, str):
                raise TypeError(f"concepts must be strings, got {type(c).__name__}: {c!r}")
            out[c] = [c]
    else:
        raise TypeError(f"concepts must be a str, a list of str or a dict concept -> prompt(s), got {type(concepts).__name__}")
    if not out:
        raise ValueError("concepts must name at least one concept, got none")
    for c, ps in out.items():
        if not c.strip() or not ps or not all(isinstance(p, str) and p.strip() for p in ps):
            raise ValueError(f"concept {c!r} must be a non-empty name with non-empty prompts, got {ps!r}")
    return out
