// Minimal Python module init so that bip_fast._C / bip_fast._C_cuda are importable.
// Importing the shared object runs its static TORCH_LIBRARY / TORCH_LIBRARY_IMPL
// registrations; the ops are then reached through torch.ops.bip_fast.*.
// Compiled into both extensions (setup.py); empty when TORCH_EXTENSION_NAME is not defined
// (CMake library and C++ tests).
#ifdef TORCH_EXTENSION_NAME
#include <Python.h>

#define BIP_FAST_STR2(x) #x
#define BIP_FAST_STR(x) BIP_FAST_STR2(x)
#define BIP_FAST_CAT2(a, b) a##b
#define BIP_FAST_CAT(a, b) BIP_FAST_CAT2(a, b)

static struct PyModuleDef bip_fast_module_def = {
    PyModuleDef_HEAD_INIT,
    BIP_FAST_STR(TORCH_EXTENSION_NAME),
    "bip_fast compiled ops (registered with torch.library; use torch.ops.bip_fast.*)",
    -1,
    nullptr,
};

PyMODINIT_FUNC BIP_FAST_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  return PyModule_Create(&bip_fast_module_def);
}
#endif  // TORCH_EXTENSION_NAME
