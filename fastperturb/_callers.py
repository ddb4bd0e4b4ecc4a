"""Where a warning points: at the user's line, however deep inside fastperturb and torch it was raised."""

from __future__ import annotations

import sys


def user_stacklevel() -> int:
    """``warnings.warn``'s ``stacklevel``, for the function that calls this and then warns, that names the first
    frame outside fastperturb and torch (the user's ``opt.step(...)`` or ``sweep(...)`` line, past the layers in
    between and torch's ``no_grad`` or ``torch.optim`` wrappers)."""
    frame, level = sys._getframe(2), 2  # (level 1: the function that warns, which called this)
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("fastperturb", "torch"):
        frame, level = frame.f_back, level + 1
    return level
