/*
 * dcbg's two CPU kernels in C: the rolling median of pixel columns and HDF5's
 * Fletcher-32 checksum. They compute exactly what jit.py computes; pip builds
 * this module when it installs dcbg, so that a process does not pay for
 * importing numba and loading its cache. Both release the GIL, so threads run
 * them in parallel.
 *
 * The median has two algorithms with the same results:
 * - the histogram kernel, portable C and the loop jit.py compiles: a
 *   256-bin histogram per pixel and a pointer to its median bin;
 * - the window kernel, one pixel per lane of a SIMD vector (GCC's and Clang's
 *   vector extensions): per pixel only the counts of a few consecutive levels
 *   around the median, so that a step is a handful of vector instructions
 *   for 16 or 32 pixels instead of two scattered histogram updates per pixel.
 *   It is built twice on x86 (16-byte vectors for any CPU, 32-byte ones for
 *   CPUs with AVX2, picked when the module loads) and once elsewhere.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BINS 256
#define FOLD_WORDS 4096 /* words summed between folds: far from overflowing 64 bits */

/*
 * One histogram of BINS counts per pixel column and a pointer to the median
 * bin; `below` counts the window's elements smaller than the median. Moving
 * the window by one frame adds one count and removes one, and the pointer
 * walks to the element of rank kernel_size / 2 in a step or two; its bounds
 * never bind on a consistent histogram, they keep a misused one (counts
 * shared with frames, say) inside its row. COUNT_T is the narrowest type
 * that holds kernel_size.
 *
 * NAME_fill zeroes the counts of columns start:start+width and counts the
 * first kernel_size - 1 rows of frames; NAME_steps then takes the windows
 * first:last (the window t is rows t … t+kernel_size-1, and the window 0
 * removes no row), with median and below zero before the window 0.
 */
#define DEFINE_HISTOGRAM_MEDIAN(NAME, COUNT_T)                                          \
    static void NAME##_fill(const uint8_t *frames, Py_ssize_t pixels,                   \
                            Py_ssize_t kernel_size, Py_ssize_t start, Py_ssize_t width, \
                            COUNT_T *counts)                                            \
    {                                                                                   \
        memset(counts, 0, (size_t)width * BINS * sizeof(COUNT_T));                      \
        for (Py_ssize_t row = 0; row < kernel_size - 1; row++) {                        \
            const uint8_t *entering = frames + row * pixels + start;                    \
            for (Py_ssize_t j = 0; j < width; j++)                                      \
                counts[j * BINS + entering[j]]++;                                       \
        }                                                                               \
    }                                                                                   \
                                                                                        \
    static void NAME##_steps(const uint8_t *frames, uint8_t *out, Py_ssize_t pixels,    \
                             Py_ssize_t kernel_size, Py_ssize_t first, Py_ssize_t last, \
                             Py_ssize_t start, Py_ssize_t width, COUNT_T *counts,       \
                             int32_t *median, int32_t *below)                           \
    {                                                                                   \
        const int32_t half = (int32_t)(kernel_size / 2);                                \
        for (Py_ssize_t t = first; t < last; t++) {                                     \
            const uint8_t *entering = frames + (t + kernel_size - 1) * pixels + start;  \
            const uint8_t *leaving = t > 0 ? entering - kernel_size * pixels : NULL;    \
            uint8_t *medians = out + t * pixels + start;                                \
            for (Py_ssize_t j = 0; j < width; j++) {                                    \
                COUNT_T *histogram = counts + j * BINS;                                 \
                int32_t m = median[j];                                                  \
                int32_t b = below[j];                                                   \
                int32_t value = entering[j];                                            \
                histogram[value]++;                                                     \
                b += value < m;                                                         \
                if (t > 0) {                                                            \
                    value = leaving[j];                                                 \
                    histogram[value]--;                                                 \
                    b -= value < m;                                                     \
                }                                                                       \
                while (b > half && m > 0) {                                             \
                    m--;                                                                \
                    b -= histogram[m];                                                  \
                }                                                                       \
                int32_t here = histogram[m];                                            \
                while (b + here <= half && m < BINS - 1) {                              \
                    b += here;                                                          \
                    m++;                                                                \
                    here = histogram[m];                                                \
                }                                                                       \
                median[j] = m;                                                          \
                below[j] = b;                                                           \
                medians[j] = (uint8_t)m;                                                \
            }                                                                           \
        }                                                                               \
    }

DEFINE_HISTOGRAM_MEDIAN(histogram_u8, uint8_t)
DEFINE_HISTOGRAM_MEDIAN(histogram_u16, uint16_t)
DEFINE_HISTOGRAM_MEDIAN(histogram_u32, uint32_t)

/* The histogram kernel's fill for counts of count_bytes bytes (1, 2 or 4) */
static void
histogram_fill(const uint8_t *frames, Py_ssize_t pixels, Py_ssize_t kernel_size,
               Py_ssize_t start, Py_ssize_t width, void *counts, Py_ssize_t count_bytes)
{
    if (count_bytes == 1)
        histogram_u8_fill(frames, pixels, kernel_size, start, width, counts);
    else if (count_bytes == 2)
        histogram_u16_fill(frames, pixels, kernel_size, start, width, counts);
    else
        histogram_u32_fill(frames, pixels, kernel_size, start, width, counts);
}

/* The histogram kernel's steps for counts of count_bytes bytes (1, 2 or 4) */
static void
histogram_steps(const uint8_t *frames, uint8_t *out, Py_ssize_t pixels,
                Py_ssize_t kernel_size, Py_ssize_t first, Py_ssize_t last, Py_ssize_t start,
                Py_ssize_t width, void *counts, Py_ssize_t count_bytes, int32_t *median,
                int32_t *below)
{
    if (count_bytes == 1)
        histogram_u8_steps(frames, out, pixels, kernel_size, first, last, start, width, counts,
                           median, below);
    else if (count_bytes == 2)
        histogram_u16_steps(frames, out, pixels, kernel_size, first, last, start, width,
                            counts, median, below);
    else
        histogram_u32_steps(frames, out, pixels, kernel_size, first, last, start, width,
                            counts, median, below);
}

/* The implementations of the median, slowest first (see median_implementations) */
enum { SCALAR, SIMD128, AVX2, IMPLEMENTATIONS };
static const char *const IMPLEMENTATION_NAMES[IMPLEMENTATIONS] = {"scalar", "simd128", "avx2"};
static int implementation_runs[IMPLEMENTATIONS] = {1, 0, 0};

/* The window kernel needs the vector extensions of Clang or GCC 9 and later
 * (__builtin_convertvector), and 16-byte vectors in hardware (SSE2, NEON):
 * compilers emulate missing ones with scalar code slower than the histogram.
 * The AVX2 kernel also needs __builtin_cpu_supports to choose it at run time
 * (in Clang where it has the builtin, and not in MSVC mode, whose headers declare the AVX
 * types only when the whole file targets AVX and whose linker lacks the CPU
 * model); GCC for Windows, Cygwin's included, does not align its stack for
 * 32-byte vectors. Where a condition fails, the build has the other kernels. */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 9)
#if defined(__SSE2__) || defined(__ARM_NEON) || defined(__aarch64__)
#define HAVE_SIMD128 1
#endif
#if (defined(__x86_64__) || defined(__i386__)) && !defined(_MSC_VER)
#if defined(__clang__)
#if __has_builtin(__builtin_cpu_supports)
#define HAVE_AVX2 1
#endif
#elif !defined(_WIN32) && !defined(__CYGWIN__)
#define HAVE_AVX2 1
#endif
#endif
#endif

#if defined(HAVE_SIMD128) || defined(HAVE_AVX2)
/*
 * The window kernel
 *
 * For each pixel it keeps a window of LEVELS consecutive grey levels
 * [level, level + LEVELS) that holds the median, the number of elements
 * below the window (`below`) and the number at each level of the window
 * (`count`). A step adds the entering frame to these counts and removes the
 * leaving one, and the median is the level at which the running sum
 * below + count[0] + count[1] + ... first exceeds kernel_size / 2: a few
 * compares and adds per level, the same in every lane, so a step of 16 or 32
 * pixels is one pass of vector instructions.
 *
 * A step adds one element and removes one, so the number of elements below
 * any level changes by at most one, and a median that leaves the window lands
 * on the nearest level outside it that holds elements. move_window then reads
 * that pixel's window once and moves the window of levels so that the new
 * median sits at the edge it crossed: the medians of real recordings more
 * often return than move on, and the levels they came from stay inside. On
 * instrument frames that happens in well under 1% of a pixel's steps. Where
 * it happens often (noise across the grey scale), the reads would cost more
 * than the histogram kernel: a vector of pixels that has read more than
 * RESCAN_BUDGET elements per pixel and step, beyond RESCAN_ALLOWANCE,
 * finishes its columns on the histogram kernel.
 *
 * Vectors compare signed lanes, so grey levels are kept as keys (8-bit
 * lanes: value ^ 0x80, 16-bit lanes: the value) and counts with a bias
 * (count + 2^(lane bits - 1)): both orders are then the signed order of the
 * lanes. Compares give -1 in the lanes where they hold.
 */
#define KEY_OF_ZERO(LANE_T) ((LANE_T)(sizeof(LANE_T) == 1 ? 0x80 : 0))
#define MAX_LEVELS 12 /* the most levels a window kernel keeps (the moved[] of move_window) */
#define WINDOW_CHUNK 16  /* steps a vector of pixels takes while its state stays in registers */
#define RESCAN_BUDGET 1  /* elements read per pixel and step before the histogram takes over */
#define RESCAN_OVERHEAD 16  /* a read window's cost beyond its elements, in elements */
/* what a pixel may read before the budget binds: a 16th of a window, so that
 * on noise a vector gives up after its first reads of long windows */
#define RESCAN_ALLOWANCE(kernel_size) ((kernel_size) / 16 + RESCAN_OVERHEAD)

/*
 * The median of one pixel left its window of `levels` levels starting at
 * *level by one rank (up: above it). Reads the pixel's kernel_size elements
 * (column, pixels apart), finds the new median, the nearest level outside
 * the window that holds elements, and moves the window to put the median at
 * the edge it crossed; updates *level, *below and count[0 … levels-1].
 */
static void
move_window(const uint8_t *column, Py_ssize_t pixels, Py_ssize_t kernel_size, int levels,
            int up, int *level, int *below, int *count)
{
    const int low = *level, high = *level + levels;
    int nearest = up ? BINS : -1, found = 0;
    if (up) {
        for (Py_ssize_t row = 0; row < kernel_size; row++) {
            int value = column[row * pixels];
            value = value >= high ? value : BINS;
            if (value < nearest) {
                nearest = value;
                found = 0;
            }
            found += value == nearest;
        }
    }
    else {
        for (Py_ssize_t row = 0; row < kernel_size; row++) {
            int value = column[row * pixels];
            value = value < low ? value : -1;
            if (value > nearest) {
                nearest = value;
                found = 0;
            }
            found += value == nearest;
        }
    }
    /* the levels between the new median and the old window hold no elements */
    const int first = up ? nearest - (levels - 1) : nearest;
    int moved[MAX_LEVELS], new_below = up ? *below : *below - found;
    for (int v = low; v < first && v < high; v++)
        new_below += count[v - low];
    for (int i = 0; i < levels; i++) {
        const int v = first + i;
        moved[i] = v == nearest ? found : v >= low && v < high ? count[v - low] : 0;
    }
    memcpy(count, moved, (size_t)levels * sizeof(int));
    *level = first;
    *below = new_below;
}

/*
 * DEFINE_WINDOW_MEDIAN defines NAME(frames, out, pixels, kernel_size,
 * output_size, start, width, counts, count_bytes): the window kernel on the
 * columns start:start+width, at least one vector of lanes wide, with vectors
 * of VECTOR_BYTES bytes, lanes of LANE_T (SIGNED_T: its signed twin) and
 * windows of LEVELS levels; ANY_LANE(mask) says whether a mask has a lane
 * set and WIDEN(bytes, type) widens bytes to lanes. counts (of count_bytes
 * bytes each) is the histogram kernel's scratch for vectors that turn to it.
 * Returns -1 if it could not allocate its state.
 *
 * The state of each vector of pixels is SLOTS vectors: level, below and
 * count[0 … LEVELS-1]. A width that is no multiple of the lanes ends with a
 * vector that overlaps the one before it; both write the same medians.
 */
#define DEFINE_WINDOW_MEDIAN(NAME, TARGET, VECTOR_BYTES, LANE_T, SIGNED_T, LEVELS, ANY_LANE, \
                             WIDEN)                                                     \
typedef LANE_T NAME##_lanes __attribute__((vector_size(VECTOR_BYTES)));                 \
typedef SIGNED_T NAME##_signed __attribute__((vector_size(VECTOR_BYTES)));              \
typedef uint8_t NAME##_bytes __attribute__((vector_size(VECTOR_BYTES / sizeof(LANE_T)))); \
typedef LANE_T __attribute__((may_alias)) NAME##_lane; /* a lane of a state vector */    \
enum { NAME##_LANES = VECTOR_BYTES / sizeof(LANE_T), NAME##_SLOTS = LEVELS + 2 };       \
typedef char NAME##_levels_fit[(LEVELS) <= MAX_LEVELS ? 1 : -1]; /* moved[] holds them */ \
                                                                                        \
/* the keys of the pixels at `pixel` and on */                                          \
TARGET static inline NAME##_lanes                                                       \
NAME##_keys(const uint8_t *pixel)                                                       \
{                                                                                       \
    NAME##_bytes bytes;                                                                 \
    memcpy(&bytes, pixel, sizeof bytes);                                                \
    return WIDEN(bytes, NAME##_lanes) ^ KEY_OF_ZERO(LANE_T);                            \
}                                                                                       \
                                                                                        \
/* writes the medians, given as keys, of the pixels at `pixel` and on */                \
TARGET static inline void                                                               \
NAME##_store(uint8_t *pixel, NAME##_lanes keys)                                         \
{                                                                                       \
    keys ^= KEY_OF_ZERO(LANE_T);                                                        \
    NAME##_bytes bytes = __builtin_convertvector(keys, NAME##_bytes);                   \
    memcpy(pixel, &bytes, sizeof bytes);                                                \
}                                                                                       \
                                                                                        \
/* the state of every vector for the window 0, and its medians */                       \
TARGET static void                                                                      \
NAME##_start(const uint8_t *frames, uint8_t *out, Py_ssize_t pixels,                    \
             Py_ssize_t kernel_size, Py_ssize_t vectors, const Py_ssize_t *column,      \
             NAME##_lanes *state)                                                       \
{                                                                                       \
    typedef NAME##_lanes lanes_t;                                                       \
    typedef NAME##_signed signed_t;                                                     \
    enum { SLOTS = NAME##_SLOTS };                                                      \
    const LANE_T bias = (LANE_T)1 << (8 * sizeof(LANE_T) - 1);                          \
    const lanes_t half = (lanes_t){0} + (LANE_T)(kernel_size / 2 + bias);               \
    const lanes_t zero = (lanes_t){0} + KEY_OF_ZERO(LANE_T);                            \
    /* the median bit by bit: the largest m with #(x < m) <= half, in slot 0, */        \
    /* counting #(x < m) in slot 1 */                                                   \
    for (Py_ssize_t v = 0; v < vectors; v++)                                            \
        state[v * SLOTS] = zero;                                                        \
    for (int bit = 7; bit >= 0; bit--) {                                                \
        for (Py_ssize_t v = 0; v < vectors; v++)                                        \
            state[v * SLOTS + 1] = (lanes_t){0} + bias;                                 \
        for (Py_ssize_t row = 0; row < kernel_size; row++) {                            \
            for (Py_ssize_t v = 0; v < vectors; v++) {                                  \
                const lanes_t key = NAME##_keys(frames + row * pixels + column[v]);     \
                const lanes_t trial = state[v * SLOTS] + (LANE_T)(1 << bit);            \
                state[v * SLOTS + 1] -= (lanes_t)((signed_t)key < (signed_t)trial);     \
            }                                                                           \
        }                                                                               \
        for (Py_ssize_t v = 0; v < vectors; v++) {                                      \
            const lanes_t below = state[v * SLOTS + 1];                                 \
            const lanes_t raise = (lanes_t)((signed_t)below <= (signed_t)half);         \
            state[v * SLOTS] += raise & (LANE_T)(1 << bit);                             \
        }                                                                               \
    }                                                                                   \
    /* a window of levels around each median, inside 0 … 255, and its counts */         \
    for (Py_ssize_t v = 0; v < vectors; v++) {                                          \
        lanes_t *slots = state + v * SLOTS;                                             \
        NAME##_store(out + column[v], slots[0]);                                        \
        const lanes_t median = slots[0] - zero; /* as a value */                        \
        const lanes_t margin = (lanes_t){0} + (LEVELS - 1) / 2;                         \
        const lanes_t top = (lanes_t){0} + (BINS - LEVELS);                             \
        lanes_t level = (median - margin) & (lanes_t)(median >= margin);                \
        const lanes_t over = (lanes_t)(level > top);                                    \
        slots[0] = ((level & ~over) | (top & over)) + zero;                             \
        slots[1] = (lanes_t){0} + bias;                                                 \
        for (int i = 0; i < LEVELS; i++)                                                \
            slots[2 + i] = (lanes_t){0};                                                \
    }                                                                                   \
    for (Py_ssize_t row = 0; row < kernel_size; row++) {                                \
        for (Py_ssize_t v = 0; v < vectors; v++) {                                      \
            lanes_t *slots = state + v * SLOTS;                                         \
            lanes_t key = NAME##_keys(frames + row * pixels + column[v]);               \
            slots[1] -= (lanes_t)((signed_t)key < (signed_t)slots[0]);                  \
            key -= slots[0];                                                            \
            for (int i = 0; i < LEVELS; i++)                                            \
                slots[2 + i] -= (lanes_t)(key == (LANE_T)i);                            \
        }                                                                               \
    }                                                                                   \
}                                                                                       \
                                                                                        \
/* windows first:last (first > 0) of the vector at `column` with its state in */        \
/* `slots`; returns 0, or the window from which on it takes the histogram kernel */     \
TARGET static Py_ssize_t                                                                \
NAME##_steps(const uint8_t *frames, uint8_t *out, Py_ssize_t pixels,                    \
             Py_ssize_t kernel_size, Py_ssize_t first, Py_ssize_t last,                 \
             Py_ssize_t column, NAME##_lanes *slots, Py_ssize_t *rescanned)             \
{                                                                                       \
    typedef NAME##_lanes lanes_t;                                                       \
    typedef NAME##_signed signed_t;                                                     \
    enum { LANES = NAME##_LANES };                                                      \
    const LANE_T bias = (LANE_T)1 << (8 * sizeof(LANE_T) - 1);                          \
    const lanes_t half = (lanes_t){0} + (LANE_T)(kernel_size / 2 + bias);               \
    lanes_t level = slots[0], below = slots[1], count[LEVELS];                          \
    for (int i = 0; i < LEVELS; i++)                                                    \
        count[i] = slots[2 + i];                                                        \
    for (Py_ssize_t t = first; t < last; t++) {                                         \
        const uint8_t *entering = frames + (t + kernel_size - 1) * pixels + column;     \
        lanes_t key = NAME##_keys(entering);                                            \
        lanes_t leaving = NAME##_keys(entering - kernel_size * pixels);                 \
        below += (lanes_t)((signed_t)leaving < (signed_t)level)                         \
                 - (lanes_t)((signed_t)key < (signed_t)level);                          \
        key -= level;                                                                   \
        leaving -= level;                                                               \
        for (int i = 0; i < LEVELS; i++)                                                \
            count[i] += (lanes_t)(leaving == (LANE_T)i) - (lanes_t)(key == (LANE_T)i);  \
        lanes_t sum = below, median = level;                                            \
        for (int i = 0; i < LEVELS - 1; i++) {                                          \
            sum += count[i];                                                            \
            median -= (lanes_t)((signed_t)sum <= (signed_t)half);                       \
        }                                                                               \
        sum += count[LEVELS - 1];                                                       \
        const lanes_t above = (lanes_t)((signed_t)sum <= (signed_t)half);               \
        const lanes_t outside = above | (lanes_t)((signed_t)below > (signed_t)half);    \
        if (__builtin_expect(ANY_LANE(outside), 0)) {                                   \
            NAME##_lane *lanes = (NAME##_lane *)slots;                                  \
            LANE_T lost[LANES], up[LANES];                                              \
            memcpy(lost, &outside, sizeof lost);                                        \
            memcpy(up, &above, sizeof up);                                              \
            slots[0] = level;                                                           \
            slots[1] = below;                                                           \
            for (int i = 0; i < LEVELS; i++)                                            \
                slots[2 + i] = count[i];                                                \
            for (int lane = 0; lane < LANES; lane++) {                                  \
                if (!lost[lane])                                                        \
                    continue;                                                           \
                const LANE_T zero = KEY_OF_ZERO(LANE_T);                                \
                int lane_level = (LANE_T)(lanes[lane] - zero);                          \
                int lane_below = (LANE_T)(lanes[LANES + lane] - bias);                  \
                int lane_count[LEVELS];                                                 \
                for (int i = 0; i < LEVELS; i++)                                        \
                    lane_count[i] = lanes[(2 + i) * LANES + lane];                      \
                move_window(frames + t * pixels + column + lane, pixels, kernel_size,   \
                            LEVELS, up[lane] != 0, &lane_level, &lane_below, lane_count); \
                lanes[lane] = (LANE_T)(lane_level + zero);                              \
                lanes[LANES + lane] = (LANE_T)(lane_below + bias);                      \
                for (int i = 0; i < LEVELS; i++)                                        \
                    lanes[(2 + i) * LANES + lane] = (LANE_T)lane_count[i];              \
                *rescanned += kernel_size + RESCAN_OVERHEAD;                            \
            }                                                                           \
            if (*rescanned > LANES * (RESCAN_BUDGET * t + RESCAN_ALLOWANCE(kernel_size))) \
                return t;                                                               \
            level = slots[0];                                                           \
            below = slots[1];                                                           \
            for (int i = 0; i < LEVELS; i++)                                            \
                count[i] = slots[2 + i];                                                \
            sum = below;                                                                \
            median = level;                                                             \
            for (int i = 0; i < LEVELS - 1; i++) {                                      \
                sum += count[i];                                                        \
                median -= (lanes_t)((signed_t)sum <= (signed_t)half);                   \
            }                                                                           \
        }                                                                               \
        NAME##_store(out + t * pixels + column, median);                                \
    }                                                                                   \
    slots[0] = level;                                                                   \
    slots[1] = below;                                                                   \
    for (int i = 0; i < LEVELS; i++)                                                    \
        slots[2 + i] = count[i];                                                        \
    return 0;                                                                           \
}                                                                                       \
                                                                                        \
TARGET static int                                                                       \
NAME(const uint8_t *frames, uint8_t *out, Py_ssize_t pixels, Py_ssize_t kernel_size,    \
     Py_ssize_t output_size, Py_ssize_t start, Py_ssize_t width, void *counts,          \
     Py_ssize_t count_bytes)                                                            \
{                                                                                       \
    enum { LANES = NAME##_LANES, SLOTS = NAME##_SLOTS };                                \
    const Py_ssize_t vectors = (width + LANES - 1) / LANES;                             \
    char *state_memory = malloc(((size_t)vectors * SLOTS + 1) * sizeof(NAME##_lanes));  \
    /* per vector: its first column, the elements it read in move_window, */           \
    /* the window from which on it takes the histogram kernel (0: none) */              \
    Py_ssize_t *column = malloc(3 * (size_t)vectors * sizeof(Py_ssize_t));              \
    /* the histogram kernel's median and below, per column */                           \
    int32_t *pointers = calloc(2 * (size_t)width, sizeof(int32_t));                     \
    if (state_memory == NULL || column == NULL || pointers == NULL) {                   \
        free(state_memory);                                                             \
        free(column);                                                                   \
        free(pointers);                                                                 \
        return -1;                                                                      \
    }                                                                                   \
    NAME##_lanes *state = (NAME##_lanes *)(state_memory + sizeof(NAME##_lanes)          \
                                   - (uintptr_t)state_memory % sizeof(NAME##_lanes));   \
    Py_ssize_t *rescanned = column + vectors, *turned = column + 2 * vectors;           \
    for (Py_ssize_t v = 0; v < vectors; v++) {                                          \
        column[v] = start + (v * LANES < width - LANES ? v * LANES : width - LANES);    \
        rescanned[v] = turned[v] = 0;                                                   \
    }                                                                                   \
    NAME##_start(frames, out, pixels, kernel_size, vectors, column, state);             \
    for (Py_ssize_t first = 1; first < output_size; first += WINDOW_CHUNK) {            \
        const Py_ssize_t last = output_size - first > WINDOW_CHUNK ? first + WINDOW_CHUNK \
                                                                   : output_size;       \
        for (Py_ssize_t v = 0; v < vectors; v++) {                                      \
            Py_ssize_t from = first;                                                    \
            /* on the histogram kernel, a vector takes the columns that no */          \
            /* vector before it takes */                                                \
            const Py_ssize_t own = v * LANES, own_width = width - own < LANES ? width - own \
                                                                               : LANES; \
            void *own_counts = (char *)counts + own * BINS * count_bytes;               \
            if (!turned[v]) {                                                           \
                from = NAME##_steps(frames, out, pixels, kernel_size, first, last,      \
                                    column[v], state + v * SLOTS, rescanned + v);       \
                if (from == 0)                                                          \
                    continue;                                                           \
                turned[v] = from;                                                       \
                histogram_fill(frames + from * pixels, pixels, kernel_size, start + own, \
                               own_width, own_counts, count_bytes);                     \
            }                                                                           \
            /* the histogram kernel's window 0 is this vector's window turned[v] */     \
            histogram_steps(frames + turned[v] * pixels, out + turned[v] * pixels, pixels, \
                            kernel_size, from - turned[v], last - turned[v], start + own, \
                            own_width, own_counts, count_bytes, pointers + own,         \
                            pointers + width + own);                                    \
        }                                                                               \
    }                                                                                   \
    free(state_memory);                                                                 \
    free(column);                                                                       \
    free(pointers);                                                                     \
    return 0;                                                                           \
}
#endif

#ifdef HAVE_SIMD128
#if defined(__SSE2__)
#include <emmintrin.h>
#define ANY_LANE_128(mask) (_mm_movemask_epi8((__m128i)(mask)) != 0)
#else
static inline int
any_lane_128(const void *mask)
{
    uint64_t words[2];
    memcpy(words, mask, sizeof words);
    return (words[0] | words[1]) != 0;
}
#define ANY_LANE_128(mask) any_lane_128(&(mask))
#endif
DEFINE_WINDOW_MEDIAN(window8_levels12_simd128, , 16, uint8_t, int8_t, 12, ANY_LANE_128,
                     __builtin_convertvector)
DEFINE_WINDOW_MEDIAN(window8_levels8_simd128, , 16, uint8_t, int8_t, 8, ANY_LANE_128,
                     __builtin_convertvector)
DEFINE_WINDOW_MEDIAN(window16_levels4_simd128, , 16, uint16_t, int16_t, 4, ANY_LANE_128,
                     __builtin_convertvector)
#endif

#ifdef HAVE_AVX2
#include <immintrin.h>
#define ANY_LANE_256(mask) (!_mm256_testz_si256((__m256i)(mask), (__m256i)(mask)))
#define TARGET_AVX2 __attribute__((target("avx2")))
/* GCC widens 16 bytes to 16-bit lanes in two halves; AVX2 does it in one instruction */
#define WIDEN_256(bytes, type) ((type)_mm256_cvtepu8_epi16((__m128i)(bytes)))
DEFINE_WINDOW_MEDIAN(window8_levels12_avx2, TARGET_AVX2, 32, uint8_t, int8_t, 12, ANY_LANE_256,
                     __builtin_convertvector)
DEFINE_WINDOW_MEDIAN(window8_levels8_avx2, TARGET_AVX2, 32, uint8_t, int8_t, 8, ANY_LANE_256,
                     __builtin_convertvector)
DEFINE_WINDOW_MEDIAN(window16_levels4_avx2, TARGET_AVX2, 32, uint16_t, int16_t, 4, ANY_LANE_256,
                     WIDEN_256)
#endif

/*
 * The median of columns start:start+width with the fastest implementation up
 * to `implementation` that takes this kernel size and width: the window
 * kernel counts in lanes of 8 bits up to kernel_size 255 and of 16 bits up to
 * 65535, and needs a vector of columns. Short kernels move their medians
 * further, so they get wider windows of levels. Returns -1 if it could not
 * allocate its scratch.
 */
#define SHORT_KERNEL 20

static int
median_columns(int implementation, const uint8_t *frames, uint8_t *out, Py_ssize_t pixels,
               Py_ssize_t kernel_size, Py_ssize_t output_size, Py_ssize_t start,
               Py_ssize_t width, void *counts, Py_ssize_t count_bytes)
{
#if defined(HAVE_SIMD128) || defined(HAVE_AVX2)
    const int lane_bytes = kernel_size <= 0xFF ? 1 : kernel_size <= 0xFFFF ? 2 : 0;
    int (*kernel)(const uint8_t *, uint8_t *, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                  Py_ssize_t, void *, Py_ssize_t) = NULL;
#ifdef HAVE_SIMD128
    if (implementation >= SIMD128 && lane_bytes && width >= 16 / lane_bytes)
        kernel = lane_bytes == 2 ? window16_levels4_simd128
                 : kernel_size < SHORT_KERNEL ? window8_levels12_simd128
                                              : window8_levels8_simd128;
#endif
#ifdef HAVE_AVX2
    if (implementation >= AVX2 && lane_bytes && width >= 32 / lane_bytes)
        kernel = lane_bytes == 2 ? window16_levels4_avx2
                 : kernel_size < SHORT_KERNEL ? window8_levels12_avx2
                                              : window8_levels8_avx2;
#endif
    if (kernel != NULL)
        return kernel(frames, out, pixels, kernel_size, output_size, start, width, counts,
                      count_bytes);
#else
    (void)implementation;
#endif
    int32_t *pointers = calloc(2 * (size_t)width, sizeof(int32_t));
    if (pointers == NULL)
        return -1;
    histogram_fill(frames, pixels, kernel_size, start, width, counts, count_bytes);
    histogram_steps(frames, out, pixels, kernel_size, 0, output_size, start, width, counts,
                    count_bytes, pointers, pointers + width);
    free(pointers);
    return 0;
}

/* A C-contiguous 2-D buffer of `obj` with the given item size (0: 1, 2 or 4) */
static int
get_matrix(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t itemsize,
           const char *name)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return -1;
    int unsigned_integer = view->format != NULL && view->format[0] != '\0'
                           && strchr("BHIL", view->format[0]) != NULL
                           && view->format[1] == '\0';
    if (view->ndim != 2 || !unsigned_integer
        || (itemsize ? view->itemsize != itemsize
                     : view->itemsize != 1 && view->itemsize != 2 && view->itemsize != 4)) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be a C-contiguous 2-D array of unsigned integers of %s",
                     name, itemsize == 1 ? "1 byte" : "1, 2 or 4 bytes");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* The index of the implementation named `name` (NULL: the fastest here), or -1
 * with a ValueError when it is unknown or this CPU or build cannot run it */
static int
find_implementation(const char *name)
{
    int best = SCALAR;
    for (int i = 0; i < IMPLEMENTATIONS; i++) {
        if (name == NULL && implementation_runs[i])
            best = i;
        if (name != NULL && strcmp(name, IMPLEMENTATION_NAMES[i]) == 0) {
            if (implementation_runs[i])
                return i;
            PyErr_Format(PyExc_ValueError,
                         "This CPU or this build of dcbg cannot run the '%s' median; use one "
                         "of those median_implementations() lists.", name);
            return -1;
        }
    }
    if (name != NULL) {
        PyErr_Format(PyExc_ValueError,
                     "Unknown median implementation '%s'; use one of those "
                     "median_implementations() lists.", name);
        return -1;
    }
    return best;
}

PyDoc_STRVAR(rolling_median_columns_doc,
"rolling_median_columns(frames, out, kernel_size, output_size, start, stop, counts, *,\n"
"                       implementation=None)\n"
"--\n\n"
"Rolling median of the pixel columns start:stop of frames.\n\n"
"out[t, p] becomes the element of rank kernel_size // 2 of\n"
"frames[t:t+kernel_size, p] for t < output_size. counts is scratch space\n"
"of shape (stop - start, 256) whose unsigned type holds kernel_size.\n"
"implementation names one of median_implementations() (default: the\n"
"fastest); all give the same bytes. Runs without the GIL.");

static PyObject *
rolling_median_columns(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"frames", "out", "kernel_size", "output_size", "start", "stop",
                               "counts", "implementation", NULL};
    PyObject *frames_obj, *out_obj, *counts_obj;
    Py_ssize_t kernel_size, output_size, start, stop;
    const char *name = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOnnnnO|$z:rolling_median_columns",
                                     keywords, &frames_obj, &out_obj, &kernel_size,
                                     &output_size, &start, &stop, &counts_obj, &name))
        return NULL;
    const int implementation = find_implementation(name);
    if (implementation < 0)
        return NULL;
    Py_buffer frames, out, counts;
    if (get_matrix(frames_obj, &frames, 0, 1, "frames") < 0)
        return NULL;
    if (get_matrix(out_obj, &out, 1, 1, "out") < 0) {
        PyBuffer_Release(&frames);
        return NULL;
    }
    if (get_matrix(counts_obj, &counts, 1, 0, "counts") < 0) {
        PyBuffer_Release(&frames);
        PyBuffer_Release(&out);
        return NULL;
    }
    const Py_ssize_t pixels = frames.shape[1];
    const Py_ssize_t width = stop - start;
    /* the kernel keeps counts and ranks in int32_t */
    const uint64_t most = counts.itemsize == 1 ? 0xFF : counts.itemsize == 2 ? 0xFFFF
                                                                             : INT32_MAX;
    const char *error = NULL;
    if (kernel_size < 1 || output_size < 0)
        error = "kernel_size must be positive and output_size not negative";
    else if (start < 0 || stop < start || stop > pixels)
        error = "start:stop must be a range of the pixel columns of frames";
    else if (output_size > 0 && (kernel_size - 1 > frames.shape[0]
                                 || output_size > frames.shape[0] - (kernel_size - 1)))
        error = "frames has fewer rows than output_size + kernel_size - 1";
    else if (out.shape[0] < output_size || out.shape[1] != pixels)
        error = "out must have output_size rows and as many columns as frames";
    else if (counts.shape[0] != width || counts.shape[1] != BINS)
        error = "counts must have the shape (stop - start, 256)";
    else if ((uint64_t)kernel_size > most)
        error = "counts has too narrow a type for kernel_size";
    int out_of_memory = 0;
    if (error == NULL && width > 0 && output_size > 0) {
        Py_BEGIN_ALLOW_THREADS
        out_of_memory = median_columns(implementation, frames.buf, out.buf, pixels,
                                       kernel_size, output_size, start, width, counts.buf,
                                       counts.itemsize) < 0;
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&frames);
    PyBuffer_Release(&out);
    PyBuffer_Release(&counts);
    if (error != NULL) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    if (out_of_memory)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(median_implementations_doc,
"median_implementations()\n"
"--\n\n"
"The implementations of rolling_median_columns this CPU runs, fastest first:\n"
"'avx2' and 'simd128' (the window kernel on 32- and 16-byte vectors) where\n"
"built and supported, and 'scalar' (the histogram kernel) always.");

static PyObject *
median_implementations(PyObject *self, PyObject *unused)
{
    PyObject *names = PyTuple_New(0);
    for (int i = IMPLEMENTATIONS - 1; i >= 0 && names != NULL; i--) {
        if (!implementation_runs[i])
            continue;
        PyObject *name = PyUnicode_FromString(IMPLEMENTATION_NAMES[i]);
        Py_ssize_t size = PyTuple_GET_SIZE(names);
        if (name == NULL || _PyTuple_Resize(&names, size + 1) < 0) {
            Py_XDECREF(name);
            Py_XDECREF(names);
            return NULL;
        }
        PyTuple_SET_ITEM(names, size, name);
    }
    return names;
}

/* Adding the high half to the low half keeps the value modulo 65535 and
 * keeps it non-zero; repeated until it fits into 16 bits. */
static uint64_t
fold(uint64_t value)
{
    while (value > 0xFFFF)
        value = (value & 0xFFFF) + (value >> 16);
    return value;
}

PyDoc_STRVAR(fletcher32_doc,
"fletcher32(data)\n"
"--\n\n"
"HDF5's Fletcher-32 checksum of a contiguous bytes-like object.\n\n"
"The data are read as big-endian 16-bit words (an odd last byte is the\n"
"high byte of a last word). Runs without the GIL.");

static PyObject *
fletcher32(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    const uint8_t *data = view.buf;
    const Py_ssize_t size = view.len;
    const Py_ssize_t words = size / 2;
    uint64_t sum1 = 0, sum2 = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t begin = 0; begin < words; begin += FOLD_WORDS) {
        const Py_ssize_t end = words - begin < FOLD_WORDS ? words : begin + FOLD_WORDS;
        for (Py_ssize_t i = begin; i < end; i++) {
            sum1 += ((uint64_t)data[2 * i] << 8) | data[2 * i + 1];
            sum2 += sum1;
        }
        sum1 = fold(sum1);
        sum2 = fold(sum2);
    }
    if (size % 2) {
        sum1 += (uint64_t)data[size - 1] << 8;
        sum2 += sum1;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong((fold(sum2) << 16) | fold(sum1));
}

/*
 * The check of a GPU's medians against this CPU kernel (dcbg.engines.verification)
 * reads a sample of pixel columns out of whole batches: a frame's first and last
 * pixel of every thread block and some pseudo-random ones. gather_columns copies
 * them into a contiguous array for the median kernel, first_difference compares
 * the GPU's medians at them with the CPU's without copying them first. With
 * thread blocks of 32 pixels the sample touches every cache line of a row, so
 * both are bound by memory: they prefetch the next row's lines while they read
 * this one (one prefetch per PREFETCH_EVERY columns, about one per line of a
 * sample), which hides most of its latency (a third less time, measured).
 */

#define PREFETCH_EVERY 4
#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(address) __builtin_prefetch(address)
#else
#define PREFETCH(address) ((void)(address)) /* a hint only: the results are the same */
#endif

/* A 1-D contiguous array of int64 column indices, each in 0 … pixels - 1 */
static int
get_columns(PyObject *obj, Py_buffer *view, Py_ssize_t pixels)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    int int64 = view->format != NULL && strchr("lq", view->format[0]) != NULL
                && view->format[0] != '\0' && view->format[1] == '\0' && view->itemsize == 8;
    if (view->ndim != 1 || !int64) {
        PyErr_SetString(PyExc_ValueError, "columns must be a contiguous 1-D array of int64");
        PyBuffer_Release(view);
        return -1;
    }
    const int64_t *columns = view->buf;
    for (Py_ssize_t j = 0; j < view->shape[0]; j++) {
        if (columns[j] < 0 || columns[j] >= pixels) {
            PyErr_Format(PyExc_ValueError, "column %lld is outside the %zd pixel columns",
                         (long long)columns[j], pixels);
            PyBuffer_Release(view);
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(gather_columns_doc,
"gather_columns(source, columns, out)\n"
"--\n\n"
"out[r, j] = source[r, columns[j]] for every row r of out.\n\n"
"source and out are C-contiguous 2-D uint8 arrays, out with at most as many\n"
"rows as source and one column per entry of columns (int64, each a column\n"
"of source). Runs without the GIL.");

static PyObject *
gather_columns(PyObject *self, PyObject *args)
{
    PyObject *source_obj, *columns_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "OOO:gather_columns", &source_obj, &columns_obj, &out_obj))
        return NULL;
    Py_buffer source, columns, out;
    if (get_matrix(source_obj, &source, 0, 1, "source") < 0)
        return NULL;
    if (get_columns(columns_obj, &columns, source.shape[1]) < 0) {
        PyBuffer_Release(&source);
        return NULL;
    }
    if (get_matrix(out_obj, &out, 1, 1, "out") < 0) {
        PyBuffer_Release(&source);
        PyBuffer_Release(&columns);
        return NULL;
    }
    const Py_ssize_t pixels = source.shape[1], rows = out.shape[0], width = out.shape[1];
    const int fits = rows <= source.shape[0] && width == columns.shape[0];
    if (fits) {
        const int64_t *index = columns.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t row = 0; row < rows; row++) {
            const uint8_t *from = (const uint8_t *)source.buf + row * pixels;
            const uint8_t *ahead = row + 1 < rows ? from + pixels : from;
            uint8_t *to = (uint8_t *)out.buf + row * width;
            for (Py_ssize_t j = 0; j < width; j++) {
                if (j % PREFETCH_EVERY == 0)
                    PREFETCH(ahead + index[j]);
                to[j] = from[index[j]];
            }
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&source);
    PyBuffer_Release(&columns);
    PyBuffer_Release(&out);
    if (!fits) {
        PyErr_SetString(PyExc_ValueError, "out must have at most the rows of source and one "
                                          "column per entry of columns");
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(first_difference_doc,
"first_difference(actual, columns, expected)\n"
"--\n\n"
"The first place, row by row, where actual differs from expected, or -1.\n\n"
"Compares actual[r, columns[j]] (actual[r, j] where columns is None) with\n"
"expected[r, j] for every row r of expected and returns r * width + j of\n"
"the first difference, where width is expected's number of columns.\n"
"actual and expected are C-contiguous 2-D uint8 arrays, actual with at\n"
"least the rows of expected. Runs without the GIL.");

static PyObject *
first_difference(PyObject *self, PyObject *args)
{
    PyObject *actual_obj, *columns_obj, *expected_obj;
    if (!PyArg_ParseTuple(args, "OOO:first_difference", &actual_obj, &columns_obj,
                          &expected_obj))
        return NULL;
    Py_buffer actual, columns, expected;
    const int every = columns_obj == Py_None;
    if (get_matrix(actual_obj, &actual, 0, 1, "actual") < 0)
        return NULL;
    if (!every && get_columns(columns_obj, &columns, actual.shape[1]) < 0) {
        PyBuffer_Release(&actual);
        return NULL;
    }
    if (get_matrix(expected_obj, &expected, 0, 1, "expected") < 0) {
        PyBuffer_Release(&actual);
        if (!every)
            PyBuffer_Release(&columns);
        return NULL;
    }
    const Py_ssize_t pixels = actual.shape[1], rows = expected.shape[0];
    const Py_ssize_t width = expected.shape[1];
    const int fits = rows <= actual.shape[0]
                     && width == (every ? pixels : columns.shape[0]);
    Py_ssize_t found = -1;
    if (fits) {
        const int64_t *index = every ? NULL : columns.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t row = 0; row < rows && found < 0; row++) {
            const uint8_t *got = (const uint8_t *)actual.buf + row * pixels;
            const uint8_t *ahead = row + 1 < rows ? got + pixels : got;
            const uint8_t *want = (const uint8_t *)expected.buf + row * width;
            /* a row's differences ORed without a branch; it is searched only if any */
            unsigned differs = 0;
            if (every)
                differs = memcmp(got, want, (size_t)width) != 0;
            else
                for (Py_ssize_t j = 0; j < width; j++) {
                    if (j % PREFETCH_EVERY == 0)
                        PREFETCH(ahead + index[j]);
                    differs |= (unsigned)(got[index[j]] ^ want[j]);
                }
            for (Py_ssize_t j = 0; differs && j < width; j++) {
                if (got[every ? j : index[j]] != want[j]) {
                    found = row * width + j;
                    break;
                }
            }
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&actual);
    if (!every)
        PyBuffer_Release(&columns);
    PyBuffer_Release(&expected);
    if (!fits) {
        PyErr_SetString(PyExc_ValueError, "expected must have at most the rows of actual and "
                                          "one column per entry of columns (per column of "
                                          "actual where columns is None)");
        return NULL;
    }
    return PyLong_FromSsize_t(found);
}

static PyMethodDef methods[] = {
    {"rolling_median_columns", (PyCFunction)(void (*)(void))rolling_median_columns,
     METH_VARARGS | METH_KEYWORDS, rolling_median_columns_doc},
    {"median_implementations", median_implementations, METH_NOARGS,
     median_implementations_doc},
    {"fletcher32", fletcher32, METH_O, fletcher32_doc},
    {"gather_columns", gather_columns, METH_VARARGS, gather_columns_doc},
    {"first_difference", first_difference, METH_VARARGS, first_difference_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_compiled",
    "dcbg's CPU kernels compiled from C (see dcbg.cpukernels)", -1, methods,
};

PyMODINIT_FUNC
PyInit__compiled(void)
{
#ifdef HAVE_SIMD128
    implementation_runs[SIMD128] = 1;
#endif
#ifdef HAVE_AVX2
    __builtin_cpu_init();
    implementation_runs[AVX2] = __builtin_cpu_supports("avx2") != 0;
#endif
    return PyModule_Create(&module);
}
