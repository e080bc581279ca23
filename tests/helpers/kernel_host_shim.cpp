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
#define __align__(n) __attribute__((aligned(n)))

#include "rollmed.cu"

// Large enough for 1024 threads with 32-bit counts.
alignas(4) unsigned char dcbg_shared_bytes[1024 * 256 * 4];

typedef void (*dcbg_kernel)(const unsigned char*, unsigned char*, long long, long long, int,
                            int);

// Runs the blocks of rows first_y .. stop_y-1 of the grid (all of them: 0 .. grid_y), so that
// a test can run one segment of a grid too large to run whole.
extern "C" int dcbg_host_launch_rows(const char* name, unsigned int grid_x,
                                     unsigned int grid_y, unsigned int first_y,
                                     unsigned int stop_y, unsigned int block_x,
                                     const unsigned char* frames, unsigned char* medians,
                                     long long pixels, long long output_size, int kernel_size,
                                     int segment_length) {
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
    for (unsigned int by = first_y; by < stop_y && by < grid_y; ++by) {
        for (unsigned int bx = 0; bx < grid_x; ++bx) {
            blockIdx.x = bx;
            blockIdx.y = by;
            // Garbage in shared memory, as on a GPU: the kernel must zero it.
            std::memset(dcbg_shared_bytes, 0xA5, sizeof(dcbg_shared_bytes));
            for (unsigned int tx = 0; tx < block_x; ++tx) {
                threadIdx.x = tx;
                kernel(frames, medians, pixels, output_size, kernel_size, segment_length);
            }
        }
    }
    return 0;
}

extern "C" int dcbg_host_launch(const char* name, unsigned int grid_x, unsigned int grid_y,
                                unsigned int block_x, const unsigned char* frames,
                                unsigned char* medians, long long pixels, long long output_size,
                                int kernel_size, int segment_length) {
    return dcbg_host_launch_rows(name, grid_x, grid_y, 0, grid_y, block_x, frames, medians,
                                 pixels, output_size, kernel_size, segment_length);
}
