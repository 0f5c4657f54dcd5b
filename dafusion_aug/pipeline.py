"""What to load, how to load it once per process, and a fingerprint that names what was loaded.

Every public entry point takes its ``pipeline`` argument in the same forms (a model id, a local folder,
``"pocket"``, a :class:`PipelineSpec` or a loaded pipeline) and turns it into a :class:`PipelineSource`
with the one :func:`resolve_pipeline`.

A :class:`PipelineSpec` is small and picklable; the pipeline it loads is not pickled, ever. Every process
loads a spec at most once (:func:`load_pipeline` keeps one pipeline per spec and process), so DataLoader
workers started with ``spawn`` each load their own copy only when they must generate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import weakref
from pathlib import Path
from typing import Any

import torch

from .errors import PipelineError
from .families import family_from_index, img2img_class
from .hashing import file_digest, stable_digest

__all__ = [
    "PipelineSpec",
    "PipelineSource",
    "load_pipeline",
    "resolve_pipeline",
    "is_loaded_pipeline",
    "pipeline_fingerprint",
    "resolve_dtype",
    "resolve_device",
    "check_dtype_on_device",
    "pipeline_lock",
]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
_WEIGHT_SUFFIXES = (".safetensors", ".json", ".txt", ".model")

_LOADED: dict[tuple, Any] = {}
_LOCK = threading.Lock()
_FILE_FP: dict[tuple, str] = {}
_PIPE_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None`` -> float32; a name (``"fp16"``, ``"bfloat16"``, ...) or a ``torch.dtype`` -> that dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of {sorted(set(_DTYPES))} or a torch.dtype, got {dtype!r}")


#: The ``device`` default of every public function: CUDA when this machine has it, else the CPU.
AUTO = "auto"


def resolve_device(device: str | torch.device | None = AUTO, *, require_available: bool = False) -> torch.device:
    """The ``torch.device`` a ``device`` argument names; the one place device arguments are interpreted.

    Args:
        device: ``"auto"`` (the default everywhere: CUDA when available, else CPU; ``None`` means the same),
            a name (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) or a ``torch.device``.
        require_available: also check that this machine has that device (done when a model is loaded or a
            classifier trained, not when a spec is built: a spec made on a CPU-only machine may be sent to
            GPU workers).

    Returns:
        The device.

    Raises:
        ValueError: ``device`` names no torch device.
        PipelineError: ``require_available`` and the machine has no such device (no CUDA device, fewer
            CUDA devices than the index, no MPS); before, torch's raw driver error surfaced at ``.to()``.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None or device == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got {device!r}") from e
    if require_available:
        _check_available(resolved, device)
    return resolved


def _check_available(device: torch.device, given: Any) -> None:
    """Refuse a device this machine does not have (see :func:`resolve_device`)."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise PipelineError(f"device={given!r}, but no CUDA device is available on this machine "
                                "(torch.cuda.is_available() is False); pass device='cpu', or 'auto' to use CUDA when there is one")
        if device.index is not None and device.index >= count:
            raise PipelineError(f"device={given!r}, but this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise PipelineError(f"device={given!r}, but MPS is not available on this machine; pass device='cpu'")


def check_dtype_on_device(dtype: str | torch.dtype | None, device: torch.device, *, given_device: Any = AUTO,
                          error: type[Exception] = ValueError) -> None:
    """Refuse float16 on the CPU, naming both arguments: half precision is a GPU setting.

    PyTorch's CPU kernels for float16 are slow or missing, so a float16 pipeline on the CPU is a mistake
    (typically a GPU script run on a laptop); float32 is the CPU's precision (bfloat16 also works there).

    Args:
        dtype: the ``dtype`` argument as given.
        device: the device it would run on (resolved).
        given_device: the ``device`` argument as given, for the message.
        error: the exception class (``ValueError`` for arguments, ``PipelineError`` when ``"auto"`` found no GPU).

    Raises:
        ValueError (or ``error``): ``dtype`` is float16 and ``device`` is the CPU.
    """
    if device.type == "cpu" and resolve_dtype(dtype) == torch.float16:
        where = " and this machine has no CUDA device" if given_device is None or given_device == AUTO else ""
        raise error(f"dtype={dtype!r} needs a GPU, but device={given_device!r}{where}; float16 runs on CUDA only. "
                    "Pass dtype='float32' on the CPU (or dtype='float16' with device='cuda' on a GPU machine)")


def _pocket_path() -> Path:
    from .pocket import model_path

    return model_path()


def _local_dir_fingerprint(path: Path) -> str:
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise PipelineError(f"model folder {str(path)!r} holds no weights or configs (*.safetensors, *.json)")
    stat_key = (str(path), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stat_key not in _FILE_FP:
        _FILE_FP[stat_key] = stable_digest("local", [(f.relative_to(path).as_posix(), file_digest(str(f))) for f in files])
    return _FILE_FP[stat_key]


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """A picklable description of an img2img pipeline to load.

    Args:
        model: a Hugging Face Hub id (``"stable-diffusion-v1-5/stable-diffusion-v1-5"``), a local folder
            written by ``save_pretrained``, or ``"pocket"`` for the digits model shipped in the package.
        revision: Hub revision (branch, tag or commit); ignored for local folders.
        dtype: ``"float32"`` (default), ``"float16"`` (CUDA only) or ``"bfloat16"``, or a ``torch.dtype``.
        device: ``"auto"`` (default: CUDA when the loading machine has it, else the CPU; ``None`` means the
            same), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        erasure: optional path of an erasure file (see :func:`dafusion_aug.erase_concept`) applied at load time.
        scheduler: ``None`` keeps the model's scheduler; or one of ``"ddim"``, ``"pndm"``, ``"euler"``,
            ``"euler-a"``, ``"dpm++"``, ``"unipc"``.
        local_files_only: never contact the Hub, use the local Hugging Face cache only.
        channels_last: put the UNet and VAE in ``channels_last`` memory format (faster convolutions on
            recent NVIDIA GPUs).
        compile: ``torch.compile`` the UNet (slow first call, faster afterwards; CUDA recommended).
        vae_slicing: decode a batch one image at a time to cap memory; ``None`` turns it on for CUDA.

    Attention uses PyTorch's scaled-dot-product attention (diffusers' default processor on torch 2).
    None of the speed switches changes the fingerprint.

    Example:
        >>> spec = PipelineSpec("pocket", device="cpu")
        >>> pipe = spec.load()  # doctest: +SKIP
    """

    model: str
    revision: str | None = None
    dtype: str = "float32"
    device: str = AUTO
    erasure: str | None = None
    scheduler: str | None = None
    local_files_only: bool = False
    channels_last: bool = False
    compile: bool = False
    vae_slicing: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise TypeError(f"model must be a Hub id, a local folder or 'pocket', got {self.model!r}")
        object.__setattr__(self, "model", os.fspath(self.model))
        given_dtype, dt = self.dtype, resolve_dtype(self.dtype)
        object.__setattr__(self, "dtype", str(dt).removeprefix("torch."))
        if self.device is None or self.device == AUTO:
            object.__setattr__(self, "device", AUTO)  # resolved where the model loads, which may be a GPU worker
        else:
            object.__setattr__(self, "device", str(resolve_device(self.device)))
            check_dtype_on_device(given_dtype, resolve_device(self.device), given_device=self.device)
        if self.scheduler is not None and self.scheduler not in _SCHEDULERS:
            raise ValueError(f"scheduler must be None or one of {sorted(_SCHEDULERS)}, got {self.scheduler!r}")
        if self.erasure is not None:
            object.__setattr__(self, "erasure", os.fspath(self.erasure))
            if not os.path.isfile(self.erasure):
                raise FileNotFoundError(f"erasure file not found: {self.erasure!r}")

    # -- where the weights are -------------------------------------------------------------------
    def local_path(self) -> Path | None:
        """The folder the weights come from, or ``None`` for a Hub id."""
        if self.model == "pocket":
            return _pocket_path()
        p = Path(self.model).expanduser()
        if p.is_dir():
            return p.resolve()
        # a bare name ("my_model") is a missing folder, not a Hub id: never send it to the Hub
        if p.exists() or self.model.startswith((".", "/", "~")) or self.model.count("/") != 1:
            raise PipelineError(f"model {self.model!r} is neither a model folder nor a Hub id of the form 'owner/name'")
        return None

    def scheduler_class(self) -> str | None:
        """The scheduler class this spec loads (e.g. ``"DDIMScheduler"``), read without loading the model.

        The ``scheduler`` choice, else the ``_class_name`` in ``scheduler/scheduler_config.json`` of a local
        folder (``"pocket"`` included) or of the Hugging Face cache (never the network); ``None`` when it
        cannot tell. :func:`~dafusion_aug.precompute` plans its batches with it before (or without, on the
        Ray driver) loading the model.
        """
        if self.scheduler is not None:
            return _SCHEDULERS[self.scheduler]
        try:
            local = self.local_path()
            if local is not None:
                path = local / "scheduler" / "scheduler_config.json"
            else:
                from huggingface_hub import try_to_load_from_cache

                found = try_to_load_from_cache(self.model, "scheduler/scheduler_config.json", revision=self.revision)
                if not isinstance(found, str):
                    return None
                path = Path(found)
            name = json.loads(path.read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError, AttributeError, ImportError, PipelineError):
            return None
        return name if isinstance(name, str) else None

    def family(self) -> str | None:
        """The model family (``"sd1"``, ``"sd2"``, ``"sdxl"``), read from the configs without loading weights.

        A local folder's ``model_index.json`` (and ``unet/config.json``); for a Hub id, the same files in the
        Hugging Face cache (never the network), ``None`` when they are not there yet.

        Raises:
            PipelineError: the model is of no supported family (see :func:`dafusion_aug.families.family_from_index`),
                or a local folder has no ``model_index.json``.
        """
        local = self.local_path()
        if local is not None:
            return family_from_index(_read_index(local), lambda: _read_json(local / "unet" / "config.json"), f"folder {str(local)!r}")
        from huggingface_hub import try_to_load_from_cache

        def cached(name: str) -> dict | None:
            found = try_to_load_from_cache(self.model, name, revision=self.revision)
            return _read_json(Path(found)) if isinstance(found, str) else None

        index = cached("model_index.json")
        return None if index is None else family_from_index(index, lambda: cached("unet/config.json"), f"Hub id {self.model!r}")

    def fingerprint(self) -> str:
        """A digest that changes whenever the loaded weights would (stable across processes and machines).

        Hub models: id + revision. Local folders (and ``"pocket"``): a content hash of the weight and config
        files, and the family when it is not SD 1.x (so 1.x fingerprints are those of earlier versions).
        Both add the scheduler choice and the erasure file's content. dtype and device are left out:
        the same model in fp16 on a GPU and fp32 on a CPU share cached variants (see docs/design.md).

        Raises:
            PipelineError: a local folder of no supported family.
        """
        local = self.local_path()
        base = _local_dir_fingerprint(local) if local is not None else stable_digest("hub", self.model, self.revision or "main")
        erasure = file_digest(self.erasure) if self.erasure else None
        # a Hub id and revision already name the family; a folder without model_index.json fails at load
        family = self.family() if local is not None and (local / "model_index.json").is_file() else None
        if family not in (None, "sd1"):
            return stable_digest("spec", base, self.scheduler, erasure, family)
        return stable_digest("spec", base, self.scheduler, erasure)

    def load(self):
        """Load (once per process) and return the pipeline; see :func:`load_pipeline`."""
        return load_pipeline(self)


def _swap_scheduler(pipe, name: str) -> None:
    import diffusers

    cls = getattr(diffusers, _SCHEDULERS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def _speed_up(pipe, spec: PipelineSpec, device: torch.device) -> None:
    if spec.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    slicing = spec.vae_slicing if spec.vae_slicing is not None else device.type == "cuda"
    if slicing and hasattr(pipe.vae, "enable_slicing"):
        pipe.vae.enable_slicing()
    if spec.compile:
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead" if device.type == "cuda" else "default")


@contextlib.contextmanager
def _quiet_loading():
    """diffusers' and transformers' loading bars off while a model loads; their switches are restored after.

    Both print a bar per load ("Loading pipeline components...", "Loading weights") through a global switch;
    a training script that augments on the fly would show them in its log on every worker.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in saved:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in saved:
            if enabled:
                lib.enable_progress_bar()


def _load_kwargs(dtype: torch.dtype, family: str) -> dict[str, Any]:
    """``from_pretrained`` arguments that load safetensors only, the family's own (no safety checker, no
    watermark), and print no warnings."""
    from diffusers.utils import deprecation_utils, is_accelerate_available

    # diffusers renamed torch_dtype to dtype (the old name warns); older releases know only torch_dtype
    dtype_name = "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    return {
        dtype_name: dtype,
        **_family_kwargs(family),
        "use_safetensors": True,
        # accelerate only makes big models load faster; without it diffusers warns on every load unless told
        "low_cpu_mem_usage": is_accelerate_available(),
    }


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_index(folder: Path) -> dict:
    index = _read_json(folder / "model_index.json")
    if index is None:
        raise PipelineError(f"model folder {str(folder)!r} has no readable model_index.json, so it is no diffusers pipeline "
                            "folder; write one with pipe.save_pretrained(folder)")
    return index


def _family_and_where(spec: PipelineSpec, local: Path | None) -> tuple[str, str]:
    """The family to load, from ``model_index.json`` (the folder's, or the Hub's: a small config download)."""
    if local is not None:
        return spec.family(), f"folder {str(local)!r}"
    from diffusers import DiffusionPipeline
    from huggingface_hub import hf_hub_download

    where = f"Hub id {spec.model!r} (revision {spec.revision or 'main'})"
    try:
        index = DiffusionPipeline.load_config(spec.model, revision=spec.revision, local_files_only=spec.local_files_only)
    except (OSError, ValueError) as e:
        raise PipelineError(f"could not load an img2img pipeline from {where}: {_load_failure(e, spec.local_files_only)}") from e

    def unet_config() -> dict | None:
        try:
            return _read_json(Path(hf_hub_download(spec.model, "unet/config.json", revision=spec.revision,
                                                   local_files_only=spec.local_files_only)))
        except (OSError, ValueError):
            return None

    return family_from_index(dict(index), unet_config, where), where


def _family_kwargs(family: str) -> dict[str, Any]:
    """``from_pretrained`` arguments of a family's img2img pipeline beyond dtype and safetensors."""
    if family == "sdxl":
        return dict(add_watermarker=False)  # the invisible watermark changes pixels; DA-Fusion never used it
    return dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _load_uncached(spec: PipelineSpec):
    import diffusers

    dtype = resolve_dtype(spec.dtype)
    device = resolve_device(spec.device, require_available=True)
    check_dtype_on_device(spec.dtype, device, given_device=spec.device, error=PipelineError)
    local = spec.local_path()
    family, where = _family_and_where(spec, local)  # refuses other families before any weight is read
    cls = getattr(diffusers, img2img_class(family))
    kwargs = _load_kwargs(dtype, family)
    try:
        with _quiet_loading():
            pipe = _from_pretrained(cls, spec, local, kwargs)
    except (OSError, ValueError) as e:
        reason = _load_failure(e, spec.local_files_only) if local is None else str(e)
        raise PipelineError(
            f"could not load an img2img pipeline from {where} ({cls.__name__}): {reason}. "
            "Only safetensors weights are loaded; no remote code is ever run."
        ) from e
    if spec.scheduler is not None:
        _swap_scheduler(pipe, spec.scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    _speed_up(pipe, spec, device)
    if spec.erasure is not None:
        from .erasure import Erasure

        Erasure.load(spec.erasure).apply(pipe)
    pipe._dafusion_fingerprint = spec.fingerprint()
    return pipe


def _from_pretrained(cls, spec: PipelineSpec, local: Path | None, kwargs: dict[str, Any]):
    if local is not None:
        return cls.from_pretrained(str(local), local_files_only=True, **kwargs)
    return cls.from_pretrained(spec.model, revision=spec.revision, local_files_only=spec.local_files_only, **kwargs)


def _load_failure(e: BaseException, local_files_only: bool = False) -> str:
    """Why a Hub model did not load, in the user's terms.

    diffusers words a missing network as "outgoing traffic has been disabled" (the user disabled nothing
    unless ``HF_HUB_OFFLINE`` is set) and sends readers to "the stacktrace above" (the CLI prints none), so
    the cause is found in the exception chain and said plainly.
    """
    chain: list[BaseException] = []
    while e is not None and e not in chain and len(chain) < 20:
        chain.append(e)
        e = e.__cause__ or e.__context__
    root = chain[-1]
    names = {type(x).__name__ for x in chain}
    text = " ".join(str(x) for x in chain).lower()
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return ("it is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set, so the Hub was not asked; "
                "unset HF_HUB_OFFLINE (or download the model once) and try again")
    if local_files_only:
        return "it is not in the local Hugging Face cache, and local_files_only=True forbids downloading it"
    if any("connect" in n.lower() or "timeout" in n.lower() for n in names) or "couldn't connect" in text:
        return (f"it is not (fully) in the local Hugging Face cache, and the Hub could not be reached "
                f"({type(root).__name__}: {str(root)[:200]}); check the network connection, or download the model "
                "once where the Hub is reachable")
    detail = str(chain[0]).replace("Please check out the root cause in the stacktrace above.", "").strip()
    if root is not chain[0]:
        detail += f" (caused by {type(root).__name__}: {str(root)[:200]})"
    return detail


def load_pipeline(spec: PipelineSpec | str | os.PathLike, **overrides: Any):
    """Return the pipeline for ``spec``, loading it the first time this process asks.

    Args:
        spec: a :class:`PipelineSpec`, or a model id / folder / ``"pocket"`` (then ``overrides`` are
            :class:`PipelineSpec` fields such as ``dtype`` or ``device``).

    Returns:
        A ``StableDiffusionImg2ImgPipeline`` on the spec's device and dtype. The same object is returned
        to every caller in this process that asks for an equal spec; callers must not change its weights
        for good (dafusion-aug only adds token rows and applies erasures inside ``try/finally``).

    Raises:
        PipelineError: the model cannot be found or loaded.
    """
    if not isinstance(spec, PipelineSpec):
        spec = PipelineSpec(os.fspath(spec), **overrides)
    elif overrides:
        spec = dataclasses.replace(spec, **overrides)
    key = (spec, str(resolve_device(spec.device)), os.getpid())
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = _load_uncached(spec)
        return _LOADED[key]


#: The components every loaded pipeline has (diffusers' Stable Diffusion layout).
_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_PIPELINE_FORMS = "a model id, a folder, 'pocket', a PipelineSpec or a loaded pipeline"


def is_loaded_pipeline(obj: Any) -> bool:
    """Whether ``obj`` is a loaded pipeline: callable, with a UNet, VAE, text encoder, tokenizer and scheduler."""
    return callable(obj) and all(hasattr(obj, name) for name in _COMPONENTS)


@dataclasses.dataclass(frozen=True)
class PipelineSource:
    """A resolved ``pipeline`` argument: a spec to load (``spec``) or a pipeline already loaded (``pipe``).

    Exactly one of the two is set. A source from a spec loads nothing until :meth:`load` is called.
    """

    spec: PipelineSpec | None = None
    pipe: Any = None

    def load(self, *, fresh: bool = False):
        """The pipeline: the loaded one, or the spec's (shared per process, see :func:`load_pipeline`).

        Args:
            fresh: load a private copy instead of the process-wide one (for callers that change modules
                while they run, such as :func:`~dafusion_aug.fit_tokens`).
        """
        if self.pipe is not None:
            return self.pipe
        return _load_uncached(self.spec) if fresh else load_pipeline(self.spec)

    def fingerprint(self) -> str:
        """The spec's fingerprint (nothing loaded), or the loaded pipeline's (:func:`pipeline_fingerprint`)."""
        return self.spec.fingerprint() if self.spec is not None else pipeline_fingerprint(self.pipe)


def resolve_pipeline(
    pipeline: Any,
    *,
    device: str | torch.device | None = AUTO,
    dtype: str | torch.dtype | None = None,
    loaded_overrides: str = "refuse",
    caller: str = "dafusion-aug",
) -> PipelineSource:
    """Turn a ``pipeline`` argument into a :class:`PipelineSource`; the one place every entry point does it.

    Args:
        pipeline: a Hub id, a local folder or ``"pocket"`` (a spec with ``device`` and ``dtype``), a
            :class:`PipelineSpec` (``device`` and ``dtype`` override its fields when given), or a loaded
            pipeline (see :func:`is_loaded_pipeline`).
        device, dtype: where and in what precision a spec loads; ``device="auto"`` (or ``None``) and
            ``dtype=None`` leave a spec's own fields (and a loaded pipeline) as they are.
        loaded_overrides: what ``device`` / ``dtype`` mean for a loaded pipeline: ``"refuse"`` (any value is
            an error: move the pipeline instead) or ``"must-match"`` (allowed when they name the pipeline's
            own device and dtype).
        caller: the function named in messages.

    Returns:
        The source; nothing is loaded yet.

    Raises:
        TypeError: ``pipeline`` is none of the forms above.
        ValueError: ``device`` / ``dtype`` given for a loaded pipeline (or differing from it), or invalid.

    Example:
        >>> resolve_pipeline("pocket", device="cpu").spec.device
        'cpu'
    """
    if loaded_overrides not in ("refuse", "must-match"):
        raise ValueError(f"loaded_overrides must be 'refuse' or 'must-match', got {loaded_overrides!r}")
    device = None if device is None or (isinstance(device, str) and device == AUTO) else device
    overrides = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    if isinstance(pipeline, (str, os.PathLike)):
        return PipelineSource(spec=PipelineSpec(os.fspath(pipeline), **overrides))
    if isinstance(pipeline, PipelineSpec):
        return PipelineSource(spec=dataclasses.replace(pipeline, **overrides) if overrides else pipeline)
    if not is_loaded_pipeline(pipeline):
        raise TypeError(f"pipeline must be {_PIPELINE_FORMS}, got {type(pipeline).__name__}")
    if overrides and loaded_overrides == "refuse":
        raise ValueError(f"device and dtype apply to pipelines {caller} loads; move a loaded pipeline with pipe.to(...) "
                         f"(got device={device!r}, dtype={dtype!r})")
    if overrides:
        _check_matches(pipeline, device, dtype)
    return PipelineSource(pipe=pipeline)


def _check_matches(pipe, device, dtype) -> None:
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    want = resolve_device(device) if device is not None else None
    if want is not None and (want.type != unet.device.type or want.index not in (None, unet.device.index)):
        raise ValueError(f"device={device!r} differs from the pipeline's {unet.device}; move the pipeline or pass a model id")
    if dtype is not None and resolve_dtype(dtype) != unet.dtype:
        raise ValueError(f"dtype={dtype!r} differs from the pipeline's {unet.dtype}; convert the pipeline or pass a model id")


def pipeline_lock(pipe) -> threading.RLock:
    """The lock that serialises dafusion-aug's changes to, and runs of, one loaded pipeline.

    A loaded pipeline is shared (by every transform on it, and by :func:`load_pipeline` within a process),
    and generating changes it for a while: class tokens are written into the text encoder, a class's
    erasure is swapped into the UNet and restored, a float16 pipeline may run in float32 for a redo.
    :meth:`~dafusion_aug.DiffusionAugment.generate` holds this lock from the first change to the restore,
    so threads calling transforms on one pipeline are safe (they take turns to generate; cache hits do not
    wait). Re-entrant; kept beside the pipeline (not on it, so the pipeline still deep-copies), for as long
    as the pipeline lives.

    Args:
        pipe: a loaded pipeline.

    Returns:
        The pipeline's ``threading.RLock`` (the same object for the same pipeline).
    """
    with _LOCK:
        lock = _PIPE_LOCKS.get(pipe)
        if lock is None:
            lock = _PIPE_LOCKS[pipe] = threading.RLock()
        return lock


def pipeline_fingerprint(pipe) -> str:
    """Fingerprint of an already-loaded pipeline: its component configs and weights.

    Token rows added by dafusion-aug are left out (only the base vocabulary's rows count), so applying
    class tokens does not change the fingerprint. Memoised on the pipeline object.
    """
    cached = getattr(pipe, "_dafusion_fingerprint", None)
    if cached is not None:
        return cached
    import hashlib

    h = hashlib.sha256()
    h.update(f"pipeline:{type(pipe).__name__}".encode())
    for name, component in sorted(pipe.components.items()):
        if component is None:
            continue
        # the vocabulary before dafusion-aug added token rows, per tokenizer / text encoder pair (SDXL has two)
        base_vocab = getattr(pipe, "_dafusion_base_vocab" + ("_2" if name.endswith("_2") else ""), None)
        h.update(f"|{name}:{type(component).__name__}".encode())
        config = getattr(component, "config", None)
        if config is not None:
            raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            cfg = {k: v for k, v in raw.items() if not k.startswith("_") and k != "transformers_version"}
            if name in ("text_encoder", "text_encoder_2") and base_vocab is not None and "vocab_size" in cfg:
                cfg["vocab_size"] = base_vocab  # grown by added token rows, which do not count
            h.update(stable_digest(cfg).encode())
        if isinstance(component, torch.nn.Module):
            for pname, tensor in sorted(component.state_dict().items()):
                t = tensor.detach()
                if name in ("text_encoder", "text_encoder_2") and base_vocab is not None and t.shape and t.shape[0] > base_vocab and "token_embedding" in pname:
                    t = t[:base_vocab]
                h.update(f"{pname}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.to("cpu", torch.float32).contiguous().numpy().tobytes())
        elif hasattr(component, "get_vocab"):
            vocab = component.get_vocab()
            if base_vocab is not None:
                vocab = {k: v for k, v in vocab.items() if v < base_vocab}
            h.update(stable_digest(sorted(vocab.items())).encode())
    fp = stable_digest("loaded", h.hexdigest())
    pipe._dafusion_fingerprint = fp
    return fp
