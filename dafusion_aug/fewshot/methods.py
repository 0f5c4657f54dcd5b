"""The methods of the few-shot protocol: which transform each one trains with, and da-fusion's tokens.

:func:`method_transform` is the one place a method's :class:`~dafusion_aug.DiffusionAugment` is built,
so a script that reads a run's cached variants (``benchmarks/fewshot_fidelity.py``) computes the same
cache keys as :func:`~dafusion_aug.fewshot.run_fewshot` did.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors

from ..data import ImageList
from ..erasure import Erasure
from ..filters import ClassifierFilter
from ..fit import fit_tokens
from ..hashing import stable_hash
from ..tokens import ClassTokens
from ..transform import DiffusionAugment
from .classifier import ClassifierSpec, to_input, train_classifier

__all__ = ["METHODS", "BEYOND", "LORA_METHODS", "GENERATIVE", "method_transform", "fit_subset_tokens", "subset_filter", "with_masks", "MaskedSamples"]

#: The methods of the protocol, in the order the paper reports them.
METHODS = ("baseline", "real-guidance", "real-guidance-agnostic", "da-fusion")
#: Beyond DA-Fusion (issue 32), run only when named: ``da-fusion-lora`` (the tokens and a class LoRA fitted
#: jointly, ``fit_tokens(lora_rank=...)``), ``diff-mix`` (the same model, inter-class edits with soft labels,
#: ``target="other-class"``) and ``diff-mix-no-lora`` (inter-class edits with da-fusion's tokens alone: the
#: ablation that shows what the LoRA adds).
BEYOND = ("da-fusion-lora", "diff-mix", "diff-mix-no-lora")
#: The methods whose tokens are fitted with a class LoRA.
LORA_METHODS = BEYOND[:2]
#: The methods that augment with generated variants.
GENERATIVE = METHODS[1:] + BEYOND


def method_transform(
    method: str,
    pipeline: Any,
    class_names: Sequence[str],
    *,
    tokens: ClassTokens | str | os.PathLike | None = None,
    prompt: str = "a photo of a {name}",
    agnostic_prompt: str = "a photo",
    class_erasures: Mapping[int | str, Any] | None = None,
    **kwargs: Any,
) -> DiffusionAugment:
    """The transform a generative method trains with.

    Args:
        method: ``"real-guidance"`` (``prompt`` with the class name), ``"real-guidance-agnostic"``
            (``agnostic_prompt``), ``"da-fusion"`` (``prompt`` with the class's learned token), or one of
            :data:`BEYOND`: ``"da-fusion-lora"`` (da-fusion with the LoRA the tokens carry), ``"diff-mix"``
            (the same, each variant drawn towards another class, with a soft label) and ``"diff-mix-no-lora"``
            (inter-class edits with tokens that carry no LoRA).
        pipeline: what :class:`~dafusion_aug.DiffusionAugment` accepts.
        class_names: the classes, index = label.
        tokens: the learned tokens (da-fusion and the LoRA methods; theirs carry ``.lora``).
        prompt, agnostic_prompt: as :func:`~dafusion_aug.fewshot.run_fewshot` takes them.
        class_erasures: ``label -> Erasure or file`` for the erased protocol (``None`` or empty: none).
        kwargs: the rest of the transform (``num_variants``, ``p``, ``strength``, ``num_inference_steps``,
            ``guidance_scale``, ``cache``, ``batch_size``, ``on_miss``).

    Returns:
        The :class:`~dafusion_aug.DiffusionAugment`.

    Raises:
        ValueError: ``"baseline"`` (it has no transform), an unknown method, da-fusion without tokens, or a
            LoRA method whose tokens carry no LoRA.

    Example:
        >>> aug = method_transform("real-guidance", "pocket", CLASS_NAMES, cache="demo/cache", on_miss="real")  # doctest: +SKIP
    """
    if method not in GENERATIVE:
        raise ValueError(f"method must be one of the generative methods {list(GENERATIVE)}, got {method!r}")
    erasures = dict(class_erasures) if class_erasures else None
    if method == "da-fusion" or method in BEYOND:
        if tokens is None:
            raise ValueError(f"method {method!r} needs the learned tokens, got tokens=None")
        if isinstance(tokens, (str, os.PathLike)):
            tokens = ClassTokens.load(tokens)
        if (method in LORA_METHODS) != (tokens.lora is not None) and method != "da-fusion":
            raise ValueError(f"method {method!r} needs tokens {'with' if method in LORA_METHODS else 'without'} a LoRA "
                             "(fit_tokens(lora_rank=...) makes one)")
        if method in BEYOND:
            kwargs["target"] = "same-class" if method == "da-fusion-lora" else "other-class"
        return DiffusionAugment(pipeline, tokens=tokens, prompt=prompt, class_erasures=erasures, **kwargs)
    text = prompt if method == "real-guidance" else agnostic_prompt
    return DiffusionAugment(pipeline, class_names=list(class_names), prompt=text, class_erasures=erasures, **kwargs)


def fit_subset_tokens(
    pipe: Any,
    subset: Sequence[tuple[Any, int]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    *,
    seed: int,
    fit_settings: Mapping[str, Any],
    erasures: Sequence[Erasure] | None = None,
) -> ClassTokens:
    """da-fusion's tokens for one few-shot subset: read from ``path``, or fitted and saved there.

    Without ``erasures`` one :func:`~dafusion_aug.fit_tokens` run learns every class jointly; with them
    each class's token is learned alone, from its own images, with that class erased, in a run of
    ``fit_settings["steps"]`` steps (Adam moves a token about lr per step whatever the batch holds, and the
    joint run steps every token that often: runs of steps / classes left tokens 10x short).

    Args:
        pipe: the loaded pipeline.
        subset: the ``(image, label)`` training images.
        class_names: the classes, index = label.
        path: the token file (named by the caller after everything that decides it).
        seed: the fit's seed.
        fit_settings: ``steps``, ``batch_size``, ``learning_rate``, ``num_vectors``, ``initializer`` (and any
            other keys, which are recorded in the tokens' metadata when fitting per class).
            With ``lora_rank`` > 0 (and ``lora_learning_rate``) a class LoRA is fitted with the tokens and
            kept beside them as ``<path stem>.lora.safetensors``; the tokens come back carrying it (``.lora``).
        erasures: one erasure per class, for the erased protocol.

    Returns:
        The tokens.
    """
    path = Path(path)
    rank = int(fit_settings.get("lora_rank", 0))
    lora_path = path.with_name(path.stem + ".lora.safetensors")
    if path.is_file() and (rank == 0 or lora_path.is_file()):
        return ClassTokens.load(path, lora=lora_path if rank else None)
    names = list(class_names)
    kw = dict(num_vectors=fit_settings["num_vectors"], initializer=fit_settings["initializer"], batch_size=fit_settings["batch_size"],
              learning_rate=fit_settings["learning_rate"], seed=seed, progress=False)
    if rank:
        if erasures is not None:
            raise ValueError("a class LoRA cannot be fitted for the erased protocol yet (fit_settings lora_rank with erasures)")
        kw.update(lora_rank=rank, lora_learning_rate=fit_settings["lora_learning_rate"])
    if erasures is None:
        tokens = fit_tokens(pipe, ImageList(subset, names), names, steps=fit_settings["steps"], **kw)
        if rank:
            tokens.lora.save(lora_path)  # before the tokens: a token file without its LoRA is fitted again
    else:
        embs, embs_2, family = [], [], {}
        for c, name in enumerate(names):
            with erasures[c].applied(pipe):
                one = fit_tokens(pipe, ImageList([(im, 0) for im, y in subset if y == c], [name]), [name], steps=fit_settings["steps"], **kw)
            embs.append(one.embeddings[0])
            if one.embeddings_2 is not None:  # SDXL: the second text encoder's embedding too
                embs_2.append(one.embeddings_2[0])
            family = {"family": one.family} if one.family else {}
        tokens = ClassTokens(names, embs, metadata={"fit": "one run per class, each with its class erased", **fit_settings, **family},
                             embeddings_2=embs_2 or None)
    tokens.save(path)
    return tokens


# -- region edits and filters in the protocol (issue 18) ------------------------------------------------------
def _filter_input(image: Any, size: int) -> torch.Tensor:
    return to_input([image], size)[0]


def subset_filter(spec: ClassifierSpec, subset: Sequence[tuple[Any, int]], num_classes: int, *, k: int, seed: int,
                  threshold: float = 0.5, device: Any = "cpu") -> ClassifierFilter:
    """A leakage-free filter: ``spec``'s classifier trained on the k-shot ``subset`` alone (no augmentation,
    its own seed), scoring each variant by its label's probability (ALIA's filter, within the protocol).

    The global torch RNG is left as it was, so the classifiers trained after it draw what they drew before.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stable_hash("fewshot-filter", k, seed))
        model = train_classifier(spec, list(subset), num_classes, None, device=device)
    return ClassifierFilter(model, transform=functools.partial(_filter_input, size=spec.image_size), threshold=threshold)


def _as_mask(mask: Any) -> tv_tensors.Mask:
    return mask if isinstance(mask, tv_tensors.Mask) else tv_tensors.Mask(torch.as_tensor(np.asarray(mask)))


def with_masks(samples: Sequence[tuple[Any, int]], masks: Callable[[Any], Any]) -> list[tuple[Any, tv_tensors.Mask, int]]:
    """``(image, label)`` samples as ``(image, Mask, label)``, the mask computed by ``masks(image)``."""
    return [(image, _as_mask(masks(image)), label) for image, label in samples]


class MaskedSamples:
    """Applies a region-editing transform to ``(image, label)`` samples, giving it ``masks(image)`` as the
    sample's ``tv_tensors.Mask`` (what the classifier's training loop calls)."""

    def __init__(self, augment: Callable[[Any], Any], masks: Callable[[Any], Any]) -> None:
        self.augment, self.masks = augment, masks

    def __call__(self, sample: tuple[Any, int]) -> tuple[Any, int]:
        image, label = sample
        out, _, label = self.augment((image, _as_mask(self.masks(image)), label))
        return out, label
