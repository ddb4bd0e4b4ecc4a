"""The benchmark suites: ``ops``, ``cycle``, ``step``, ``train``, ``memory``, ``train_loop`` and ``family``, one
module each.

Each suite returns a list of result records (dicts, see :mod:`benchmarks.report`
for the fields). Records of implementations that cannot run here are kept with
``status="skipped"`` and the reason, so a missing peer never crashes a run.
"""

from ..train_loop import MODELS as _TRAIN_LOOP_MODELS  # noqa: F401  (the runner lists its models)
from ..train_loop import suite_train_loop
from .common import Config, fastperturb_backends, make_params, timed_backends
from .cycle import CYCLES, _foreach_cycle, suite_cycle
from .family import FAMILY_NAMES, suite_family
from .memory import MEMORY_IMPLS, suite_memory
from .ops import suite_ops
from .step import SyntheticClosure, _wrap_step, suite_step
from .train import _train_model, small_cnn, suite_train

SUITES = ("ops", "cycle", "step", "train", "memory", "train_loop", "family")
RUNNERS = {
    "ops": suite_ops,
    "cycle": suite_cycle,
    "step": suite_step,
    "train": suite_train,
    "memory": suite_memory,
    "train_loop": suite_train_loop,
    "family": suite_family,
}

__all__ = [
    "Config",
    "CYCLES",
    "FAMILY_NAMES",
    "MEMORY_IMPLS",
    "RUNNERS",
    "SUITES",
    "SyntheticClosure",
    "fastperturb_backends",
    "make_params",
    "small_cnn",
    "suite_cycle",
    "suite_family",
    "suite_memory",
    "suite_ops",
    "suite_step",
    "suite_train",
    "timed_backends",
    "_foreach_cycle",
    "_train_model",
    "_wrap_step",
]
