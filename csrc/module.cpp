// The Python module fastperturb._C. Importing it loads this library, whose
// static initialisers register the ops (TORCH_LIBRARY in schemas.cpp, the
// kernels' TORCH_LIBRARY_IMPL); the module itself only reports which CPU
// kernel variant runs (`fastperturb._C.cpu_isa`) and on which device types the ops on a TensorLists handle have
// kernels (`fastperturb._C.handle_devices()`). No pybind11: a plain
// CPython module keeps the build small and fast.
#include <Python.h>

#include <c10/core/DeviceType.h>

#include <string>

#include "common/handle_kernels.h"
#include "cpu/kernels.h"

// The device types whose handle-op kernels this build registered, as a tuple of names ("cpu", "cuda").
static PyObject* handle_devices(PyObject*, PyObject*) {
  PyObject* names = PyList_New(0);
  if (names == nullptr) return nullptr;
  for (int t = 0; t < static_cast<int>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES); ++t) {
    const auto type = static_cast<c10::DeviceType>(t);
    if (fastperturb::handle_kernels(type) == nullptr) continue;
    const std::string name = c10::DeviceTypeName(type, /*lower_case=*/true);
    PyObject* s = PyUnicode_FromString(name.c_str());
    if (s == nullptr || PyList_Append(names, s) < 0) {
      Py_XDECREF(s);
      Py_DECREF(names);
      return nullptr;
    }
    Py_DECREF(s);
  }
  PyObject* tuple = PyList_AsTuple(names);
  Py_DECREF(names);
  return tuple;
}

static PyMethodDef fastperturb_c_methods[] = {
    {"handle_devices", handle_devices, METH_NOARGS,
     "The device types on which the ops on a TensorLists handle have compiled kernels."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef fastperturb_c_module = {PyModuleDef_HEAD_INIT,
                                                  "_C",
                                                  "fastperturb's compiled ops (registered as torch.ops.fastperturb.*)",
                                                  -1,
                                                  fastperturb_c_methods,
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
