"""Parameter lists to benchmark on: built-in architectures (shapes only) or the user's model.

The built-in lists are generated from the architectures' definitions, so they
have the real number of tensors and the real sizes without needing torchvision,
timm or transformers:

* ``resnet50``: torchvision's ResNet-50 (161 tensors, 25,557,032 parameters);
* ``bert-base``: BERT-base-uncased with pooler (199 tensors, 109,482,240);
* ``vit-b16``: ViT-B/16 at 224 px, 1000 classes (152 tensors, 86,567,656);
* ``small1000``: 1000 tensors of 32x32 (launch- and loop-overhead bound);
* ``huge``: one tensor of 2**25 elements (pure bandwidth).

A user model is ``pkg.module:factory`` (a callable returning an ``nn.Module``,
built on the meta device when it allows so no memory is spent) or the name of a
torchvision / timm model when those packages are installed.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

Shape = tuple[int, ...]


def resnet50() -> list[Shape]:
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            width, out = planes, planes * 4
            shapes += [(width, inplanes, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out, width, 1, 1), (out,), (out,)]
            if b == 0:  # projection shortcut
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    shapes += [(1000, 2048), (1000,)]
    return shapes


def bert_base() -> list[Shape]:
    h, inter, vocab = 768, 3072, 30522
    shapes: list[Shape] = [(vocab, h), (512, h), (2, h), (h,), (h,)]
    for _ in range(12):
        for _qkvo in range(4):
            shapes += [(h, h), (h,)]
        shapes += [(h,), (h,)]  # attention output LayerNorm
        shapes += [(inter, h), (inter,), (h, inter), (h,)]
        shapes += [(h,), (h,)]  # output LayerNorm
    shapes += [(h, h), (h,)]  # pooler
    return shapes


def vit_b16() -> list[Shape]:
    h, mlp = 768, 3072
    shapes: list[Shape] = [(1, 1, h), (1, 197, h), (h, 3, 16, 16), (h,)]
    for _ in range(12):
        shapes += [(h,), (h,), (3 * h, h), (3 * h,), (h, h), (h,), (h,), (h,), (mlp, h), (mlp,), (h, mlp), (h,)]
    shapes += [(h,), (h,), (1000, h), (1000,)]
    return shapes


def small1000() -> list[Shape]:
    return [(32, 32)] * 1000


def huge() -> list[Shape]:
    return [(1 << 25,)]


def tiny() -> list[Shape]:
    """For tests: a handful of small tensors of mixed rank."""
    return [(8, 4, 3, 3), (8,), (16, 8), (16,), (5, 7)]


BUILTIN: dict[str, Callable[[], list[Shape]]] = {
    "resnet50": resnet50,
    "bert-base": bert_base,
    "vit-b16": vit_b16,
    "small1000": small1000,
    "huge": huge,
    "tiny": tiny,
}


class UnknownModel(ValueError):
    pass


def _module_shapes(module: torch.nn.Module) -> list[Shape]:
    return [tuple(p.shape) for p in module.parameters() if p.requires_grad]


def _build(factory: Callable[[], object]) -> torch.nn.Module:
    try:
        with torch.device("meta"):
            m = factory()
    except Exception:
        m = factory()
    if not isinstance(m, torch.nn.Module):
        raise UnknownModel(f"the factory returned {type(m).__name__}, not an nn.Module")
    return m


def shapes_for(name: str) -> list[Shape]:
    """The parameter shapes of a built-in list, ``pkg.module:factory``, or a torchvision/timm model name."""
    if name in BUILTIN:
        return BUILTIN[name]()
    if ":" in name:
        mod_name, _, attr = name.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise UnknownModel(f"cannot import {mod_name!r} for --model {name!r}: {e}") from None
        factory = getattr(mod, attr, None)
        if not callable(factory):
            raise UnknownModel(f"{mod_name!r} has no callable {attr!r} (--model expects pkg.module:factory)")
        return _module_shapes(_build(factory))
    tried = []
    try:
        tv = importlib.import_module("torchvision.models")
        if name in tv.list_models():
            return _module_shapes(_build(lambda: tv.get_model(name, weights=None)))
        tried.append("torchvision")
    except Exception:
        pass
    try:
        timm = importlib.import_module("timm")
        if name in timm.list_models():
            return _module_shapes(_build(lambda: timm.create_model(name, pretrained=False)))
        tried.append("timm")
    except Exception:
        pass
    where = f" (not found in {', '.join(tried)})" if tried else " (torchvision/timm not installed)"
    raise UnknownModel(
        f"unknown model {name!r}{where}; built-in lists: {', '.join(BUILTIN)}; "
        "or pass pkg.module:factory for your own model"
    )


def describe(shapes: list[Shape]) -> str:
    n = sum(_numel(s) for s in shapes)
    return f"{len(shapes)} tensors, {n / 1e6:.1f}M params"


def _numel(s: Shape) -> int:
    out = 1
    for d in s:
        out *= d
    return out


def numel(shapes: list[Shape]) -> int:
    return sum(_numel(s) for s in shapes)
