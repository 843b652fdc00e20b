// math_constants.h for the CPU emulator: CUDA's CUDART_* constants come from llmc_constants.h, which
// llmc_cuda.h includes.
#pragma once
#include "llmc_cuda.h"
