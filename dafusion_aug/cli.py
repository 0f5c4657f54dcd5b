"""The ``dafusion-aug`` command line: each subcommand is a thin call into the library.

Subcommands register themselves through ``_add_<name>(subparsers)`` functions listed in ``_COMMANDS``;
each sets ``func`` to a handler taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from . import __version__

__all__ = ["main", "build_parser"]


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hub id, local model folder, or 'pocket'")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    p.add_argument("--local-files-only", action="store_true", help="never contact the Hugging Face Hub")


def _spec(args):
    from .pipeline import PipelineSpec

    return PipelineSpec(
        args.model,
        revision=args.revision,
        device=args.device,
        dtype=args.dtype,
        local_files_only=args.local_files_only,
        erasure=getattr(args, "erasure", None),
    )


# -- info ------------------------------------------------------------------------------------------
def _cmd_info(args) -> int:
    import torch

    info = {
        "dafusion_aug": __version__,
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }
    for mod in ("torchvision", "diffusers", "transformers", "safetensors"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if args.model:
        from .pipeline import PipelineSpec

        info["fingerprint"] = PipelineSpec(args.model).fingerprint()
    _print_json(info)
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print versions (and a model's fingerprint)")
    p.add_argument("--model", default=None, help="also print this model's fingerprint")
    p.set_defaults(func=_cmd_info)


# -- generate --------------------------------------------------------------------------------------
def _cmd_generate(args) -> int:
    from .data import image_folder
    from .transform import DiffusionAugment

    data = image_folder(args.data)
    aug = DiffusionAugment(
        _spec(args),
        tokens=args.tokens,
        class_names=None if args.tokens else data.class_names,
        prompt=args.prompt,
        strength=args.strength,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.steps,
        negative_prompt=args.negative_prompt,
        num_variants=args.num_variants,
        cache=args.cache,
        seed=args.seed,
    )
    if aug.class_names is not None and aug.class_names != data.class_names:
        print(f"error: the token file's classes {aug.class_names} differ from the data folder's {data.class_names}", file=sys.stderr)
        return 2
    from .precompute import precompute

    result = precompute(aug, data, batch_size=args.batch_size, progress=not args.quiet)
    _print_json(result)
    return 0 if not result["failures"] else 1


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="fill a cache with every variant of every image of a class-folder data set")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="folder with one sub-folder of images per class")
    p.add_argument("--cache", required=True, help="cache folder to fill")
    p.add_argument("--tokens", default=None, help="class-token file (default: class names in the prompt)")
    p.add_argument("--prompt", default="a photo of a {name}")
    p.add_argument("--strength", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--steps", type=int, default=50, help="num_inference_steps")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--num-variants", type=int, default=10, help="M, variants per image")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--erasure", default=None, help="erasure file applied to the model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)


_COMMANDS: list[Callable] = [_add_info, _add_generate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dafusion-aug", description="Generative data augmentation with diffusion models (DA-Fusion).")
    parser.add_argument("--version", action="version", version=f"dafusion-aug {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .errors import DafusionError

    try:
        return int(args.func(args) or 0)
    except (DafusionError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
