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
// kernel_size, since a window never has more than kernel_size elements. The
// memory is bytes that only ever hold counts: it is zeroed and used through
// the count type alone, never through another (which C++'s aliasing rules
// would let the compiler reorder).
//
// A batch may hold more than 2^31 windows: window indices are 64-bit, and
// only counts within one segment (at most segment_length) are int.
//
// The file is plain CUDA C++ without includes so that it compiles with NVRTC
// (through CuPy), with nvcc, and with a host C++ compiler plus a small shim
// that defines the CUDA built-ins (tests/helpers/kernel_host_shim.cpp).

extern __shared__ __align__(4) unsigned char dcbg_shared_bytes[];

template <typename Count>
__device__ __forceinline__ Count* dcbg_bin(Count* counts, unsigned int bin) {
    // Bins per 32-bit word, and where this thread's word for `bin` is.
    // Unsigned: bins are never negative, and signed division would cost sign
    // fix-ups in every step of the median walk.
    const unsigned int per_word = 4u / (unsigned int)sizeof(Count);
    return counts + ((bin / per_word) * blockDim.x * per_word + (bin % per_word));
}

// The window of one thread: its histogram, where its median is, and the
// row pointers of its input and output streams.
//
// Rows are reached by adding `pixels` to a pointer once per step: computing
// row * pixels in 64 bits for each of the three accesses of a step was about
// a third of the step's instructions.
template <typename Count>
struct DcbgWindow {
    Count* counts;
    const unsigned char* ahead;   // entering byte of the next step to fetch
    const unsigned char* behind;  // leaving byte of the next step to fetch
    unsigned char* out;           // median of the current step
    long long pixels;
    int half;
    int median;
    int below;  // window elements smaller than `median`

    __device__ __forceinline__ void fetch(int& entering, int& leaving) {
        entering = *ahead;
        leaving = *behind;
        ahead += pixels;
        behind += pixels;
    }

    __device__ __forceinline__ void walk_and_store() {
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
        *out = (unsigned char)median;
        out += pixels;
    }

    // One step after the first: take the bytes from a pipeline slot, refill
    // the slot with the bytes of the step four later if that step is in
    // this segment, then slide the window. The guard keeps the loads inside
    // the input, which may end right after this segment's last entering row.
    __device__ __forceinline__ void step(int& entering_slot, int& leaving_slot, bool refill) {
        const int entering = entering_slot;
        const int leaving = leaving_slot;
        if (refill) {
            fetch(entering_slot, leaving_slot);
        }
        // Leave before entering: the window never exceeds kernel_size,
        // which is what lets uint8 counts serve kernel_size <= 255.
        *dcbg_bin(counts, leaving) -= 1;
        below -= leaving < median;
        *dcbg_bin(counts, entering) += 1;
        below += entering < median;
        walk_and_store();
    }
};

template <typename Count>
__device__ void dcbg_rolling_median(const unsigned char* __restrict__ frames,
                                    unsigned char* __restrict__ medians,
                                    long long pixels,
                                    long long output_size,
                                    int kernel_size,
                                    int segment_length) {
    const long long pixel = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long first = (long long)blockIdx.y * segment_length;
    if (pixel >= pixels || first >= output_size) {
        return;
    }
    // Windows of this segment; steps count from its first window.
    const int last = output_size - first < segment_length ? (int)(output_size - first)
                                                           : segment_length;

    // This thread's first count, in the first word that it owns.
    Count* counts = reinterpret_cast<Count*>(dcbg_shared_bytes) +
                    threadIdx.x * (4u / (unsigned int)sizeof(Count));
    for (unsigned int bin = 0; bin < 256u; ++bin) {
        *dcbg_bin(counts, bin) = 0;
    }

    const long long start = first * pixels + pixel;
    DcbgWindow<Count> window;
    window.counts = counts;
    window.ahead = frames + start;
    window.behind = frames + start;
    window.out = medians + start;
    window.pixels = pixels;
    window.half = kernel_size / 2;
    window.median = 0;
    window.below = 0;

    // The first window has nothing to leave: its k - 1 warm-up rows and its
    // entering row go in as one run, which leaves `ahead` at the entering
    // row of the second step. Its median walk starts from bin 0, where no
    // element is below.
    for (int row = 0; row < kernel_size; ++row) {
        *dcbg_bin(window.counts, *window.ahead) += 1;
        window.ahead += pixels;
    }

    // The bytes of each step are loaded four steps before their use. The
    // histograms take so much shared memory that only a few warps share an
    // SM, too few to hide global load latency by switching between them; so
    // each thread keeps its next loads in flight while it works on the
    // current step. Each slot costs two registers, and four keep the
    // register count far below where registers would limit occupancy more
    // than shared memory does. The slots are plain variables, not an array,
    // so that they stay in registers.
    //
    // Fill the slots with the steps 1 .. 4 that exist; their loads
    // complete during the long first walk.
    int enter0 = 0, enter1 = 0, enter2 = 0, enter3 = 0;
    int leave0 = 0, leave1 = 0, leave2 = 0, leave3 = 0;
    if (1 < last) window.fetch(enter0, leave0);
    if (2 < last) window.fetch(enter1, leave1);
    if (3 < last) window.fetch(enter2, leave2);
    if (4 < last) window.fetch(enter3, leave3);
    window.walk_and_store();

    // Steps go round the slots in order, so slot i always holds the step
    // that is i steps after the group's first; the last group may be partial.
    const int refill_stop = last - 4;
    int step = 1;
    while (step < last) {
        window.step(enter0, leave0, step < refill_stop);
        if (++step == last) break;
        window.step(enter1, leave1, step < refill_stop);
        if (++step == last) break;
        window.step(enter2, leave2, step < refill_stop);
        if (++step == last) break;
        window.step(enter3, leave3, step < refill_stop);
        ++step;
    }
}

// Entry points, one per count width. Dynamic shared memory per block:
// blockDim.x * 256 * sizeof(count) bytes.
#define DCBG_ROLLMED_ENTRY(NAME, COUNT)                                              \
    extern "C" __global__ void NAME(const unsigned char* __restrict__ frames,        \
                                    unsigned char* __restrict__ medians,              \
                                    long long pixels, long long output_size,         \
                                    int kernel_size, int segment_length) {           \
        dcbg_rolling_median<COUNT>(frames, medians, pixels, output_size, kernel_size, \
                                   segment_length);                                   \
    }

DCBG_ROLLMED_ENTRY(dcbg_rollmed_count8, unsigned char)
DCBG_ROLLMED_ENTRY(dcbg_rollmed_count16, unsigned short)
DCBG_ROLLMED_ENTRY(dcbg_rollmed_count32, unsigned int)
