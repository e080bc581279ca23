// Rolling median over the time axis of a uint8 frame batch.
//
// One thread owns one pixel within one time segment of the batch. Frames are
// uint8, so the thread keeps a 256-bin histogram of its window and a pointer
// to the median bin: sliding the window by one frame moves one count down
// and one count up, and the pointer walks to the new median, usually a step
// or two. Segments split a batch in time when a frame alone has too few
// pixels to fill the GPU; each segment warms up its own window.
//
// Layout: frames[row * pixels + pixel], row-major, so a warp's loads and
// stores of one row touch consecutive bytes.
//
// Histograms live in dynamic shared memory, interleaved by 32-bit word: the
// word w of thread t sits at word index w * blockDim.x + t, so the 32 threads
// of a warp always hit 32 different banks whatever bins they touch. A word
// holds 4 uint8, 2 uint16 or 1 uint32 counts; the count type only has to hold
// kernel_size, since a window never has more than kernel_size elements.
//
// The file is plain CUDA C++ without includes so that it compiles with NVRTC
// (through CuPy), with nvcc, and with a host C++ compiler plus a small shim
// that defines the CUDA built-ins (tests/kernel_host_shim.cpp).

extern __shared__ unsigned int dcbg_shared_words[];

template <typename Count>
__device__ __forceinline__ Count* dcbg_bin(Count* counts, int bin) {
    // Bins per 32-bit word, and where this thread's word for `bin` is.
    const int per_word = 4 / (int)sizeof(Count);
    return counts + ((bin / per_word) * (int)blockDim.x * per_word + (bin % per_word));
}

template <typename Count>
__device__ void dcbg_rolling_median(const unsigned char* __restrict__ frames,
                                    unsigned char* __restrict__ medians,
                                    long long pixels,
                                    int output_size,
                                    int kernel_size,
                                    int segment_length) {
    const long long pixel = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int first = (int)blockIdx.y * segment_length;
    if (pixel >= pixels || first >= output_size) {
        return;
    }
    // One past the last window of this segment.
    const int stop = first + segment_length;
    const int last = stop < output_size ? stop : output_size;
    const int per_word = 4 / (int)sizeof(Count);

    unsigned int* words = dcbg_shared_words + threadIdx.x;
    for (int w = 0; w < 256 / per_word; ++w) {
        words[w * blockDim.x] = 0u;
    }
    Count* counts = reinterpret_cast<Count*>(words);

    const unsigned char* column = frames + pixel;
    for (int row = first; row < first + kernel_size - 1; ++row) {
        *dcbg_bin(counts, column[(long long)row * pixels]) += 1;
    }

    const int half = kernel_size / 2;
    int median = 0;
    int below = 0;  // window elements smaller than `median`
    for (int t = first; t < last; ++t) {
        if (t > first) {
            // Leave before entering: the window never exceeds kernel_size,
            // which is what lets uint8 counts serve kernel_size <= 255.
            const int leaving = column[(long long)(t - 1) * pixels];
            *dcbg_bin(counts, leaving) -= 1;
            below -= leaving < median;
        }
        const int entering = column[(long long)(t + kernel_size - 1) * pixels];
        *dcbg_bin(counts, entering) += 1;
        below += entering < median;

        while (below > half) {
            --median;
            below -= *dcbg_bin(counts, median);
        }
        int here = *dcbg_bin(counts, median);
        while (below + here <= half) {
            below += here;
            ++median;
            here = *dcbg_bin(counts, median);
        }
        medians[(long long)t * pixels + pixel] = (unsigned char)median;
    }
}

// Entry points, one per count width. Dynamic shared memory per block:
// blockDim.x * 256 * sizeof(count) bytes.
#define DCBG_ROLLMED_ENTRY(NAME, COUNT)                                              \
    extern "C" __global__ void NAME(const unsigned char* __restrict__ frames,        \
                                    unsigned char* __restrict__ medians,              \
                                    long long pixels, int output_size,               \
                                    int kernel_size, int segment_length) {           \
        dcbg_rolling_median<COUNT>(frames, medians, pixels, output_size, kernel_size, \
                                   segment_length);                                   \
    }

DCBG_ROLLMED_ENTRY(dcbg_rollmed_count8, unsigned char)
DCBG_ROLLMED_ENTRY(dcbg_rollmed_count16, unsigned short)
DCBG_ROLLMED_ENTRY(dcbg_rollmed_count32, unsigned int)
