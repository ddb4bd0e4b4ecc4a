"""Registration of the Triton ops under ``fastperturb_triton::``, with the
schemas the compiled extension registered for ``fastperturb::`` (written once,
in ``csrc/include/fastperturb/schemas.h``), the shared fake impls, and the
version-counter bumps every backend makes on the tensors it writes."""

from __future__ import annotations

from typing import Callable

import torch

from .. import fake, native, pure
from ..names import HELPER_OPS, OPS
from . import impls
from .impls import NAMESPACE


def _schema_of(name: str) -> torch.FunctionSchema:
    """The schema the compiled extension registered for ``fastperturb::<name>``."""
    try:
        return getattr(torch.ops.fastperturb, name).default._schema
    except (AttributeError, RuntimeError) as e:
        reason = native.load_error or e
        raise ImportError(
            f"fastperturb.ops.triton takes the op schemas from the compiled extension, but "
            f"torch.ops.fastperturb.{name} is not defined ({reason}); build fastperturb._C first"
        ) from e


def _signature(schema: torch.FunctionSchema) -> str:
    """The argument and return part of ``schema``: ``(Tensor[] tensors, float ord) -> (Tensor, Tensor)``."""
    text = str(schema)
    return text[text.index("(") :]


# Written-to lists an op leaves untouched unless a flag asks for the write (the
# C++ ops skip these bumps the same way): {op: {argument: flag}}.
_WRITTEN_ONLY_IF = {"ascent_step_": {"backups": "first", "grads": "zero_grads"}}


def _bumping_versions(name: str, impl: Callable, schema: torch.FunctionSchema) -> Callable:
    """``impl`` followed by a version-counter bump of every tensor it wrote: the
    arguments the schema marks as written (``Tensor(a!)[]``), as torch's in-place ops
    and the C++ backends do, so autograd notices a weight modified after it was
    saved for backward. ``impl`` validates before writing, so a rejected call
    leaves the counters alone."""
    only_if = _WRITTEN_ONLY_IF.get(name, {})
    written = [
        (i, a.name) for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write
    ]

    def run(*args, **kwargs):
        out = impl(*args, **kwargs)
        for i, arg in written:
            flag = only_if.get(arg)
            if flag is not None and not kwargs.get(flag, False):
                continue
            tensors = args[i] if i < len(args) else kwargs[arg]
            if tensors:
                torch.autograd.graph.increment_version(tensors)
        return out

    run.__name__ = run.__qualname__ = impl.__name__
    run.__doc__ = impl.__doc__
    return run


def _already_defined() -> bool:
    try:
        _ = getattr(torch.ops, NAMESPACE).norms
    except (AttributeError, RuntimeError):
        return False
    return True


_LIBS: list[torch.library.Library] = []  # keeps the registrations alive


def register() -> None:
    """Define ``fastperturb_triton::<op>`` for every op of :data:`~fastperturb.ops.names.OPS` and
    :data:`~fastperturb.ops.names.HELPER_OPS` (once per process)."""
    if _already_defined():
        return
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    for name in (*OPS, *HELPER_OPS):
        qualname = f"{NAMESPACE}::{name}"
        schema = _schema_of(name)
        # The ops that run on a launch plan upload it from host memory at every call: a CUDA graph must not
        # capture them (plan.refuse_capture); the tag has Inductor's CUDA graphs leave them out.
        tags = (torch.Tag.cudagraph_unsafe,) if name in OPS else ()
        torch.library.define(qualname, _signature(schema), lib=lib, tags=tags)
        # CompositeExplicitAutograd ("default") serves calls whose lists are all
        # empty (no tensor to dispatch on) and devices without a kernel, which
        # the impl refuses with the reason.
        torch.library.impl(
            qualname, ("cpu", "cuda", "default"), _bumping_versions(name, getattr(impls, name), schema), lib=lib
        )
    fake.register(NAMESPACE)
    pure.register(NAMESPACE)
    _LIBS.append(lib)
