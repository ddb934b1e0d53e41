// Entry point of resnext_kernels._C. The module carries no Python functions: importing it runs the
// static registrations (the schemas below, the CUDA kernels in ops.cpp), which make the ops visible
// as torch.ops.resnext_kernels.*. Fake kernels and autograd are registered from Python.

#include <Python.h>

#include "op_schemas.h"

extern "C" {
// A stub module instead of pybind11: the ops are reached through the dispatcher.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "resnext_kernels CUDA extension (ops live in torch.ops.resnext_kernels)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(resnext_kernels, m) { resnext_kernels::define_ops(m); }
