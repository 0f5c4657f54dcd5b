"""ESD internals (Gandikota et al., ICCV 2023): parameter sets, the training loop, checkpoints; see :mod:`.erase`.

Design choices (see docs/erasure.md):

- The frozen model θ* is the pipeline's own UNet, untouched: the trained tensors are separate float32
  copies fed in with ``torch.func.functional_call``. No second UNet, no swapping, and nothing of the
  caller's pipeline changes (not even ``.grad``: gradients come from ``torch.autograd.grad``).
- x_t is sampled with the frozen model (the authors' newer script), so the training distribution does
  not drift as the concept fades, and the sampling runs without autograd.
- x_t after k DDIM steps sits exactly at the noise level of the k-th DDIM timestep; that timestep is the
  one the three noise predictions use (the original CompVis code mixed up the two time axes).
- All randomness of step s comes from a CPU generator seeded with ``stable_hash(seed, s)``, so the RNG
  state of a checkpoint is (seed, step) and a resumed run equals an uninterrupted one bitwise on the CPU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._hashing import stable_hash
from ._io import atomic_write_bytes, remove_temporaries
from .tokens import _atomic_save_file, _read_safetensors

__all__ = ["train_esd", "parameter_names", "normalize_concepts", "resolve_pipeline", "METHODS", "CHECKPOINT_FILE"]

#: The parameter sets :func:`erase_concept` can train (see :func:`parameter_names`).
METHODS = ("esd-x", "esd-x-strict", "esd-u", "full")
CHECKPOINT_FILE = "esd-checkpoint.safetensors"
_CHECKPOINT_FORMAT = "dafusion-aug/esd-checkpoint/1"


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


# -- what to train ---------------------------------------------------------------------------------
def _unet_of(pipe) -> nn.Module:
    unet = getattr(pipe, "unet", None)
    if unet is None and isinstance(pipe, nn.Module):
        return getattr(pipe, "_orig_mod", pipe)
    if not isinstance(unet, nn.Module):
        raise TypeError(f"pipe must be a diffusers pipeline with a UNet (or the UNet itself), got {type(pipe).__name__}")
    return getattr(unet, "_orig_mod", unet)  # torch.compile'd UNets prefix their names with _orig_mod.


def parameter_names(unet: nn.Module, method: str) -> list[str]:
    """The UNet parameter names a method trains, in ``named_parameters`` order.

    - ``"esd-x"``: every cross-attention Linear, ``*.attn2.{to_q,to_k,to_v,to_out.0}.{weight,bias}``.
    - ``"esd-x-strict"``: only the keys and values of cross-attention, ``*.attn2.{to_k,to_v}.*``.
    - ``"esd-u"``: every ``nn.Linear`` / ``nn.Conv2d`` weight and bias outside ``attn2`` (norms excluded).
    - ``"full"``: every UNet parameter.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (any module with diffusers' naming works).
        method: one of :data:`METHODS`.
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


def resolve_pipeline(pipeline, device, dtype):
    from .pipeline import PipelineSpec, load_pipeline, pipeline_fingerprint, resolve_device, resolve_dtype

    if isinstance(pipeline, (str, os.PathLike, PipelineSpec)):
        spec = pipeline if isinstance(pipeline, PipelineSpec) else PipelineSpec(os.fspath(pipeline))
        overrides = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        import dataclasses

        spec = dataclasses.replace(spec, **overrides) if overrides else spec
        if spec.erasure is not None:
            raise ValueError(f"erase_concept trains from a base model; the spec has erasure={spec.erasure!r}")
        return load_pipeline(spec), spec.fingerprint()
    if not all(hasattr(pipeline, a) for a in ("unet", "text_encoder", "tokenizer", "scheduler")):
        raise TypeError(f"pipeline must be a model id, a PipelineSpec or a Stable Diffusion pipeline, got {type(pipeline).__name__}")
    unet = _unet_of(pipeline)
    want = resolve_device(device) if device is not None else None
    if want is not None and (want.type != unet.device.type or want.index not in (None, unet.device.index)):
        raise ValueError(f"device={device!r} differs from the pipeline's {unet.device}; move the pipeline or pass a model id")
    if dtype is not None and resolve_dtype(dtype) != unet.dtype:
        raise ValueError(f"dtype={dtype!r} differs from the pipeline's {unet.dtype}; convert the pipeline or pass a model id")
    return pipeline, pipeline_fingerprint(pipeline)


# -- checkpoints -------------------------------------------------------------------------------------
def _save_checkpoint(folder: Path, trained: Mapping[str, torch.Tensor], opt: torch.optim.Optimizer, step: int,
                     losses: list[float], signature: str, seed: int) -> None:
    tensors: dict[str, torch.Tensor] = {}
    state = opt.state_dict()["state"]
    for i, (name, value) in enumerate(trained.items()):
        tensors[f"param/{name}"] = value.detach().to("cpu").contiguous()
        for key, t in state.get(i, {}).items():
            tensors[f"{key}/{name}"] = torch.as_tensor(t).detach().to("cpu").contiguous()
    meta = {
        "dafusion_format": _CHECKPOINT_FORMAT,
        "step": str(step),
        "signature": signature,
        "rng": json.dumps({"scheme": "torch.Generator('cpu').manual_seed(stable_hash('esd-step', seed, step))", "seed": seed}),
        "losses": json.dumps(losses),
    }
    _atomic_save_file(tensors, str(folder / CHECKPOINT_FILE), meta)
    # A human-readable mirror; the safetensors file alone is what resuming reads.
    side = {"step": step, "signature": signature, "seed": seed, "last_loss": losses[-1] if losses else None}
    atomic_write_bytes(folder / "esd-checkpoint.json", json.dumps(side, indent=2).encode())


def _load_checkpoint(folder: Path, trained: Mapping[str, torch.Tensor], opt: torch.optim.Optimizer,
                     signature: str) -> tuple[int, list[float]] | None:
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return None
    tensors, meta = _read_safetensors(str(path), "ESD checkpoint")
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
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train the ``names`` tensors of ``pipe.unet`` with the ESD objective; ``pipe`` is left untouched.

    Returns:
        The trained tensors (float32, CPU) keyed by UNet parameter name, and the loss of every step.
    """
    from diffusers import DDIMScheduler
    from torch.func import functional_call
    from tqdm.auto import tqdm

    unet = _unet_of(pipe)
    device, dtype = unet.device, unet.dtype
    params = dict(unet.named_parameters())
    # float32 master copies: Adam at lr 1e-5 would lose its updates in fp16 weights
    trained = {n: params[n].detach().to(torch.float32, copy=True).requires_grad_(True) for n in names}
    opt = torch.optim.Adam(list(trained.values()), lr=learning_rate)

    start, losses = 0, []
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        remove_temporaries(checkpoint_dir)  # half-written checkpoints of a killed run
        if resume:
            loaded = _load_checkpoint(checkpoint_dir, trained, opt, signature)
            if loaded is not None:
                start, losses = loaded
                if start > steps:
                    raise ValueError(f"checkpoint_dir {str(checkpoint_dir)!r} is at step {start}, past steps={steps}")

    concept_list = list(concepts)
    all_prompts = sorted({p for ps in concepts.values() for p in ps} | {""})
    embeds = _encode(pipe, all_prompts, device, dtype)
    uncond = embeds[""]
    # our own scheduler object: the pipeline's keeps its state
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(ddim_steps)
    shape = _latent_shape(unet)

    bar = tqdm(total=steps, initial=start, disable=not progress, desc="erase", unit="step", dynamic_ncols=True)
    try:
        for step in range(start, steps):
            concept = concept_list[step % len(concept_list)]
            prompts = concepts[concept]
            cond = embeds[prompts[(step // len(concept_list)) % len(prompts)]]
            both = torch.cat([uncond, cond])
            gen = torch.Generator("cpu").manual_seed(stable_hash("esd-step", seed, step))
            k = int(torch.randint(ddim_steps, (1,), generator=gen))
            x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype) * sched.init_noise_sigma
            with torch.no_grad():
                for t in sched.timesteps[:k]:
                    e_u, e_c = unet(torch.cat([x, x]), t.to(device), encoder_hidden_states=both, return_dict=False)[0].chunk(2)
                    x = sched.step(e_u + start_guidance * (e_c - e_u), t, x).prev_sample
                t = sched.timesteps[k].to(device)
                e_0, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=both, return_dict=False)[0].float().chunk(2)
                target = e_0 - negative_guidance * (e_c - e_0)
            live = {n: v.to(dtype) for n, v in trained.items()}
            pred = functional_call(unet, live, (x, t), {"encoder_hidden_states": cond, "return_dict": False})[0]
            loss = F.mse_loss(pred.float(), target)
            grads = torch.autograd.grad(loss, list(trained.values()), allow_unused=True)
            for v, g in zip(trained.values(), grads):
                v.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4g}", concept=concept, refresh=False)
            done = step + 1
            if checkpoint_dir is not None and (done % checkpoint_every == 0 or done == steps):
                _save_checkpoint(checkpoint_dir, trained, opt, done, losses, signature, seed)
    finally:
        bar.close()
    return {n: v.detach().to("cpu") for n, v in trained.items()}, losses
