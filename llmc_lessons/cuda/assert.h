// assert.h for the CPU emulator: found before the system's, so `#include <assert.h>` (or <cassert>) keeps the
// emulator's assert, whose failure stops the launch with a Python error instead of aborting the process.
#include "llmc_cuda.h"
#undef assert
#define assert(cond) LLMC_ASSERT(#cond, cond)
