// The Python module fastperturb._C. Importing it loads this library, whose
// static initialisers register the ops (TORCH_LIBRARY in schemas.cpp, the
// kernels' TORCH_LIBRARY_IMPL); the module itself only reports which CPU
// kernel variant runs (`fastperturb._C.cpu_isa`). No pybind11: a plain
// CPython module keeps the build small and fast.
#include <Python.h>

#include "cpu/kernels.h"

static struct PyModuleDef fastperturb_c_module = {PyModuleDef_HEAD_INIT,
                                                  "_C",
                                                  "fastperturb's compiled ops (registered as torch.ops.fastperturb.*)",
                                                  -1,
                                                  nullptr,
                                                  nullptr,
                                                  nullptr,
                                                  nullptr,
                                                  nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&fastperturb_c_module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddStringConstant(m, "cpu_isa", fastperturb::cpu::kernels().isa) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
