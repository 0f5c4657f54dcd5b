"""The variant plan: what variant ``v`` of an image is, decided before anything is generated.

Each real image has ``num_variants`` (M) variants. Variant ``v`` of the image with pixel digest ``d`` and
label ``y`` fixes its strength, prompt and generator seed through stable hashes of ``(seed, d, y, v)``, so
it is the same picture on every worker and every run, and its cache key is
``sha256(format version, d, y, generation fingerprint, v)``. The generation fingerprint hashes everything
else that decides the pixels (model, tokens, prompts, strengths, guidance, steps, resolution, erasures).

These are plain functions, the way ``torchvision.transforms.v2.functional`` holds the work of its
transforms: :class:`~dafusion_aug.DiffusionAugment` is the policy around them, and ``precompute`` plans
its batches with the transform's :meth:`~dafusion_aug.DiffusionAugment.variant`.

Example:
    >>> from dafusion_aug.hashing import image_digest
    >>> key = cache_key("f" * 64, image_digest(np.zeros((8, 8, 3), np.uint8)), 1, 0)
    >>> len(key)
    64
"""

from __future__ import annotations

import hashlib
import math
import numbers
import string
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from ._samples import Label, check_one_class, label_index
from .fingerprints import fingerprint_callable
from .hashing import stable_digest, stable_hash

if TYPE_CHECKING:
    from .cache import AugmentationCache
    from .erasure import Erasure
    from .tokens import ClassTokens

__all__ = [
    "Variant",
    "Augmenter",
    "DEFAULT_STRENGTHS",
    "CACHE_FORMAT_VERSION",
    "PromptSpec",
    "check_strength_probs",
    "check_prompt",
    "prompt_needs_class",
    "prompt_options",
    "generation_fingerprint",
    "cache_key",
    "variant_strength",
    "variant_prompt",
    "variant_seed",
    "fingerprint_callable",
]

#: DA-Fusion's randomized intensity: each strength with probability 1/4.
DEFAULT_STRENGTHS = (0.25, 0.5, 0.75, 1.0)
#: Part of every cache key; raise it when a change makes old cached variants wrong. 2 (issue 15): the
#: generation fingerprint covers ``seed`` (under 1, a cache could hold another seed's pixels).
CACHE_FORMAT_VERSION = 2

PromptSpec = str | Sequence[str] | Mapping[Any, str | Sequence[str]] | Callable[[str, int | None], str]


class Variant(NamedTuple):
    """What variant ``v`` of an image is: its strength, prompt, seed and cache key, for a region edit
    its edit mask (bool ``(H, W)``, ``True`` where it may change; see :mod:`dafusion_aug.regions`), and
    for an inter-class edit (``target="other-class"``, :mod:`dafusion_aug.mixing`) the class its prompt names."""

    strength: float
    prompt: str
    seed: int
    key: str
    edit: np.ndarray | None = None
    target: int | None = None


class Augmenter(Protocol):
    """What :func:`~dafusion_aug.precompute` needs of a transform (:class:`~dafusion_aug.DiffusionAugment` is one)."""

    spec: Any
    cache: AugmentationCache | None
    class_names: list[str] | None
    num_variants: int
    batch_size: int | None
    target: Any  # None, or the OtherClass of inter-class edits (dafusion_aug.mixing)

    def fingerprint(self) -> str: ...

    def cache_key(self, digest: str, label: Label, v: int, edit: np.ndarray | None = None) -> str: ...

    def variant(self, digest: str, label: Label, v: int, edit: np.ndarray | None = None) -> Variant: ...

    def edit_masks(self, sample: Any) -> list[np.ndarray | None]: ...

    def erasure_group(self, label: Label) -> Any: ...

    def sample_images(self, sample: Any) -> tuple[list[np.ndarray], list[Label]]: ...

    def mixes_strengths(self) -> bool: ...

    def generate(self, images: Sequence[np.ndarray], variants: Sequence[Variant], labels: Sequence[Label] | None = None,
                 *, batch_size: int | None = None, mixed_strengths: bool | None = None,
                 counts: dict | None = None) -> list[np.ndarray | None]: ...


# -- checks ----------------------------------------------------------------------------------------------
def check_strength_probs(strengths: Sequence[float], strength_probs: Sequence[float] | None) -> tuple[float, ...]:
    """The probability of each strength: uniform by default, else as given.

    Raises:
        TypeError: ``strength_probs`` is not a sequence of numbers (numpy scalars are numbers).
        ValueError: not one probability per strength, a NaN, infinite or negative one, or a sum other than 1.
    """
    if strength_probs is None:
        return tuple([1.0 / len(strengths)] * len(strengths))
    if isinstance(strength_probs, (str, bytes)) or not hasattr(strength_probs, "__iter__"):
        raise TypeError(f"strength_probs must be a sequence of numbers, got {type(strength_probs).__name__}: {strength_probs!r}")
    raw = list(strength_probs)
    bad = [x for x in raw if isinstance(x, bool) or not isinstance(x, numbers.Real)]
    if bad:
        raise TypeError(f"strength_probs must hold numbers, got {type(bad[0]).__name__}: {bad[0]!r}")
    probs = [float(x) for x in raw]
    if len(probs) != len(strengths):
        raise ValueError(f"strength_probs must have one entry per strength ({len(strengths)}), got {len(probs)}")
    if not all(math.isfinite(x) for x in probs):  # NaN compares False everywhere: [nan, 1.0] always drew 1.0
        raise ValueError(f"strength_probs must be finite, got {probs}")
    if any(x < 0 for x in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"strength_probs must be non-negative and sum to 1, got {probs} (sum {sum(probs)})")
    return tuple(probs)


def _fields(template: str) -> list[str]:
    """The replacement fields of a ``str.format`` template (``"{name!r}"`` and ``"{name:>8}"`` name ``name``).

    Raises:
        ValueError: the template is not a valid format string (a lone ``{`` or ``}``).
    """
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def _needs_names(template: str) -> bool:
    return "name" in _fields(template)


def _check_template(t: Any, where: str, class_names: Sequence[str] | None) -> None:
    if not isinstance(t, str):
        raise TypeError(f"{where} must be a str, got {type(t).__name__}: {t!r}")
    try:
        fields = _fields(t)
        other = sorted({f for f in fields if f != "name"})
        if other:  # positional "{}", another name, or an attribute / index of name ("{name.upper}")
            raise ValueError(f"it uses {', '.join('{' + f + '}' for f in other)}")
        t.format(name="x")
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise ValueError(f"{where}={t!r} may only use the field {{name}} (with an optional !conversion or "
                         f":format spec): {e}") from e
    if "name" in fields and class_names is None:
        raise ValueError(f"{where}={t!r} uses {{name}}, which needs class_names or tokens")


def check_prompt(prompt: PromptSpec, class_names: Sequence[str] | None) -> None:
    """Check a prompt spec: a template, a list of templates, a per-class dict of them, or a callable.

    Templates are ``str.format`` strings that may only use the field ``{name}`` (a conversion or format spec
    such as ``{name!r}`` or ``{name:>8}`` included), and only when the classes are known.

    Raises:
        TypeError: a template is not a str, or the spec has another type.
        ValueError: ``{name}`` without classes, another field, or a dict that misses a class.
    """
    if isinstance(prompt, str):
        _check_template(prompt, "prompt", class_names)
    elif callable(prompt):
        return
    elif isinstance(prompt, Mapping):
        if class_names is None:
            raise ValueError("a per-class prompt dict needs class_names or tokens")
        for k, v in prompt.items():
            label_index(k, class_names, "prompt key")
            for t in [v] if isinstance(v, str) else list(v):
                _check_template(t, f"prompt[{k!r}]", class_names)
        missing = [n for i, n in enumerate(class_names) if i not in prompt and n not in prompt]
        if missing:
            raise ValueError(f"the prompt dict has no entry for classes {missing}")
    elif isinstance(prompt, Sequence) and prompt:
        for i, t in enumerate(prompt):
            _check_template(t, f"prompt[{i}]", class_names)
    else:
        raise TypeError(f"prompt must be a str, a non-empty list of str, a dict or a callable, got {prompt!r}")


# -- prompts -----------------------------------------------------------------------------------------------
def prompt_needs_class(prompt: PromptSpec) -> bool:
    """Whether a prompt needs the image's class: the one rule the transform and ``precompute`` follow.

    A template that uses ``{name}`` (in a list of templates, any of them) and a per-class dict need it; a
    template without ``{name}`` (``"a photo"``) does not. A callable does not either: it receives what the
    sample has (one label, ``None``, or all of an image's labels, see :func:`prompt_options`).
    """
    if isinstance(prompt, str):
        return _needs_names(prompt)
    if callable(prompt):
        return False
    if isinstance(prompt, Mapping):
        return True
    return any(_needs_names(t) for t in prompt)


def _class_word(label: Label, class_names: Sequence[str] | None, tokens: ClassTokens | None) -> str:
    """What ``{name}`` becomes: the class's token, or its name without tokens (Real Guidance).

    Raises:
        ValueError: there is no label, or several (see :func:`~dafusion_aug._samples.check_one_class`).
    """
    if label is None:
        raise ValueError("this prompt needs the class, but the sample has no label (labels_getter found none)")
    if isinstance(label, tuple):
        check_one_class([label], "this prompt")
    if tokens is not None:
        return tokens.token_for(label)
    assert class_names is not None
    return class_names[label]


def _callable_names(label: Label, class_names: Sequence[str] | None, tokens: ClassTokens | None) -> str | tuple[str, ...]:
    """The ``name`` a prompt callable receives: the class word, ``""`` when it is not known (no label, or
    no class names or tokens), and a tuple of them for an image with several labels."""
    if isinstance(label, tuple):
        return tuple(_callable_names(x, class_names, tokens) for x in label)  # type: ignore[misc]
    if label is None or (tokens is None and class_names is None):
        return ""
    return _class_word(label, class_names, tokens)


def prompt_options(prompt: PromptSpec, label: Label, class_names: Sequence[str] | None,
                   tokens: ClassTokens | None) -> list[str]:
    """The prompts a variant of class ``label`` chooses from, with ``{name}`` filled in.

    A callable is called as ``prompt(name, label)``: ``name`` is the class's token (or its name without
    tokens), ``""`` when the class is not known; for an image with several labels (a detection target)
    ``name`` and ``label`` are tuples, one entry per label.

    Raises:
        ValueError: the prompt needs one class and the image has no label, or several.
        TypeError: a prompt callable returned something other than a str or a non-empty list of str.
    """
    if callable(prompt) and not isinstance(prompt, str):
        out = prompt(_callable_names(label, class_names, tokens), label)
        options = [out] if isinstance(out, str) else list(out) if isinstance(out, (list, tuple)) else None
        if not options or not all(isinstance(t, str) for t in options):
            raise TypeError(f"the prompt callable must return a str or a non-empty list of str, got {out!r} for label {label!r}")
        return options
    if isinstance(prompt, Mapping):
        if label is None:
            raise ValueError("a per-class prompt dict needs a label, but the sample has none")
        if isinstance(label, tuple):
            check_one_class([label], "a per-class prompt dict")
        assert class_names is not None
        prompt = prompt[label] if label in prompt else prompt[class_names[label]]
    templates = [prompt] if isinstance(prompt, str) else list(prompt)
    # always format: "{name!r}" and "{name:>8}" need the class too, and "{{" stands for "{" (check_prompt
    # allows only templates that format); before, such templates reached the model as they were written
    return [t.format(name=_class_word(label, class_names, tokens)) if _needs_names(t) else t.format() for t in templates]


# -- fingerprint and keys ---------------------------------------------------------------------------------
def generation_fingerprint(
    model: str,
    *,
    tokens: ClassTokens | None,
    class_names: Sequence[str] | None,
    prompt: PromptSpec,
    strength: Sequence[float],
    strength_probs: Sequence[float],
    guidance_scale: float,
    num_inference_steps: int,
    negative_prompt: str | None,
    resolution: int | None,
    class_erasures: Mapping[int, Erasure],
    seed: int,
    region: tuple[str, int] | None = None,
    filter: tuple | None = None,
    lora: str | None = None,
    target: tuple | None = None,
) -> str:
    """Digest of everything that decides the generated pixels besides the image, label and variant.

    Every argument of the transform that changes a variant's pixels is here (issue 15 found ``seed``
    missing: two transforms differing only in ``seed`` shared entries). Left out on purpose: ``dtype`` and
    ``device`` (see docs/design.md), ``batch_size``, and what decides only *whether* and *which* variant is
    used (``p``, ``num_variants``, ``on_miss``, ``labels_getter``, ``cache``).

    ``tokens``, ``class_names``, ``prompt``, ``strength``, ``strength_probs``, ``guidance_scale``,
    ``num_inference_steps``, ``negative_prompt``, ``resolution``, ``class_erasures`` and ``seed`` are as the
    transform holds them. A prompt callable counts by what decides its output: its code and the values it
    closes over and reads (:func:`~dafusion_aug.fingerprints.fingerprint_callable`).

    Args:
        model: the model's fingerprint (:meth:`PipelineSpec.fingerprint` or :func:`pipeline_fingerprint`;
            it covers the weights, the scheduler and a spec's erasure file).
        region: ``(region, mask_grow)`` of a region edit, ``None`` for ``region="all"``. Added to the digest
            only when set, so keys without it are those of earlier versions; a masked variant's key also
            holds its edit mask (:func:`~dafusion_aug.regions.edit_digest`).
        filter: :func:`~dafusion_aug.filters.filter_fingerprint` of a filtered transform (``None``: no
            filter, not in the digest): a different filter, threshold, ``max_tries`` or fallback is a
            different entry.
        lora: the content hash of the transform's :class:`~dafusion_aug.ClassLora` (``None``: none, not in the digest).
        target: :meth:`~dafusion_aug.OtherClass.fingerprint` of an inter-class transform (``None``: variants of
            the image's own class, not in the digest).

    Returns:
        A sha256 hex digest.
    """
    prompt_fp = fingerprint_callable(prompt, "prompt") if callable(prompt) and not isinstance(prompt, str) else prompt
    extra = [] if region is None else [("region", region[0], int(region[1]))]
    extra += [] if filter is None else [list(filter)]
    extra += [] if lora is None else [("lora", lora)]
    extra += [] if target is None else [list(target)]
    return stable_digest(
        "generation",
        model,
        tokens.content_hash() if tokens is not None else None,
        None if class_names is None else list(class_names),
        prompt_fp,
        tuple(strength),
        tuple(strength_probs),
        guidance_scale,
        num_inference_steps,
        negative_prompt,
        resolution,
        sorted((label, e.content_hash()) for label, e in class_erasures.items()),
        int(seed),
        *extra,
    )


def cache_key(fingerprint: str, digest: str, label: Label, v: int) -> str:
    """``sha256(format_version, image_digest, label, generation_fingerprint, v)``, as DESIGN.md specifies."""
    # a plain joined string (all parts are hex, ints or None) is cheaper than the JSON of stable_digest
    return hashlib.sha256(f"dafusion-aug/cache-key/{CACHE_FORMAT_VERSION}|{digest}|{label}|{fingerprint}|{int(v)}".encode()).hexdigest()


def variant_strength(seed: int, digest: str, label: Label, v: int, strengths: Sequence[float],
                     strength_probs: Sequence[float]) -> float:
    """Variant ``v``'s strength: the inverse CDF of ``strength_probs`` at a uniform number from a stable hash."""
    u = stable_hash(seed, digest, label, v, "strength") / float(1 << 63)
    cum, strength = 0.0, strengths[-1]
    for s, q in zip(strengths, strength_probs):
        cum += q
        if u < cum:
            return s
    return strength


def variant_prompt(seed: int, digest: str, label: Label, v: int, options: Sequence[str]) -> str:
    """Variant ``v``'s prompt among ``options`` (see :func:`prompt_options`)."""
    return options[stable_hash(seed, digest, label, v, "prompt") % len(options)]


def variant_seed(seed: int, digest: str, label: Label, v: int) -> int:
    """Variant ``v``'s generator seed: ``stable_hash(seed, digest, label, v)``."""
    return stable_hash(seed, digest, label, v)
