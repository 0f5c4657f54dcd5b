"""The ``dafusion-aug`` command line: each subcommand is a thin call into the library.

Subcommands register themselves through ``_add_<name>(subparsers)`` functions listed in ``_COMMANDS``;
each sets ``func`` to a handler taking the parsed arguments and returning an exit code. Handlers import
the library when they run, so ``--help`` imports neither torch nor diffusers.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__

__all__ = ["main", "build_parser"]

#: The release that drops the deprecated ``--steps`` spelling.
_STEPS_REMOVED_IN = "0.2"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every help line ends with its default, except defaults that mean "not given" (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        return super()._get_help_string(action)


def _parser(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=_HelpFormatter, **kwargs)


class _DeprecatedSteps(argparse.Action):
    """``--steps``, the old spelling of ``--train-steps`` / ``--inference-steps``: still works, with a warning."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated here and will be removed in {_STEPS_REMOVED_IN}; "
              f"use {self.new} {values}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_steps(p: argparse.ArgumentParser, new: str, default: int, help: str) -> None:
    """``new`` (``--train-steps`` or ``--inference-steps``) and the deprecated ``--steps`` for the same value."""
    dest = new.removeprefix("--").replace("-", "_")
    p.add_argument(new, type=int, default=default, dest=dest, help=help)
    p.add_argument("--steps", type=int, dest=dest, default=argparse.SUPPRESS, action=_DeprecatedSteps, new=new,
                   help=f"deprecated spelling of {new} (removed in {_STEPS_REMOVED_IN})")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hub id, local model folder, or 'pocket'")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit; default: main)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else the CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", help="float32, float16 (CUDA only) or bfloat16")
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
        channels_last=getattr(args, "channels_last", False),
        compile=getattr(args, "compile", False),
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
        info["family"] = PipelineSpec(args.model).family()
    _print_json(info)
    return 0


def _add_info(sub) -> None:
    p = _parser(sub, "info", help="print versions (and a model's fingerprint and family)")
    p.add_argument("--model", default=None, help="also print this model's fingerprint and family (sd1, sd2, sdxl)")
    p.set_defaults(func=_cmd_info)


# -- generate --------------------------------------------------------------------------------------
def _cmd_generate(args) -> int:
    from .data import image_folder
    from .regions import Region
    from .transform import DiffusionAugment

    data = image_folder(args.data, masks=args.masks)
    aug = DiffusionAugment(
        _spec(args),
        tokens=args.tokens,
        lora=args.lora,
        class_names=None if args.tokens else data.class_names,
        prompt=args.prompt,
        strength=args.strength,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.inference_steps,
        negative_prompt=args.negative_prompt,
        num_variants=args.num_variants,
        cache=args.cache,
        seed=args.seed,
        region=Region(args.region, grow=args.mask_grow),
        **_filter_args(args, data.class_names),
    )
    from .precompute import precompute  # it refuses a token file whose classes differ from the folder's

    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    result = precompute(aug, data, backend=args.backend, batch_size=batch_size, progress=not args.quiet,
                        out=args.out, concurrency=args.concurrency)
    _print_json(result)
    return 0 if not result["failures"] else 1


def _filter_args(args, class_names) -> dict:
    """``generate --filter clip``: a CLIPFilter over the folder's class names (issue 18)."""
    if args.filter is None:
        return {}
    from .filters import CLIPFilter

    threshold = 0.5 if args.filter_threshold is None else args.filter_threshold
    return dict(filter=CLIPFilter(args.clip_model, class_names=class_names, threshold=threshold),
                max_tries=args.max_tries, filter_fallback=args.filter_fallback)


def _add_generate(sub) -> None:
    p = _parser(sub, "generate", help="fill a cache with every variant of every image of a class-folder data set")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="folder with one sub-folder of images per class")
    p.add_argument("--cache", required=True, help="cache folder to fill")
    p.add_argument("--tokens", default=None, help="class-token file (default: class names in the prompt)")
    p.add_argument("--lora", default=None, help="LoRA file trained with the tokens (fit-tokens --lora-rank)")
    p.add_argument("--prompt", default="a photo of a {name}", help="prompt template; {name} is the class (its token with --tokens)")
    p.add_argument("--strength", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0], help="img2img strengths, one drawn per variant")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale")
    _add_steps(p, "--inference-steps", 50, "denoising steps at strength 1 (num_inference_steps)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt")
    p.add_argument("--num-variants", type=int, default=10, help="M, variants per image")
    p.add_argument("--batch-size", default="16", help="images per UNet call, or 'auto' (back off on out-of-memory)")
    p.add_argument("--backend", choices=["local", "ray"], default="local", help="ray needs pip install 'dafusion-aug[ray]'")
    p.add_argument("--concurrency", type=int, default=None, help="Ray actors (default: one per GPU, or 2 on CPU)")
    p.add_argument("--out", default=None, help="also write an ImageFolder copy with manifest.jsonl here")
    p.add_argument("--seed", type=int, default=0, help="base seed of the variants")
    p.add_argument("--erasure", default=None, help="erasure file applied to the model")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--region", choices=["all", "object", "background"], default="all", help="edit only the object or the background (needs --masks)")
    p.add_argument("--masks", default=None, help="folder of object masks laid out like --data (cat/a.jpg -> cat/a.png, non-zero = object)")
    p.add_argument("--mask-grow", type=int, default=16, help="pixels the mask grows before a region edit")
    p.add_argument("--filter", choices=["clip"], default=None, help="keep only variants CLIP still reads as their class")
    p.add_argument("--clip-model", default="openai/clip-vit-base-patch32", help="CLIP Hub id or local folder for --filter clip")
    p.add_argument("--filter-threshold", type=float, default=None, help="keep a variant whose zero-shot probability is >= this (default 0.5)")
    p.add_argument("--max-tries", type=int, default=4, help="generations per variant before the fallback")
    p.add_argument("--filter-fallback", choices=["real", "best"], default="real", help="what a variant rejected --max-tries times becomes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)


# -- erase -----------------------------------------------------------------------------------------
class _ConceptOrPrompt(argparse.Action):
    """Keeps --concept and --prompt in command-line order: each --prompt belongs to the --concept before it."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, "erase_items", None) or [])
        items.append((self.dest, values))
        namespace.erase_items = items


def _erase_concepts(items) -> dict[str, list[str]]:
    concepts: dict[str, list[str]] = {}
    last = None
    for kind, value in items or []:
        if kind == "concept":
            last = value
            concepts.setdefault(value, [])
        elif last is None:
            raise ValueError(f"--prompt {value!r} must follow the --concept it belongs to")
        else:
            concepts[last].append(value)
    if not concepts:
        raise ValueError("erase needs at least one --concept")
    return {c: ps or [c] for c, ps in concepts.items()}


def _cmd_erase(args) -> int:
    from .erase import erase_concept

    erasure = erase_concept(
        _spec(args),
        _erase_concepts(args.erase_items),
        method=args.method,
        negative_guidance=args.negative_guidance,
        steps=args.train_steps,
        learning_rate=args.lr,
        start_guidance=args.start_guidance,
        ddim_steps=args.ddim_steps,
        seed=args.seed,
        progress=not args.quiet,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=not args.no_resume,
    )
    path = erasure.save(args.out)
    losses = erasure.metadata.get("losses") or [None]
    _print_json(
        {
            "out": str(path),
            "concepts": erasure.concepts,
            "method": erasure.method,
            "tensors": len(erasure.tensors),
            "parameters": erasure.num_parameters,
            "final_loss": losses[-1],
            "content_hash": erasure.content_hash(),
        }
    )
    return 0


def _add_erase(sub) -> None:
    p = _parser(sub, "erase", help="erase concepts from a model with ESD; writes a small erasure file")
    _add_model_args(p)
    p.add_argument("--concept", dest="concept", action=_ConceptOrPrompt, required=True, help="concept to erase (repeatable)")
    p.add_argument("--prompt", dest="prompt", action=_ConceptOrPrompt, help="a prompt of the preceding --concept (repeatable; default: the concept itself)")
    p.add_argument("--method", default="esd-x", choices=["esd-x", "esd-x-strict", "esd-u", "full"], help="which UNet parameters are trained")
    _add_steps(p, "--train-steps", 1000, "optimisation steps")
    p.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate")
    p.add_argument("--negative-guidance", type=float, default=1.0, help="eta")
    p.add_argument("--start-guidance", type=float, default=3.0, help="guidance used to sample x_t")
    p.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of the sampling that makes x_t")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint here; rerunning the command resumes")
    p.add_argument("--checkpoint-every", type=int, default=100, help="optimisation steps between checkpoints")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--out", required=True, help="erasure file to write (.safetensors)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_erase, erase_items=None)


# -- fit-tokens ------------------------------------------------------------------------------------
def _cmd_fit_tokens(args) -> int:
    from .fit import fit_tokens

    tokens = fit_tokens(
        _spec(args),
        args.data,
        num_vectors=args.num_vectors,
        initializer=args.initializer,
        steps=args.train_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        scale_lr=args.scale_lr,
        resolution=args.resolution,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=not args.no_resume,
        progress=not args.quiet,
        lora_rank=args.lora_rank,
        lora_learning_rate=args.lora_lr,
    )
    path = tokens.save(args.out)
    lora_path = None
    if tokens.lora is not None:
        lora_path = tokens.lora.save(args.lora_out or Path(args.out).with_suffix(".lora.safetensors"))
    _print_json(
        {
            "out": str(path),
            "lora": None if lora_path is None else str(lora_path),
            "class_names": tokens.class_names,
            "tokens": tokens.tokens,
            "num_vectors": tokens.num_vectors,
            "family": tokens.family,
            "final_loss": tokens.metadata.get("final_loss"),
            "base_model": tokens.metadata.get("base_model"),
        }
    )
    return 0


def _add_fit_tokens(sub) -> None:
    p = _parser(sub, "fit-tokens", help="learn one textual-inversion token per class of a class-folder data set")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="folder with one sub-folder of images per class")
    p.add_argument("--out", required=True, help="token file to write (.safetensors)")
    _add_steps(p, "--train-steps", 1000, "optimisation steps, all classes together")
    p.add_argument("--batch-size", type=int, default=4, help="samples per step, mixed across classes")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    p.add_argument("--scale-lr", action="store_true", help="multiply --lr by --batch-size (DA-Fusion, diffusers)")
    p.add_argument("--num-vectors", type=int, default=1, help="vectors per token")
    p.add_argument("--initializer", default="class_name", help="'class_name' or one vocabulary word, e.g. 'the'")
    p.add_argument("--lora-rank", type=int, default=0, help="also train a LoRA of this rank on the UNet's attention (0: tokens only; needs peft)")
    p.add_argument("--lora-lr", type=float, default=1e-4, help="AdamW learning rate of the LoRA")
    p.add_argument("--lora-out", default=None, help="LoRA file to write (default: OUT with .lora.safetensors)")
    p.add_argument("--resolution", type=int, default=None, help="training image size (default: the model's native size)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--erasure", default=None, help="erasure file applied to the model")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint here; rerunning the command resumes")
    p.add_argument("--checkpoint-every", type=int, default=100, help="optimisation steps between checkpoints")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_fit_tokens)


# -- demo ------------------------------------------------------------------------------------------
def _cmd_demo(args) -> int:
    from .fewshot import run_demo

    run_demo(args.out, full=args.full, erase=args.erase, build_erasures_only=args.build_erasures, threads=args.threads, progress=not args.quiet,
             region=args.region, mask_grow=args.mask_grow, filter=args.filter, filter_threshold=args.filter_threshold)
    return 0


def _add_demo(sub) -> None:
    p = _parser(
        sub,
        "demo",
        help="the paper's few-shot experiment on the pocket model (baseline, real guidance, DA-Fusion); about 6 CPU-minutes in quick mode",
        description="Few-shot digits (pocket model, digits part B): k images per class to train, the rest to test. "
        "Quick mode: k in {1, 2, 4}, 3 seeds. Writes results.csv/json, results.png, augmentations.png, summary.md.",
    )
    p.add_argument("--out", default="dafusion-demo", help="output folder; caches live here too")
    p.add_argument("--full", action="store_true", help="k in {1, 2, 4, 8, 16} and 5 seeds (about 25 CPU-minutes)")
    p.add_argument("--erase", action="store_true", help="leakage-free protocol: class c is augmented with c erased (builds 10 erasures first; about 1.5 CPU-hours "
                   "in quick mode, mostly fitting ten tokens per k and seed)")
    p.add_argument("--build-erasures", action="store_true", help="only build (or find) the per-class erasure files under OUT/erasures")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the model is small, and one thread is not slowed by other jobs)")
    p.add_argument("--region", choices=["all", "object", "background"], default="all", help="edit only each digit's ink or its background")
    p.add_argument("--mask-grow", type=int, default=1, help="pixels the ink mask grows before a region edit")
    p.add_argument("--filter", choices=["subset", "judge"], default=None,
                   help="subset: a classifier trained on the k images only (leakage-free); judge: the pocket judge (leaks, an upper bound)")
    p.add_argument("--filter-threshold", type=float, default=None, help="keep a variant whose label probability is >= this (default 0.5)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


_COMMANDS: list[Callable] = [_add_info, _add_generate, _add_erase, _add_fit_tokens, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dafusion-aug", description="Generative data augmentation with diffusion models (DA-Fusion).",
                                     formatter_class=_HelpFormatter)
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

    saved_format, warnings.formatwarning = warnings.formatwarning, _format_warning  # (recorders still record)
    try:
        return int(args.func(args) or 0)
    except (DafusionError, ValueError, TypeError, FileNotFoundError, NotADirectoryError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = saved_format


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line, ``warning: ...``: the command's user has no use for the line of source that raised it."""
    return f"warning: {message}\n"
