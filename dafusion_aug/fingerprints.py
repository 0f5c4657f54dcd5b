"""Fingerprints of user callables: everything that decides what a function returns, as a stable digest.

A prompt callable, a filter, a region's mask function or a classifier's transform enters a cache key
through :func:`fingerprint_callable`. Two callables with the same fingerprint must give the same output,
in every process: otherwise a cache would serve one filter's pictures under another (issue 33).

What counts:

- a function: its module, name, source and constants, its defaults, its closure cells and the module
  globals its code reads (``THRESHOLD``, ``model``, ``config.THRESHOLD`` of a module of your own), each
  digested the same way;
- a function, class or module of an installed package (or of Python itself): its name and the package's
  version, plus a function's line, constants, closure cells and defaults (a library factory's closure holds
  your values);
- an ``nn.Module``: its classes, mode, every parameter and buffer (dtype, shape, bytes) and the public
  attributes of each submodule; a tensor or array: its dtype, shape and bytes;
- numbers, strings, enums, containers: by value; an object of pure-Python classes: its class and its
  attributes; anything with a ``fingerprint()`` method: what it returns (the way to say a key yourself).

Anything else (a lock, a file, a ``torch.Generator``, an object whose state lives in C) cannot be digested
the same way in every process, and is refused with a ``ValueError`` naming where it was found.

Example:
    >>> fingerprint_callable(lambda images, labels: [img.mean() > 20 for img in images]) == \\
    ...     fingerprint_callable(lambda images, labels: [img.mean() > 30 for img in images])
    False
"""

from __future__ import annotations

import dis
import enum
import functools
import hashlib
import importlib.metadata
import inspect
import logging
import pathlib
import re
import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .hashing import stable_digest

__all__ = ["fingerprint_callable"]

_MAX_DEPTH = 48
_HEAPTYPE, _IMMUTABLETYPE = 1 << 9, 1 << 8  # CPython type flags: defined in Python / immutable (C) type
_BUILTIN_CALLABLES = (types.BuiltinFunctionType, types.WrapperDescriptorType, types.MethodWrapperType,
                      types.MethodDescriptorType, types.ClassMethodDescriptorType, np.ufunc)
_ATTRIBUTE_OPS = frozenset({"LOAD_ATTR", "LOAD_METHOD"})


def fingerprint_callable(fn: Callable, what: str = "callable") -> str:
    """A callable's fingerprint for cache keys: what decides its output (see the module), never a memory address.

    Args:
        fn: the callable (a function, lambda, ``functools.partial``, bound method or callable object).
        what: what ``fn`` is to the user (``"filter"``, ``"prompt"``), for the error message.

    Returns:
        A sha256 hex digest, the same in every process for the same code and values.

    Raises:
        ValueError: ``fn`` reads a value that cannot be digested deterministically; the message names the
            value and where ``fn`` reads it, and says to give ``fn`` a ``fingerprint()`` method.
    """
    return stable_digest("callable/2", _Walk(fn, what).value(fn, ()))


class _Walk:
    """One depth-first digest of a value graph: the objects on the current path (cycles) and their labels."""

    def __init__(self, root: Any, what: str) -> None:
        self.root, self.what = root, what
        self.stack: list[int] = []
        self.classes: dict[type, list] = {}  # a class's source is read once per walk

    def value(self, x: Any, path: tuple[str, ...]) -> Any:
        """A JSON-able, address-free description of ``x`` (tensors and arrays by their bytes' digest)."""
        if x is None or isinstance(x, (bool, str)) or type(x) is int:
            return x
        if isinstance(x, float) and not isinstance(x, np.generic):
            return ["float", repr(x)]
        if isinstance(x, enum.Enum):
            return ["enum", _class_path(type(x)), x.name]
        if isinstance(x, (int, complex, bytes, bytearray, range, slice, np.generic, np.dtype, torch.dtype,
                          torch.device, pathlib.PurePath, re.Pattern)):
            return [type(x).__qualname__, repr(x)]
        own = getattr(x, "fingerprint", None)
        if callable(own) and not isinstance(x, (type, types.ModuleType)):
            return ["fingerprint", _class_path(type(x)), str(own())]
        if isinstance(x, torch.Tensor):
            return self._tensor(x, path)
        if isinstance(x, np.ndarray):
            if x.dtype.hasobject:
                return ["object-array", list(x.shape), self.value(x.tolist(), path)]
            return ["ndarray", x.dtype.str, list(x.shape), hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()]
        if isinstance(x, types.ModuleType):
            return ["pymodule", x.__name__, _library(x.__name__)]
        if id(x) in self.stack:  # a cycle (a module's parent, a recursive function): where it closes
            return ["cycle", self.stack.index(id(x))]
        if len(self.stack) >= _MAX_DEPTH:
            raise self._refuse(x, path, f"nested deeper than {_MAX_DEPTH} levels")
        self.stack.append(id(x))
        try:
            return self._compound(x, path)
        finally:
            self.stack.pop()

    def _compound(self, x: Any, path: tuple[str, ...]) -> Any:
        if isinstance(x, (list, tuple)):
            kind = type(x).__qualname__ if type(x) in (list, tuple) else _class_path(type(x))
            return [kind, [self.value(v, (*path, f"[{i}]")) for i, v in enumerate(x)]]
        if isinstance(x, dict):
            items = [[self.value(k, (*path, "key")), self.value(v, (*path, f"[{k!r}]"))] for k, v in x.items()]
            return ["dict", sorted(items, key=stable_digest)]
        if isinstance(x, (set, frozenset)):
            return ["set", sorted((self.value(v, (*path, "item")) for v in x), key=stable_digest)]
        if isinstance(x, torch.nn.Module):
            return self._module(x, path)
        if isinstance(x, type):
            return self._class(x, path)
        if isinstance(x, functools.partial):
            return ["partial", self.value(x.func, (*path, ".func")), self.value(list(x.args), (*path, ".args")),
                    self.value(x.keywords, (*path, ".keywords"))]
        if isinstance(x, types.MethodType):
            return ["method", self.value(x.__func__, path), self.value(x.__self__, (*path, ".__self__"))]
        if isinstance(x, types.FunctionType):
            return self._function(x, path)
        if isinstance(x, _BUILTIN_CALLABLES):
            owner = getattr(x, "__self__", None)
            owner = None if owner is None or isinstance(owner, (types.ModuleType, type)) else self.value(owner, (*path, ".__self__"))
            module = getattr(x, "__module__", None) or getattr(getattr(x, "__objclass__", None), "__module__", "")
            return ["builtin", module, getattr(x, "__qualname__", getattr(x, "__name__", "")), owner]
        if isinstance(x, types.SimpleNamespace):
            return ["namespace", self.value(vars(x), path)]
        if isinstance(x, logging.Logger):  # read to log, not to decide
            return ["logger", x.name]
        if type(x) is object:  # a sentinel: no state
            return ["object"]
        pil = sys.modules.get("PIL.Image")
        if pil is not None and isinstance(x, pil.Image):
            return ["PIL.Image", x.mode, list(x.size), hashlib.sha256(x.tobytes()).hexdigest()]
        if _native(type(x)) and callable(getattr(x, "__wrapped__", None)):  # functools.lru_cache and the like
            return ["wrapped", _class_path(type(x)), self.value(x.__wrapped__, path)]
        return self._object(x, path)

    def _tensor(self, t: torch.Tensor, path: tuple[str, ...]) -> list:
        try:
            data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        except (RuntimeError, TypeError) as e:  # sparse, quantized or meta tensors have no plain bytes
            raise self._refuse(t, path, f"a {t.layout} tensor without plain bytes ({e})") from e
        return ["tensor", str(t.dtype), list(t.shape), hashlib.sha256(data).hexdigest()]

    def _module(self, m: torch.nn.Module, path: tuple[str, ...]) -> list:
        """Classes and mode of every submodule, every parameter and buffer, and the submodules' public
        attributes (``eps``, ``mean``, a ``temperature`` of your own); not hooks or private state."""
        weights = hashlib.sha256()
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            weights.update(f"{name}:{stable_digest(self._tensor(t, (*path, '.' + name)))}|".encode())
        subs = []
        for name, sub in m.named_modules():
            at = (*path, f".{name}" if name else "")
            attrs = {k: v for k, v in vars(sub).items() if not k.startswith("_") and k != "training"}
            subs.append([name, self._class(type(sub), at), sub.training, self.value(attrs, at)])
        return ["nn.Module", weights.hexdigest(), subs]

    def _class(self, cls: type, path: tuple[str, ...]) -> list:
        """A library class by its name and version; a class of your own by its source, its bases and the
        globals its methods read."""
        version = _library(cls.__module__)
        if version is not None:
            return ["class", _class_path(cls), version]
        if cls not in self.classes:
            self.classes[cls] = self._own_class(cls, path)
        return self.classes[cls]

    def _own_class(self, cls: type, path: tuple[str, ...]) -> list:
        methods = [m for m in (_unwrap(v) for _, v in sorted(vars(cls).items())) if isinstance(m, types.FunctionType)]
        try:
            code: Any = inspect.getsource(cls)
        except (OSError, TypeError):
            code = [[m.__name__, _code(m.__code__, with_bytecode=True)] for m in methods]
        bases = [self._class(b, (*path, f" (base {b.__qualname__})")) for b in cls.__bases__ if b is not object]
        used = [self._globals(m, (*path, f".{m.__name__}")) for m in methods]
        return ["class", _class_path(cls), code, bases, used]

    def _function(self, fn: types.FunctionType, path: tuple[str, ...]) -> list:
        cells = []
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell: a name assigned after the function was made
                cells.append([name, ["empty-cell"]])
                continue
            cells.append([name, self.value(contents, (*path, f" closure `{name}`"))])
        state = [self.value(fn.__defaults__, (*path, " defaults")), self.value(fn.__kwdefaults__, (*path, " defaults")),
                 cells, self.value(getattr(fn, "__wrapped__", None), (*path, ".__wrapped__"))]
        version = _library(fn.__module__ or "")
        if version is not None:  # its code and module state are the package's: its version says them (its
            # line and constants tell apart two lambdas of one function)
            where = [fn.__code__.co_firstlineno, _code(fn.__code__, with_bytecode=False)]
            return ["function", fn.__module__, fn.__qualname__, version, where, state]
        try:
            code: Any = [inspect.getsource(fn), _code(fn.__code__, with_bytecode=False)]
        except (OSError, TypeError):  # defined at a prompt or by exec: no source to read
            code = _code(fn.__code__, with_bytecode=True)
        return ["function", fn.__module__, fn.__qualname__, code, state, self._globals(fn, path)]

    def _globals(self, fn: types.FunctionType, path: tuple[str, ...]) -> list:
        """The module globals ``fn``'s code reads, by value; ``mod.NAME`` of a module of your own, by the value
        of ``NAME`` (builtins and names not defined are left out)."""
        out = []
        for dotted in sorted(_global_reads(fn.__code__)):
            head, *attrs = dotted.split(".")
            if head not in fn.__globals__:
                continue
            obj, used = fn.__globals__[head], [head]
            for attr in attrs:  # follow a module of your own down to the value read
                if not isinstance(obj, types.ModuleType) or _library(obj.__name__) is not None or not hasattr(obj, attr):
                    break
                obj, used = getattr(obj, attr), [*used, attr]
            name = ".".join(used)
            out.append([name, self.value(obj, (*path, f" global `{name}`"))])
        return sorted(out, key=stable_digest)

    def _object(self, x: Any, path: tuple[str, ...]) -> list:
        """An object of pure-Python classes by its class and attributes (``__dict__`` and slots): all its state."""
        classes = [c for c in type(x).__mro__ if c is not object]
        native = [c for c in classes if _native(c)]
        if native or not hasattr(x, "__dict__") and not any("__slots__" in vars(c) for c in classes):
            raise self._refuse(x, path, f"its state lives in {native[0].__qualname__!r}, not in attributes"
                               if native else "it has no attributes")
        slots = {}
        for c in classes:
            names = vars(c).get("__slots__", ())
            for s in [names] if isinstance(names, str) else names:
                if s not in ("__dict__", "__weakref__") and hasattr(x, s):
                    slots[s] = getattr(x, s)
        attrs = {**getattr(x, "__dict__", {}), **slots}
        return ["object", self._class(type(x), path),
                {k: self.value(v, (*path, f".{k}")) for k, v in sorted(attrs.items(), key=lambda kv: str(kv[0]))}]

    def _refuse(self, x: Any, path: tuple[str, ...], why: str) -> ValueError:
        where = "".join(path).strip() or "itself"
        kind = f"{type(x).__module__}.{type(x).__qualname__}"
        return ValueError(
            f"{self.what} {_name(self.root)} cannot be part of a cache key: it reads {where}, a {kind} ({why}), "
            f"which has no digest that is the same in every process, so two different ones could share cached "
            f"variants. Give the {self.what} a fingerprint() method returning a string that changes whenever "
            f"its output would (e.g. a class with __call__ and fingerprint(); see docs/masks-and-filters.md)"
        )


def _name(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(getattr(fn, "func", None), "__qualname__", None)
    return f"`{name}`" if isinstance(name, str) else f"of type {type(fn).__qualname__}"


def _native(cls: type) -> bool:
    """Whether a class is defined in C (its instances hold state that is not in their attributes)."""
    return cls is not object and (not cls.__flags__ & _HEAPTYPE or bool(cls.__flags__ & _IMMUTABLETYPE))


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _unwrap(member: Any) -> Any:
    if isinstance(member, (staticmethod, classmethod)):
        return member.__func__
    return member.fget if isinstance(member, property) else member


@functools.cache
def _library(module: str) -> str | None:
    """The version that stands for a module's code: Python's for the standard library, the distribution's
    for an installed package; ``None`` for code of your own (a script, a notebook, a test folder)."""
    top = module.partition(".")[0]
    if top in sys.stdlib_module_names or top in ("builtins", "_frozen_importlib"):
        return "python-" + ".".join(map(str, sys.version_info[:2]))
    if top == "dafusion_aug":  # the package is imported before any of its modules: no import needed
        return "dafusion-aug-" + str(getattr(sys.modules.get("dafusion_aug"), "__version__", "unknown"))
    dists = _distributions().get(top)
    if not dists:
        return None
    try:
        return f"{dists[0]}-{importlib.metadata.version(dists[0])}"
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


def _code(code: types.CodeType, with_bytecode: bool) -> list:
    """A code object's constants (and names and bytecode, when there is no source), nested code included:
    two lambdas on one source line differ by their constants."""
    consts = [_const(c, with_bytecode) for c in code.co_consts]
    return [consts, list(code.co_names), code.co_code.hex()] if with_bytecode else consts


def _const(c: Any, with_bytecode: bool) -> Any:
    if isinstance(c, types.CodeType):
        return _code(c, with_bytecode)
    if isinstance(c, tuple):
        return [_const(v, with_bytecode) for v in c]
    if isinstance(c, frozenset):  # `x in {"a", "b"}`: its repr's order changes with the hash seed
        return sorted(repr(_const(v, with_bytecode)) for v in c)
    return [type(c).__qualname__, repr(c)]


def _global_reads(code: types.CodeType) -> set[str]:
    """The globals a code object and the code nested in it read, with the attributes read right after a
    global (``config.THRESHOLD``), as dotted names."""
    out: set[str] = set()
    chain: list[str] = []
    for ins in dis.get_instructions(code):
        if chain and ins.opname in _ATTRIBUTE_OPS and isinstance(ins.argval, str):
            chain.append(ins.argval)
            continue
        if chain:
            out.add(".".join(chain))
        chain = [ins.argval] if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and isinstance(ins.argval, str) else []
    if chain:
        out.add(".".join(chain))
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out |= _global_reads(c)
    return out
