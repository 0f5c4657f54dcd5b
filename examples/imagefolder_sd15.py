"""DA-Fusion on your own ImageFolder with Stable Diffusion 1.5 on a GPU: fit tokens, precompute, train.

    python examples/imagefolder_sd15.py --data my_data/train --test my_data/val --out runs/sd15
    python examples/imagefolder_sd15.py --tiny --out /tmp/tiny-run        # seconds on a CPU, for tests

``--data`` holds one sub-folder of images per class (the folder names are the class names). The script

1. learns one textual-inversion token per class (``fit_tokens``; DA-Fusion: 1000 steps, batch 4, lr 5e-4);
2. generates M = 10 variants of every training image at strengths 0.25/0.5/0.75/1.0 into a cache
   (``precompute``; rerunning skips what is cached);
3. trains a classifier (a frozen ImageNet ResNet-50 and a linear head, as in the paper) with a DataLoader
   whose workers only read the cache (``on_miss="real"``), replacing each image by a variant with p = 0.5;
4. prints the class-balanced accuracy on ``--test`` when given.

``--tiny`` swaps in a random tiny Stable-Diffusion-layout model (``dafusion_aug.testing.tiny_pipeline()``,
saved as a model folder), writes a toy 3-class ImageFolder, and uses a small CNN: the whole script runs in
seconds offline. Its images are noise; it checks the plumbing, not the method.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from dafusion_aug import AugmentedDataset, DiffusionAugment, PipelineSpec, fit_tokens, image_folder
from dafusion_aug.pipeline import resolve_device


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="ImageFolder with the (few-shot) training images, one sub-folder per class")
    p.add_argument("--test", default=None, help="optional ImageFolder to report accuracy on (same class folders)")
    p.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="Hub id or local model folder")
    p.add_argument("--out", default="runs/sd15", help="folder for tokens, cache and the classifier")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else the CPU), cpu, cuda, ...")
    p.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--fit-steps", type=int, default=1000, help="textual-inversion steps (all classes together)")
    p.add_argument("--num-variants", type=int, default=10, help="M, variants per image")
    p.add_argument("--steps", type=int, default=50, help="sampler steps at strength 1")
    p.add_argument("--p", type=float, default=0.5, help="probability of replacing an image by a variant")
    p.add_argument("--train-steps", type=int, default=2000, help="classifier optimisation steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (they only read the cache)")
    p.add_argument("--tiny", action="store_true", help="tiny random model, toy data, small CNN: a seconds-long smoke run")
    args = p.parse_args(argv)
    if args.tiny:
        args.fit_steps, args.num_variants, args.steps, args.train_steps, args.batch_size, args.workers = 4, 2, 4, 10, 8, 0
    elif not args.data:
        p.error("--data is required (or pass --tiny)")
    return args


def make_tiny_inputs(out: Path) -> tuple[str, str]:
    """Save the tiny pipeline as a model folder and write a toy ImageFolder of 3 classes x 4 images."""
    from dafusion_aug.testing import tiny_pipeline

    model = out / "tiny-model"
    if not (model / "model_index.json").is_file():
        tiny_pipeline(seed=0).save_pretrained(model, safe_serialization=True)
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "zebra"):  # words the tiny tokenizer knows
        (out / "data" / name).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out / "data" / name / f"{i}.png")
    return str(model), str(out / "data")


def build_classifier(num_classes: int, tiny: bool) -> nn.Module:
    if tiny:
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
    from torchvision.models import ResNet50_Weights, resnet50

    backbone = resnet50(weights=ResNet50_Weights.DEFAULT)  # downloads the ImageNet weights once
    backbone.fc = nn.Identity()
    backbone.requires_grad_(False).eval()
    head = nn.Linear(2048, num_classes)
    return nn.Sequential(backbone, head)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        torch.set_num_threads(1)  # tiny models run fastest on one thread
        args.model, args.data = make_tiny_inputs(out)
    device = str(resolve_device(args.device))  # the library's rule: "auto" is CUDA when present, else the CPU
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    spec = PipelineSpec(args.model, device=device, dtype=dtype)
    data = image_folder(args.data)
    print(f"{len(data)} training images in {len(data.class_names)} classes: {data.class_names}")

    # 1. One token per class, learned from the training images (reused when the file exists).
    t0 = time.perf_counter()
    token_file = out / "tokens.safetensors"
    if not token_file.is_file():
        tokens = fit_tokens(spec, data, steps=args.fit_steps, checkpoint_dir=out / "fit-checkpoints", progress=not args.tiny)
        tokens.save(token_file)
    print(f"tokens: {token_file} ({time.perf_counter() - t0:.1f} s)")

    # 2. Every variant of every image, into the cache (a rerun only fills what is missing).
    aug = DiffusionAugment(
        spec, tokens=token_file, cache=out / "cache", num_variants=args.num_variants, p=args.p,
        num_inference_steps=args.steps, device=device, dtype=dtype,
    )
    t0 = time.perf_counter()
    counts = aug.precompute(data, batch_size=16, progress=not args.tiny)
    print(f"precompute: {counts['generated']} generated, {counts['skipped']} cached ({time.perf_counter() - t0:.1f} s)")

    # 3. Train: workers read the cache only (on_miss="real" never loads a model in a worker).
    reader = DiffusionAugment(
        spec, tokens=token_file, cache=out / "cache", num_variants=args.num_variants, p=args.p,
        num_inference_steps=args.steps, on_miss="real",
    )
    size = 32 if args.tiny else 224
    standard = v2.Compose([
        v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    train = AugmentedDataset(data, reader, transform=standard)
    sampler = torch.utils.data.RandomSampler(train, replacement=True, num_samples=args.train_steps * args.batch_size)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers)
    torch.manual_seed(0)  # classifier init, sampler order and which variants are drawn: reproducible
    model = build_classifier(len(data.class_names), args.tiny).to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4 if not args.tiny else 1e-3)
    t0 = time.perf_counter()
    model.train()
    if not args.tiny:
        model[0].eval()  # the frozen backbone keeps its BatchNorm statistics
    for images, labels in loader:
        loss = nn.functional.cross_entropy(model(images.to(device)), labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), out / "classifier.pt")
    print(f"trained {args.train_steps} steps, last loss {loss.item():.3f} ({time.perf_counter() - t0:.1f} s)")

    # 4. Class-balanced accuracy on the test folder.
    result = {"tokens": str(token_file), "generated": counts["generated"], "loss": loss.item()}
    if args.test or args.tiny:
        test = image_folder(args.test or args.data)
        evaluate = v2.Compose([v2.ToImage(), v2.Resize((size, size), antialias=True), v2.ToDtype(torch.float32, scale=True),
                               v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        model.eval()
        preds, labels = [], []
        with torch.no_grad():
            for i in range(len(test)):
                image, label = test[i]
                preds.append(int(model(evaluate(image)[None].to(device)).argmax(1)))
                labels.append(label)
        recalls = [np.mean([p == c for p, y in zip(preds, labels) if y == c]) for c in sorted(set(labels))]
        result["balanced_accuracy"] = float(np.mean(recalls))
        print(f"class-balanced accuracy: {100 * result['balanced_accuracy']:.1f}%")
    return result


if __name__ == "__main__":
    main()
