// Runs src/dcbg/engines/kernels/rollmed.cu on the CPU: the CUDA built-ins become
// plain globals and a launch becomes loops over blocks and threads. The
// kernel has no __syncthreads and each thread touches only its own shared
// words, so running the threads one after another is a faithful schedule.
#include <cstring>

struct dcbg_dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
static dcbg_dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__

#include "rollmed.cu"

// Large enough for 1024 threads with 32-bit counts.
unsigned int dcbg_shared_words[1024 * 256];

typedef void (*dcbg_kernel)(const unsigned char*, unsigned char*, long long, int, int, int);

extern "C" int dcbg_host_launch(const char* name, unsigned int grid_x, unsigned int grid_y,
                                unsigned int block_x, const unsigned char* frames,
                                unsigned char* medians, long long pixels, int output_size,
                                int kernel_size, int segment_length) {
    dcbg_kernel kernel;
    if (std::strcmp(name, "dcbg_rollmed_count8") == 0) {
        kernel = dcbg_rollmed_count8;
    } else if (std::strcmp(name, "dcbg_rollmed_count16") == 0) {
        kernel = dcbg_rollmed_count16;
    } else if (std::strcmp(name, "dcbg_rollmed_count32") == 0) {
        kernel = dcbg_rollmed_count32;
    } else {
        return 1;
    }
    if (block_x > 1024) {
        return 2;
    }
    gridDim.x = grid_x;
    gridDim.y = grid_y;
    blockDim.x = block_x;
    for (unsigned int by = 0; by < grid_y; ++by) {
        for (unsigned int bx = 0; bx < grid_x; ++bx) {
            blockIdx.x = bx;
            blockIdx.y = by;
            // Garbage in shared memory, as on a GPU: the kernel must zero it.
            std::memset(dcbg_shared_words, 0xA5, sizeof(dcbg_shared_words));
            for (unsigned int tx = 0; tx < block_x; ++tx) {
                threadIdx.x = tx;
                kernel(frames, medians, pixels, output_size, kernel_size, segment_length);
            }
        }
    }
    return 0;
}
