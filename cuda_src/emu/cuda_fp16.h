// cuda_fp16.h for the CPU emulator build (the GPU build gets NVIDIA's): the types and conversions are in
// shim.h, which every emulated module already includes; this header lets kernels keep their
// `#include <cuda_fp16.h>` unchanged. The emulator puts cuda_src/emu/ first on the include path.
#pragma once
#include "shim.h"
typedef __half half;
