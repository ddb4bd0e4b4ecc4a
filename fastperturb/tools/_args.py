"""What the command-line tools share: argument types, one-line usage errors, and checked loading of the
user's model, weights and data, plus all-or-nothing output folders.

Every problem the user can cause at the command line is a :class:`UsageError` (or an argparse error)
whose message names the argument and the problem; :func:`fastperturb.cli.main` prints it as one line and
exits with code 2. Outputs are checked to be writable before any work starts and are written only when
everything succeeded, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import pickle
import sys
import tempfile
import zipfile
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn


class UsageError(Exception):
    """A problem the user caused at the command line (a missing file, a bad shape, an unwritable
    folder): :func:`fastperturb.cli.main` prints it as one line naming the argument and exits 2."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (argparse's own prints the usage first)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` that states every option's default, read from the parser (so it cannot go stale beside a value
    written into the help text): added where the help does not already say what the default is (a default that is
    not a literal, e.g. "torch's choice"). Flags (``store_true``) and options without a default get nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or action.nargs == 0
            or default is None
            or default is argparse.SUPPRESS
            or "default" in text.lower()
        ):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------- argument types


def eps_list(text: str, *, allow_zero: bool = False) -> list[float]:
    """Comma-separated finite radii, > 0 (or >= 0 with ``allow_zero``)."""
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one eps")
    for v in vals:
        if not (math.isfinite(v) and (v >= 0 if allow_zero else v > 0)):
            raise argparse.ArgumentTypeError(
                f"every eps must be a finite number {'>=' if allow_zero else '>'} 0, got {v}"
            )
    return vals


def positive_eps_list(text: str) -> list[float]:
    return eps_list(text, allow_zero=False)


def nonnegative_eps_list(text: str) -> list[float]:
    return eps_list(text, allow_zero=True)


def choice_list(choices: Sequence[str], what: str = "presets") -> Callable[[str], list[str]]:
    """An argument type: a comma-separated, non-empty subset of ``choices`` (lower case, order kept,
    duplicates dropped)."""

    def parse(text: str) -> list[str]:
        vals = [v.strip().lower() for v in text.split(",") if v.strip()]
        if not vals or any(v not in choices for v in vals):
            raise argparse.ArgumentTypeError(
                f"{what} must be a comma-separated subset of {','.join(choices)}, got {text!r}"
            )
        return list(dict.fromkeys(vals))

    return parse


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch threads (``n <= 0``: leave torch's choice), restoring the count after."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
        return v

    parse.__name__ = f"int>={low}"
    return parse


def _float_above(low: float, *, inclusive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or v < low or (v == low and not inclusive):
            relation = ">=" if inclusive else ">"
            raise argparse.ArgumentTypeError(f"expected a finite number {relation} {low:g}, got {text}")
        return v

    parse.__name__ = f"float>{'=' if inclusive else ''}{low:g}"
    return parse


positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)
positive_float = _float_above(0.0, inclusive=False)
nonnegative_float = _float_above(0.0, inclusive=True)


def trials(text: str) -> int:
    """Random corruptions per eps: an even number >= 4 (mirrored pairs, and two pairs or more for a standard
    error)."""
    v = positive_int(text)
    if v < 4 or v % 2:
        raise argparse.ArgumentTypeError(
            f"expected an even number >= 4 (mirrored pairs; two pairs or more give a standard error), got {text!r}"
        )
    return v


def shape(text: str) -> tuple[int, ...]:
    """A tensor shape: comma- or x-separated positive integers (``3,32,32`` or ``3x32x32``)."""
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape such as 3,32,32, got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected positive dimensions such as 3,32,32, got {text!r}")
    return dims


# ----------------------------------------------------------------------------- the user's model


def import_object(spec: str, arg: str = "--model"):
    """``package.module:name`` imported the way ``python -m`` would: the current directory is importable."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise UsageError(f"{arg} {spec}: expected package.module:factory")
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)  # console scripts do not put the current directory on sys.path
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # ImportError, or the user's module failing at import
        raise UsageError(f"{arg} {spec}: cannot import {mod_name!r} ({_first_line(e)})") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{arg} {spec}: {mod_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


def build_model(spec: str, arg: str = "--model") -> nn.Module:
    """Call the factory ``package.module:factory`` (no arguments); it must return an ``nn.Module``."""
    factory = import_object(spec, arg)
    if not callable(factory):
        raise UsageError(f"{arg} {spec}: {spec.partition(':')[2]!r} is not callable")
    try:
        model = factory()
    except Exception as e:
        raise UsageError(f"{arg} {spec}: calling the factory failed ({_first_line(e)})") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"{arg} {spec}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model


def load_module_file(path: str, arg: str = "--model") -> nn.Module:
    """A whole pickled ``nn.Module`` or a TorchScript module (a pickle can run code: trusted files only)."""
    try:
        is_script = False
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                is_script = any(n.endswith("constants.pkl") for n in z.namelist())
        model = (
            torch.jit.load(path, map_location="cpu")
            if is_script
            else torch.load(path, map_location="cpu", weights_only=False)
        )
    except Exception as e:
        raise UsageError(f"{arg} {path}: not a pickled nn.Module or TorchScript file ({_first_line(e)})") from None
    if _is_tensor_dict(model):  # a state_dict (the demo's models/seed*/*.pt are)
        raise UsageError(
            f"{arg} {path}: holds a state_dict, not an nn.Module; pass the model's factory as {arg} and the file as "
            "--weights (the demo's models: --model fastperturb.tools.demo:DigitsCNN --weights PATH)"
        )
    if not isinstance(model, nn.Module):
        raise UsageError(f"{arg} {path}: holds a {type(model).__name__}, not an nn.Module")
    return model


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_state_dict(path: str, arg: str = "--weights") -> dict:
    """A ``state_dict`` file (loaded with ``weights_only=True``: no code runs)."""
    if not os.path.isfile(path):
        raise UsageError(f"{arg} {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(
            f"{arg} {path}: holds a pickled object (a whole nn.Module?), not a state_dict; pass "
            "such a file as --model, or save torch.save(model.state_dict(), path)"
        ) from None
    except Exception as e:
        raise UsageError(f"{arg} {path}: not a file written by torch.save ({_first_line(e)})") from None
    if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        for key in ("state_dict", "model"):  # common checkpoint layouts
            if _is_tensor_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_tensor_dict(obj):
        raise UsageError(f"{arg} {path}: holds a {type(obj).__name__}, not a state_dict (names -> tensors)")
    return dict(obj)


def _names(keys, limit: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_weights_into(model: nn.Module, path: str, arg: str = "--weights") -> None:
    """Load a ``state_dict`` file into ``model``; a mismatch is one line (missing, unexpected, other shapes)."""
    state = load_state_dict(path, arg)
    own = model.state_dict()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    shapes = [k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
        if shapes:
            k = sorted(shapes)[0]
            parts.append(
                f"{len(shapes)} of another shape ({k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
            )
        raise UsageError(f"{arg} {path} does not match the model: " + "; ".join(parts))
    try:
        model.load_state_dict(state)
    except Exception as e:
        raise UsageError(f"{arg} {path} does not load into the model ({_first_line(e)})") from None


# ----------------------------------------------------------------------------- data


def check_finite(t: torch.Tensor, what: str, arg: str, spec: str) -> None:
    """NaN or Inf in float data is the user's to clean: a loss over it means nothing."""
    if t.is_floating_point() or t.is_complex():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise UsageError(
                f"{arg} {spec}: the {what} hold {bad} NaN/Inf value(s) of {t.numel()}; clean the data first"
            )


# ----------------------------------------------------------------------------- outputs


def check_writable_dir(path: str, arg: str = "--out") -> None:
    """Fail now, before any work, if ``path`` cannot become a folder we can write in (nothing is created)."""
    probe = os.path.abspath(path)
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise UsageError(f"{arg} {path}: exists and is not a folder")
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UsageError(f"{arg} {path}: {probe} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UsageError(f"{arg} {path}: cannot write in {probe} ({e.strerror or e})") from None


def check_writable_file(path: str, arg: str) -> None:
    """Fail now, before any work, if the file ``path`` could not be written at the end."""
    if not path.strip():
        raise UsageError(f"{arg}: an empty file name")
    if os.path.isdir(path):
        raise UsageError(f"{arg} {path}: is a folder, expected a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"{arg} {path}: {folder} is not a folder")
    if not os.path.isdir(folder):
        raise UsageError(f"{arg} {path}: the folder {folder} does not exist")
    check_writable_dir(folder, arg)


def write_all(folder: str, writers: Mapping[str, Callable[[str], object]], arg: str = "--out") -> list[str]:
    """Write every file of ``writers`` (name -> ``write(path)``) into ``folder``, all or nothing.

    Each is first written to a temporary name in ``folder``; only when all succeeded are they renamed into
    place (and the folder is created only then), so a failure leaves no partial set of outputs behind.
    """
    made_folder = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{arg} {folder}: cannot create it ({e.strerror or e})") from None
    temps: dict[str, str] = {}
    try:
        for name, write in writers.items():
            stem, ext = os.path.splitext(name)
            tmp = os.path.join(folder, f".{stem}.partial{ext}")  # keeps the extension: matplotlib reads it
            temps[name] = tmp
            write(tmp)
        for name, tmp in temps.items():
            os.replace(tmp, os.path.join(folder, name))
    except BaseException:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        if made_folder and not os.listdir(folder):
            os.rmdir(folder)
        raise
    return list(writers)
