"""DA-Fusion's few-shot experiment: does diffusion augmentation help a classifier trained on k images per class?

For every ``(k, seed)`` a few-shot subset of ``k`` images per class is drawn from a training pool; every
method trains the same classifier with the same budget and standard augmentation, and is scored by
class-balanced accuracy on a test set. Methods:

- ``baseline``: standard augmentation only;
- ``real-guidance``: img2img with the class *name* in the prompt (He et al.);
- ``real-guidance-agnostic``: img2img with a prompt that names no class ("a photo");
- ``da-fusion``: img2img with class tokens learned by :func:`~dafusion_aug.fit_tokens` on the k images.

Variants are generated once into a cache by :func:`~dafusion_aug.precompute`; training reads them with
``on_miss="real"``. With ``erase=True`` the images of class c are augmented (and c's token is learned) by
the model with c erased (one :class:`~dafusion_aug.Erasure` per class), so no method can draw on what the
model already knows about the class.

Modules: :mod:`.protocol` (:func:`run_fewshot`, the grid, resuming), :mod:`.methods` (each method's
transform, da-fusion's tokens), :mod:`.classifier` (what is trained and how it is scored),
:mod:`.erasures` (one erasure per class), :mod:`.report` (confidence intervals, tables, files, plots) and
:mod:`.demo` (``dafusion-aug demo`` on the pocket model).
"""

from .classifier import ClassifierSpec, resnet50_linear, small_cnn
from .demo import (
    ERASURE_PROMPTS,
    ERASURE_SETTINGS,
    FULL,
    QUICK,
    DemoSettings,
    demo_folder,
    ink_mask,
    run_demo,
)
from .erasures import build_erasures, resolve_erasures
from .methods import BEYOND, GENERATIVE, LORA_METHODS, METHODS, fit_subset_tokens, method_transform
from .protocol import FewShotResult, check_grid, run_fewshot

__all__ = [
    "METHODS",
    "BEYOND",
    "GENERATIVE",
    "LORA_METHODS",
    "FewShotResult",
    "run_fewshot",
    "check_grid",
    "build_erasures",
    "resolve_erasures",
    "method_transform",
    "fit_subset_tokens",
    "ClassifierSpec",
    "small_cnn",
    "resnet50_linear",
    "run_demo",
    "demo_folder",
    "ink_mask",
    "DemoSettings",
    "QUICK",
    "FULL",
    "ERASURE_PROMPTS",
    "ERASURE_SETTINGS",
]
