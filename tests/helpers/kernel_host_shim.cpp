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
typedef void (*dcbg_levels_kernel)(const void*, void*, long long, long long, int, int,
                                   unsigned int);

// An entry point of the window kernels with its frames and medians untyped.
template <typename Value,
          void (*Entry)(const Value*, Value*, long long, long long, int, int, unsigned int)>
static void dcbg_untyped(const void* frames, void* medians, long long pixels,
                         long long output_size, int kernel_size, int segment_length,
                         unsigned int value_xor) {
    Entry(static_cast<const Value*>(frames), static_cast<Value*>(medians), pixels, output_size,
          kernel_size, segment_length, value_xor);
}

// Runs `run_thread` for every thread of the blocks of rows first_y .. stop_y-1 of the
// grid, one thread after another.
template <typename RunThread>
static void dcbg_run_grid(unsigned int grid_x, unsigned int grid_y, unsigned int first_y,
                          unsigned int stop_y, unsigned int block_x, RunThread run_thread) {
    gridDim.x = grid_x;
    gridDim.y = grid_y;
    blockDim.x = block_x;
    // Garbage in shared memory, as on a GPU: the kernel must zero it. A thread uses at
    // most 1 KiB (256 counts of 4 bytes), so each block after the first needs fresh
    // garbage only there; beyond it, what a launch finds changed was written out of bounds.
    std::memset(dcbg_shared_bytes, 0xA5, sizeof(dcbg_shared_bytes));
    const size_t used = block_x * size_t(1024) < sizeof(dcbg_shared_bytes)
                            ? block_x * size_t(1024)
                            : sizeof(dcbg_shared_bytes);
    for (unsigned int by = first_y; by < stop_y && by < grid_y; ++by) {
        for (unsigned int bx = 0; bx < grid_x; ++bx) {
            blockIdx.x = bx;
            blockIdx.y = by;
            std::memset(dcbg_shared_bytes, 0xA5, used);
            for (unsigned int tx = 0; tx < block_x; ++tx) {
                threadIdx.x = tx;
                run_thread();
            }
        }
    }
}

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
    dcbg_run_grid(grid_x, grid_y, first_y, stop_y, block_x, [&] {
        kernel(frames, medians, pixels, output_size, kernel_size, segment_length);
    });
    return 0;
}

extern "C" int dcbg_host_launch(const char* name, unsigned int grid_x, unsigned int grid_y,
                                unsigned int block_x, const unsigned char* frames,
                                unsigned char* medians, long long pixels, long long output_size,
                                int kernel_size, int segment_length) {
    return dcbg_host_launch_rows(name, grid_x, grid_y, 0, grid_y, block_x, frames, medians,
                                 pixels, output_size, kernel_size, segment_length);
}

#define DCBG_LEVELS_ENTRY(NAME, VALUE) {#NAME, dcbg_untyped<VALUE, NAME>}

// The window kernels of 8- and 16-bit values, which also take value_xor, for the
// blocks of rows first_y .. stop_y-1 of the grid as dcbg_host_launch_rows. With
// shared_bytes > 0, a block that writes shared memory beyond its shared_bytes
// fails the launch (code 3): the planner reserved less.
// Whether the shared bytes from `start` on still hold the garbage dcbg_run_grid put there
// (compared a page at a time: a block's check reads a megabyte).
static bool dcbg_untouched_from(size_t start) {
    static unsigned char garbage[4096];
    if (garbage[0] != 0xA5) {
        std::memset(garbage, 0xA5, sizeof(garbage));
    }
    for (size_t i = start; i < sizeof(dcbg_shared_bytes); i += sizeof(garbage)) {
        size_t size = sizeof(dcbg_shared_bytes) - i;
        if (std::memcmp(dcbg_shared_bytes + i, garbage,
                        size < sizeof(garbage) ? size : sizeof(garbage)) != 0) {
            return false;
        }
    }
    return true;
}

extern "C" int dcbg_host_launch_levels(const char* name, unsigned int grid_x,
                                       unsigned int grid_y, unsigned int first_y,
                                       unsigned int stop_y, unsigned int block_x,
                                       const void* frames, void* medians, long long pixels,
                                       long long output_size, int kernel_size,
                                       int segment_length, unsigned int value_xor,
                                       unsigned int shared_bytes) {
    static const struct {
        const char* name;
        dcbg_levels_kernel kernel;
    } entries[] = {
        DCBG_LEVELS_ENTRY(dcbg_rollmed_window16_count8, unsigned short),
        DCBG_LEVELS_ENTRY(dcbg_rollmed_window16_count16, unsigned short),
        DCBG_LEVELS_ENTRY(dcbg_rollmed_window16_count32, unsigned short),
        DCBG_LEVELS_ENTRY(dcbg_rollmed_window8_count8, unsigned char),
        DCBG_LEVELS_ENTRY(dcbg_rollmed_window8_count16, unsigned char),
        DCBG_LEVELS_ENTRY(dcbg_rollmed_window8_count32, unsigned char),
    };
    dcbg_levels_kernel kernel = nullptr;
    for (const auto& entry : entries) {
        if (std::strcmp(name, entry.name) == 0) {
            kernel = entry.kernel;
        }
    }
    if (kernel == nullptr) {
        return 1;
    }
    if (block_x > 1024 || shared_bytes > sizeof(dcbg_shared_bytes)) {
        return 2;
    }
    bool beyond = false;
    dcbg_run_grid(grid_x, grid_y, first_y, stop_y, block_x, [&] {
        kernel(frames, medians, pixels, output_size, kernel_size, segment_length, value_xor);
        if (shared_bytes > 0 && threadIdx.x + 1 == blockDim.x) {
            beyond |= !dcbg_untouched_from(shared_bytes);
        }
    });
    return beyond ? 3 : 0;
}

// Shared memory per thread of the window kernels, which the launch planner must know.
extern "C" int dcbg_host_window_bytes() { return DCBG_WINDOW_BYTES; }
