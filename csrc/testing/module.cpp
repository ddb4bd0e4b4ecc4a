// The Python module fastperturb._C_testing: the test harnesses of the native
// code, built only when FASTPERTURB_BUILD_TESTING=1 (setup.py, CMakeLists.txt)
// and never shipped in the wheel. Importing it loads this library, whose
// static initialisers register torch.ops.fastperturb_worklist.* (the CPU
// executor of the CUDA work list, worklist_executor.cpp; and cpu_plan, the CPU
// kernels' chunk plan, cpu_plan.cpp).
#include <Python.h>

static struct PyModuleDef fastperturb_c_testing_module = {
    PyModuleDef_HEAD_INIT,
    "_C_testing",
    "fastperturb's native test harnesses (registered as torch.ops.fastperturb_worklist.*)",
    -1,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr};

PyMODINIT_FUNC PyInit__C_testing(void) { return PyModule_Create(&fastperturb_c_testing_module); }
