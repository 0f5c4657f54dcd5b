"""``fit_tokens``: textual inversion for every class of a data set in one run.

All classes learn jointly: each batch mixes classes (a class-balanced stream), and each sample's prompt
puts its own class's token into one of the textual-inversion templates. Only the new token rows learn;
every weight of the model stays bitwise unchanged, and the caller's tokenizer gets no new tokens.

Checkpoints (see :mod:`dafusion_aug._checkpoint`) are a pair of files per saved step:
``checkpoint-<step>.safetensors`` (learned rows, AdamW moments and step, the sampling generator's state as
a uint8 tensor, the loss history; metadata ``format``, ``step``, ``config_digest``) and
``checkpoint-<step>.json`` (step, config digest, readable config); the newest two are kept.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import _peft
from ._checkpoint import load_numbered, numbered_checkpoints, remove_checkpoints, save_numbered
from ._checks import check_int
from ._io import remove_temporaries
from ._samples import check_class_names
from .data import LabelledImages, as_dataset, class_names_of, read_labelled_images
from .errors import FitError
from .families import family_of
from .functional import native_resolution, to_batch
from .hashing import stable_digest, stable_hash
from .pipeline import resolve_pipeline
from .tokens import ClassTokens, token_for_class

__all__ = ["fit_tokens", "FitError", "IMAGENET_TEMPLATES"]

_BETAS, _WEIGHT_DECAY, _EPS = (0.9, 0.999), 1e-2, 1e-8  # AdamW settings of the diffusers example
_ENCODE_BATCH = 8
_LOSS_WINDOW = 50
CHECKPOINT_FORMAT = "dafusion-aug/fit-checkpoint/1"
_KEEP_CHECKPOINTS = 2
_OPTIMIZER = {"name": "AdamW", "betas": list(_BETAS), "weight_decay": _WEIGHT_DECAY, "eps": _EPS}

#: The object templates of the diffusers textual-inversion example (``imagenet_templates_small``).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)


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


def _check_args(num_vectors, initializer, steps, batch_size, learning_rate, templates, resolution, seed,
                checkpoint_every) -> tuple[list[str], tuple[int, int, int, int, int]]:
    """The templates, and ``(num_vectors, steps, batch_size, seed, checkpoint_every)`` as Python ints, checked."""
    num_vectors, steps, batch_size, checkpoint_every = (check_int(value, name, minimum=1) for name, value in (
        ("num_vectors", num_vectors), ("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)))
    ints = (num_vectors, steps, batch_size, check_int(seed, "seed"), checkpoint_every)
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
    return tmpl, ints


def _encoders(pipe) -> list[tuple[Any, Any]]:
    """The ``(text encoder, tokenizer)`` pairs whose new rows train: one, or SDXL's two (both learn together)."""
    pairs = [(pipe.text_encoder, pipe.tokenizer)]
    if family_of(pipe) == "sdxl":
        pairs.append((pipe.text_encoder_2, pipe.tokenizer_2))
    return pairs


def _check_tokens(pipe, tokens: list[list[str]], class_names: list[str]) -> None:
    ours = getattr(pipe, "_dafusion_tokens", set())
    for _, tokenizer in _encoders(pipe):
        vocab = tokenizer.get_vocab()
        for names, cls in zip(tokens, class_names):
            clash = [t for t in names if t in vocab and t not in ours]
            if clash:
                raise FitError(
                    f"token {clash[0]!r} (class {cls!r}) is already in the tokenizer vocabulary (id {vocab[clash[0]]}) with "
                    "its own values; the fitted token would clash with it when applied. Use a pipeline without it, "
                    "or other class names"
                )


def _initial_rows(encoder, tokenizer, class_names: list[str], initializer: str, num_vectors: int) -> torch.Tensor:
    """The starting rows of one text encoder's new tokens, from its own embedding matrix."""
    weight = encoder.get_input_embeddings().weight.detach()
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
        self.sizes: list[tuple[int, int]] = []  # each image's own (height, width): SDXL's original_size

    def add(self, image) -> None:
        self.pending.append(image)
        self.sizes.append((int(image.shape[0]), int(image.shape[1])))
        if len(self.pending) == _ENCODE_BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        x = to_batch(self.pending, self.size).mul_(2).sub_(1)
        self.pending = []
        was_training, dtype = self.vae.training, self.vae.dtype
        # SDXL's VAE overflows in float16 (force_upcast): encode in float32, as its pipeline does
        upcast = dtype == torch.float16 and bool(getattr(self.vae.config, "force_upcast", False))
        try:
            self.vae.eval()
            if upcast:
                self.vae.to(torch.float32)
            with torch.no_grad():
                dist = self.vae.encode(x.to(self.device, self.vae.dtype)).latent_dist
        finally:
            self.vae.train(was_training)
            if upcast:
                self.vae.to(dtype)
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


def _class_tokens(names: list[str], num_vectors: int) -> tuple[list[str], list[list[str]]]:
    """Each class's token and its tokenizer entries (``<t>``, ``<t>_1``, ...)."""
    tokens = [token_for_class(n, i) for i, n in enumerate(names)]
    if len(set(tokens)) != len(tokens):
        raise FitError(f"class names {names} map to the same tokens {tokens}; rename the classes")
    return tokens, [[t] + [f"{t}_{i}" for i in range(1, num_vectors)] for t in tokens]


def _noise_scheduler(pipe):
    """The model's DDPM training schedule (noise, v or sample prediction)."""
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_sched.config.prediction_type
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise FitError(f"scheduler prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction!r}")
    return noise_sched


# -- the training data ---------------------------------------------------------------------------------
def _open_training_data(data: Any, class_names: Sequence[str] | None) -> tuple[Any, list[str]]:
    """The dataset behind ``data`` and its class names, checked (no image is read yet).

    Raises:
        TypeError: class names given as one str (not a list), or holding a non-str.
        ValueError: no class names, or empty / repeated ones.
        FitError: the data holds no image.
    """
    ds = as_dataset(data)
    names = class_names if class_names is not None else class_names_of(ds)
    if names is None:
        raise ValueError(f"class_names is required: data ({type(data).__name__}) has no .class_names or .classes attribute")
    names = check_class_names(names)
    if len(ds) == 0:
        raise FitError(f"data is empty ({type(data).__name__} with 0 images); fit_tokens needs at least one image per class")
    return ds, names


def _private_tokenizer(tokenizer, flat: list[str]) -> tuple[Any, torch.Tensor]:
    """A copy of ``tokenizer`` with the new tokens, and the map token id -> trained row (-1: a frozen row)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([t for t in flat if t not in tokenizer.get_vocab()])
    ids = tokenizer.convert_tokens_to_ids(flat)
    row_of_id = torch.full((max(len(tokenizer), max(ids) + 1),), -1, dtype=torch.long)
    row_of_id[torch.tensor(ids)] = torch.arange(len(ids))
    return tokenizer, row_of_id


class _Trainer:
    """The trained rows (one set per text encoder: SDXL trains both together), their optimizer and generator,
    private tokenizers, and one step of the loop."""

    def __init__(self, pipe, inits: list[torch.Tensor], expanded: list[list[str]], templates: list[str], lr: float, seed: int,
                 lora: tuple[int, float] | None = None) -> None:
        self.pipe, self.expanded, self.templates, self.seed = pipe, expanded, templates, seed
        self.dev = pipe.unet.device
        self.encoders = [enc for enc, _ in _encoders(pipe)]
        self.rows = nn.Parameter(inits[0].to(self.dev))
        self.rows_2 = nn.Parameter(inits[1].to(self.dev)) if len(inits) > 1 else None
        groups: list[dict[str, Any]] = [{"params": self.params()}]
        self.lora: _peft.LoraLayers | None = None
        if lora is not None:  # (rank, learning rate): peft layers in the UNet until detach_lora()
            self.lora = _peft.attach(pipe.unet, lora[0], seed)
            groups.append({"params": self.lora.params(), "lr": lora[1]})
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=_BETAS, weight_decay=_WEIGHT_DECAY, eps=_EPS)
        self.gen = torch.Generator().manual_seed(seed)
        self.losses: list[float] = []
        self.start = 0
        flat = [t for names_k in expanded for t in names_k]
        self.tokenizers, self.row_of_ids = zip(*(_private_tokenizer(tok, flat) for _, tok in _encoders(pipe)))
        self.tokenizer, self.row_of_id = self.tokenizers[0], self.row_of_ids[0]
        self._prompt_ids: dict[tuple[int, int, int], torch.Tensor] = {}
        self.checkpoint_dir: str | os.PathLike | None = None
        self._info: dict[str, Any] = {}

    def resume(self, checkpoint_dir: str | os.PathLike | None, resume: bool, config: dict[str, Any], steps: int) -> None:
        """Continue from ``checkpoint_dir``'s newest checkpoint of this ``config``, or start over there."""
        if checkpoint_dir is None:
            return
        digest = stable_digest("fit-tokens", 1, config)
        self.checkpoint_dir, self._info = checkpoint_dir, {"config_digest": digest, "config": config}
        remove_temporaries(checkpoint_dir)  # half-written checkpoints of a killed run
        state = load_numbered(checkpoint_dir, digest, config, fmt=CHECKPOINT_FORMAT, error=FitError) if resume else None
        if state is not None and int(state[0]["step"]) > steps:
            raise FitError(f"the checkpoint in {os.fspath(checkpoint_dir)!r} is at step {state[0]['step']}, past steps={steps}; "
                           "raise steps or pass resume=False")
        self.restore(state)
        if state is None:
            remove_checkpoints(numbered_checkpoints(checkpoint_dir))  # a run that starts over leaves no later steps behind

    def save(self, step: int, loss: float) -> None:
        """Write checkpoint ``step`` (the newest two are kept)."""
        save_numbered(self.checkpoint_dir, step, self.snapshot(), {**self._info, "loss": loss}, fmt=CHECKPOINT_FORMAT, keep=_KEEP_CHECKPOINTS)

    def params(self) -> list[nn.Parameter]:
        """The trained rows, one parameter per text encoder (AdamW's parameter order)."""
        return [self.rows] + ([self.rows_2] if self.rows_2 is not None else [])

    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        """Every trained parameter with its checkpoint key: the rows (``rows``, ``rows_2``), then the LoRA's
        factors (``lora.<module>.down`` / ``.up``), in AdamW's order."""
        out = list(zip(("rows", "rows_2"), self.params()))
        if self.lora is not None:
            for name, down, up in zip(self.lora.names, self.lora.down, self.lora.up):
                out += [(f"lora.{name}.down", down), (f"lora.{name}.up", up)]
        return out

    @staticmethod
    def _moment_keys(key: str) -> tuple[str, str, str]:
        """The checkpoint keys of a parameter's AdamW state (the rows keep their first names)."""
        if key.startswith("rows"):
            suffix = key.removeprefix("rows")
            return "exp_avg" + suffix, "exp_avg_sq" + suffix, "adam_step" + suffix
        return f"exp_avg|{key}", f"exp_avg_sq|{key}", f"adam_step|{key}"

    def lora_result(self, base_model: str, family: str, metadata: dict[str, Any]):
        """The trained LoRA as a :class:`~dafusion_aug.ClassLora` (``None`` without one), with the digests of
        the base weights it adapts (checked when it is applied)."""
        if self.lora is None:
            return None
        from .lora import ClassLora

        unet = self.pipe.unet
        base = ClassLora.base_digests_of({n: unet.get_submodule(n).get_base_layer().weight for n in self.lora.names})
        layers = {n: (d.detach(), u.detach()) for n, d, u in zip(self.lora.names, self.lora.down, self.lora.up)}
        return ClassLora(layers, alpha=self.lora.rank, base_digests=base, base_model=base_model, family=family, metadata=metadata)

    def detach_lora(self) -> None:
        """Take the peft layers out of the UNet (the caller's modules are back)."""
        if self.lora is not None:
            _peft.detach(self.pipe.unet, self.lora.names)

    def restore(self, state: tuple[dict[str, Any], dict[str, torch.Tensor]] | None) -> None:
        """Continue from a checkpoint's rows, AdamW state, generator state and losses."""
        if state is None:
            return
        info, tensors = state
        self.start = int(info["step"])
        adam = {}
        for i, (key, param) in enumerate(self.named_params()):
            with torch.no_grad():
                param.copy_(tensors[key].to(param.device))
            avg, avg_sq, step = self._moment_keys(key)
            adam[i] = {"step": tensors[step].reshape(()), "exp_avg": tensors[avg], "exp_avg_sq": tensors[avg_sq]}
        if self.start > 0:
            self.optimizer.load_state_dict({"state": adam, "param_groups": self.optimizer.state_dict()["param_groups"]})
        self.gen.set_state(tensors["rng_state"])
        self.losses = tensors["losses"].tolist()

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The tensors of a checkpoint (SDXL adds the second encoder's under ``*_2`` keys)."""
        out = {"rng_state": self.gen.get_state(), "losses": torch.tensor(self.losses, dtype=torch.float64)}
        for key, param in self.named_params():
            adam = self.optimizer.state.get(param, {})
            zeros = torch.zeros_like(param)
            avg, avg_sq, step = self._moment_keys(key)
            out.update({
                key: param.detach(),
                avg: adam.get("exp_avg", zeros),
                avg_sq: adam.get("exp_avg_sq", zeros),
                step: torch.as_tensor(adam.get("step", 0.0), dtype=torch.float32).reshape(1),
            })
        return out

    def _prompt(self, k: int, j: int, e: int = 0) -> torch.Tensor:
        """Token ids of class ``k`` in template ``j`` for text encoder ``e``'s tokenizer (cached)."""
        if (k, j, e) not in self._prompt_ids:
            text = self.templates[j].format(" ".join(self.expanded[k]))
            tok = self.tokenizers[e]
            self._prompt_ids[(k, j, e)] = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids[0]
        return self._prompt_ids[(k, j, e)]

    @contextlib.contextmanager
    def spliced(self) -> Iterator[None]:
        """Freeze the caller's modules (eval mode) and read the token rows of every text encoder from
        :meth:`params`; restore on exit."""
        modules = (*self.encoders, self.pipe.unet, self.pipe.vae)
        flags = [[p.requires_grad for p in m.parameters()] for m in modules]
        modes = [m.training for m in modules]
        originals = [enc.get_input_embeddings() for enc in self.encoders]
        try:
            for m in modules:
                m.requires_grad_(False)
                m.eval()
            for p in self.lora.params() if self.lora is not None else ():
                p.requires_grad_(True)
            for enc, original, rows, row_of_id in zip(self.encoders, originals, self.params(), self.row_of_ids):
                enc.set_input_embeddings(_SplicedEmbedding(original, rows, row_of_id.to(self.dev)))
            yield
        finally:
            for enc, original in zip(self.encoders, originals):
                enc.set_input_embeddings(original)
            for m, fl, mode in zip(modules, flags, modes):
                for p, f in zip(m.parameters(), fl):
                    p.requires_grad_(f)
                m.train(mode)

    def condition(self, classes: list[int], tj: list[int], sizes: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The UNet's text conditioning of a batch: hidden states, and for SDXL the added conditioning.

        SDXL as its pipeline encodes a prompt: both encoders' penultimate hidden states, concatenated, the
        pooled (projected) embedding of encoder 2, and ``time_ids`` = (original size, crop (0, 0), target size).
        """
        pipe, dev = self.pipe, self.dev
        ids = [torch.stack([self._prompt(k, j, e) for k, j in zip(classes, tj)]).to(dev) for e in range(len(self.encoders))]
        if self.rows_2 is None:
            use_mask = bool(getattr(pipe.text_encoder.config, "use_attention_mask", False))
            mask = (ids[0] != self.tokenizer.pad_token_id).long() if use_mask else None
            return pipe.text_encoder(ids[0], attention_mask=mask)[0].to(pipe.unet.dtype), None
        states = []
        for enc, x in zip(self.encoders, ids):
            out = enc(x, output_hidden_states=True)
            states.append(out.hidden_states[-2])
        pooled = out[0]  # encoder 2's projected pooled embedding, as the SDXL pipeline takes it
        dtype = pipe.unet.dtype
        return torch.cat(states, dim=-1).to(dtype), {"text_embeds": pooled.to(dtype), "time_ids": sizes.to(dev, dtype)}

    def step(self, step: int, batch_size: int, train: LabelledImages, latents: _Latents, noise_sched) -> float:
        """One optimisation step on a class-balanced batch; returns its loss."""
        pipe, dev, gen = self.pipe, self.dev, self.gen
        classes = _class_stream(self.seed, len(train.class_names), step, batch_size, latents.perms)
        u = torch.rand(batch_size, generator=gen, dtype=torch.float64)
        idx = [latents.by_class[k][int(x * len(latents.by_class[k]))] for k, x in zip(classes, u.tolist())]
        tj = torch.randint(len(self.templates), (batch_size,), generator=gen).tolist()
        t = torch.randint(int(noise_sched.config.num_train_timesteps), (batch_size,), generator=gen)
        eps = torch.randn((batch_size, *latents.mean.shape[1:]), generator=gen)
        noise = torch.randn((batch_size, *latents.mean.shape[1:]), generator=gen)
        sel = torch.tensor(idx)
        x0 = ((latents.mean[sel] + latents.std[sel] * eps.to(dev)) - latents.shift) * latents.scale
        noise, t = noise.to(dev), t.to(dev)
        noisy = noise_sched.add_noise(x0, noise, t)
        prediction = noise_sched.config.prediction_type
        target = noise if prediction == "epsilon" else (noise_sched.get_velocity(x0, noise, t) if prediction == "v_prediction" else x0)
        hidden, added = self.condition(classes, tj, latents.time_ids[sel])
        pred = pipe.unet(noisy.to(pipe.unet.dtype), t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), target.float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    def run(self, steps: int, batch_size: int, train: LabelledImages, latents: _Latents, noise_sched, *, progress: bool,
            checkpoint_every: int, on_step: Callable[[int, float], None] | None) -> None:
        """Steps ``start .. steps - 1`` inside :meth:`spliced`, saving every ``checkpoint_every`` steps and at the end."""
        from ._progress import progress_bar

        with self.spliced(), progress_bar(total=steps, initial=self.start, progress=progress, desc="fit_tokens", unit="step") as bar:
            for step in range(self.start, steps):
                loss = self.step(step, batch_size, train, latents, noise_sched)
                bar.set_postfix(loss=f"{sum(self.losses[-20:]) / len(self.losses[-20:]):.4f}", refresh=False)
                bar.update(1)  # after the postfix, so the last drawn line is the final one
                if self.checkpoint_dir is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                    self.save(step + 1, loss)
                if on_step is not None:
                    on_step(step + 1, loss)


class _Latents:
    """Every training image's VAE posterior (mean, std) and the per-class index lists the stream draws from."""

    def __init__(self, pipe, train: LabelledImages, mean: torch.Tensor, std: torch.Tensor, sizes: list[tuple[int, int]],
                 size: int) -> None:
        vae = pipe.vae
        self.mean, self.std = mean, std
        # SDXL's size conditioning per image: its own size, no crop, the training size (unused by other families)
        self.time_ids = torch.tensor([[h, w, 0, 0, size, size] for h, w in sizes], dtype=torch.float32)
        self.scale = float(vae.config.scaling_factor)
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0
        self.by_class = [[i for i, y in enumerate(train.labels) if y == k] for k in range(len(train.class_names))]
        self.perms: dict[int, list[int]] = {}


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
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    lora_rank: int = 0,
    lora_learning_rate: float = 1e-4,
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
        device, dtype: where and how to load a model id / folder / spec (not for a loaded pipeline);
            ``device="auto"`` (default) is CUDA when available, else the CPU, or a spec's own device.
        lora_rank: ``r > 0`` also trains, jointly, a rank-``r`` LoRA of the UNet's attention projections
            (Diff-Mix: 10; needs ``peft``; the caller's UNet is left as it was). 0 (default): tokens only.
        lora_learning_rate: AdamW learning rate of the LoRA's factors (never scaled by ``scale_lr``).

    Returns:
        :class:`ClassTokens` with ``metadata["base_model"]`` (the base fingerprint), the hyper-parameters
        and ``final_loss`` (mean loss of the last 50 steps); its ``lora`` is the :class:`~dafusion_aug.ClassLora`.

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
    tmpl, (num_vectors, steps, batch_size, seed, checkpoint_every) = _check_args(
        num_vectors, initializer, steps, batch_size, learning_rate, templates, resolution, seed, checkpoint_every)
    lora = _check_lora(lora_rank, lora_learning_rate)
    dataset, names = _open_training_data(data, class_names)
    tokens, expanded = _class_tokens(names, num_vectors)

    # 2. The model and its checks; then every image is decoded and encoded once (checked on the way).
    source = resolve_pipeline(pipeline, device=device, dtype=dtype, caller="fit_tokens")
    pipe, base_fp = source.load(fresh=True), source.fingerprint()  # a private copy: modules are swapped while training
    _check_tokens(pipe, expanded, names)
    inits = [_initial_rows(enc, tok, names, initializer, num_vectors) for enc, tok in _encoders(pipe)]
    family, noise_sched = family_of(pipe), _noise_scheduler(pipe)
    train, latents, size = _encode(pipe, dataset, names, resolution)
    lr = float(learning_rate) * (batch_size if scale_lr else 1)
    config = {
        "base_model": base_fp, "data": train.digest, "num_images": len(train.labels), "class_names": names, "tokens": tokens,
        "num_vectors": num_vectors, "initializer": initializer, "batch_size": batch_size, "learning_rate": float(learning_rate),
        "scale_lr": bool(scale_lr), "effective_learning_rate": lr, "templates": tmpl, "resolution": size, "seed": seed,
        "dtype": str(pipe.unet.dtype).removeprefix("torch."), "optimizer": _OPTIMIZER, "prediction_type": noise_sched.config.prediction_type,
    }
    if family != "sd1":  # SD 1.x configs (and their checkpoints' digests) are those of earlier versions
        config["family"] = family
    if lora is not None:  # only then, so token-only configs (and their checkpoints' digests) are those of earlier versions
        config.update(lora_rank=lora[0], lora_learning_rate=lora[1], lora_targets="attention-projections")

    # 3. Trainable rows (and LoRA), a private tokenizer, the optimizer and the generator (restored from a checkpoint).
    trainer = _Trainer(pipe, inits, expanded, tmpl, lr, seed, lora=lora)
    try:  # 4. Train, with the caller's modules restored on the way out.
        trainer.resume(checkpoint_dir, resume, config, steps)
        trainer.run(steps, batch_size, train, latents, noise_sched, progress=progress, checkpoint_every=checkpoint_every, on_step=_on_step)
        trained_lora = trainer.lora_result(base_fp, family, {"steps": steps, **config})
    finally:
        trainer.detach_lora()
    return _result(trainer, config, steps, num_vectors, trained_lora)  # 5. The result.


def _encode(pipe, dataset: Any, names: list[str], resolution: int | None) -> tuple[LabelledImages, _Latents, int]:
    """Decode and check every training image, encode it once at the training size; ``(images, latents, size)``."""
    size = int(resolution) if resolution is not None else native_resolution(pipe)
    encoder = _LatentEncoder(pipe.vae, size, pipe.unet.device)
    train = read_labelled_images(dataset, names, encoder.add, error=FitError)
    return train, _Latents(pipe, train, *encoder.finish(), encoder.sizes, size), size


def _check_lora(lora_rank: Any, lora_learning_rate: Any) -> tuple[int, float] | None:
    """``(rank, learning rate)`` of the LoRA to train, checked, or ``None`` for ``lora_rank=0``."""
    lora_rank = check_int(lora_rank, "lora_rank", minimum=0)
    if lora_rank > 1024:
        raise ValueError(f"lora_rank must be in [0, 1024], got {lora_rank}")
    if isinstance(lora_learning_rate, bool) or not isinstance(lora_learning_rate, (int, float)) or not 0 < lora_learning_rate < math.inf:
        raise ValueError(f"lora_learning_rate must be a positive number, got {lora_learning_rate!r}")
    if not lora_rank:
        return None
    _peft.require_peft()
    return lora_rank, float(lora_learning_rate)


def _result(trainer: _Trainer, config: dict[str, Any], steps: int, num_vectors: int, lora) -> ClassTokens:
    """The trained rows as :class:`ClassTokens` (with the run's facts as metadata, and its LoRA)."""
    names = config["class_names"]
    finals = [p.detach().to("cpu", torch.float32) for p in trainer.params()]
    per_class = [[f[k * num_vectors : (k + 1) * num_vectors] for k in range(len(names))] for f in finals]
    window = trainer.losses[-_LOSS_WINDOW:]
    meta = {k: v for k, v in config.items() if k not in ("class_names", "tokens")}
    meta.update(method="textual-inversion (joint)", steps=steps, final_loss=sum(window) / len(window) if window else None)
    result = ClassTokens(names, per_class[0], tokens=config["tokens"], metadata=meta,
                         embeddings_2=per_class[1] if len(per_class) > 1 else None)
    result.lora = lora
    return result
