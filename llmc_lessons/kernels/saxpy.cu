// saxpy.cu: out = a * x + y, the first kernel of the course (lesson 00).
// One thread per element; the grid has CEIL_DIV(n, blockDim.x) blocks, so the threads of the last block
// whose index falls past the end must do nothing.

extern "C" __global__ void saxpy_kernel(float* out, const float* x, const float* y, float a, int n) {
    // out, x, y: (n,)
    int i = blockIdx.x * blockDim.x + threadIdx.x;  // my element: skip the blocks before mine, then my place in it
    if (i < n) {
        out[i] = a * x[i] + y[i];
    }
}
