"""``fit_tokens``: textual inversion for every class of a data set in one run.

All classes learn jointly: each batch mixes classes (a class-balanced stream), and each sample's prompt
puts its own class's token into one of the textual-inversion templates. Only the new token rows learn;
every weight of the model stays bitwise unchanged, and the caller's tokenizer gets no new tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._fit_io import (
    IMAGENET_TEMPLATES,
    FitError,
    clear_checkpoints,
    load_checkpoint,
    open_training_data,
    read_training_data,
    save_checkpoint,
)
from ._hashing import stable_digest, stable_hash
from ._io import remove_temporaries
from .functional import _to_batch, native_resolution
from .pipeline import PipelineSpec, pipeline_fingerprint, resolve_device, resolve_dtype
from .tokens import ClassTokens, token_for_class

__all__ = ["fit_tokens", "FitError", "IMAGENET_TEMPLATES"]

_BETAS, _WEIGHT_DECAY, _EPS = (0.9, 0.999), 1e-2, 1e-8  # AdamW settings of the diffusers example
_ENCODE_BATCH = 8
_LOSS_WINDOW = 50


class _SplicedEmbedding(nn.Module):
    """The frozen token embedding, with the rows of the trained tokens read from a separate parameter."""

    def __init__(self, base: nn.Module, rows: nn.Parameter, row_of_id: torch.Tensor) -> None:
        super().__init__()
        self.base, self.rows = base, rows
        self.register_buffer("row_of_id", row_of_id, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        idx = self.row_of_id[input_ids]
        mine = idx >= 0
        out = self.base(torch.where(mine, torch.zeros_like(input_ids), input_ids))
        new = self.rows.to(out.dtype)[idx.clamp(min=0)]
        return torch.where(mine.unsqueeze(-1), new, out)


def _check_args(num_vectors, initializer, steps, batch_size, learning_rate, templates, resolution, seed, checkpoint_every) -> list[str]:
    def positive_int(value, name):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    positive_int(num_vectors, "num_vectors")
    positive_int(steps, "steps")
    positive_int(batch_size, "batch_size")
    positive_int(checkpoint_every, "checkpoint_every")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}: {seed!r}")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not 0 < learning_rate < math.inf:
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
    if not isinstance(initializer, str) or not initializer.strip():
        raise ValueError(f"initializer must be 'class_name' or a word of the tokenizer's vocabulary, got {initializer!r}")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8 or resolution % 8):
        raise ValueError(f"resolution must be None or a multiple of 8 (>= 8), got {resolution!r}")
    tmpl = list(IMAGENET_TEMPLATES) if templates is None else ([templates] if isinstance(templates, str) else list(templates))
    if not tmpl:
        raise ValueError("templates must be None or a non-empty list of strings with one '{}', got []")
    for t in tmpl:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"each template must be a str with exactly one '{{}}' for the token, got {t!r}")
    return tmpl


def _resolve_pipeline(pipeline: Any, device, dtype) -> tuple[Any, str]:
    """``(pipe, base fingerprint)``; a spec is loaded fresh, never the process-wide shared copy."""
    from .pipeline import _load_uncached

    if isinstance(pipeline, (str, os.PathLike)):
        pipeline = PipelineSpec(os.fspath(pipeline))
    if isinstance(pipeline, PipelineSpec):
        overrides = {}
        if device is not None:
            overrides["device"] = str(resolve_device(device))
        if dtype is not None:
            overrides["dtype"] = str(resolve_dtype(dtype)).removeprefix("torch.")
        spec = dataclasses.replace(pipeline, **overrides) if overrides else pipeline
        return _load_uncached(spec), spec.fingerprint()
    if all(hasattr(pipeline, a) for a in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")):
        if device is not None or dtype is not None:
            raise ValueError("device and dtype apply to pipelines fit_tokens loads; move a loaded pipeline with pipe.to(...)")
        return pipeline, pipeline_fingerprint(pipeline)
    raise TypeError(f"pipeline must be a model id, a folder, 'pocket', a PipelineSpec or a loaded pipeline, got {type(pipeline).__name__}")


def _check_tokens(pipe, tokens: list[list[str]], class_names: list[str]) -> None:
    vocab = pipe.tokenizer.get_vocab()
    ours = getattr(pipe, "_dafusion_tokens", set())
    for names, cls in zip(tokens, class_names):
        clash = [t for t in names if t in vocab and t not in ours]
        if clash:
            raise FitError(
                f"token {clash[0]!r} (class {cls!r}) is already in the tokenizer vocabulary (id {vocab[clash[0]]}) with "
                "its own values; the fitted token would clash with it when applied. Use a pipeline without it, "
                "or other class names"
            )


def _initial_rows(pipe, class_names: list[str], initializer: str, num_vectors: int) -> torch.Tensor:
    tokenizer = pipe.tokenizer
    weight = pipe.text_encoder.get_input_embeddings().weight.detach()
    bad = {tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id} - {None}
    if initializer != "class_name":
        ids = tokenizer.encode(initializer, add_special_tokens=False)
        if len(ids) != 1 or ids[0] in bad:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise FitError(
                f"initializer {initializer!r} is not a word of the tokenizer's vocabulary (it encodes to {len(ids)} tokens "
                f"{pieces}); pass one known word such as 'the', or initializer='class_name'"
            )
        vec = weight[ids[0]].to("cpu", torch.float32)
        return vec.expand(len(class_names) * num_vectors, -1).clone()
    rows = []
    for name in class_names:
        ids = [i for i in tokenizer.encode(name, add_special_tokens=False) if i not in bad]
        if not ids:
            raise FitError(
                f"initializer='class_name' cannot initialise class {name!r}: its name has no tokens in the tokenizer's "
                "vocabulary; pass a word instead, e.g. initializer='the'"
            )
        rows.append(weight[ids].to("cpu", torch.float32).mean(0).expand(num_vectors, -1))
    return torch.cat(rows).clone()


class _LatentEncoder:
    """Collects images and encodes them through the VAE in batches: posterior mean and std, float32, kept once."""

    def __init__(self, vae, size: int, device) -> None:
        self.vae, self.size, self.device = vae, size, device
        self.pending: list = []
        self.means: list[torch.Tensor] = []
        self.stds: list[torch.Tensor] = []

    def add(self, image) -> None:
        self.pending.append(image)
        if len(self.pending) == _ENCODE_BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        x = _to_batch(self.pending, self.size).mul_(2).sub_(1)
        self.pending = []
        was_training = self.vae.training
        try:
            self.vae.eval()
            with torch.no_grad():
                dist = self.vae.encode(x.to(self.device, self.vae.dtype)).latent_dist
        finally:
            self.vae.train(was_training)
        self.means.append(dist.mean.float())
        self.stds.append(dist.std.float())

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._flush()
        return torch.cat(self.means), torch.cat(self.stds)


def _class_stream(seed: int, num_classes: int, step: int, batch_size: int, cache: dict[int, list[int]]) -> list[int]:
    """The classes of ``step``'s batch: consecutive shuffles of all classes, so every class trains equally."""
    out = []
    for p in range(step * batch_size, (step + 1) * batch_size):
        epoch = p // num_classes
        if epoch not in cache:
            g = torch.Generator().manual_seed(stable_hash(seed, "fit-classes", epoch))
            cache.clear()
            cache[epoch] = torch.randperm(num_classes, generator=g).tolist()
        out.append(cache[epoch][p % num_classes])
    return out


def fit_tokens(
    pipeline: Any,
    data: Any,
    class_names: Sequence[str] | None = None,
    *,
    num_vectors: int = 1,
    initializer: str = "class_name",
    steps: int = 1000,
    batch_size: int = 4,
    learning_rate: float = 5e-4,
    scale_lr: bool = False,
    templates: Sequence[str] | None = None,
    resolution: int | None = None,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    _on_step: Callable[[int, float], None] | None = None,
) -> ClassTokens:
    """Learn one token per class (textual inversion), all classes jointly in one run.

    Each step draws ``batch_size`` samples from a class-balanced stream (consecutive shuffles of all
    classes, then a random image of each class), samples its latent from the posterior cached once per
    image, noises it at a random timestep of the model's DDPM schedule and regresses the noise (or ``v``,
    following ``scheduler.config.prediction_type``) under a prompt from ``templates`` holding the class's
    token. AdamW (betas 0.9/0.999, weight decay 1e-2, eps 1e-8, constant lr) updates only the new rows.

    Defaults vs recipes: the defaults are DA-Fusion's (1000 steps, batch 4, lr 5e-4, one vector), except
    ``initializer="class_name"`` (DA-Fusion's camera-ready choice; the first version used ``"the"``) and
    ``scale_lr=False`` (DA-Fusion scaled lr by the batch size, i.e. 2e-3 at batch 4: pass ``scale_lr=True``).
    DA-Fusion camera-ready: ``num_vectors=4, batch_size=8, steps=2000, scale_lr=True``. The diffusers
    example's README recipe: batch 1 x 4 accumulation, 3000 steps, lr 5e-4 scaled to 2e-3, per concept.
    Unlike both, there is no random horizontal flip (latents are cached once per image). See docs/tokens.md.

    The caller's pipeline is not changed: the tokenizer is deep-copied before tokens are added to it,
    and while training runs the text encoder's input-embedding module is swapped for a wrapper that
    reads the new rows from a separate parameter (all ``requires_grad`` flags off, eval mode); the
    original module, flags and modes are restored on exit, also on errors. Do not use the pipeline from
    another thread meanwhile. A model id, folder or :class:`PipelineSpec` is loaded afresh for training,
    never the process-wide copy of :func:`load_pipeline`.

    Args:
        pipeline: a model id, a local folder, ``"pocket"``, a :class:`PipelineSpec`, or a loaded pipeline.
        data: a map-style dataset of ``(image, label)`` (e.g. ``ImageFolder``), a folder with one sub-folder
            per class, or a list of ``(path or PIL image, label)``.
        class_names: class names, index = label; default ``data.class_names`` or ``data.classes``.
        num_vectors: vectors per token (multi-vector tokens are ``<t>``, ``<t>_1``, ... as in diffusers).
        initializer: ``"class_name"`` (mean embedding of the class name's tokens) or one vocabulary word.
        steps: optimisation steps (in total, not per class).
        batch_size: samples per step, mixed across classes.
        learning_rate: AdamW learning rate; multiplied by ``batch_size`` when ``scale_lr``.
        scale_lr: scale the learning rate by the batch size (the diffusers/DA-Fusion ``--scale_lr``).
        templates: prompt templates with one ``{}``; default the 27 of the diffusers example.
        resolution: training image size; default the model's native size.
        seed: seeds every random draw (one CPU generator, so results do not depend on the device's RNG).
        checkpoint_dir: where to write checkpoints; ``None`` writes none.
        checkpoint_every: steps between checkpoints (the last step is always saved).
        resume: continue from the newest checkpoint in ``checkpoint_dir`` (``False`` starts over).
        progress: show a tqdm bar with the running loss.
        device, dtype: where and how to load a model id / folder / spec (not for a loaded pipeline).

    Returns:
        :class:`ClassTokens` with ``metadata["base_model"]`` (the base fingerprint), the hyper-parameters
        and ``final_loss`` (mean loss of the last 50 steps).

    Raises:
        FitError: empty data, a class without images, a label outside ``class_names``, an unreadable image
            (named), an initializer not in the vocabulary, a token already in the tokenizer, or a
            checkpoint written for other data or hyper-parameters. All are raised before any step.
        ValueError, TypeError: a plainly wrong argument.

    Example:
        >>> tokens = fit_tokens("pocket", "train/", steps=300)  # doctest: +SKIP
        >>> tokens.save("tokens.safetensors")  # doctest: +SKIP
    """
    # 1. Check the arguments, the data's form and the class names.
    tmpl = _check_args(num_vectors, initializer, steps, batch_size, learning_rate, templates, resolution, seed, checkpoint_every)
    dataset, names = open_training_data(data, class_names)
    tokens = [token_for_class(n, i) for i, n in enumerate(names)]
    if len(set(tokens)) != len(tokens):
        raise FitError(f"class names {names} map to the same tokens {tokens}; rename the classes")
    expanded = [[t] + [f"{t}_{i}" for i in range(1, num_vectors)] for t in tokens]

    # 2. The model and its checks; then every image is decoded and encoded once (checked on the way).
    pipe, base_fp = _resolve_pipeline(pipeline, device, dtype)
    _check_tokens(pipe, expanded, names)
    init = _initial_rows(pipe, names, initializer, num_vectors)
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_sched.config.prediction_type
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise FitError(f"scheduler prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction!r}")
    size = int(resolution) if resolution is not None else native_resolution(pipe)
    dev = pipe.unet.device
    encoder = _LatentEncoder(pipe.vae, size, dev)
    train = read_training_data(dataset, names, encoder.add)
    mean, std = encoder.finish()
    lr = float(learning_rate) * (batch_size if scale_lr else 1)
    run_dtype = pipe.unet.dtype
    config = {
        "base_model": base_fp,
        "data": train.digest,
        "num_images": len(train.labels),
        "class_names": names,
        "tokens": tokens,
        "num_vectors": num_vectors,
        "initializer": initializer,
        "batch_size": batch_size,
        "learning_rate": float(learning_rate),
        "scale_lr": bool(scale_lr),
        "effective_learning_rate": lr,
        "templates": tmpl,
        "resolution": size,
        "seed": seed,
        "dtype": str(run_dtype).removeprefix("torch."),
        "optimizer": {"name": "AdamW", "betas": list(_BETAS), "weight_decay": _WEIGHT_DECAY, "eps": _EPS},
        "prediction_type": prediction,
    }
    digest = stable_digest("fit-tokens", 1, config)
    if checkpoint_dir is not None:
        remove_temporaries(checkpoint_dir)  # half-written checkpoints of a killed run
    state = load_checkpoint(checkpoint_dir, digest, config) if (checkpoint_dir is not None and resume) else None
    if state is not None and int(state[0]["step"]) > steps:
        raise FitError(f"the checkpoint in {os.fspath(checkpoint_dir)!r} is at step {state[0]['step']}, past steps={steps}; raise steps or pass resume=False")

    # 3. Trainable rows, a private tokenizer, the optimizer and the generator (restored from a checkpoint).
    rows = nn.Parameter(init.to(dev))
    optimizer = torch.optim.AdamW([rows], lr=lr, betas=_BETAS, weight_decay=_WEIGHT_DECAY, eps=_EPS)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = 0
    if state is not None:
        info, tensors = state
        start = int(info["step"])
        with torch.no_grad():
            rows.copy_(tensors["rows"].to(dev))
        if start > 0:
            adam = {"step": tensors["adam_step"].reshape(()), "exp_avg": tensors["exp_avg"], "exp_avg_sq": tensors["exp_avg_sq"]}
            optimizer.load_state_dict({"state": {0: adam}, "param_groups": optimizer.state_dict()["param_groups"]})
        gen.set_state(tensors["rng_state"])
        losses = tensors["losses"].tolist()
    tokenizer = copy.deepcopy(pipe.tokenizer)
    flat = [t for names_k in expanded for t in names_k]
    tokenizer.add_tokens([t for t in flat if t not in tokenizer.get_vocab()])
    ids = tokenizer.convert_tokens_to_ids(flat)
    row_of_id = torch.full((max(len(tokenizer), max(ids) + 1),), -1, dtype=torch.long)
    row_of_id[torch.tensor(ids)] = torch.arange(len(ids))
    prompt_ids: dict[tuple[int, int], torch.Tensor] = {}

    def encode_prompt(k: int, j: int) -> torch.Tensor:
        if (k, j) not in prompt_ids:
            text = tmpl[j].format(" ".join(expanded[k]))
            prompt_ids[(k, j)] = tokenizer(
                text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids[0]
        return prompt_ids[(k, j)]

    def snapshot(step: int) -> None:
        adam = optimizer.state.get(rows, {})
        zeros = torch.zeros_like(rows)
        tensors = {
            "rows": rows.detach(),
            "exp_avg": adam.get("exp_avg", zeros),
            "exp_avg_sq": adam.get("exp_avg_sq", zeros),
            "adam_step": torch.as_tensor(adam.get("step", 0.0), dtype=torch.float32).reshape(1),
            "rng_state": gen.get_state(),
            "losses": torch.tensor(losses, dtype=torch.float64),
        }
        save_checkpoint(checkpoint_dir, step, tensors, {"config_digest": digest, "config": config, "loss": losses[-1] if losses else None})

    # 4. Train, with the caller's modules restored on the way out.
    text_encoder, unet, vae = pipe.text_encoder, pipe.unet, pipe.vae
    modules = (text_encoder, unet, vae)
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    modes = [m.training for m in modules]
    original = text_encoder.get_input_embeddings()
    if checkpoint_dir is not None and state is None:
        clear_checkpoints(checkpoint_dir)
    bar = None
    try:
        for m in modules:
            m.requires_grad_(False)
            m.eval()
        text_encoder.set_input_embeddings(_SplicedEmbedding(original, rows, row_of_id.to(dev)))
        use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
        scale = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        by_class = [[i for i, y in enumerate(train.labels) if y == k] for k in range(len(names))]
        num_t = int(noise_sched.config.num_train_timesteps)
        perms: dict[int, list[int]] = {}
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, disable=not progress, desc="fit_tokens", unit="step", dynamic_ncols=True)
        for step in range(start, steps):
            classes = _class_stream(seed, len(names), step, batch_size, perms)
            u = torch.rand(batch_size, generator=gen, dtype=torch.float64)
            idx = [by_class[k][int(x * len(by_class[k]))] for k, x in zip(classes, u.tolist())]
            tj = torch.randint(len(tmpl), (batch_size,), generator=gen).tolist()
            t = torch.randint(num_t, (batch_size,), generator=gen)
            eps = torch.randn((batch_size, *mean.shape[1:]), generator=gen)
            noise = torch.randn((batch_size, *mean.shape[1:]), generator=gen)
            sel = torch.tensor(idx)
            latents = ((mean[sel] + std[sel] * eps.to(dev)) - shift) * scale
            noise, t = noise.to(dev), t.to(dev)
            noisy = noise_sched.add_noise(latents, noise, t)
            target = noise if prediction == "epsilon" else (noise_sched.get_velocity(latents, noise, t) if prediction == "v_prediction" else latents)
            input_ids = torch.stack([encode_prompt(k, j) for k, j in zip(classes, tj)]).to(dev)
            mask = (input_ids != tokenizer.pad_token_id).long() if use_mask else None
            hidden = text_encoder(input_ids, attention_mask=mask)[0].to(run_dtype)
            pred = unet(noisy.to(run_dtype), t, encoder_hidden_states=hidden).sample
            loss = F.mse_loss(pred.float(), target.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}", refresh=False)
            if checkpoint_dir is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                snapshot(step + 1)
            if _on_step is not None:
                _on_step(step + 1, losses[-1])
    finally:
        if bar is not None:
            bar.close()
        text_encoder.set_input_embeddings(original)
        for m, fl, mode in zip(modules, flags, modes):
            for p, f in zip(m.parameters(), fl):
                p.requires_grad_(f)
            m.train(mode)

    # 5. The result.
    final = rows.detach().to("cpu", torch.float32)
    window = losses[-_LOSS_WINDOW:]
    meta = {k: v for k, v in config.items() if k not in ("class_names", "tokens")}
    meta.update(method="textual-inversion (joint)", steps=steps, final_loss=sum(window) / len(window) if window else None)
    return ClassTokens(names, [final[k * num_vectors : (k + 1) * num_vectors] for k in range(len(names))], tokens=tokens, metadata=meta)
