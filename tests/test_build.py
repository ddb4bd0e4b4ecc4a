"""The two builds (setup.py and CMakeLists.txt) compile the same sources, all
taken from csrc/sources.txt, and the installed extension is the one tested."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_setup():
    spec = importlib.util.spec_from_file_location("fastperturb_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines functions only: setup() runs under __main__
    return mod


def test_sources_file_lists_existing_files_in_known_sections():
    setup = load_setup()
    sections = setup.read_sources(ROOT)
    assert set(sections) <= {"cpu", "cuda"}
    assert "csrc/schemas.cpp" in sections["cpu"] and "csrc/module.cpp" in sections["cpu"]
    listed = set(sections["cpu"])
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp")}
    # every C++ file of the CPU build is listed (a forgotten file would only fail at link or import time)
    cpu_dirs = ("csrc/cpu/",)
    assert {p for p in on_disk if p.startswith(cpu_dirs)} <= listed


def test_cuda_switch(monkeypatch):
    setup = load_setup()
    monkeypatch.setenv("FASTPERTURB_CUDA", "0")
    assert setup.cuda_enabled() is False
    assert setup.extension_sources(False) == setup.read_sources(ROOT)["cpu"]
    monkeypatch.setenv("FASTPERTURB_CUDA", "1")
    assert setup.cuda_enabled() is True
    monkeypatch.setenv("FASTPERTURB_CUDA", "yes")
    with pytest.raises(ValueError):
        setup.cuda_enabled()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ninja") is None and
                    importlib.util.find_spec("ninja") is None, reason="needs cmake and ninja")
def test_cmake_configures_the_same_sources_as_setup_py(tmp_path):
    import torch.utils

    ninja = shutil.which("ninja")
    if ninja is None:
        import ninja as ninja_pkg

        ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
    env = dict(os.environ, FASTPERTURB_CUDA="0")
    subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython3_EXECUTABLE={sys.executable}"],
        check=True, env=env, capture_output=True, text=True,
    )
    commands = json.loads((tmp_path / "compile_commands.json").read_text())
    cmake_files = sorted(str(Path(c["file"]).resolve().relative_to(ROOT)) for c in commands)
    setup = load_setup()
    assert cmake_files == sorted(setup.extension_sources(cuda=False))


def test_extension_is_built_and_loaded():
    """Fails, rather than letting every cpp test skip, when CI built no extension."""
    from fastperturb.ops import native as _native

    if _native.load_error is not None and os.environ.get("FASTPERTURB_REQUIRE_NATIVE") != "1":
        pytest.skip(f"fastperturb._C did not load: {_native.load_error}")
    assert _native.load_error is None, f"fastperturb._C did not load: {_native.load_error}"
    import fastperturb._C as C

    assert C.cpu_isa in ("default", "avx2")
    assert Path(C.__file__).suffix == ".so"
