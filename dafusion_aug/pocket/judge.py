"""The judge: a small CNN digit classifier that reads the pocket model's pictures.

It is trained on part A only (with mild affine, blur and noise augmentation, so it also reads slightly
soft generated digits) and shipped as ``judge.safetensors`` (safetensors only, never a pickle). The
network averages the three colour channels first, so a colour tint cannot fool it.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .data import IMAGE_SIZE, random_affine

__all__ = [
    "JudgeNet", "JUDGE_FILE", "judge", "judge_images", "judge_accuracy", "train_judge", "fit_classifier", "save_judge",
    "read_judge_file",
]

#: Where the shipped judge weights live.
JUDGE_FILE = Path(__file__).resolve().parent / "judge.safetensors"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class JudgeNet(nn.Module):
    """A VGG-style CNN: (B, 3, 32, 32) floats in [0, 1] -> (B, 10) logits.

    Args:
        width: channels of the first block (the next blocks use 2x and 4x).
        num_classes: number of outputs.
    """

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(1, width), _block(width, 2 * width), _block(2 * width, 4 * width)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * width * 16, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of images in [0, 1] (any square size; resized to 32x32)."""
        x = images.float().mean(dim=1, keepdim=True)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        return self.head(self.features(x * 2.0 - 1.0))


def judge(path: str | os.PathLike | None = None) -> JudgeNet:
    """Load the judge classifier.

    Args:
        path: a ``judge.safetensors`` file; defaults to the one shipped in the package.

    Returns:
        A fresh :class:`JudgeNet` in eval mode on the CPU, taking float ``(B, 3, 32, 32)`` in [0, 1]
        and returning logits ``(B, 10)``.

    Raises:
        FileNotFoundError: when the weights file is missing.
    """
    path = Path(path) if path is not None else JUDGE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"judge weights not found at {path}; rebuild them with `python -m dafusion_aug.pocket.train`"
        )
    meta, state = read_judge_file(path)
    net = JudgeNet(width=int(meta.get("width", 16)))
    net.load_state_dict(state)
    return net.eval()


@functools.lru_cache(maxsize=1)
def _shared_judge() -> JudgeNet:
    return judge()


def _to_tensor(images: torch.Tensor | Image.Image | Sequence[Image.Image | torch.Tensor]) -> torch.Tensor:
    """Turn PIL images or tensors into a float (B, 3, H, W) batch in [0, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        batch = images if images.ndim == 4 else images[None]
    else:
        items = []
        for im in images:
            if isinstance(im, Image.Image):
                arr = np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
                items.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
            else:
                items.append(im)
        batch = torch.stack(items)
    if batch.dtype == torch.uint8:
        batch = batch.float() / 255.0
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    return batch.float().clamp(0.0, 1.0)


@torch.no_grad()
def judge_images(
    images: torch.Tensor | Image.Image | Sequence[Image.Image | torch.Tensor],
    model: nn.Module | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Predict the digit shown in each image.

    Args:
        images: PIL images, a float tensor in [0, 1] or a uint8 tensor, ``(B, C, H, W)`` or ``(C, H, W)``.
        model: the classifier; defaults to the shipped judge (loaded once per process).
        batch_size: images per forward pass.

    Returns:
        ``LongTensor (B,)`` of predicted labels.
    """
    model = model if model is not None else _shared_judge()
    batch = _to_tensor(images)
    preds = [model(batch[i : i + batch_size]).argmax(dim=1) for i in range(0, len(batch), batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def judge_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the fraction of ``images`` (float (B, 3, H, W) in [0, 1]) that ``model`` labels correctly."""
    was_training = model.training
    model.eval()
    acc = float((judge_images(images, model=model) == labels).float().mean())
    model.train(was_training)
    return acc


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Affine jitter, a random blur and a little noise: robustness to soft generated digits."""
    x = random_affine(images, generator, degrees=12.0, scale=(0.85, 1.15), shift=0.15)
    blur = torch.rand(len(x), 1, 1, 1, generator=generator) < 0.5
    soft = nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = torch.where(blur, 0.5 * x + 0.5 * soft, x)
    x = x + 0.05 * torch.rand(len(x), 1, 1, 1, generator=generator) * torch.randn(
        x.shape, generator=generator
    )
    return x.clamp(0.0, 1.0)


def train_judge(
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    width: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> JudgeNet:
    """Train a :class:`JudgeNet` from scratch.

    Args:
        images: float ``(N, 3, 32, 32)`` in [0, 1] (part A).
        labels: int64 ``(N,)``.
        steps: optimizer steps (AdamW, one-cycle schedule).
        batch_size: images per step, drawn with replacement.
        lr: the peak learning rate.
        width: channels of the first block.
        seed: seeds the weights and the sampling.
        progress: show a tqdm bar.

    Returns:
        The trained network, in eval mode.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = JudgeNet(width=width)

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        logits = net(_augment(images[idx], gen))
        return nn.functional.cross_entropy(logits, labels[idx], label_smoothing=0.05)

    return fit_classifier(net, batch_loss, steps, lr, desc="judge", progress=progress)


def fit_classifier(
    net: nn.Module, batch_loss: Callable[[], torch.Tensor], steps: int, lr: float, desc: str, progress: bool = True
) -> nn.Module:
    """The judges' training loop: AdamW (weight decay 5e-4) under a one-cycle schedule, ``steps`` steps.

    Args:
        net: the network (put in train mode, returned in eval mode).
        batch_loss: draws one batch and returns its loss (it owns the sampling and the augmentation).
        steps: optimizer steps.
        lr: the peak learning rate.
        desc: the progress bar's label.
        progress: show a tqdm bar.
    """
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    net.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=5.0)
    for _ in bar:
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return net.eval()


def save_judge(net: nn.Module, path: str | os.PathLike, metadata: dict[str, object] | None = None) -> Path:
    """Write a judge's weights as float16 safetensors, atomically (a temporary file, then a rename).

    Args:
        net: the trained judge (:class:`JudgeNet`, or the scene judge: any network whose ``features[0][0]``
            is its first convolution).
        path: the output file.
        metadata: extra metadata (values are JSON-encoded unless strings).

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    width = net.features[0][0].out_channels
    meta = {"format": "pt", "width": str(width), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for key, value in (metadata or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    state = {
        k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in net.state_dict().items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_judge_file(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, float32 state dict)`` of a file written by :func:`save_judge` (safetensors, never a pickle)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return meta, {k: v.float() for k, v in load_file(str(path)).items()}
