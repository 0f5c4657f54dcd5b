"""Class tokens: class names <-> learned tokens <-> embeddings, stored as one safetensors file.

File format (see DESIGN.md): keys are tokens (``"<golden-retriever>"``), values float32
``[num_vectors, dim]`` (diffusers' textual-inversion convention); metadata strings ``format=pt``,
``dafusion_aug_version``, ``class_names`` (JSON list, index = label), ``tokens`` (JSON list),
``base_model``, ``dim``, ``num_vectors`` and ``training`` (JSON of the hyper-parameters).

The token files people have are read too: diffusers' one-token ``learned_embeds.safetensors``
(:meth:`ClassTokens.load`), A1111 embeddings (``{"emb_params": tensor}`` safetensors, and the ``.pt``
``{"string_to_param": {"*": tensor}, "name": ...}``: :meth:`ClassTokens.from_a1111`) and DA-Fusion's
``.bin`` / aggregated ``.pt`` files (:meth:`ClassTokens.from_dafusion`); ``.pt`` and ``.bin`` files only
through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__
from ._io import (
    FLOAT_DTYPES,
    TensorHeader,
    check_tensor_headers,
    format_size,
    looks_like_pickle,
    read_safetensors,
    save_safetensors,
)
from .errors import TokenFileError
from .families import FAMILIES, family_of, requires_family
from .hashing import stable_digest

__all__ = ["ClassTokens", "token_for_class", "DIFFUSERS_MULTI_CLASS", "DIFFUSERS_SDXL"]

_FORMAT = "dafusion-aug/class-tokens/1"
_PICKLE_HINT = ("Import DA-Fusion .bin / .pt files with ClassTokens.from_dafusion(path, class_names=[...]) and A1111 "
                ".pt embeddings with ClassTokens.from_a1111(path); both read them with torch.load(weights_only=True).")
#: The one line that loads a multi-class token file into a plain diffusers pipeline (``load_textual_inversion``
#: takes one token per file, or lists of tensors and tokens); error messages and docs/tokens.md show it.
DIFFUSERS_MULTI_CLASS = "pipe.load_textual_inversion(list(sd.values()), token=list(sd.keys()))"
#: How plain diffusers loads one class of an SDXL export (:meth:`ClassTokens.export_diffusers`) into both encoders.
DIFFUSERS_SDXL = ('pipe.load_textual_inversion(sd["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2); '
                  'pipe.load_textual_inversion(sd["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)')
_MULTI_CLASS_HINT = (f"plain diffusers loads a multi-class file with {DIFFUSERS_MULTI_CLASS}, where "
                     "sd = safetensors.torch.load_file(path) (or torch.load(path, weights_only=True) for a .pt / .bin file)")
_A1111_KEYS = ("emb_params", "string_to_param")
# Sane sizes, checked from a file's header (or size) before anything is read: an embedding is kilobytes.
#: vectors per token: a CLIP prompt holds 77 positions, so no prompt uses more than a few dozen
_MAX_VECTORS = 1024
#: an embedding's width: the widest text encoder in reach (T5-XXL); CLIP ViT-L is 768, ViT-bigG 1280
_MAX_WIDTH = 4096
#: tokens (classes) per file; ImageNet-21k has 21,841 classes
_MAX_TOKENS = 100_000
#: a whole token file: its tensors (safetensors) or the file itself (``.pt`` / ``.bin``)
_MAX_TOKEN_BYTES = 2**30


def _torch_load(path: str, what: str) -> Any:
    """A ``.pt`` / ``.bin`` file's contents through ``torch.load(weights_only=True)``, which builds only tensors
    and plain containers (never arbitrary objects).

    Raises:
        TokenFileError: the file is missing, over 1 GiB (refused unread), or holds anything else.
    """
    if not os.path.isfile(path):
        raise TokenFileError(f"{what} not found: {path!r}")
    size = os.path.getsize(path)
    if size > _MAX_TOKEN_BYTES:  # torch.load reads every storage into memory; embeddings are kilobytes
        raise TokenFileError(f"{what} {path!r} is {format_size(size)}, more than the {format_size(_MAX_TOKEN_BYTES)} a token "
                             "file may take (embeddings are kilobytes); refused unread")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for bad files
        raise TokenFileError(f"{path!r} is not a {what} loadable with weights_only=True: {e}") from e


def _a1111_embedding(data: Any, path: str) -> tuple[torch.Tensor, str | None] | None:
    """``(embedding, name)`` of an A1111 embedding (``{"emb_params": t}``, or ``{"string_to_param": {"*": t},
    "name": ...}``), ``None`` for anything else.

    Raises:
        TokenFileError: an A1111 key holding something other than one tensor (the keys found are named).
    """
    if not isinstance(data, Mapping) or not any(k in data for k in _A1111_KEYS):
        return None
    value = data.get("emb_params", data.get("string_to_param"))
    if isinstance(value, Mapping):
        if len(value) != 1:
            raise TokenFileError(f"A1111 embedding {path!r} must hold one tensor under 'string_to_param', got keys {list(value)}")
        value = next(iter(value.values()))
    if not isinstance(value, torch.Tensor):
        raise TokenFileError(f"A1111 embedding {path!r} must hold a tensor, got {type(value).__name__} (keys {list(data)})")
    name = data.get("name")
    return value, name if isinstance(name, str) and name.strip() else None


def _dafusion_match(name: str, keys: Sequence[str]) -> str | None:
    """The key of class ``name`` in a DA-Fusion file: its token ``<name>`` as DA-Fusion wrote it (spaces as
    ``_``), the name as given, or either without the angle brackets."""
    for key in (f"<{name}>", f"<{name.replace(' ', '_')}>", name, name.replace(" ", "_")):
        if key in keys:
            return key
    return None


def _declared_width(path: str, what: str, meta: Mapping[str, str], key: str) -> int | None:
    """The width a token file's metadata declares under ``key`` (``dim``, ``dim_2``), ``None`` when absent.

    Raises:
        TokenFileError: the value is not a positive integer.
    """
    if key not in meta:
        return None
    value = meta[key]
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise TokenFileError(f"{what} {path!r} has malformed metadata: {key!r} must be a positive integer, got {value!r}"[:300])
    return int(value)


def _embedding_problem(t: TensorHeader, dim: int | None, dim_2: int | None, max_rows: int) -> str | None:
    """Why a token file's tensor cannot be embeddings (``dim_2`` is ``clip_g``'s width), or ``None``."""
    width, want = t.shape[-1], dim_2 if t.name == "clip_g" else dim
    if want is not None and width != want:
        return f"an embedding's width (its last dimension) must be the dim the file declares, {want}, got {width:,}"
    if width > _MAX_WIDTH:
        return f"an embedding's width (its last dimension) must be at most {_MAX_WIDTH}, got {width:,}"
    if len(t.shape) == 2 and t.shape[0] > max_rows:
        return f"it may have at most {max_rows:,} rows ({_MAX_VECTORS} vectors per token), got {t.shape[0]:,}"
    return None


def _check_token_header(path: str, what: str, tensors: Mapping[str, TensorHeader], meta: Mapping[str, str]) -> None:
    """Refuse a token file from its header, before any tensor is read, unless every tensor could be embeddings:
    floating-point, ``[dim]`` or ``[num_vectors, dim]``, at most 1024 vectors per token (an SDXL file's
    ``clip_l`` / ``clip_g`` stack the rows of all its tokens), a width of at most 4096 that equals the ``dim``
    (``dim_2`` for ``clip_g``) the metadata declares, at most 100,000 tensors and 1 GiB in all.

    Raises:
        TokenFileError: naming the tensor, its shape and the limit.
    """
    dim = _declared_width(path, what, meta, "dim")
    dim_2, max_rows = dim, _MAX_VECTORS
    if meta.get("family") == "sdxl":
        dim_2 = _declared_width(path, what, meta, "dim_2")
        with contextlib.suppress(json.JSONDecodeError, TypeError):  # malformed tokens metadata: named by load, later
            max_rows *= max(1, len(json.loads(meta.get("tokens", "[]"))))
    check_tensor_headers(tensors, path, what, error=TokenFileError, dtypes=FLOAT_DTYPES, ranks=(1, 2),
                         max_tensors=_MAX_TOKENS, max_bytes=_MAX_TOKEN_BYTES,
                         rule=functools.partial(_embedding_problem, dim=dim, dim_2=dim_2, max_rows=max_rows))


def _check_metadata_list(path: str, key: str, value: Any) -> None:
    """A token file's ``tokens`` / ``class_names`` metadata must be a non-empty JSON list of strings.

    Raises:
        TokenFileError: naming the file, the key and what it holds.
    """
    if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
        raise TokenFileError(f"token file {path!r} has malformed metadata: {key!r} must be a non-empty JSON list of "
                             f"strings, got {json.dumps(value)[:200]}")


def token_for_class(name: str, index: int | None = None) -> str:
    """The token for a class name: ``"Golden Retriever"`` -> ``"<golden-retriever>"``.

    Characters other than ASCII letters and digits become ``-``; a name with none of them (``"猫"``)
    becomes ``<class-{index}>``.
    """
    if not isinstance(name, str):
        raise TypeError(f"class name must be a str, got {type(name).__name__}: {name!r}")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]
    if not slug:
        if index is None:
            raise ValueError(f"class name {name!r} has no ASCII letters or digits; pass its index")
        slug = f"class-{index}"
    return f"<{slug}>"


def _embedding(value: Any, name: str) -> torch.Tensor:
    """One class's embedding as a float32 ``[num_vectors, dim]`` CPU tensor of its own (never a view of the
    caller's tensor, nor shared with another class: safetensors refuses to save tensors that share memory).

    Raises:
        TypeError: not a floating-point tensor (integer values are no embedding: they are refused, never cast).
    """
    t = torch.as_tensor(value)
    if not t.is_floating_point():
        raise TypeError(f"the embedding of class {name!r} must be a floating-point tensor, got dtype {str(t.dtype).removeprefix('torch.')}")
    t = t.detach().to("cpu", torch.float32, copy=True)
    return t.unsqueeze(0) if t.ndim == 1 else t


def _class_embeddings(embeddings: Any, names: list[str], arg: str) -> list[torch.Tensor]:
    """One float32 ``[num_vectors, dim]`` tensor per class, of one shape, finite (see :class:`ClassTokens`)."""
    if isinstance(embeddings, Mapping):
        missing = [n for n in names if n not in embeddings]
        if missing:
            raise ValueError(f"{arg} has no entry for classes {missing}")
        embeddings = [embeddings[n] for n in names]
    embeddings = list(embeddings)
    if len(embeddings) != len(names):
        raise ValueError(f"{arg} must have one entry per class ({len(names)}), got {len(embeddings)}")
    embs = [_embedding(e, n) for e, n in zip(embeddings, names)]
    shapes = {tuple(e.shape) for e in embs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"{arg} must all be [num_vectors, dim] of one shape, got {sorted(shapes)}")
    if min(next(iter(shapes))) < 1:
        raise ValueError(f"{arg} must have at least one vector of at least one value, got shape {next(iter(shapes))}")
    if any(not torch.isfinite(e).all() for e in embs):
        raise ValueError(f"{arg} must be finite, got NaN or inf values")
    return embs


class ClassTokens:
    """Learned class tokens and their embeddings.

    Args:
        class_names: class names, index = label (a list, not a single str).
        embeddings: one float tensor per class, ``[num_vectors, dim]`` (a ``[dim]`` tensor means one vector),
            as a sequence in class order or a mapping ``class_name -> tensor``. Each is copied and stored as
            float32 (the file format's dtype); integer tensors are refused.
        tokens: the token strings; default ``token_for_class(name)`` for each class.
        metadata: free-form JSON-able information (base model fingerprint, hyper-parameters, ...); its
            ``"family"`` (``"sd1"``, ``"sd2"``, ``"sdxl"``), when recorded, is checked when the tokens are applied.
        embeddings_2: SDXL only: each class's embedding for the second text encoder (OpenCLIP ViT-bigG,
            ``clip_g``; ``embeddings`` are then the first encoder's, ``clip_l``). Sets the family to ``"sdxl"``.

    Raises:
        TypeError: ``class_names`` or ``tokens`` is a str (not a list), a name is not a str, or an embedding is
            not a float tensor.
        ValueError: no classes, repeated names or tokens, embeddings of different or empty shapes, NaN or inf.

    Example:
        >>> toks = ClassTokens(["cat", "dog"], [torch.zeros(1, 32), torch.ones(1, 32)])
        >>> toks.tokens
        ['<cat>', '<dog>']
    """

    def __init__(
        self,
        class_names: Sequence[str],
        embeddings: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        tokens: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        embeddings_2: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if isinstance(class_names, (str, bytes)):
            raise TypeError(f"class_names must be a list of class names, got the {type(class_names).__name__} "
                            f"{class_names!r}; for one class pass [{class_names!r}]")
        names = list(class_names)
        if not names:
            raise ValueError("class_names must name at least one class, got []")
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"class_names must hold str class names, got {type(bad[0]).__name__} {bad[0]!r} in {names!r}"[:300])
        if len(set(names)) != len(names):
            raise ValueError(f"class_names must be unique, got {names}")
        embs = _class_embeddings(embeddings, names, "embeddings")
        embs_2 = _class_embeddings(embeddings_2, names, "embeddings_2") if embeddings_2 is not None else None
        if embs_2 is not None and embs_2[0].shape[0] != embs[0].shape[0]:
            raise ValueError(f"embeddings and embeddings_2 must have the same num_vectors, got {embs[0].shape[0]} and {embs_2[0].shape[0]}")
        meta = dict(metadata or {})
        family = meta.get("family")
        if family is not None and family not in FAMILIES:
            raise ValueError(f"metadata['family'] must be one of {FAMILIES}, got {family!r}")
        if (family == "sdxl") != (embs_2 is not None) and family is not None:
            raise ValueError(f"metadata['family']={family!r} but embeddings_2 is {'given' if embs_2 is not None else 'missing'}: "
                             "SDXL tokens have one embedding per text encoder (embeddings: clip_l, embeddings_2: clip_g), "
                             "other families one")
        if isinstance(tokens, (str, bytes)):
            raise TypeError(f"tokens must be a list of token strings, got the {type(tokens).__name__} {tokens!r}; for one class pass [{tokens!r}]")
        toks = list(tokens) if tokens is not None else [token_for_class(n, i) for i, n in enumerate(names)]
        if len(toks) != len(names):
            raise ValueError(f"tokens must have one entry per class ({len(names)}), got {len(toks)}")
        if len(set(toks)) != len(toks):
            dupes = sorted({t for t in toks if toks.count(t) > 1})
            raise ValueError(f"class names map to the same token {dupes}; pass tokens= explicitly")
        for t in toks:
            if not isinstance(t, str) or not t or any(c.isspace() for c in t):
                raise ValueError(f"each token must be a non-empty string without spaces, got {t!r}")
        self.class_names: list[str] = names
        self.tokens: list[str] = toks
        self.embeddings: list[torch.Tensor] = embs
        self.embeddings_2: list[torch.Tensor] | None = embs_2
        if embs_2 is not None:
            meta["family"] = "sdxl"
        self.metadata: dict[str, Any] = meta
        #: The :class:`~dafusion_aug.ClassLora` trained with these tokens, or ``None`` (not part of the token file).
        self.lora: Any = None

    # -- basic facts -------------------------------------------------------------------------------
    @property
    def num_vectors(self) -> int:
        return int(self.embeddings[0].shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings[0].shape[1])

    @property
    def family(self) -> str | None:
        """The model family the tokens were made for (``"sd1"``, ``"sd2"``, ``"sdxl"``), ``None`` when unrecorded."""
        return self.metadata.get("family")

    def __len__(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        return f"ClassTokens({len(self)} classes, num_vectors={self.num_vectors}, dim={self.dim})"

    def token_for(self, label: int | str) -> str:
        """The token of a class, by label or class name."""
        if isinstance(label, str):
            if label not in self.class_names:
                raise ValueError(f"label {label!r} is not one of the class names {self.class_names}")
            return self.tokens[self.class_names.index(label)]
        if not 0 <= int(label) < len(self):
            raise ValueError(f"label must be in [0, {len(self)}), got {label}")
        return self.tokens[int(label)]

    def content_hash(self) -> str:
        """Digest of the names, tokens and embedding values (what changes generated images)."""
        import hashlib

        h = hashlib.sha256(stable_digest(self.class_names, self.tokens).encode())
        for e in self.embeddings + (self.embeddings_2 or []):  # SD 1.x / 2.x hashes are those of earlier versions
            h.update(e.contiguous().numpy().tobytes())
        return h.hexdigest()

    def expanded_tokens(self, index: int) -> list[str]:
        """The tokenizer entries of class ``index``: ``<t>``, ``<t>_1``, ... (diffusers' multi-vector naming)."""
        t = self.tokens[index]
        return [t] + [f"{t}_{i}" for i in range(1, self.num_vectors)]

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokens to ``path`` (safetensors), atomically.

        One key per token (``[num_vectors, dim]``); SDXL tokens instead under the ecosystem's keys ``clip_l``
        (first text encoder) and ``clip_g`` (second), each ``[num_classes * num_vectors, dim]`` in label order,
        with ``family="sdxl"`` in the metadata. SD 2.x and SDXL files record their family.

        Returns:
            The path.

        Raises:
            TokenFileError: the file cannot be written (full disk, unwritable folder); nothing is left behind.
        """
        path = Path(path)
        meta = {
            "format": "pt",
            "dafusion_format": _FORMAT,
            "dafusion_aug_version": __version__,
            "class_names": json.dumps(self.class_names),
            "tokens": json.dumps(self.tokens),
            "dim": str(self.dim),
            "num_vectors": str(self.num_vectors),
            "base_model": str(self.metadata.get("base_model", "")),
            "training": json.dumps({k: v for k, v in self.metadata.items() if k != "base_model"}, default=str),
        }
        if self.family is not None:
            meta["family"] = self.family
        if self.embeddings_2 is not None:
            # SDXL: the ecosystem's keys, each class's rows stacked in label order (a one-class file is a plain
            # SDXL embedding); metadata tokens and num_vectors say which rows are whose
            tensors = {"clip_l": torch.cat(self.embeddings), "clip_g": torch.cat(self.embeddings_2)}
            meta["dim_2"] = str(int(self.embeddings_2[0].shape[1]))
        else:
            tensors = {t: e.contiguous() for t, e in zip(self.tokens, self.embeddings)}
        save_safetensors(tensors, str(path), meta, what="token file", error=TokenFileError)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, lora: Any = None) -> ClassTokens:
        """Read a token file (see :meth:`_read` for the formats); ``lora``: a LoRA file (or
        :class:`~dafusion_aug.ClassLora`) trained with these tokens (``fit_tokens(lora_rank=...)``), kept as
        :attr:`lora` and used by :class:`~dafusion_aug.DiffusionAugment`.

        Raises:
            TokenFileError: see :meth:`_read`.
            LoraFileError: the LoRA file is missing, corrupt or no UNet LoRA.
        """
        tokens = cls._read(path)
        if lora is not None:
            from .lora import ClassLora

            tokens.lora = lora if isinstance(lora, ClassLora) else ClassLora.load(lora)
        return tokens

    @classmethod
    def _read(cls, path: str | os.PathLike) -> ClassTokens:
        """Read a token file written by :meth:`save`, a one-token diffusers ``learned_embeds.safetensors``
        (the key is the token, its class the token without angle brackets) or an A1111 ``emb_params``
        safetensors embedding (its class is named after the file, as A1111 does; see :meth:`from_a1111`).

        Raises:
            TokenFileError: missing, corrupt, truncated, a pickle, inconsistent contents, several tensors without
                dafusion-aug's metadata (the order of their classes, the labels, is unknown; the keys found are
                named), or a header declaring tensors no embedding has (not floating-point, not ``[dim]`` /
                ``[num_vectors, dim]``, a width other than the declared ``dim`` or over 4096, over 1024 vectors
                per token, over 100,000 tensors or 1 GiB in all), refused before any tensor data is read.
        """
        path = os.fspath(path)
        tensors, meta = read_safetensors(path, "token file", pickle_hint=_PICKLE_HINT, check=_check_token_header)
        if not tensors:
            raise TokenFileError(f"token file {path!r} holds no tensors")
        if "tokens" not in meta:
            return cls._load_without_metadata(path, tensors)
        try:
            tokens = json.loads(meta["tokens"])
            _check_metadata_list(path, "tokens", tokens)
            names = json.loads(meta["class_names"]) if "class_names" in meta else [t.strip("<>") for t in tokens]
            _check_metadata_list(path, "class_names", names)
            extra = json.loads(meta.get("training", "{}") or "{}")
        except json.JSONDecodeError as e:
            raise TokenFileError(f"token file {path!r} has malformed metadata: {e}") from e
        if not isinstance(extra, dict):
            raise TokenFileError(f"token file {path!r} has malformed metadata: 'training' must be a JSON object, got {extra!r}"[:300])
        if len(names) != len(tokens):
            raise TokenFileError(f"token file {path!r} has {len(names)} class_names but {len(tokens)} tokens in its metadata")
        if meta.get("base_model"):
            extra["base_model"] = meta["base_model"]
        if meta.get("family"):
            extra["family"] = meta["family"]
        if meta.get("family") == "sdxl":
            return cls._load_sdxl(path, tensors, names, tokens, extra)
        missing = [t for t in tokens if t not in tensors]
        if missing:
            raise TokenFileError(f"token file {path!r} lists tokens {missing} that it does not store")
        try:
            return cls(names, [tensors[t] for t in tokens], tokens=tokens, metadata=extra)
        except (ValueError, TypeError) as e:
            raise TokenFileError(f"token file {path!r} is inconsistent: {e}") from e

    @classmethod
    def _load_sdxl(cls, path: str, tensors: Mapping[str, torch.Tensor], names: list[str], tokens: list[str],
                   extra: dict[str, Any]) -> ClassTokens:
        """An SDXL token file: ``clip_l`` and ``clip_g`` rows, ``len(tokens) * num_vectors`` each, in label order."""
        if set(tensors) != {"clip_l", "clip_g"}:
            raise TokenFileError(f"SDXL token file {path!r} must hold exactly the keys ['clip_g', 'clip_l'], got {sorted(tensors)}")
        split = {}
        for key in ("clip_l", "clip_g"):
            rows = tensors[key]
            if rows.ndim != 2 or rows.shape[0] % len(tokens):
                raise TokenFileError(f"SDXL token file {path!r}: {key!r} of shape {tuple(rows.shape)} does not split into "
                                     f"{len(tokens)} tokens")
            split[key] = list(rows.chunk(len(tokens)))
        try:
            return cls(names, split["clip_l"], tokens=tokens, metadata=extra, embeddings_2=split["clip_g"])
        except (ValueError, TypeError) as e:
            raise TokenFileError(f"token file {path!r} is inconsistent: {e}") from e

    @classmethod
    def _load_without_metadata(cls, path: str, tensors: Mapping[str, torch.Tensor]) -> ClassTokens:
        """A safetensors token file that dafusion-aug did not write: one diffusers token or an A1111 embedding.

        Raises:
            TokenFileError: several tensors (their order, the labels, is unknown), named with the keys found.
        """
        a1111 = _a1111_embedding(tensors, path)
        if a1111 is not None:
            return cls([Path(path).stem], [a1111[0]], metadata={"imported_from": "a1111"})
        if len(tensors) == 1:  # diffusers' learned_embeds.safetensors: the key is the token
            token = next(iter(tensors))
            try:
                return cls([token.strip("<>") or token], [tensors[token]], tokens=[token])
            except (ValueError, TypeError) as e:
                raise TokenFileError(f"token file {path!r} is inconsistent: {e}") from e
        raise TokenFileError(
            f"token file {path!r} holds {len(tensors)} tensors {sorted(tensors)[:20]} but no dafusion-aug metadata, so "
            "which class each one is (and its label) is unknown; build ClassTokens(class_names, [sd[k] for k in keys], "
            f"tokens=keys) in label order. ({_MULTI_CLASS_HINT})"
        )

    @classmethod
    def from_a1111(cls, path: str | os.PathLike, class_name: str | None = None) -> ClassTokens:
        """Import an AUTOMATIC1111 (stable-diffusion-webui) textual-inversion embedding as one class.

        Two formats: a safetensors file ``{"emb_params": tensor}`` and a ``torch.save`` file
        ``{"string_to_param": {"*": tensor}, "name": ..., ...}`` (the one plain diffusers'
        ``load_textual_inversion`` reads), the latter through ``torch.load(weights_only=True)``.

        Args:
            path: the ``.safetensors`` or ``.pt`` file.
            class_name: the class's name; default the file's ``name`` entry (``.pt``), else the file name
                without its extension (A1111's trigger word).

        Returns:
            One class whose token is ``token_for_class(class_name)`` and whose embedding is the file's
            ``[num_vectors, dim]`` tensor (stored as float32).

        Raises:
            TokenFileError: missing, unreadable, not loadable with ``weights_only=True``, not an A1111
                embedding (the keys found are named), a ``.pt`` over 1 GiB or a safetensors header declaring
                tensors no embedding has (see :meth:`load`), refused unread.
            TypeError, ValueError: ``class_name`` is not a non-empty str.
        """
        path = os.fspath(path)
        if class_name is not None and (not isinstance(class_name, str) or not class_name.strip()):
            raise TypeError(f"class_name must be a non-empty str or None, got {class_name!r}")
        if os.path.isfile(path) and not looks_like_pickle(path):
            data, _ = read_safetensors(path, "A1111 embedding", check=_check_token_header)
        else:
            data = _torch_load(path, "A1111 embedding")
        found = _a1111_embedding(data, path)
        if found is None:
            keys = list(data)[:20] if isinstance(data, Mapping) else type(data).__name__
            hint = f"; {_MULTI_CLASS_HINT}" if isinstance(data, Mapping) and len(data) > 1 else ""
            raise TokenFileError(f"{path!r} is not an A1111 embedding (no 'emb_params' or 'string_to_param' key): "
                                 f"got {keys}{hint}")
        embedding, name = found
        return cls([class_name or name or Path(path).stem], [embedding], metadata={"imported_from": "a1111"})

    @classmethod
    def from_dafusion(cls, path: str | os.PathLike, class_names: Sequence[str] | None = None) -> ClassTokens:
        """Import an original DA-Fusion token file: a ``learned_embeds.bin`` of one class or the aggregated
        ``.pt`` of several (a ``torch.save`` dict ``{"<class_name>": tensor}``).

        Loaded with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
        containers; the values are DA-Fusion's own, bit for bit (stored as float32).

        Args:
            path: the ``.bin`` / ``.pt`` file.
            class_names: the class names in label order (index = label). Required for a file of several
                classes: DA-Fusion merged its per-class files in no label order, so the file's order says
                nothing about the labels. Names are matched to DA-Fusion's tokens as DA-Fusion wrote them
                (``<pickup_truck>`` is found for ``"pickup_truck"`` and for ``"pickup truck"``), and kept
                as given. Default, for a one-class file: its token without the angle brackets.

        Returns:
            The classes named by ``class_names`` (a subset of the file's is fine), in that order.

        Raises:
            TokenFileError: missing, over 1 GiB (refused unread), not loadable with ``weights_only=True``, not a
                dict of token -> tensor, an A1111 embedding (see :meth:`from_a1111`), or a class of
                ``class_names`` it has no token for.
            ValueError: ``class_names`` missing for a file of several classes.
        """
        path = os.fspath(path)
        data = _torch_load(path, "DA-Fusion token file")
        if _a1111_embedding(data, path) is not None:
            raise TokenFileError(f"{path!r} is an A1111 embedding (keys {list(data)}), not a DA-Fusion token file; "
                                 "import it with ClassTokens.from_a1111(path)")
        if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
            keys = list(data)[:20] if isinstance(data, dict) else None
            raise TokenFileError(f"{path!r} must hold a dict of token -> tensor, got {type(data).__name__}"
                                 + (f" with keys {keys}" if keys is not None else ""))
        keys = [str(k) for k in data]
        if class_names is None:
            if len(keys) > 1:
                raise ValueError(
                    f"class_names is required for DA-Fusion file {path!r}: it holds the classes {keys} in the order "
                    "their files were merged, which is not the label order; pass class_names=[...] with label i "
                    f"at index i. ({_MULTI_CLASS_HINT})"
                )
            class_names = [keys[0].strip("<>") or keys[0]]
        if isinstance(class_names, (str, bytes)):
            raise TypeError(f"class_names must be a list of class names, got the str {class_names!r}; for one class pass [{class_names!r}]")
        names = list(class_names)
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"class_names must hold str class names, got {type(bad[0]).__name__} {bad[0]!r} in {names!r}"[:300])
        matched = {n: _dafusion_match(n, keys) for n in names}
        missing = [n for n, k in matched.items() if k is None]
        if missing:
            raise TokenFileError(f"{path!r} has no tokens for classes {missing}; it has the tokens {keys}")
        return cls(names, [data[matched[n]] for n in names], metadata={"imported_from": "da-fusion"})

    def export_diffusers(self, folder: str | os.PathLike) -> list[Path]:
        """Write one ``<folder>/<slug>/learned_embeds.safetensors`` per class.

        Each file holds one key (the token) and loads into a plain diffusers pipeline with
        ``pipe.load_textual_inversion(folder / slug)``. For SDXL each file is an SDXL embedding with the keys
        ``clip_l`` and ``clip_g``, which plain diffusers loads into both text encoders with
        ``sd = safetensors.torch.load_file(path)``, then
        ``pipe.load_textual_inversion(sd["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer_2)`` and ``pipe.load_textual_inversion(sd["clip_l"], token=token,
        text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)`` (:data:`DIFFUSERS_SDXL`).
        """
        out = []
        used: set[str] = set()
        for i, (token, emb) in enumerate(zip(self.tokens, self.embeddings)):
            slug = token_for_class(token.strip("<>"), i).strip("<>")  # never a raw name in a path
            while slug in used:  # "<A>" and "<a>" share a slug: never overwrite another class's file
                slug = f"{slug}-{i}"
            used.add(slug)
            sub = Path(folder) / slug
            path = sub / "learned_embeds.safetensors"
            if self.embeddings_2 is not None:
                tensors = {"clip_l": emb.contiguous(), "clip_g": self.embeddings_2[i].contiguous()}
            else:
                tensors = {token: emb.contiguous()}
            save_safetensors(tensors, str(path), {"format": "pt"}, what="token file", error=TokenFileError)
            out.append(path)
        return out

    # -- pipelines ---------------------------------------------------------------------------------
    def apply(self, pipe, *, replace: bool = False) -> None:
        """Add the tokens to ``pipe``'s tokenizer and text encoder (through ``load_textual_inversion``); for
        SDXL, ``embeddings`` to ``tokenizer`` / ``text_encoder`` and ``embeddings_2`` to ``tokenizer_2`` /
        ``text_encoder_2``.

        Idempotent: tokens already present with the same values are skipped.

        Args:
            pipe: a diffusers pipeline with ``tokenizer`` and ``text_encoder`` (and the ``_2`` pair for SDXL).
            replace: overwrite the rows of tokens that dafusion-aug added earlier with other values
                (used when a process runs several experiments on one loaded pipeline).

        Raises:
            TokenFileError: the tokens were made for another family (recorded in the file), SDXL needs two
                embeddings per token, the embedding size does not match a text encoder, or a token is already
                in the vocabulary with other values (and ``replace`` does not allow overwriting it).
        """
        tokenizer, encoder = getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)
        if tokenizer is None or encoder is None:
            raise TokenFileError(f"pipeline {type(pipe).__name__} has no tokenizer/text_encoder to apply tokens to")
        targets = [("", tokenizer, encoder, self.embeddings)]
        if self._check_family(pipe) == "sdxl":
            targets.append(("_2", pipe.tokenizer_2, pipe.text_encoder_2, self.embeddings_2))
        for suffix, tok, enc, embs in targets:
            dim = enc.get_input_embeddings().weight.shape[1]
            if dim != embs[0].shape[1]:
                raise TokenFileError(
                    f"token embeddings{suffix} have dim {embs[0].shape[1]} but the text encoder{' 2' if suffix else ''}'s embeddings have dim {dim}; "
                    f"these tokens were trained for another model (base_model={self.metadata.get('base_model', '?')!r})"
                )
            if not hasattr(pipe, f"_dafusion_base_vocab{suffix}"):
                setattr(pipe, f"_dafusion_base_vocab{suffix}", len(tok))
        ours: set[str] = getattr(pipe, "_dafusion_tokens", set())
        added: set[str] = set()
        for _, tok, enc, embs in targets:
            new_tokens, new_embs = self._rows_to_add(tok, enc, embs, ours, replace)
            if new_tokens:
                rows = sum(len(self.expanded_tokens(i)) for i, t in enumerate(self.tokens) if t in new_tokens)
                _grow_embeddings(enc, len(tok) + rows)
                pipe.load_textual_inversion(new_embs, token=new_tokens, tokenizer=tok, text_encoder=enc)
                added.update(new_tokens)
        for i, t in enumerate(self.tokens):
            if t in added:
                ours.update(self.expanded_tokens(i))
        pipe._dafusion_tokens = ours

    def _check_family(self, pipe) -> str:
        """The pipeline's family, after refusing tokens of another one.

        Raises:
            TokenFileError: the recorded family differs, or one embedding per token for an SDXL pipeline.
        """
        family = family_of(pipe)
        what = f"the class tokens {self.tokens[:3]}{'...' if len(self) > 3 else ''} (base_model={self.metadata.get('base_model', '?')!r})"
        if self.family is not None:
            requires_family(self.family, family, what, TokenFileError)
        elif family == "sdxl" and self.embeddings_2 is None:
            raise TokenFileError(f"{what} have one embedding per token, but the pipeline is SDXL with two text encoders "
                                 "(clip_l and clip_g); fit the tokens on the SDXL model (fit_tokens trains both)")
        return family

    def _rows_to_add(self, tokenizer, encoder, embeddings: list[torch.Tensor], ours: set[str], replace: bool):
        """The tokens (and embeddings) that ``tokenizer`` / ``encoder`` still lack; rows of tokens dafusion-aug
        added before are overwritten in place when ``replace``.

        Raises:
            TokenFileError: a token is a vocabulary word, or is present with other values and not replaceable.
        """
        weight = encoder.get_input_embeddings().weight
        vocab = tokenizer.get_vocab()
        new_tokens, new_embs = [], []
        for i, emb in enumerate(embeddings):
            names = self.expanded_tokens(i)
            present = [n in vocab for n in names]
            if not any(present):
                for n in names:
                    word = tokenizer.encode(n, add_special_tokens=False)
                    if len(word) == 1 and word[0] != tokenizer.unk_token_id:
                        # an added token is matched before BPE: it would replace this word in every prompt
                        raise TokenFileError(
                            f"token {n!r} (class {self.class_names[i]!r}) is a word of the tokenizer's vocabulary; added, it "
                            f"would replace that word in every prompt. Use a delimited token such as {'<' + n.strip('<>') + '>'!r}"
                        )
                new_tokens.append(self.tokens[i])
                new_embs.append(emb)
                continue
            ids = [vocab.get(n) for n in names]
            if all(present):
                current = weight.detach()[ids].to("cpu", torch.float32)
                target = emb.to(weight.dtype).to(torch.float32)
                if torch.equal(current, target):
                    continue
                if replace and all(n in ours for n in names):
                    with torch.no_grad():
                        weight[ids] = emb.to(weight.device, weight.dtype)
                    continue
            raise TokenFileError(
                f"token {self.tokens[i]!r} (class {self.class_names[i]!r}) is already in the tokenizer vocabulary "
                "with other values; use other token names, or a fresh pipeline"
            )
        return new_tokens, new_embs


def _grow_embeddings(encoder, size: int) -> None:
    """Give the text encoder ``size`` embedding rows before ``load_textual_inversion`` asks for the same number.

    diffusers resizes with transformers' default ``mean_resizing=True``, which draws the new rows from a
    normal fitted to the whole vocabulary (a covariance of the full table) and warns about it, for rows that
    the token values overwrite at once; resized here first, its own resize has nothing left to do.
    """
    import inspect

    if encoder.get_input_embeddings().weight.shape[0] >= size:
        return
    if "mean_resizing" in inspect.signature(encoder.resize_token_embeddings).parameters:
        encoder.resize_token_embeddings(size, mean_resizing=False)
