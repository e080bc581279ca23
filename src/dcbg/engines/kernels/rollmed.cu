// Rolling medians over the time axis of a batch of frames: element
// kernel_size / 2 of each window of kernel_size frames, sorted.
//
// Two kernel families:
// - The histogram kernel, for uint8 frames. A thread keeps a count of each
//   of the 256 levels over its window and a pointer to the median level:
//   sliding the window by one frame moves one count down and one count up,
//   and the pointer walks to the new median, usually a step or two.
// - The window kernels, for uint16, int16 and int8 frames. 65,536 levels
//   rule out a count of each, so a thread counts a window of 128, 64 or 32
//   consecutive levels that holds its median, walks the median as the
//   histogram kernel does, and rescans its time window when the median
//   leaves the counted levels. Signed values are loaded and stored with
//   their sign bit flipped (value_xor), which orders them as unsigned ones.
// Each family is compiled as a module of its own (DCBG_HISTOGRAM_KERNELS,
// DCBG_WINDOW_KERNELS below), so a run on uint8 frames never waits for the
// window kernels.
//
// In both, one thread owns one pixel within one time segment of the batch.
// Segments split a batch in time when a frame alone has too few pixels to
// fill the GPU; each segment warms up its own window (the window kernels by
// a radix select of its median).
//
// Layout: frames[row * pixels + pixel], row-major, so a warp's loads and
// stores of one row touch consecutive values.
//
// Counts live in dynamic shared memory, interleaved by 32-bit word: the
// word w of thread t sits at word index w * blockDim.x + t, so the 32 threads
// of a warp always hit 32 different banks whatever bins they touch. A word
// holds 4 uint8, 2 uint16 or 1 uint32 counts; the count type only has to hold
// kernel_size, since a window never has more than kernel_size elements. A
// thread of the histogram kernel has 256 counts, one of the window kernels
// DCBG_WINDOW_BYTES bytes of them. The memory is bytes that only ever hold
// counts: it is zeroed and used through the count type alone, never through
// another (which C++'s aliasing rules would let the compiler reorder).
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

// This thread's first count, in the first word that it owns.
template <typename Count>
__device__ __forceinline__ Count* dcbg_thread_counts() {
    return reinterpret_cast<Count*>(dcbg_shared_bytes) +
           threadIdx.x * (4u / (unsigned int)sizeof(Count));
}

// Takes a segment's windows 0 .. last-1 with any window kernel: the first
// window (window.start, then its walk), then each later step with its bytes
// loaded four steps before their use.
//
// The uint8 kernel's histograms take so much shared memory that only a few
// warps share an SM, too few to hide global load latency by switching
// between them; so each thread keeps its next loads in flight while it works
// on the current step. Each slot costs two registers, and four keep the
// register count far below where registers would limit occupancy more than
// shared memory does. The slots are plain variables, not an array, so that
// they stay in registers. The slots of steps 1 .. 4 that exist are filled
// before the first window's walk (and, for the window kernels, its passes
// over the column), which hides their loads.
template <typename Window, typename Value>
__device__ __forceinline__ void dcbg_run_segment(Window& window, int last,
                                                 const Value* column) {
    int enter0 = 0, enter1 = 0, enter2 = 0, enter3 = 0;
    int leave0 = 0, leave1 = 0, leave2 = 0, leave3 = 0;
    if (1 < last) window.fetch(enter0, leave0);
    if (2 < last) window.fetch(enter1, leave1);
    if (3 < last) window.fetch(enter2, leave2);
    if (4 < last) window.fetch(enter3, leave3);
    window.start(column);
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

// The kernel families a compile holds: with -DDCBG_HISTOGRAM_KERNELS the
// histogram kernel's entry points, with -DDCBG_WINDOW_KERNELS the window
// kernels'; a compile that names neither (the host shim's) holds both.
#if !defined(DCBG_HISTOGRAM_KERNELS) && !defined(DCBG_WINDOW_KERNELS)
#define DCBG_HISTOGRAM_KERNELS
#define DCBG_WINDOW_KERNELS
#endif

#if defined(DCBG_HISTOGRAM_KERNELS)
// ---------------------------------------------------------------------------
// Rolling median of uint8 values: the histogram kernel.
// ---------------------------------------------------------------------------

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

    // The first window's rows were counted before the load slots were filled
    // (dcbg_rolling_median), so its median walk needs nothing more.
    __device__ __forceinline__ void start(const unsigned char*) {}
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

    Count* counts = dcbg_thread_counts<Count>();
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

    dcbg_run_segment(window, last, frames + start);
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
#endif  // DCBG_HISTOGRAM_KERNELS

#if defined(DCBG_WINDOW_KERNELS)
// ---------------------------------------------------------------------------
// Rolling median of 16-bit (and signed 8-bit) values: the window kernel.
//
// 65,536 levels rule out a histogram per thread. Each thread instead counts
// a window of consecutive levels [level, level + levels) that holds its
// median, and keeps `below`, the elements of its time window smaller than
// the median. A step removes the leaving value and adds the entering one
// (a value outside the counted levels only moves `below`), and the median
// walks inside the counted levels as in the uint8 kernel.
//
// A step removes one element and adds one, so the rank of any level changes
// by at most one: a median that walks off the counted levels lands on the
// nearest level beyond the edge it crossed that holds elements. The thread
// then rescans its kernel_size elements of the current window from global
// memory (a warp's elements of one row are consecutive, so the reads are
// coalesced), finds that level and its count, and moves the counted levels
// so that the median sits at the edge it crossed. The counts are a ring,
// level v in slot v % levels, so the levels that stay counted keep their
// counts in place and a move only clears the slots of the levels it adds.
//
// The first window of a time segment has no counts to walk: a radix select
// (each pass counts, among the elements that share the digits found so far,
// the next digit of log2(levels) bits) narrows the median to an aligned
// block of fewer than `levels` levels, and one more pass counts the levels
// around that block and the elements below them: 3 passes over the window
// for 16-bit values (4 with 32-bit counts), 2 for 8-bit values.
//
// Levels: each thread has DCBG_WINDOW_BYTES = 128 bytes of counts, 128
// levels of 8-bit counts (kernel_size <= 255), 64 of 16-bit counts, 32 of
// 32-bit counts. The levels buy down rescans, which cost a whole warp a
// pass over k elements whenever one of its 32 threads needs one: the median
// of k samples of noise with standard deviation s wanders by about
// 1.25 s / sqrt(k) levels. In a simulation of shot noise at 4,000 counts
// (s = 63), a thread's median left 32 levels in 0.7 % of its steps at
// k = 100 and in 22 % at k = 10, 64 levels in 0.03 % and 9 %, 128 levels in
// 0.00 % and 0.6 %; from k = 256 on (16-bit counts) it wanders 4 times less
// than at k = 16, so 64 levels do. 128 bytes per thread are half the uint8
// kernel's smallest histogram: the about 1,600 threads that the 40 registers
// of these kernels leave on an SM take about 200 KiB, within an sm_90 SM's
// 228 KiB, so registers bound occupancy there, not shared memory (an sm_80
// SM's 164 KiB hold the counts of 1,280 threads).
//
// Values are loaded as v ^ value_xor and medians stored as m ^ value_xor:
// flipping the sign bit (0x8000 for int16, 0x80 for int8) orders signed
// values as unsigned ones, so signed frames need no converted copy.
// ---------------------------------------------------------------------------

#define DCBG_WINDOW_BYTES 128

// Loops of the rare paths stay loops: unrolled, each of the five walks of
// the steps' pipeline would carry its own copies. (The host compiler of the
// tests knows no such pragma.)
#if defined(__CUDACC__)
#define DCBG_KEEP_LOOP _Pragma("unroll 1")
#else
#define DCBG_KEEP_LOOP
#endif

template <typename Value, typename Count>
struct DcbgLevelWindow {
    // Levels of a Value: 256 or 65,536.
    static constexpr int value_levels = 1 << (8 * sizeof(Value));
    // Counted levels, and the bits of a radix digit that they count.
    static constexpr int levels = DCBG_WINDOW_BYTES / (int)sizeof(Count);
    static constexpr int digit_bits = levels == 128 ? 7 : levels == 64 ? 6 : 5;
    static_assert((1 << digit_bits) == levels, "a radix digit indexes the counts");

    Count* counts;        // this thread's first count; slots are dcbg_bin's bins
    const Value* ahead;   // entering value of the next step to fetch
    const Value* behind;  // leaving value of the next step to fetch
    Value* out;           // median of the current step
    const Value* frames;  // the kernel's arguments, for the rescans
    const Value* medians;
    long long pixels;
    int kernel_size;
    unsigned int value_xor;
    int half;
    int level;   // lowest counted level
    int median;  // level <= median < level + levels
    int below;   // window elements smaller than `median`

    __device__ __forceinline__ Count* slot(int value) {
        return dcbg_bin(counts, (unsigned int)value & (levels - 1));
    }

    __device__ __forceinline__ void fetch(int& entering, int& leaving) {
        entering = (int)(*ahead ^ value_xor);
        leaving = (int)(*behind ^ value_xor);
        ahead += pixels;
        behind += pixels;
    }

    __device__ __forceinline__ void update(int value, Count change) {
        if ((unsigned int)(value - level) < (unsigned int)levels) {
            *slot(value) += change;
        }
    }

    // The median walked off the counted levels (up: above them). Rescans the
    // current window for the nearest level beyond the crossed edge and moves
    // the counted levels so that this level, the new median, sits at that
    // edge.
    __device__ void move(bool up) {
        const int low = level;
        const int high = level + levels;
        // Distance beyond the crossed edge, as unsigned: up, value - high;
        // down, (low - 1) - value = ~value + low. Values on the near side
        // of the edge wrap to more than any level's distance.
        const unsigned int flip = up ? 0u : ~0u;
        const unsigned int offset = up ? (unsigned int)(-high) : (unsigned int)low;
        unsigned int nearest = ~0u;
        int found = 0;
        const Value* column = frames + (out - medians);
        // Unrolled by the compiler, unlike the other rare loops: a loop of
        // one load at a time would wait a memory latency per element.
        for (int row = 0; row < kernel_size; ++row) {
            const unsigned int distance = ((*column ^ value_xor) ^ flip) + offset;
            column += pixels;
            if (distance < nearest) {
                nearest = distance;
                found = 0;
            }
            found += distance == nearest;
        }
        const int target = up ? high + (int)nearest : low - 1 - (int)nearest;
        const int first = up ? target - (levels - 1) : target;
        // The levels that become counted, [added, added_end): none but the
        // target holds elements, and their slots held levels that stop
        // being counted.
        const int added = up && first < high ? high : first;
        const int added_end = !up && first + levels > low ? low : first + levels;
        DCBG_KEEP_LOOP
        for (int v = added; v < added_end; ++v) {
            *slot(v) = 0;
        }
        *slot(target) = (Count)found;
        if (!up) {
            // below counted the elements under `low`; the target is the
            // nearest of them.
            below -= found;
        }
        level = first;
        median = target;
    }

    __device__ __forceinline__ void walk_and_store() {
        while (below > half && median != level) {
            --median;
            below -= *slot(median);
        }
        int here = *slot(median);
        while (below + here <= half) {
            below += here;
            if (++median == level + levels) {
                break;
            }
            here = *slot(median);
        }
        // One place that moves the levels, in either direction: the walk is
        // inlined in every step, and the move is long.
        const bool up = median == level + levels;
        if (up || below > half) {
            move(up);
        }
        *out = (Value)(median ^ value_xor);
        out += pixels;
    }

    // As DcbgWindow::step, for the counted levels.
    __device__ __forceinline__ void step(int& entering_slot, int& leaving_slot, bool refill) {
        const int entering = entering_slot;
        const int leaving = leaving_slot;
        if (refill) {
            fetch(entering_slot, leaving_slot);
        }
        update(leaving, (Count)-1);
        below -= leaving < median;
        update(entering, (Count)1);
        below += entering < median;
        walk_and_store();
    }

    // Through the count type, the only type the shared bytes are used as.
    __device__ __forceinline__ void clear_counts() {
        DCBG_KEEP_LOOP
        for (unsigned int bin = 0; bin < (unsigned int)levels; ++bin) {
            *dcbg_bin(counts, bin) = 0;
        }
    }

    // The counts and median of the first window, whose rows start at
    // `column`: radix select down to an aligned block of fewer than
    // `levels` levels, then one pass that counts the levels around it.
    __device__ void start(const Value* column) {
        const int value_bits = 8 * (int)sizeof(Value);
        int known = 0;    // leading bits of the median found so far
        int prefix = 0;   // their value
        int rank = half;  // the median's rank among the elements with that prefix
        while (value_bits - known > digit_bits) {
            const int shift = value_bits - known - digit_bits;
            clear_counts();
            const Value* row = column;
            for (int r = 0; r < kernel_size; ++r) {
                const unsigned int value = *row ^ value_xor;
                row += pixels;
                if ((int)(value >> (shift + digit_bits)) == prefix) {
                    *dcbg_bin(counts, (value >> shift) & (levels - 1)) += 1;
                }
            }
            int digit = 0;
            int here = *dcbg_bin(counts, 0u);
            DCBG_KEEP_LOOP
            while (rank >= here) {
                rank -= here;
                here = *dcbg_bin(counts, (unsigned int)++digit);
            }
            prefix = (prefix << digit_bits) | digit;
            known += digit_bits;
        }
        const int block_bits = value_bits - known;
        int first = (prefix << block_bits) - (levels - (1 << block_bits)) / 2;
        first = first < 0 ? 0 : first;
        first = first > value_levels - levels ? value_levels - levels : first;
        clear_counts();
        level = first;
        below = 0;
        const Value* row = column;
        for (int r = 0; r < kernel_size; ++r) {
            const int value = (int)(*row ^ value_xor);
            row += pixels;
            below += value < first;
            update(value, (Count)1);
        }
        // The median lies in the counted levels: the walk up from `level`
        // finds it without leaving them.
        median = first;
    }
};

template <typename Value, typename Count>
__device__ void dcbg_rolling_median_levels(const Value* __restrict__ frames,
                                           Value* __restrict__ medians,
                                           long long pixels,
                                           long long output_size,
                                           int kernel_size,
                                           int segment_length,
                                           unsigned int value_xor) {
    const long long pixel = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long first = (long long)blockIdx.y * segment_length;
    if (pixel >= pixels || first >= output_size) {
        return;
    }
    // Windows of this segment; steps count from its first window.
    const int last = output_size - first < segment_length ? (int)(output_size - first)
                                                           : segment_length;

    const long long start = first * pixels + pixel;
    DcbgLevelWindow<Value, Count> window;
    window.counts = dcbg_thread_counts<Count>();
    window.ahead = frames + start + (long long)kernel_size * pixels;
    window.behind = frames + start;
    window.out = medians + start;
    window.frames = frames;
    window.medians = medians;
    window.pixels = pixels;
    window.kernel_size = kernel_size;
    window.value_xor = value_xor;
    window.half = kernel_size / 2;

    dcbg_run_segment(window, last, frames + start);
}

// Entry points, one per value width and count width. Dynamic shared memory
// per block: blockDim.x * DCBG_WINDOW_BYTES bytes.
#define DCBG_ROLLMED_LEVELS_ENTRY(NAME, VALUE, COUNT)                                      \
    extern "C" __global__ void NAME(const VALUE* __restrict__ frames,                     \
                                    VALUE* __restrict__ medians, long long pixels,        \
                                    long long output_size, int kernel_size,               \
                                    int segment_length, unsigned int value_xor) {         \
        dcbg_rolling_median_levels<VALUE, COUNT>(frames, medians, pixels, output_size,    \
                                                 kernel_size, segment_length, value_xor); \
    }

DCBG_ROLLMED_LEVELS_ENTRY(dcbg_rollmed_window16_count8, unsigned short, unsigned char)
DCBG_ROLLMED_LEVELS_ENTRY(dcbg_rollmed_window16_count16, unsigned short, unsigned short)
DCBG_ROLLMED_LEVELS_ENTRY(dcbg_rollmed_window16_count32, unsigned short, unsigned int)
DCBG_ROLLMED_LEVELS_ENTRY(dcbg_rollmed_window8_count8, unsigned char, unsigned char)
DCBG_ROLLMED_LEVELS_ENTRY(dcbg_rollmed_window8_count16, unsigned char, unsigned short)
DCBG_ROLLMED_LEVELS_ENTRY(dcbg_rollmed_window8_count32, unsigned char, unsigned int)
#endif  // DCBG_WINDOW_KERNELS
