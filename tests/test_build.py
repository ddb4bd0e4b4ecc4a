"""The two builds (setup.py and CMakeLists.txt) compile the same sources, all
taken from csrc/sources.txt, with the flags of csrc/flags.txt; the test
harnesses stay out of fastperturb._C; and the installed extension is the one
tested."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastperturb as fp

ROOT = Path(__file__).resolve().parent.parent


def load_setup():
    spec = importlib.util.spec_from_file_location("fastperturb_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines functions only: setup() runs under __main__
    return mod


def test_sources_file_lists_existing_files_in_known_sections():
    setup = load_setup()
    sections = setup.read_sources(ROOT)
    assert set(sections) <= {"cpu", "cuda", "testing"}
    assert "csrc/schemas.cpp" in sections["cpu"] and "csrc/module.cpp" in sections["cpu"]
    listed = set(sections["cpu"])
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp")}
    # every C++ file of the CPU build is listed (a forgotten file would only fail at link or import time)
    cpu_dirs = ("csrc/cpu/",)
    assert {p for p in on_disk if p.startswith(cpu_dirs)} <= listed
    # the test harnesses are built into their own module only, never into _C
    testing = {p for p in on_disk if p.startswith("csrc/testing/")}
    assert testing and testing == set(sections["testing"])
    assert not testing & (set(sections["cpu"]) | set(sections["cuda"]))


def test_flags_come_from_one_file_and_werror_only_on_request(monkeypatch):
    setup = load_setup()
    monkeypatch.delenv("FASTPERTURB_WERROR", raising=False)
    flags = setup.read_flags()
    assert "-ffp-contract=off" in flags["cxx"] and "--fmad=false" in flags["nvcc"] and flags["link"] == ["-fopenmp"]
    # users' builds: a newer compiler's new warning must not break their install
    assert not any("Werror" in f for kind in flags.values() for f in kind)
    monkeypatch.setenv("FASTPERTURB_WERROR", "1")
    strict = setup.read_flags()
    assert "-Werror" in strict["cxx"]
    assert strict["nvcc"][-3:] == ["-Werror", "all-warnings", "-Xcompiler=-Werror"]
    monkeypatch.setenv("FASTPERTURB_WERROR", "yes")
    with pytest.raises(ValueError):
        setup.read_flags()


def test_testing_module_only_on_request(monkeypatch):
    setup = load_setup()
    monkeypatch.setenv("FASTPERTURB_CUDA", "0")
    monkeypatch.delenv("FASTPERTURB_BUILD_TESTING", raising=False)
    assert [e.name for e in setup.extensions()] == ["fastperturb._C"]
    monkeypatch.setenv("FASTPERTURB_BUILD_TESTING", "1")
    exts = {e.name: e for e in setup.extensions()}
    assert set(exts) == {"fastperturb._C", "fastperturb._C_testing"}
    assert exts["fastperturb._C_testing"].sources == setup.read_sources(ROOT)["testing"]
    assert not set(exts["fastperturb._C"].sources) & set(exts["fastperturb._C_testing"].sources)


def test_the_shipped_extension_registers_no_test_harness(native):
    """Importing fastperturb (and so _C) in a fresh process registers fastperturb::*, not the
    work-list executor's namespace, which only fastperturb._C_testing brings."""
    code = (
        "import torch, fastperturb, fastperturb.ops\n"
        "names = torch._C._dispatch_get_all_op_names()\n"
        "print(sorted(n for n in names if n.startswith('fastperturb')))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    from fastperturb.ops import pure
    from fastperturb.ops.names import HANDLE_OPS, HELPER_OPS, OPS

    # the op set, plus grad_stats_'s non-mutating twin that torch.compile calls (fastperturb/ops/pure.py), plus the
    # ops on a TensorLists handle and the engine's helpers
    want = (*OPS, pure.NAME, *HANDLE_OPS, *HELPER_OPS)
    assert run.stdout.strip() == str(sorted(f"fastperturb::{name}" for name in want))


def test_setup_py_without_torch_says_to_install_it_first(tmp_path):
    """``pip install --no-build-isolation .`` into an environment without torch: one line saying what to do, not a
    ModuleNotFoundError traceback from setup.py (torch is made unimportable in the child)."""
    code = (
        "import runpy, sys\n"
        "sys.modules['torch'] = None\n"
        "sys.argv = ['setup.py', '--name']\n"
        f"runpy.run_path({str(ROOT / 'setup.py')!r}, run_name='__main__')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "install torch first (pip install torch==2.13.0), then pip install --no-build-isolation ." in run.stderr


def test_python_op_names_are_the_compiled_op_set(native):
    """fastperturb/ops/names.py and schemas.h's kAll name the same ops, in the same order."""
    from fastperturb.ops import pure
    from fastperturb.ops.names import HANDLE_OPS, HELPER_OPS, OPS

    registered = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastperturb::")]
    # plus grad_stats_'s non-mutating twin that torch.compile calls (fastperturb/ops/pure.py), plus the ops on a
    # TensorLists handle (their order: kAllLists, checked below) and the engine's helpers (defined outside kAll)
    want = (*OPS, pure.NAME, *HANDLE_OPS, *HELPER_OPS)
    assert sorted(registered) == sorted(f"fastperturb::{name}" for name in want)
    helpers = (ROOT / "csrc/schemas.cpp").read_text()
    assert all(
        f"m.def(fastperturb::schemas::k{''.join(w.title() for w in name.split('_'))})" in helpers for name in HELPER_OPS
    )
    # the order of kAll, as TORCH_LIBRARY defines them: the schemas' positions in the registry are not
    # observable, so the order is checked against the header's text
    header = (ROOT / "csrc/include/fastperturb/schemas.h").read_text()
    init = header.split("kAll[] =", 1)[1].split(";", 1)[0]  # the initializer may span lines
    consts = [c.strip() for c in init.split("{", 1)[1].split("}", 1)[0].split(",")]
    defined = {c: header.split(f"{c} =", 1)[1].split('"', 2)[1].split("(", 1)[0] for c in consts}
    assert tuple(defined[c] for c in consts) == OPS
    lists_header = (ROOT / "csrc/include/fastperturb/list_schemas.h").read_text()
    body = lists_header.split("kAllLists[] = {", 1)[1].split("}", 1)[0]
    consts = [c.strip() for c in body.split(",")]
    defined = {c: lists_header.split(f"{c} =", 1)[1].split('"', 2)[1].split("(", 1)[0] for c in consts}
    assert tuple(defined[c] for c in consts) == HANDLE_OPS


def test_cuda_switch(monkeypatch):
    setup = load_setup()
    monkeypatch.setenv("FASTPERTURB_CUDA", "0")
    assert setup.cuda_enabled() is False
    assert setup.extension_sources(False) == setup.read_sources(ROOT)["cpu"]
    monkeypatch.setenv("FASTPERTURB_CUDA", "1")
    if torch.version.cuda is not None:
        from torch.utils import cpp_extension

        if setup.toolkit_problem(cpp_extension.CUDA_HOME) is None:
            assert setup.cuda_enabled() is True
        else:  # (an nvcc wrapper on PATH, no toolkit beside it: refused by name)
            with pytest.raises(SystemExit, match="FASTPERTURB_CUDA=0"):
                setup.cuda_enabled()
    else:  # (torch's own error blamed CUDA_HOME, set or not)
        with pytest.raises(SystemExit, match=r"FASTPERTURB_CUDA=1 needs a CUDA build of torch; this one is .*\+cpu"):
            setup.cuda_enabled()
    monkeypatch.setenv("FASTPERTURB_CUDA", "yes")
    with pytest.raises(ValueError):
        setup.cuda_enabled()


def _toolkit(root: Path, nvcc: bool = True, headers: str | None = "include") -> Path:
    if nvcc:
        (root / "bin").mkdir(parents=True)
        (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    if headers is not None:
        (root / headers).mkdir(parents=True)
        (root / headers / "cuda_runtime.h").write_text("")
    return root


@pytest.mark.parametrize("forced", [None, "1"])
def test_a_cuda_torch_with_an_incomplete_toolkit_is_refused_by_name_before_compiling(monkeypatch, tmp_path, forced):
    """torch guesses CUDA_HOME from the nvcc on PATH: a wrapper script in /usr/local/bin gave /usr/local, no
    cuda_runtime.h there, and the build failed in the middle of compiling. Now refused first, saying what to set;
    FASTPERTURB_CUDA=0 still builds the CPU kernels, and a complete toolkit (or a conda one's targets/ headers)
    compiles the CUDA kernels."""
    from torch.utils import cpp_extension

    setup = load_setup()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    for var in ("CUDA_INC_PATH", "CPATH", "CPLUS_INCLUDE_PATH"):  # (header folders the check accepts)
        monkeypatch.delenv(var, raising=False)
    if Path("/usr/include/cuda_runtime.h").is_file():
        pytest.skip("the system's own cuda_runtime.h (/usr/include) is accepted for any toolkit home")
    if forced is None:
        monkeypatch.delenv("FASTPERTURB_CUDA", raising=False)
    else:
        monkeypatch.setenv("FASTPERTURB_CUDA", forced)
    cases = {
        "no_headers": _toolkit(tmp_path / "shim", headers=None),
        "no_nvcc": _toolkit(tmp_path / "headers_only", nvcc=False),
    }
    for name, home in cases.items():
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
        missing = "include/cuda_runtime.h" if name == "no_headers" else "bin/nvcc"
        with pytest.raises(SystemExit, match=rf"CUDA build.*{home} .*has no {missing}.*FASTPERTURB_CUDA=0"):
            setup.cuda_enabled()
    for home in (_toolkit(tmp_path / "complete"), _toolkit(tmp_path / "conda", headers="targets/x86_64-linux/include")):
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
        assert setup.cuda_enabled() is True
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)  # no toolkit at all: CPU kernels, unless asked for CUDA
    if forced is None:
        assert setup.cuda_enabled() is False
    else:
        with pytest.raises(SystemExit, match="no CUDA toolkit was found"):
            setup.cuda_enabled()
    monkeypatch.setenv("FASTPERTURB_CUDA", "0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(cases["no_headers"]))
    assert setup.cuda_enabled() is False


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None,
    reason="needs cmake and ninja",
)
@pytest.mark.skipif(
    torch.version.cuda is not None,
    reason="a CUDA torch's CMake package needs CMake to find the CUDA toolkit (.ci/cuda_build.sh's "
    "FASTPERTURB_CUDA_CMAKE=1 configures it so); this checks the CPU configuration",
)
def test_cmake_configures_the_same_sources_as_setup_py(tmp_path):
    import torch.utils

    ninja = shutil.which("ninja")
    if ninja is None:
        import ninja as ninja_pkg

        ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
    env = dict(os.environ, FASTPERTURB_CUDA="0", FASTPERTURB_BUILD_TESTING="0")
    subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(tmp_path),
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
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


def test_a_source_checkout_without_the_extension_says_so(tmp_path):
    """Run from a checkout after `pip install .`, Python imports the checkout's package, which has no compiled
    extension: the load error says that, and how to fix it (not Python's "circular import"). Checked on a copy of
    the package's folder (an editable install's import hook would always find the real one)."""
    import fastperturb
    from fastperturb.ops import native

    package = Path(fastperturb.__file__).parent
    copy = tmp_path / "fastperturb"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__", "data"))
    assert native._source_checkout_error(copy) is None  # not a checkout: no setup.py beside it
    (tmp_path / "setup.py").write_text("")
    err = native._source_checkout_error(copy)
    assert isinstance(err, ImportError)
    assert "imported from the source checkout" in str(err) and "pip install --no-build-isolation -e ." in str(err)
    (copy / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert native._source_checkout_error(copy) is None  # built in place: a load failure is something else


def test_auto_says_once_when_it_falls_back_to_the_reference(monkeypatch):
    """The checkout's package (no extension) shadowing the installed one made `auto` run every op on the
    reference, silently (found by this round's newcomer review): now a RuntimeWarning names the reason, once per
    reason, at the user's line; a chosen reference backend says nothing."""
    import warnings

    from fastperturb import ops
    from fastperturb.ops import dispatch, native

    monkeypatch.setattr(native, "load_error", ImportError("imported from the source checkout (test)"))
    monkeypatch.setattr(dispatch, "_fallbacks_said", set())
    x = [torch.randn(5)]
    with pytest.warns(RuntimeWarning, match=r"reference backend for cpu tensors .*source checkout \(test\)") as seen:
        ops.norms(x, 2.0)
        ops.norms(x, 2.0)
        ops.grad_stats_(x)
    assert len(seen) == 1 and seen[0].filename == __file__
    monkeypatch.setattr(dispatch, "_fallbacks_said", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fp.use_backend("reference"):
            ops.norms(x, 2.0)
        ops.norms([torch.empty(5, device="meta")], 2.0)  # no backend computes on meta: nothing to say
        # under torch.compile (fullgraph) the walk to the user's frame cannot be traced: said at the next eager call
        torch._dynamo.reset()
        compiled = torch.compile(lambda t: ops.norms([t], 2.0)[0] * 2, fullgraph=True, backend="eager")
        assert torch.equal(compiled(torch.ones(4)), torch.tensor([4.0]))
    with pytest.warns(RuntimeWarning, match="reference backend for cpu tensors"):
        ops.norms(x, 2.0)
    # a training step compiled whole never resolves the backend eagerly: the optimizer says it when it is built
    monkeypatch.setattr(dispatch, "_fallbacks_said", set())
    model = torch.nn.Linear(3, 2)
    with pytest.warns(RuntimeWarning, match="reference backend for cpu tensors") as seen:
        fp.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert seen[0].filename == __file__


@pytest.mark.parametrize(
    "arch_list, visible, torch_archs, want_archs, error",
    [
        ("8.0;9.0", [], [], None, None),  # CI's list
        ("7.5+PTX 8.6", [(6, 1)], [], None, None),  # the user's list decides, not the GPU
        ("6.1;8.0+PTX", [], [], None, "names 6.1:"),
        ("Pascal;Ampere", [], [], None, "names Pascal:"),
        (None, [(8, 6), (7, 0)], ["sm_50"], None, None),
        (None, [(8, 6), (6, 1)], [], None, "compute capability 6.1"),
        ("native", [(6, 0)], [], None, "compute capability 6.0"),  # torch's "native" is the visible GPU
        (
            None,
            [],
            ["sm_50", "sm_60", "sm_70", "sm_75", "sm_90a", "sm_100", "compute_120"],
            "7.0;7.5;9.0;10.0;12.0",
            None,
        ),
        ("", [], ["sm_75", "sm_80"], "7.5;8.0", None),
        (None, [], ["sm_50", "sm_61"], None, "only for CUDA architectures older than 7.0"),
        (None, [], [], None, None),  # torch's builder says what it needs
    ],
)
def test_cuda_architectures_older_than_the_kernels_need_are_refused_or_dropped(
    arch_list, visible, torch_archs, want_archs, error
):
    """The CUDA kernels take __grid_constant__ launch arguments (compute capability 7.0+): an older architecture the
    user or the GPU asks for fails the build with a message naming it, not with nvcc's error on a kernel."""
    archs, err = load_setup().cuda_arch_plan(arch_list, visible, torch_archs)
    assert archs == want_archs
    if error is None:
        assert err is None
    else:
        assert err is not None and error in err


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
@pytest.mark.parametrize("arch, refused", [(600, True), (690, True), (700, False), (900, False), (None, False)])
def test_the_kernels_header_refuses_an_architecture_below_the_floor_in_any_build(tmp_path, arch, refused):
    """setup.py checks TORCH_CUDA_ARCH_LIST before compiling; a build by other means (CMake) meets the same floor in
    the header of the kernels' launch arguments (the __grid_constant__ ones), preprocessed here as nvcc's device pass
    sees it (__CUDA_ARCH__ set), with the floor setup.py reads from that header."""
    setup = load_setup()
    assert setup.MIN_CUDA_ARCH == (7, 0)
    src = tmp_path / "probe.cpp"
    src.write_text('#include "fastperturb/worklist/launch_args.h"\nint main() { return 0; }\n')
    flags = [] if arch is None else [f"-D__CUDA_ARCH__={arch}"]
    run = subprocess.run(
        ["c++", "-std=c++20", "-E", f"-I{ROOT / 'csrc' / 'include'}", *flags, str(src), "-o", os.devnull],
        capture_output=True,
        text=True,
    )
    if refused:
        assert run.returncode != 0
        assert "need compute capability 7.0 or newer" in run.stderr and "TORCH_CUDA_ARCH_LIST" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
