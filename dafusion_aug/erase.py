"""Concept erasure (ESD, Gandikota et al., ICCV 2023): :func:`erase_concept` trains an :class:`~dafusion_aug.Erasure`.

The erasure file itself (format, apply, restore) lives in :mod:`dafusion_aug.erasure`; this module holds
the training: which tensors a method trains, the ESD loop and its checkpoints. Design choices (see
docs/erasure.md):

- The frozen model θ* is the pipeline's own UNet, untouched: the trained tensors are separate float32
  copies fed in with ``torch.func.functional_call``. No second UNet, no swapping, and nothing of the
  caller's pipeline changes (not even ``.grad``: gradients come from ``torch.autograd.grad``).
- x_t is sampled with the frozen model (the authors' newer script), so the training distribution does
  not drift as the concept fades, and the sampling runs without autograd.
- x_t after k DDIM steps sits exactly at the noise level of the k-th DDIM timestep; that timestep is the
  one the three noise predictions use (the original CompVis code mixed up the two time axes).
- All randomness of step s comes from a CPU generator seeded with ``stable_hash(seed, s)``, so the RNG
  state of a checkpoint is (seed, step) and a resumed run equals an uninterrupted one bitwise on the CPU.

Checkpoint format: ``esd-checkpoint.safetensors`` (``param/<name>`` and Adam's ``<state>/<name>`` tensors;
metadata ``dafusion_format``, ``step``, ``signature``, ``rng``, ``losses``), then a readable
``esd-checkpoint.json`` mirror; resuming reads the safetensors file alone.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checkpoint import write_checkpoint
from ._checks import check_int
from ._io import read_safetensors, remove_temporaries
from .erasure import Erasure, base_digests, normalize_concepts, unet_of
from .errors import PipelineError
from .families import family_of
from .hashing import stable_digest, stable_hash
from .pipeline import resolve_pipeline

__all__ = ["Erasure", "erase_concept", "ensure_erasure", "parameter_names", "METHODS"]

#: The parameter sets :func:`erase_concept` can train (see :func:`parameter_names`).
METHODS = ("esd-x", "esd-x-strict", "esd-u", "full")
CHECKPOINT_FILE = "esd-checkpoint.safetensors"
_CHECKPOINT_FORMAT = "dafusion-aug/esd-checkpoint/1"
#: Preserved prompts per ESD step (round-robin over ``preserve``), sharing one sampled x_t.
PRESERVE_BATCH = 8


def parameter_names(unet: nn.Module, method: str) -> list[str]:
    """The UNet parameter names a method trains, in ``named_parameters`` order.

    - ``"esd-x"``: every cross-attention Linear, ``*.attn2.{to_q,to_k,to_v,to_out.0}.{weight,bias}``.
    - ``"esd-x-strict"``: only the keys and values of cross-attention, ``*.attn2.{to_k,to_v}.*``.
    - ``"esd-u"``: every ``nn.Linear`` / ``nn.Conv2d`` weight and bias outside ``attn2`` (norms excluded).
    - ``"full"``: every UNet parameter.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (any module with diffusers' naming works).
        method: one of :data:`METHODS`.

    Raises:
        ValueError: an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if method == "full":
        return [n for n, _ in unet.named_parameters()]
    wanted = set()
    for mname, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        parts = mname.split(".")
        in_xattn = "attn2" in parts
        rest = ".".join(parts[parts.index("attn2") + 1 :]) if in_xattn else ""
        if (
            (method == "esd-u" and not in_xattn)
            or (method == "esd-x" and rest in ("to_q", "to_k", "to_v", "to_out.0"))
            or (method == "esd-x-strict" and rest in ("to_k", "to_v"))
        ):
            wanted.update(f"{mname}.{p}" for p, _ in module.named_parameters(recurse=False))
    return [n for n, _ in unet.named_parameters() if n in wanted]


# -- checkpoints -------------------------------------------------------------------------------------
def _save_checkpoint(folder: Path, trained: Mapping[str, torch.Tensor], opt: torch.optim.Optimizer, step: int,
                     losses: list[float], signature: str, seed: int) -> None:
    tensors: dict[str, torch.Tensor] = {}
    state = opt.state_dict()["state"]
    for i, (name, value) in enumerate(trained.items()):
        tensors[f"param/{name}"] = value
        for key, t in state.get(i, {}).items():
            tensors[f"{key}/{name}"] = torch.as_tensor(t)
    meta = {
        "dafusion_format": _CHECKPOINT_FORMAT,
        "step": str(step),
        "signature": signature,
        "rng": json.dumps({"scheme": "torch.Generator('cpu').manual_seed(stable_hash('esd-step', seed, step))", "seed": seed}),
        "losses": json.dumps(losses),
    }
    # the JSON is a human-readable mirror; the safetensors file alone is what resuming reads
    side = {"step": step, "signature": signature, "seed": seed, "last_loss": losses[-1] if losses else None}
    write_checkpoint(folder, Path(CHECKPOINT_FILE).stem, tensors, meta, side, indent=2)


def _load_checkpoint(folder: Path, trained: Mapping[str, torch.Tensor], opt: torch.optim.Optimizer,
                     signature: str) -> tuple[int, list[float]] | None:
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return None
    tensors, meta = read_safetensors(str(path), "ESD checkpoint")
    if meta.get("dafusion_format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not an ESD checkpoint written by dafusion-aug")
    if meta.get("signature") != signature:
        raise ValueError(
            f"checkpoint_dir {str(folder)!r} holds a run with other settings (model, concepts, method or "
            "hyper-parameters); use another checkpoint_dir, or resume=False to start over"
        )
    state: dict[int, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for i, (name, value) in enumerate(trained.items()):
            value.copy_(tensors[f"param/{name}"])
            entry = {key.split("/", 1)[0]: t for key, t in tensors.items() if key.split("/", 1)[1] == name and not key.startswith("param/")}
            if entry:
                state[i] = entry
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return int(meta["step"]), [float(x) for x in json.loads(meta.get("losses", "[]"))]


# -- the loop ----------------------------------------------------------------------------------------
@torch.no_grad()
def _encode_sdxl(pipe, prompts: Sequence[str], device: torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
    """SDXL's prompt encoding per prompt, as its pipeline does: ``[1, seq, dim]`` hidden states of both text
    encoders and the UNet's added conditioning (encoder 2's pooled embedding, ``time_ids`` of the native
    size, no crop). The empty prompt is zeros when the model says so (``force_zeros_for_empty_prompt``), as
    SDXL's own unconditional branch is."""
    size = int(unet_of(pipe).config.sample_size) * int(pipe.vae_scale_factor)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype)
    zeros = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
    embeds, added = {}, {}
    for p in prompts:
        emb, _, pooled, _ = pipe.encode_prompt(p, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        if p == "" and zeros:
            emb, pooled = torch.zeros_like(emb), torch.zeros_like(pooled)
        embeds[p] = emb.to(device=device, dtype=dtype)
        added[p] = {"text_embeds": pooled.to(device=device, dtype=dtype), "time_ids": time_ids}
    return embeds, added


@torch.no_grad()
def _encode(pipe, prompts: Sequence[str], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Text embeddings ``[1, seq, dim]`` per prompt, through the pipeline's own prompt encoder when it has one."""
    out = {}
    for p in prompts:
        if hasattr(pipe, "encode_prompt"):
            emb = pipe.encode_prompt(p, device, 1, False)[0]
        else:
            tok = pipe.tokenizer
            ids = tok([p], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            emb = pipe.text_encoder(ids.to(device))[0]
        out[p] = emb.to(device=device, dtype=dtype)
    return out


def _latent_shape(unet) -> tuple[int, int, int, int]:
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (1, int(unet.config.in_channels), int(h), int(w))


class _ESDStep:
    """One ESD step: sample x_t with the frozen UNet, then regress the trained copies towards ε*."""

    def __init__(self, pipe, concepts: Mapping[str, Sequence[str]], ddim_steps: int, start_guidance: float,
                 negative_guidance: float, seed: int, preserve: Sequence[str] = (), preserve_weight: float = 0.0) -> None:
        from diffusers import DDIMScheduler

        self.unet = unet_of(pipe)
        self.device, self.dtype = self.unet.device, self.unet.dtype
        self.concepts, self.concept_list = concepts, list(concepts)
        self.preserve, self.preserve_weight = list(preserve), preserve_weight
        all_prompts = sorted({p for ps in concepts.values() for p in ps} | {""} | set(self.preserve))
        # the family's prompt encoding; SDXL adds pooled embeddings and size conditioning (self.added)
        self.added: dict[str, dict[str, torch.Tensor]] = {}
        if family_of(pipe) == "sdxl":
            self.embeds, self.added = _encode_sdxl(pipe, all_prompts, self.device, self.dtype)
        else:
            self.embeds = _encode(pipe, all_prompts, self.device, self.dtype)
        # our own scheduler object: the pipeline's keeps its state
        self.sched = DDIMScheduler.from_config(pipe.scheduler.config)
        self.sched.set_timesteps(ddim_steps)
        self.shape = _latent_shape(self.unet)
        self.ddim_steps, self.start_guidance, self.negative_guidance, self.seed = ddim_steps, start_guidance, negative_guidance, seed

    def concept(self, step: int) -> str:
        return self.concept_list[step % len(self.concept_list)]

    def conditioning(self, prompts: Sequence[str]) -> dict[str, Any]:
        """The UNet's keyword arguments for a batch of ``prompts`` (their hidden states; SDXL's added conditioning)."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": torch.cat([self.embeds[p] for p in prompts])}
        if self.added:
            kwargs["added_cond_kwargs"] = {k: torch.cat([self.added[p][k] for p in prompts]) for k in ("text_embeds", "time_ids")}
        return kwargs

    def _sample(self, prompt: str, k: int, gen: torch.Generator) -> torch.Tensor:
        """x_t after ``k`` DDIM steps of the frozen model under ``prompt`` (at ``start_guidance``), from seeded noise."""
        unet, sched = self.unet, self.sched
        both = self.conditioning(["", prompt])
        x = torch.randn(self.shape, generator=gen).to(device=self.device, dtype=self.dtype) * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps[:k]:
                e_u, e_c = unet(torch.cat([x, x]), t.to(self.device), **both, return_dict=False)[0].chunk(2)
                x = sched.step(e_u + self.start_guidance * (e_c - e_u), t, x).prev_sample
        return x

    def __call__(self, step: int, trained: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The loss of ``step`` (gradients flow into ``trained`` only)."""
        from torch.func import functional_call

        unet, sched, device = self.unet, self.sched, self.device
        prompts = self.concepts[self.concept(step)]
        prompt = prompts[(step // len(self.concept_list)) % len(prompts)]
        cond, both = self.conditioning([prompt]), self.conditioning(["", prompt])
        gen = torch.Generator("cpu").manual_seed(stable_hash("esd-step", self.seed, step))
        k = int(torch.randint(self.ddim_steps, (1,), generator=gen))
        x = self._sample(prompt, k, gen)
        t = sched.timesteps[k].to(device)
        with torch.no_grad():
            e_0, e_c = unet(torch.cat([x, x]), t, **both, return_dict=False)[0].float().chunk(2)
            target = e_0 - self.negative_guidance * (e_c - e_0)
        live = {n: v.to(self.dtype) for n, v in trained.items()}
        pred = functional_call(unet, live, (x, t), {**cond, "return_dict": False})[0]
        loss = F.mse_loss(pred.float(), target)
        if self.preserve:
            loss = loss + self.preserve_weight * self._preservation(step, k, t, live)
        return loss

    def _preservation(self, step: int, k: int, t: torch.Tensor, live: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """MSE between the trained and the frozen predictions under up to :data:`PRESERVE_BATCH` preserved
        prompts (round-robin), on an x_t sampled under the first of them (the regulariser of Kumari et al.'s
        concept ablation, batched)."""
        from torch.func import functional_call

        n = min(PRESERVE_BATCH, len(self.preserve))
        picked = [self.preserve[(step * n + j) % len(self.preserve)] for j in range(n)]
        gen = torch.Generator("cpu").manual_seed(stable_hash("esd-preserve", self.seed, step))
        x = self._sample(picked[0], k, gen).expand(n, -1, -1, -1)
        cond = self.conditioning(picked)
        with torch.no_grad():
            target = self.unet(x, t, **cond, return_dict=False)[0].float()
        pred = functional_call(self.unet, live, (x, t), {**cond, "return_dict": False})[0]
        return F.mse_loss(pred.float(), target)


def _resume(checkpoint_dir: Path | None, resume: bool, trained, opt, signature: str, steps: int) -> tuple[int, list[float]]:
    """``(first step, losses so far)``: from ``checkpoint_dir``'s checkpoint, or a fresh start."""
    if checkpoint_dir is None:
        return 0, []
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(checkpoint_dir)  # half-written checkpoints of a killed run
    loaded = _load_checkpoint(checkpoint_dir, trained, opt, signature) if resume else None
    if loaded is None:
        return 0, []
    start, losses = loaded
    if start > steps:
        raise ValueError(f"checkpoint_dir {str(checkpoint_dir)!r} is at step {start}, past steps={steps}")
    return start, losses


def train_esd(
    pipe,
    concepts: Mapping[str, Sequence[str]],
    names: Sequence[str],
    *,
    negative_guidance: float,
    steps: int,
    learning_rate: float,
    start_guidance: float,
    ddim_steps: int,
    seed: int,
    progress: bool,
    checkpoint_dir: Path | None,
    checkpoint_every: int,
    resume: bool,
    signature: str,
    on_step: Callable[[int, float], None] | None = None,
    preserve: Sequence[str] = (),
    preserve_weight: float = 0.0,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train the ``names`` tensors of ``pipe.unet`` with the ESD objective; ``pipe`` is left untouched.

    Returns:
        The trained tensors (float32, CPU) keyed by UNet parameter name, and the loss of every step.
    """
    from ._progress import progress_bar

    params = dict(unet_of(pipe).named_parameters())
    # float32 master copies: Adam at lr 1e-5 would lose its updates in fp16 weights
    trained = {n: params[n].detach().to(torch.float32, copy=True).requires_grad_(True) for n in names}
    opt = torch.optim.Adam(list(trained.values()), lr=learning_rate)
    start, losses = _resume(checkpoint_dir, resume, trained, opt, signature, steps)
    loss_of = _ESDStep(pipe, concepts, ddim_steps, start_guidance, negative_guidance, seed, preserve, preserve_weight)
    bar = progress_bar(total=steps, initial=start, progress=progress, desc="erase", unit="step")
    try:
        for step in range(start, steps):
            loss = loss_of(step, trained)
            grads = torch.autograd.grad(loss, list(trained.values()), allow_unused=True)
            for v, g in zip(trained.values(), grads):
                v.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4g}", concept=loss_of.concept(step), refresh=False)
            done = step + 1
            if checkpoint_dir is not None and (done % checkpoint_every == 0 or done == steps):
                _save_checkpoint(checkpoint_dir, trained, opt, done, losses, signature, seed)
            if on_step is not None:
                on_step(done, losses[-1])
    finally:
        bar.close()
    return {n: v.detach().to("cpu") for n, v in trained.items()}, losses


def _check_args(method: str, steps: int, ddim_steps: int, checkpoint_every: int, learning_rate: float) -> tuple[int, int, int]:
    """``(steps, ddim_steps, checkpoint_every)`` as Python ints, checked with the method and learning rate."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    ints = tuple(check_int(value, name, minimum=1) for name, value in
                 (("steps", steps), ("ddim_steps", ddim_steps), ("checkpoint_every", checkpoint_every)))
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    return ints


def _check_preserve(preserve: Any, weight: Any, concepts: Mapping[str, Sequence[str]]) -> list[str]:
    """The preserved prompts as a list (empty for plain ESD); refuses bad types, a bad weight, or an erased prompt."""
    if preserve is None:
        return []
    prompts = [preserve] if isinstance(preserve, str) else preserve
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise TypeError(f"preserve must be a prompt or a list of non-empty prompts, got {preserve!r}")
    if len(prompts) == 0:  # an empty list would silently be plain ESD, whatever preserve_weight says
        raise ValueError(f"preserve must hold at least one prompt, got {preserve!r}; pass preserve=None (the default) for plain ESD")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"preserve_weight must be a finite number > 0, got {weight!r}")
    erased = {p for ps in concepts.values() for p in ps}
    clash = sorted(set(prompts) & erased)
    if clash:
        raise ValueError(f"preserve must not hold a prompt that is being erased, got {clash}")
    return list(dict.fromkeys(prompts))


def _base_pipeline(pipeline: Any, device, dtype) -> tuple[Any, str]:
    """The pipeline to train from and its fingerprint; refuses a spec or pipe that already has an erasure."""
    source = resolve_pipeline(pipeline, device=device, dtype=dtype, loaded_overrides="must-match")
    if source.spec is not None and source.spec.erasure is not None:
        raise ValueError(f"erase_concept trains from a base model; the spec has erasure={source.spec.erasure!r}")
    pipe, base_fp = source.load(), source.fingerprint()
    if Erasure.active(pipe) is not None:
        raise PipelineError(f"erase_concept trains from the base model, but the pipeline has {Erasure.active(pipe)!r} applied; restore it first")
    return pipe, base_fp


def erase_concept(
    pipeline,
    concepts: str | Sequence[str] | Mapping[str, str | Sequence[str]],
    *,
    method: str = "esd-x",
    negative_guidance: float = 1.0,
    steps: int = 1000,
    learning_rate: float = 1e-5,
    start_guidance: float = 3.0,
    ddim_steps: int = 50,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    preserve: str | Sequence[str] | None = None,
    preserve_weight: float = 1.0,
    _on_step: Callable[[int, float], None] | None = None,
) -> Erasure:
    """Erase concepts from a text-to-image model with ESD; the pipeline itself is never changed.

    Each step picks a concept (round-robin) and its next prompt c, a DDIM step k in ``[0, ddim_steps)``,
    samples x_t with the frozen model by k DDIM steps from seeded noise under c at ``start_guidance``,
    and moves ε_θ(x_t, c, t) towards ε* = ε(x_t, ∅, t) − η·(ε(x_t, c, t) − ε(x_t, ∅, t)) of the frozen model.
    With ``preserve`` prompts, each step also takes the next :data:`PRESERVE_BATCH` preserved prompts p
    (round-robin), samples one x_t under the first of them the same way, and adds ``preserve_weight`` ·
    MSE(ε_θ(x_t, p, t), ε_θ*(x_t, p, t)) over them: the model must keep drawing what those prompts drew
    (concept ablation's regulariser, Kumari et al. 2023). Plain ESD leaves neighbours
    unguarded; on the pocket model v2 it erased nine as much as three (docs/erasure.md).

    Args:
        pipeline: a model id, a local folder, ``"pocket"``, a :class:`~dafusion_aug.PipelineSpec`, or a
            loaded diffusers pipeline (left untouched: the trained tensors are separate copies).
        concepts: ``"zebra"``, ``["zebra", "cat"]``, or ``{"zebra": ["a photo of a zebra", "zebra"]}``.
        method: ``"esd-x"`` (cross-attention), ``"esd-x-strict"``, ``"esd-u"`` or ``"full"``; see
            :func:`parameter_names`.
        negative_guidance: η, how far past "unconditional" the target points.
        steps: optimisation steps (batch 1).
        learning_rate: Adam learning rate.
        start_guidance: classifier-free guidance used to sample x_t.
        ddim_steps: DDIM steps of the sampling schedule.
        seed: seeds every step's randomness (the global torch RNG is not used).
        progress: show a progress bar with the loss.
        device, dtype: where and in what precision to run when ``pipeline`` is loaded here; for a loaded
            pipeline they must match it (or be None). Trained tensors are float32 in any case.
        checkpoint_dir: folder for a checkpoint every ``checkpoint_every`` steps and at the end;
            with ``resume`` a later call continues from it (bitwise equal to an uninterrupted run on CPU).
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint_dir``'s checkpoint when there is one.
        preserve: prompts whose noise predictions must not change (e.g. the other classes' prompts);
            None: plain ESD (an empty list is refused, so a list that came out empty by mistake is not plain ESD silently).
        preserve_weight: weight of the preservation term (> 0; used only with ``preserve``).

    Returns:
        An :class:`Erasure`; ``erasure.save(path)`` writes it.

    Raises:
        ValueError: bad arguments, or a checkpoint from other settings.
        PipelineError: the model cannot be loaded, or the pipeline already has an erasure applied.

    Example:
        >>> erasure = erase_concept("pocket", "seven", steps=100, learning_rate=2e-3, ddim_steps=10)  # doctest: +SKIP
        >>> erasure.save("erase-seven.safetensors")  # doctest: +SKIP
    """
    steps, ddim_steps, checkpoint_every = _check_args(method, steps, ddim_steps, checkpoint_every, learning_rate)
    concept_map = normalize_concepts(concepts)
    kept = _check_preserve(preserve, preserve_weight, concept_map)
    pipe, base_fp = _base_pipeline(pipeline, device, dtype)
    names = parameter_names(unet_of(pipe), method)
    params = dict(unet_of(pipe).named_parameters())
    base_dtype, digests = base_digests({n: params[n] for n in names})
    hparams = {
        "negative_guidance": float(negative_guidance),
        "learning_rate": float(learning_rate),
        "start_guidance": float(start_guidance),
        "ddim_steps": ddim_steps,
        "seed": int(seed),
        "compute_dtype": base_dtype,
        "sampler": "frozen",
    }
    if kept:  # only then: files and checkpoints of plain ESD keep their names and signatures
        hparams.update(preserve=kept, preserve_weight=float(preserve_weight))
    if family_of(pipe) != "sd1":  # recorded (and checked at apply) for other families; SD 1.x files are unchanged
        hparams["family"] = family_of(pipe)
    tensors, losses = train_esd(
        pipe, concept_map, names, negative_guidance=float(negative_guidance), steps=steps, learning_rate=float(learning_rate),
        start_guidance=float(start_guidance), ddim_steps=ddim_steps, seed=int(seed), progress=progress,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None, checkpoint_every=checkpoint_every,
        resume=resume, signature=stable_digest("esd", base_fp, method, concept_map, hparams, digests), on_step=_on_step,
        preserve=kept, preserve_weight=float(preserve_weight),
    )
    return Erasure(tensors, concepts=concept_map, method=method, base_dtype=base_dtype, base_digests=digests,
                   base_model=base_fp, metadata={**hparams, "steps": steps, "losses": losses})


def ensure_erasure(path: str | os.PathLike, pipeline: Any, concepts: Any, **kwargs: Any) -> float | None:
    """Make sure ``path`` holds the erasure of ``concepts``: train and save it there when the file is missing.

    The caller names the file after everything that decides it (e.g. a :func:`~dafusion_aug.hashing.stable_digest`
    of the base model's fingerprint, the concepts and the settings), so an existing file is the right one.

    Args:
        path: the erasure file.
        pipeline, concepts, kwargs: passed to :func:`erase_concept`.

    Returns:
        The seconds training took, or ``None`` when the file was already there.

    Example:
        >>> ensure_erasure("runs/erase-seven.safetensors", "pocket", "seven", steps=100)  # doctest: +SKIP
    """
    path = Path(path)
    if path.is_file():
        return None
    t0 = time.perf_counter()
    erasure = erase_concept(pipeline, concepts, **kwargs)
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    erasure.save(path)
    return seconds
