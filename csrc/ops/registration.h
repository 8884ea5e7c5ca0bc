// How an op file registers its schemas: each one for our op (emu_fast::) and for its ATen twin
// (emu_fast_aten::) from the same string, so an op and its twin cannot differ in signature.
#pragma once
#include <torch/library.h>

#define EMU_FAST_DEFINE_OP_AND_TWIN(schemas)      \
  TORCH_LIBRARY_FRAGMENT(emu_fast, m) {           \
    for (const char* s : schemas) m.def(s);       \
  }                                               \
  TORCH_LIBRARY_FRAGMENT(emu_fast_aten, m) {      \
    for (const char* s : schemas) m.def(s);       \
  }
