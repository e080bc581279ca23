/*
 * dcbg's two CPU kernels in C: the rolling median of pixel columns and HDF5's
 * Fletcher-32 checksum. They compute exactly what jit.py computes; pip builds
 * this module when it installs dcbg, so that a process does not pay for
 * importing numba and loading its cache. Both release the GIL, so threads run
 * them in parallel.
 *
 * The median has these algorithms, all with the same results. For 8-bit
 * values:
 * - the histogram kernel, portable C and the loop jit.py compiles: a
 *   256-bin histogram per pixel and a pointer to its median bin;
 * - the window kernel, one pixel per lane of a SIMD vector (GCC's and Clang's
 *   vector extensions): per pixel only the counts of a few consecutive levels
 *   around the median, so that a step is a handful of vector instructions
 *   for 16 or 32 pixels instead of two scattered histogram updates per pixel.
 * For 16-bit values, where a histogram of 65,536 levels per pixel would fit
 * no cache:
 * - the sorted-window kernel, portable C and the loop jit.py compiles: each
 *   pixel keeps its window sorted, and a step is two binary searches and a
 *   shift of the values between them, whatever the medians do;
 * - the sorted-lanes kernel, for windows of up to SORTED_LANES_MAX frames:
 *   one pixel per lane, its window sorted across kernel_size vectors, and a
 *   step a min, a max, a compare and a blend per vector;
 * - the window kernel for 16-bit values, for longer windows: the 8-bit
 *   window kernel on values relative to each pixel's window of levels. Shot
 *   noise spreads a pixel's values over tens of levels, but the median of
 *   a long window wanders only a few: 24 or 32 levels (12 for windows of
 *   more than 255 frames, whose medians wander less) hold it in all but a
 *   fraction of a percent of the steps, and a copy of each pixel's window in
 *   consecutive memory (a ring) makes it cheap to find the median when it
 *   leaves them. Noisier or brighter columns, whose medians leave their
 *   levels more often, take the sorted lanes (up to LANES_FALLBACK_MAX
 *   frames) or the sorted windows.
 * The vector kernels are built twice on x86 (16-byte vectors for any CPU,
 * 32-byte ones for CPUs with AVX2, picked when the module loads) and once
 * elsewhere.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BINS 256
#define LEVELS16 65536 /* the levels of 16-bit values */
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

/*
 * The sorted-window kernel, for 16-bit values: a histogram of 65,536 levels
 * per pixel would not fit any cache, so each pixel keeps its window sorted
 * instead (kernel_size values, its row of `sorted`). A step finds the
 * leaving value and the place of the entering one by binary search, shifts
 * the values between the two by one place and reads the middle element. Its
 * cost does not depend on how the median moves, which makes it the fallback
 * of the 16-bit window kernel for noisy columns and the portable kernel.
 * Columns are taken SORTED_BLOCK at a time through all windows, so that
 * their sorted windows stay in cache.
 *
 * sorted_fill sorts the first kernel_size - 1 rows of each column of
 * start:start+width into its row of sorted; sorted_steps then takes the
 * windows first:last (the window 0 removes no row).
 */
#define SORTED_BLOCK 32

/* The index of the first of `size` sorted values that is not below `value`
 * (in arithmetic without branches on the values, which a binary search
 * cannot predict and compilers turn a conditional expression into) */
static inline Py_ssize_t
first_not_below(const uint16_t *values, Py_ssize_t size, uint16_t value)
{
    if (size <= 0)
        return 0;
    const uint16_t *base = values;
    while (size > 1) {
        const Py_ssize_t half = size / 2;
        base += half & -(Py_ssize_t)(base[half - 1] < value);
        size -= half;
    }
    return (base - values) + (*base < value);
}

/* Sorts the column of `count` values `stride` apart into `sorted` (radix
 * sort by the low byte, then by the high byte, through `spare`) */
static void
sort_column(const uint16_t *column, Py_ssize_t stride, Py_ssize_t count, uint16_t *sorted,
            uint16_t *spare)
{
    Py_ssize_t low[BINS + 1] = {0}, high[BINS + 1] = {0};
    for (Py_ssize_t row = 0; row < count; row++) {
        const uint16_t value = column[row * stride];
        low[(value & 0xFF) + 1]++;
        high[(value >> 8) + 1]++;
    }
    for (int bin = 0; bin < BINS; bin++) {
        low[bin + 1] += low[bin];
        high[bin + 1] += high[bin];
    }
    for (Py_ssize_t row = 0; row < count; row++) {
        const uint16_t value = column[row * stride];
        spare[low[value & 0xFF]++] = value;
    }
    for (Py_ssize_t i = 0; i < count; i++)
        sorted[high[spare[i] >> 8]++] = spare[i];
}

/* Returns -1 if it could not allocate the radix sort's spare values */
static int
sorted_fill(const uint16_t *frames, Py_ssize_t pixels, Py_ssize_t kernel_size,
            Py_ssize_t start, Py_ssize_t width, uint16_t *sorted)
{
    uint16_t *spare = malloc((size_t)kernel_size * sizeof(uint16_t));
    if (spare == NULL)
        return -1;
    for (Py_ssize_t j = 0; j < width; j++)
        sort_column(frames + start + j, pixels, kernel_size - 1, sorted + j * kernel_size,
                    spare);
    free(spare);
    return 0;
}

/* The places of `leaving` and `entering` in the sorted window of `size`
 * values: the first value not below each, searched side by side, so that
 * the two chains of loads overlap */
static inline void
find_both(const uint16_t *window, Py_ssize_t size, uint16_t leaving, uint16_t entering,
          Py_ssize_t *leaving_at, Py_ssize_t *entering_at)
{
    const uint16_t *gone = window, *coming = window;
    while (size > 1) {
        const Py_ssize_t half = size / 2;
        gone += half & -(Py_ssize_t)(gone[half - 1] < leaving);
        coming += half & -(Py_ssize_t)(coming[half - 1] < entering);
        size -= half;
    }
    *leaving_at = (gone - window) + (*gone < leaving);
    *entering_at = (coming - window) + (*coming < entering);
}

/* The sorted window of `size` values with `leaving` replaced by `entering`:
 * the values between the two places move by one towards the leaving one's.
 * The bound on `at` never binds on a consistent window; it keeps the moves
 * of a misused one (values shared with frames, say) inside the window. */
static inline void
replace_sorted(uint16_t *window, Py_ssize_t size, uint16_t leaving, uint16_t entering)
{
    Py_ssize_t at, to;
    find_both(window, size, leaving, entering, &at, &to);
    at = at < size ? at : size - 1;
    /* entering above: the values at + 1 … to - 1 move down and it takes to - 1;
     * below: the values to … at - 1 move up and it takes to */
    const int up = entering > leaving;
    to = up ? to - 1 : to;
    const Py_ssize_t from = up ? at + 1 : to, into = up ? at : to + 1;
    to = to > 0 ? to : 0;
    Py_ssize_t moved = up ? to - at : at - to;
    moved = moved > 0 ? moved : 0;
    memmove(window + into, window + from, (size_t)moved * sizeof(uint16_t));
    window[to] = entering;
}

static void
sorted_steps(const uint16_t *frames, uint16_t *out, Py_ssize_t pixels, Py_ssize_t kernel_size,
             Py_ssize_t first, Py_ssize_t last, Py_ssize_t start, Py_ssize_t width,
             uint16_t *sorted)
{
    const Py_ssize_t half = kernel_size / 2;
    for (Py_ssize_t block = 0; block < width; block += SORTED_BLOCK) {
        const Py_ssize_t block_end = width - block > SORTED_BLOCK ? block + SORTED_BLOCK : width;
        for (Py_ssize_t t = first; t < last; t++) {
            const uint16_t *entering = frames + (t + kernel_size - 1) * pixels + start;
            const uint16_t *leaving = t > 0 ? entering - kernel_size * pixels : NULL;
            uint16_t *medians = out + t * pixels + start;
            for (Py_ssize_t j = block; j < block_end; j++) {
                uint16_t *window = sorted + j * kernel_size;
                if (t > 0) {
                    replace_sorted(window, kernel_size, leaving[j], entering[j]);
                }
                else {
                    /* the window 0 grows from kernel_size - 1 values */
                    const Py_ssize_t to = first_not_below(window, kernel_size - 1, entering[j]);
                    memmove(window + to + 1, window + to,
                            (size_t)(kernel_size - 1 - to) * sizeof(uint16_t));
                    window[to] = entering[j];
                }
                medians[j] = window[half];
            }
        }
    }
}

/* The implementations of the median, slowest first (see median_implementations) */
enum { SCALAR, SIMD128, AVX2, IMPLEMENTATIONS };
static const char *const IMPLEMENTATION_NAMES[IMPLEMENTATIONS] = {"scalar", "simd128", "avx2"};
static int implementation_runs[IMPLEMENTATIONS] = {1, 0, 0};

/* The vector kernels need the vector extensions of Clang or GCC 9 and later
 * (__builtin_convertvector), and 16-byte vectors in hardware (SSE2, NEON):
 * compilers emulate missing ones with scalar code slower than the scalar
 * kernels. The AVX2 kernels also need __builtin_cpu_supports to choose it at run time
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
#define MAX_LEVELS 32
/* the most levels a window kernel keeps (the moved[] of move_window) */
#define WINDOW_CHUNK 16  /* steps a vector of pixels takes while its state stays in registers */
#define RESCAN_BUDGET 1  /* elements read per pixel and step before the histogram takes over */
#define RESCAN_OVERHEAD 16  /* a read window's cost beyond its elements, in elements */
/* what a pixel may read before the budget binds: a 16th of a window, so that
 * on noise a vector gives up after its first reads of long windows */
#define RESCAN_ALLOWANCE(kernel_size) ((kernel_size) / 16 + RESCAN_OVERHEAD)

/*
 * DEFINE_MOVE_WINDOW defines NAME for values of VALUE_T, which take the
 * levels 0 … VALUE_LEVELS-1. The median of one pixel left its window of
 * `levels` levels starting at *level by one rank (up: above it). NAME reads
 * the pixel's kernel_size elements (column, pixels apart), finds the new
 * median, the nearest level outside the window that holds elements, and
 * moves the window to put the median at the edge it crossed; updates *level,
 * *below and count[0 … levels-1].
 */
#define DEFINE_MOVE_WINDOW(NAME, VALUE_T, VALUE_LEVELS)                                 \
static void                                                                             \
NAME(const VALUE_T *column, Py_ssize_t pixels, Py_ssize_t kernel_size, int levels, int up, \
     int *level, int *below, int *count)                                                \
{                                                                                       \
    const int low = *level, high = *level + levels;                                     \
    int nearest = up ? (VALUE_LEVELS) : -1, found = 0;                                  \
    if (up) {                                                                           \
        for (Py_ssize_t row = 0; row < kernel_size; row++) {                            \
            int value = column[row * pixels];                                           \
            value = value >= high ? value : (VALUE_LEVELS);                             \
            if (value < nearest) {                                                      \
                nearest = value;                                                        \
                found = 0;                                                              \
            }                                                                           \
            found += value == nearest;                                                  \
        }                                                                               \
    }                                                                                   \
    else {                                                                              \
        for (Py_ssize_t row = 0; row < kernel_size; row++) {                            \
            int value = column[row * pixels];                                           \
            value = value < low ? value : -1;                                           \
            if (value > nearest) {                                                      \
                nearest = value;                                                        \
                found = 0;                                                              \
            }                                                                           \
            found += value == nearest;                                                  \
        }                                                                               \
    }                                                                                   \
    /* the levels between the new median and the old window hold no elements */         \
    const int first = up ? nearest - (levels - 1) : nearest;                            \
    int moved[MAX_LEVELS], new_below = up ? *below : *below - found;                    \
    for (int v = low; v < first && v < high; v++)                                       \
        new_below += count[v - low];                                                    \
    for (int i = 0; i < levels; i++) {                                                  \
        const int v = first + i;                                                        \
        moved[i] = v == nearest ? found : v >= low && v < high ? count[v - low] : 0;    \
    }                                                                                   \
    memcpy(count, moved, (size_t)levels * sizeof(int));                                 \
    *level = first;                                                                     \
    *below = new_below;                                                                 \
}

DEFINE_MOVE_WINDOW(move_window, uint8_t, BINS)

/*
 * move_window for 16-bit values and cumulative counts: cumulative[j] is the
 * number of elements below the level *level + j (j = 0 … levels), so
 * cumulative[0] counts the elements below the window. Two passes without
 * branches on the values: the nearest level outside the window that holds
 * elements, then its elements.
 */
static void
move_window16(const uint16_t *column, Py_ssize_t stride, Py_ssize_t kernel_size, int levels,
              int up, int *level, int *cumulative)
{
    const int low = *level, high = *level + levels;
    int nearest = up ? LEVELS16 : -1, found = 0;
    /* candidates outside the window keep their value, the others become a
     * level past the end of the search: LEVELS16 or above going up, -1 going
     * down (in arithmetic, which compilers do not turn into branches) */
    if (up) {
        for (Py_ssize_t row = 0; row < kernel_size; row++) {
            const int value = column[row * stride];
            const int candidate = value | (value < high) << 16;
            nearest = candidate < nearest ? candidate : nearest;
        }
    }
    else {
        for (Py_ssize_t row = 0; row < kernel_size; row++) {
            const int value = column[row * stride];
            const int candidate = value | -(value >= low);
            nearest = candidate > nearest ? candidate : nearest;
        }
    }
    for (Py_ssize_t row = 0; row < kernel_size; row++)
        found += column[row * stride] == nearest;
    /* the levels between the new median and the old window hold no elements */
    const int first = up ? nearest - (levels - 1) : nearest;
    int moved[MAX_LEVELS + 1];
    for (int j = 0; j <= levels; j++) {
        const int boundary = first + j; /* moved[j] counts the elements below it */
        moved[j] = boundary <= nearest && !up ? cumulative[0] - found
                   : boundary <= low ? cumulative[0]
                   : boundary <= high ? cumulative[boundary - low]
                   : boundary <= nearest ? cumulative[levels]
                   : cumulative[levels] + found;
    }
    memcpy(cumulative, moved, ((size_t)levels + 1) * sizeof(int));
    *level = first;
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
#if defined(__SSE2__) && !defined(DCBG_GENERIC_VECTORS)
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

#if defined(HAVE_SIMD128) || defined(HAVE_AVX2)
/*
 * The window kernel for 16-bit values
 *
 * The window kernel of 8-bit values with three changes, which keep its
 * steps about as cheap on 16-bit values.
 *
 * Keys relative to the window: the lowest level of each pixel's window is
 * kept in 16 bits, and a value becomes the key value - level, saturated to
 * the signed range of 16 bits (negative below the window, 0 … LEVELS-1
 * inside it, larger above), which a saturating pack narrows to 8 bits. So
 * the counts and compares stay in lanes of 8 bits (kernel_size up to 255:
 * 16 or 32 pixels a vector) or 16 bits (up to 65535: 8 or 16 pixels).
 *
 * Cumulative counts: per level j = 0 … LEVELS the elements below it, so that
 * a step updates each with two compares and no sum runs through the levels;
 * the median is the highest level with at most kernel_size / 2 elements
 * below it, cumulative[0] > kernel_size / 2 says it is below the window and
 * cumulative[LEVELS] <= kernel_size / 2 above.
 *
 * More levels, and rings: shot noise spreads a pixel's values over tens of
 * levels (the square root of a few thousand counts), and the median of
 * kernel_size 100 of them wanders a few levels around their mean. On such
 * frames it leaves a window of 32 levels in about 0.1% of the steps (of 24
 * levels: 0.3%, of 8: 3.6%); move_window16 then reads the pixel's window in
 * the vector's ring (see DEFINE_WINDOW16_MEDIAN). A vector whose reads cost
 * more per step than the kernel it could take instead finishes on that
 * kernel, as the 8-bit kernel's vectors finish on the histogram kernel: on
 * the sorted lanes up to LANES_FALLBACK_MAX frames (its ring sorted in
 * place), on the sorted windows above.
 */
#define KEY16 ((int16_t)-0x8000) /* value ^ KEY16: 16-bit values in the signed order */
/* elements read per pixel and step before the sorted windows take over: a
 * step of theirs costs about as much as reading this many */
#define RESCAN_BUDGET16 16

/* Vectors of the window kernel turn to the sorted lanes up to this kernel
 * size, to the sorted windows above it, whichever is faster there */
#define LANES_FALLBACK_MAX 1024
/* elements read per pixel and step before a vector turns to the sorted
 * lanes, whose step costs about as much as reading a 32nd of a window */
#define LANES_BUDGET16(kernel_size) ((kernel_size) / 32 + 1)

/*
 * Turns a ring of the window `t` (kernel_size rows of `lanes` values) into
 * the slots of the sorted lanes: each lane's values sorted, as keys, through
 * `values` and `spare` (kernel_size values each). Writes the window's
 * medians, the pixels' at `column` and on, and returns the next window, from
 * which on the sorted lanes take the vector.
 */
static Py_ssize_t
sort_ring(uint16_t *ring, Py_ssize_t lanes, Py_ssize_t kernel_size, uint16_t *out,
          Py_ssize_t pixels, Py_ssize_t t, Py_ssize_t column, uint16_t *values,
          uint16_t *spare)
{
    for (Py_ssize_t lane = 0; lane < lanes; lane++) {
        sort_column(ring + lane, lanes, kernel_size, values, spare);
        for (Py_ssize_t row = 0; row < kernel_size; row++)
            ring[row * lanes + lane] = values[row] ^ (uint16_t)KEY16;
        out[t * pixels + column + lane] = values[kernel_size / 2];
    }
    return t + 1;
}

/* The keys and the stores of a kernel with 8-bit lanes: a vector of lanes
 * holds two vectors (HALF_T) of values */
#define DEFINE_KEYS_IN_BYTES(NAME, TARGET, HALF_T, BYTES_T, SUBTRACT, NARROW, WIDEN_LOW,      \
                             WIDEN_HIGH)                                                \
/* the keys of the pixels at `pixel` and on, relative to the window's lowest level */   \
TARGET static inline BYTES_T                                                            \
NAME##_keys(const uint16_t *pixel, const HALF_T *level_key)                             \
{                                                                                       \
    HALF_T low, high;                                                                   \
    memcpy(&low, pixel, sizeof low);                                                    \
    memcpy(&high, pixel + sizeof low / 2, sizeof high);                                 \
    return NARROW(SUBTRACT(low ^ KEY16, level_key[0]), SUBTRACT(high ^ KEY16, level_key[1])); \
}                                                                                       \
                                                                                        \
/* writes the medians, given relative to the windows' lowest levels */                  \
TARGET static inline void                                                               \
NAME##_store(uint16_t *pixel, BYTES_T median, const HALF_T *level)                      \
{                                                                                       \
    const HALF_T low = WIDEN_LOW(median) + level[0], high = WIDEN_HIGH(median) + level[1]; \
    memcpy(pixel, &low, sizeof low);                                                    \
    memcpy(pixel + sizeof low / 2, &high, sizeof high);                                 \
}

/* The keys and the stores of a kernel with 16-bit lanes */
#define DEFINE_KEYS_IN_WORDS(NAME, TARGET, HALF_T, SUBTRACT)                            \
TARGET static inline HALF_T                                                             \
NAME##_keys(const uint16_t *pixel, const HALF_T *level_key)                             \
{                                                                                       \
    HALF_T values;                                                                      \
    memcpy(&values, pixel, sizeof values);                                              \
    return SUBTRACT(values ^ KEY16, level_key[0]);                                      \
}                                                                                       \
                                                                                        \
TARGET static inline void                                                               \
NAME##_store(uint16_t *pixel, HALF_T median, const HALF_T *level)                       \
{                                                                                       \
    const HALF_T values = median + level[0];                                            \
    memcpy(pixel, &values, sizeof values);                                              \
}

/*
 * DEFINE_WINDOW16_MEDIAN defines NAME(frames, out, pixels, kernel_size,
 * output_size, start, width, sorted): the window kernel for 16-bit values on
 * the columns start:start+width, at least one vector of lanes wide, with
 * vectors of VECTOR_BYTES bytes, lanes of LANE_T (SIGNED_T: its signed twin),
 * windows of LEVELS levels, and NAME_keys and NAME_store defined for it;
 * HALF_T is a vector of VECTOR_BYTES bytes of 16-bit values, SORTED_LANES
 * the sorted-lanes kernel of the same vectors. Returns -1 if it could not
 * allocate its state.
 *
 * Each vector of pixels keeps a copy of its window's values, a ring of
 * kernel_size rows of LANES values in which a step reads the leaving row and
 * writes the entering one in its place. move_window16 reads a pixel's window
 * there, in a few kilobytes of consecutive memory that stay in cache,
 * instead of in kernel_size frames far apart, which have left it (and which,
 * where the frame size is a power of two, share a few cache sets). The
 * rings of whole vectors are their columns' rows of `sorted`, the
 * sorted-window kernel's scratch, which a vector that turns to that kernel
 * fills anew (one that turns to the sorted lanes sorts its ring into their
 * slots); the last vector of a width that is no multiple of the lanes has a
 * ring of its own.
 */
#define DEFINE_WINDOW16_MEDIAN(NAME, TARGET, VECTOR_BYTES, LANE_T, SIGNED_T, LEVELS, ANY_LANE, \
                               HALF_T, SORTED_LANES)                                    \
typedef LANE_T NAME##_lanes __attribute__((vector_size(VECTOR_BYTES)));                 \
typedef SIGNED_T NAME##_signed __attribute__((vector_size(VECTOR_BYTES)));              \
typedef uint16_t NAME##_words __attribute__((vector_size(VECTOR_BYTES)));               \
enum { NAME##_LANES = VECTOR_BYTES / sizeof(LANE_T), NAME##_PARTS = 2 / sizeof(LANE_T) }; \
typedef char NAME##_levels_fit[(LEVELS) <= MAX_LEVELS ? 1 : -1]; /* moved[] holds them */ \
typedef struct {                                                                        \
    HALF_T level[NAME##_PARTS]; /* per lane: the lowest level of its window */          \
    /* per lane: its elements below the window's level j (j = 0 … LEVELS), + bias */    \
    NAME##_lanes cumulative[LEVELS + 1];                                                \
} NAME##_state;                                                                         \
                                                                                        \
/* the rings and the state of every vector for the window 0, and its medians */         \
TARGET static void                                                                      \
NAME##_start(const uint16_t *frames, uint16_t *out, Py_ssize_t pixels,                  \
             Py_ssize_t kernel_size, Py_ssize_t vectors, const Py_ssize_t *column,      \
             uint16_t *const *ring, NAME##_state *state)                                \
{                                                                                       \
    typedef NAME##_lanes lanes_t;                                                       \
    typedef NAME##_signed signed_t;                                                     \
    typedef NAME##_words words_t;                                                       \
    enum { LANES = NAME##_LANES, PARTS = NAME##_PARTS, WORDS = VECTOR_BYTES / 2 };      \
    const LANE_T bias = (LANE_T)1 << (8 * sizeof(LANE_T) - 1);                          \
    const words_t half = (words_t){0} + (uint16_t)(kernel_size / 2);                    \
    const words_t margin = (words_t){0} + (LEVELS - 1) / 2;                             \
    const words_t top = (words_t){0} + (LEVELS16 - LEVELS);                             \
    for (Py_ssize_t row = 0; row < kernel_size; row++)                                  \
        for (Py_ssize_t v = 0; v < vectors; v++)                                        \
            memcpy(ring[v] + row * LANES, frames + row * pixels + column[v],            \
                   LANES * sizeof(uint16_t));                                           \
    for (Py_ssize_t v = 0; v < vectors; v++) {                                          \
        for (int part = 0; part < PARTS; part++) {                                      \
            /* the median bit by bit: the largest m with #(x < m) <= half */            \
            words_t median = (words_t){0};                                              \
            for (int bit = 15; bit >= 0; bit--) {                                       \
                const words_t trial = median + (uint16_t)(1u << bit);                   \
                words_t below = (words_t){0};                                           \
                for (Py_ssize_t row = 0; row < kernel_size; row++) {                    \
                    words_t values;                                                     \
                    memcpy(&values, ring[v] + row * LANES + part * WORDS, sizeof values); \
                    below -= (words_t)(values < trial);                                 \
                }                                                                       \
                median += (words_t)(below <= half) & (uint16_t)(1u << bit);             \
            }                                                                           \
            memcpy(out + column[v] + part * WORDS, &median, sizeof median);             \
            /* a window of levels around it, inside 0 … 65535 */                        \
            words_t level = (median - margin) & (words_t)(median >= margin);            \
            const words_t over = (words_t)(level > top);                                \
            state[v].level[part] = (HALF_T)((level & ~over) | (top & over));            \
        }                                                                               \
        HALF_T level_key[PARTS];                                                        \
        for (int part = 0; part < PARTS; part++)                                        \
            level_key[part] = state[v].level[part] ^ KEY16;                             \
        lanes_t cumulative[LEVELS + 1];                                                 \
        for (int j = 0; j <= LEVELS; j++)                                               \
            cumulative[j] = (lanes_t){0} + bias;                                        \
        for (Py_ssize_t row = 0; row < kernel_size; row++) {                            \
            const signed_t key = NAME##_keys(ring[v] + row * LANES, level_key);         \
            for (int j = 0; j <= LEVELS; j++)                                           \
                cumulative[j] -= (lanes_t)(key < (SIGNED_T)j);                          \
        }                                                                               \
        for (int j = 0; j <= LEVELS; j++)                                               \
            state[v].cumulative[j] = cumulative[j];                                     \
    }                                                                                   \
}                                                                                       \
                                                                                        \
/* windows first:last (first > 0) of the vector at `column` with its ring and */        \
/* state; returns 0, or the window from which on it takes the sorted windows */         \
TARGET static Py_ssize_t                                                                \
NAME##_steps(const uint16_t *frames, uint16_t *out, Py_ssize_t pixels,                  \
             Py_ssize_t kernel_size, Py_ssize_t first, Py_ssize_t last,                 \
             Py_ssize_t column, uint16_t *ring, NAME##_state *state,                    \
             Py_ssize_t *rescanned, Py_ssize_t budget)                                  \
{                                                                                       \
    typedef NAME##_lanes lanes_t;                                                       \
    typedef NAME##_signed signed_t;                                                     \
    enum { LANES = NAME##_LANES, PARTS = NAME##_PARTS };                                \
    const LANE_T bias = (LANE_T)1 << (8 * sizeof(LANE_T) - 1);                          \
    const signed_t half = (signed_t)((lanes_t){0} + (LANE_T)(kernel_size / 2 + bias));  \
    HALF_T level[PARTS], level_key[PARTS];                                              \
    lanes_t cumulative[LEVELS + 1];                                                     \
    for (int part = 0; part < PARTS; part++) {                                          \
        level[part] = state->level[part];                                               \
        level_key[part] = level[part] ^ KEY16;                                          \
    }                                                                                   \
    for (int j = 0; j <= LEVELS; j++)                                                   \
        cumulative[j] = state->cumulative[j];                                           \
    /* the ring row of the frame that leaves the window t, which the entering */       \
    /* frame replaces */                                                                \
    Py_ssize_t slot = (first - 1) % kernel_size;                                        \
    for (Py_ssize_t t = first; t < last; t++) {                                         \
        const uint16_t *entering = frames + (t + kernel_size - 1) * pixels + column;    \
        uint16_t *replaced = ring + slot * LANES;                                       \
        const signed_t key = NAME##_keys(entering, level_key);                          \
        const signed_t leaving = NAME##_keys(replaced, level_key);                      \
        memcpy(replaced, entering, LANES * sizeof(uint16_t));                           \
        slot = slot + 1 < kernel_size ? slot + 1 : 0;                                   \
        for (int j = 0; j <= LEVELS; j++)                                               \
            cumulative[j] += (lanes_t)(leaving < (SIGNED_T)j) - (lanes_t)(key < (SIGNED_T)j); \
        /* the median is the highest level j of the window with at most half */        \
        /* of the elements below it */                                                  \
        lanes_t median = (lanes_t){0};                                                  \
        for (int j = 1; j < LEVELS; j++)                                                \
            median -= (lanes_t)((signed_t)cumulative[j] <= half);                       \
        const lanes_t above = (lanes_t)((signed_t)cumulative[LEVELS] <= half);          \
        const lanes_t outside = above | (lanes_t)((signed_t)cumulative[0] > half);      \
        if (__builtin_expect(ANY_LANE(outside), 0)) {                                   \
            uint16_t lane_level[LANES];                                                 \
            LANE_T lane_cumulative[LEVELS + 1][LANES], lost[LANES], up[LANES];          \
            memcpy(lane_level, level, sizeof lane_level);                               \
            memcpy(lane_cumulative, cumulative, sizeof lane_cumulative);                \
            memcpy(lost, &outside, sizeof lost);                                        \
            memcpy(up, &above, sizeof up);                                              \
            for (int lane = 0; lane < LANES; lane++) {                                  \
                if (!lost[lane])                                                        \
                    continue;                                                           \
                int moved_level = lane_level[lane], moved[LEVELS + 1];                  \
                for (int j = 0; j <= LEVELS; j++)                                       \
                    moved[j] = (LANE_T)(lane_cumulative[j][lane] - bias);               \
                move_window16(ring + lane, LANES, kernel_size, LEVELS, up[lane] != 0,   \
                              &moved_level, moved);                                     \
                lane_level[lane] = (uint16_t)moved_level;                               \
                for (int j = 0; j <= LEVELS; j++)                                       \
                    lane_cumulative[j][lane] = (LANE_T)(moved[j] + bias);               \
                *rescanned += kernel_size + RESCAN_OVERHEAD;                            \
            }                                                                           \
            if (*rescanned > LANES * (budget * t + RESCAN_ALLOWANCE(kernel_size)))      \
                return t;                                                               \
            memcpy(level, lane_level, sizeof lane_level);                               \
            memcpy(cumulative, lane_cumulative, sizeof lane_cumulative);                \
            for (int part = 0; part < PARTS; part++)                                    \
                level_key[part] = level[part] ^ KEY16;                                  \
            median = (lanes_t){0};                                                      \
            for (int j = 1; j < LEVELS; j++)                                            \
                median -= (lanes_t)((signed_t)cumulative[j] <= half);                   \
        }                                                                               \
        NAME##_store(out + t * pixels + column, (signed_t)median, level);               \
    }                                                                                   \
    for (int part = 0; part < PARTS; part++)                                            \
        state->level[part] = level[part];                                               \
    for (int j = 0; j <= LEVELS; j++)                                                   \
        state->cumulative[j] = cumulative[j];                                           \
    return 0;                                                                           \
}                                                                                       \
                                                                                        \
TARGET static int                                                                       \
NAME(const uint16_t *frames, uint16_t *out, Py_ssize_t pixels, Py_ssize_t kernel_size,  \
     Py_ssize_t output_size, Py_ssize_t start, Py_ssize_t width, uint16_t *sorted)      \
{                                                                                       \
    enum { LANES = NAME##_LANES };                                                      \
    const int to_lanes = kernel_size <= LANES_FALLBACK_MAX;                             \
    const Py_ssize_t budget = to_lanes ? LANES_BUDGET16(kernel_size) : RESCAN_BUDGET16;  \
    const Py_ssize_t vectors = (width + LANES - 1) / LANES;                             \
    char *state_memory = malloc(((size_t)vectors + 1) * sizeof(NAME##_state));          \
    /* per vector: its first column, the elements it read in move_window16, */         \
    /* the window from which on it takes the sorted lanes or windows (0: none) */       \
    Py_ssize_t *column = malloc(3 * (size_t)vectors * sizeof(Py_ssize_t));              \
    uint16_t **ring = malloc((size_t)vectors * sizeof(uint16_t *));                     \
    uint16_t *last_ring = width % LANES ? malloc((size_t)kernel_size * LANES * sizeof(uint16_t)) \
                                        : NULL;                                         \
    /* sort_ring's values and spare */                                                  \
    uint16_t *sorting = to_lanes ? malloc(2 * (size_t)kernel_size * sizeof(uint16_t)) : NULL; \
    int failed = state_memory == NULL || column == NULL || ring == NULL                 \
                 || (width % LANES && last_ring == NULL) || (to_lanes && sorting == NULL); \
    if (!failed) {                                                                      \
        NAME##_state *state = (NAME##_state *)(state_memory + VECTOR_BYTES              \
                                               - (uintptr_t)state_memory % VECTOR_BYTES); \
        Py_ssize_t *rescanned = column + vectors, *turned = column + 2 * vectors;       \
        for (Py_ssize_t v = 0; v < vectors; v++) {                                      \
            column[v] = start + (v * LANES < width - LANES ? v * LANES : width - LANES); \
            ring[v] = (v + 1) * LANES <= width ? sorted + v * LANES * kernel_size : last_ring; \
            rescanned[v] = turned[v] = 0;                                               \
        }                                                                               \
        NAME##_start(frames, out, pixels, kernel_size, vectors, column, ring, state);   \
        for (Py_ssize_t first = 1; first < output_size && !failed; first += WINDOW_CHUNK) { \
            const Py_ssize_t last = output_size - first > WINDOW_CHUNK ? first + WINDOW_CHUNK \
                                                                       : output_size;   \
            for (Py_ssize_t v = 0; v < vectors; v++) {                                  \
                Py_ssize_t from = first;                                                \
                /* on the sorted windows, a vector takes the columns that no */        \
                /* vector before it takes */                                            \
                const Py_ssize_t own = v * LANES;                                       \
                const Py_ssize_t own_width = width - own < LANES ? width - own : LANES; \
                uint16_t *own_sorted = sorted + own * kernel_size;                      \
                if (!turned[v]) {                                                       \
                    from = NAME##_steps(frames, out, pixels, kernel_size, first, last,  \
                                        column[v], ring[v], state + v, rescanned + v,   \
                                        budget);                                        \
                    if (from == 0)                                                      \
                        continue;                                                       \
                    turned[v] = from;                                                   \
                    if (to_lanes) {                                                     \
                        /* the ring holds the window `from`: sorted, its slots */      \
                        from = sort_ring(ring[v], LANES, kernel_size, out, pixels, from, \
                                         column[v], sorting, sorting + kernel_size);    \
                    }                                                                   \
                    else {                                                              \
                        failed = sorted_fill(frames + from * pixels, pixels, kernel_size, \
                                             start + own, own_width, own_sorted) < 0;   \
                        if (failed)                                                     \
                            break;                                                      \
                    }                                                                   \
                }                                                                       \
                if (to_lanes) {                                                         \
                    for (int part = 0; part < LANES; part += SORTED_LANES##_LANES)      \
                        SORTED_LANES##_steps(frames, out, pixels, kernel_size, from, last, \
                                             column[v] + part, ring[v] + part, LANES);  \
                    continue;                                                           \
                }                                                                       \
                /* the sorted windows' window 0 is this vector's window turned[v] */    \
                sorted_steps(frames + turned[v] * pixels, out + turned[v] * pixels, pixels, \
                             kernel_size, from - turned[v], last - turned[v], start + own, \
                             own_width, own_sorted);                                    \
            }                                                                           \
        }                                                                               \
    }                                                                                   \
    free(state_memory);                                                                 \
    free(column);                                                                       \
    free(ring);                                                                         \
    free(last_ring);                                                                    \
    free(sorting);                                                                      \
    return failed ? -1 : 0;                                                             \
}
#endif

/*
 * The sorted-lanes kernel, for 16-bit values and short windows: each lane
 * keeps its whole window sorted, as kernel_size vectors (slot i holds the
 * element of rank i of every lane's window). A step removes the leaving value
 * (the slots from its rank on take the next slot's value) and inserts the
 * entering one (slot i becomes max(slot i-1, min(slot i, value))) with a
 * compare, a blend, a min and a max per slot, the same in every lane: it does
 * not depend on how far the medians move, which in short windows of noisy
 * 16-bit values is too far for any window of levels. Values are kept as
 * keys (value ^ KEY16) in signed lanes, whose min and max SSE2 has.
 *
 * DEFINE_SORTED_LANES_MEDIAN defines NAME(frames, out, pixels, kernel_size,
 * output_size, start, width, sorted) for vectors of VECTOR_BYTES bytes and
 * kernel sizes up to SORTED_LANES_MAX, on columns at least one vector wide.
 * The slots of whole vectors are their columns' rows of `sorted`; the last
 * vector of a width that is no multiple of the lanes has slots of its own.
 * Returns -1 if it could not allocate them.
 */
#define SORTED_LANES_MAX 56

/* The lanes of `a` where `mask` is set, of `b` elsewhere */
#define LANES_SELECT(mask, a, b) (((a) & (mask)) | ((b) & ~(mask)))
#define LANES_MIN(a, b) LANES_SELECT((a) < (b), a, b)
#define LANES_MAX(a, b) LANES_SELECT((a) > (b), a, b)

#define DEFINE_SORTED_LANES_MEDIAN(NAME, TARGET, VECTOR_BYTES, MIN, MAX)                \
typedef int16_t NAME##_words __attribute__((vector_size(VECTOR_BYTES)));                \
enum { NAME##_LANES = VECTOR_BYTES / 2 };                                               \
                                                                                        \
/* the keys of the pixels at `pixel` and on */                                          \
TARGET static inline NAME##_words                                                       \
NAME##_keys(const uint16_t *pixel)                                                      \
{                                                                                       \
    NAME##_words values;                                                                \
    memcpy(&values, pixel, sizeof values);                                              \
    return values ^ KEY16;                                                              \
}                                                                                       \
                                                                                        \
/* the sorted slots of `size` keys, `stride` values apart, with `key` inserted */     \
TARGET static inline void                                                               \
NAME##_insert(uint16_t *slots, Py_ssize_t size, NAME##_words key, Py_ssize_t stride)    \
{                                                                                       \
    typedef NAME##_words words_t;                                                       \
    words_t before = (words_t){0} + KEY16; /* the smallest key */                       \
    for (Py_ssize_t i = 0; i <= size; i++) {                                            \
        words_t here = (words_t){0} + (int16_t)0x7FFF; /* past the end: the largest */  \
        if (i < size)                                                                   \
            memcpy(&here, slots + i * stride, sizeof here);                             \
        const words_t placed = MAX(before, MIN(here, key));                             \
        memcpy(slots + i * stride, &placed, sizeof placed);                             \
        before = here;                                                                  \
    }                                                                                   \
}                                                                                       \
                                                                                        \
/* windows first:last of the vector at `column` (first > 0: with the window */          \
/* first - 1 in its slots; first == 0: with its first kernel_size - 1 rows), */         \
/* its slots `stride` values apart */                                                   \
TARGET static void                                                                      \
NAME##_steps(const uint16_t *frames, uint16_t *out, Py_ssize_t pixels,                  \
             Py_ssize_t kernel_size, Py_ssize_t first, Py_ssize_t last,                 \
             Py_ssize_t column, uint16_t *slots, Py_ssize_t stride)                     \
{                                                                                       \
    typedef NAME##_words words_t;                                                       \
    const words_t largest = (words_t){0} + (int16_t)0x7FFF;                             \
    for (Py_ssize_t t = first; t < last; t++) {                                         \
        const uint16_t *entering = frames + (t + kernel_size - 1) * pixels + column;    \
        const words_t key = NAME##_keys(entering);                                      \
        if (t == 0) {                                                                   \
            NAME##_insert(slots, kernel_size - 1, key, stride);                         \
        }                                                                               \
        else {                                                                          \
            const words_t leaving = NAME##_keys(entering - kernel_size * pixels);       \
            /* slot i of the window without the leaving key: kept[i]; of the */        \
            /* window with the entering key too: max(kept[i-1], min(kept[i], key)) */  \
            words_t here, before = (words_t){0} + KEY16;                                \
            memcpy(&here, slots, sizeof here);                                          \
            for (Py_ssize_t i = 0; i < kernel_size; i++) {                              \
                words_t next = largest, kept = largest;                                 \
                if (i + 1 < kernel_size) {                                              \
                    memcpy(&next, slots + (i + 1) * stride, sizeof next);               \
                    kept = LANES_SELECT(here < leaving, here, next);                    \
                }                                                                       \
                const words_t placed = MAX(before, MIN(kept, key));                     \
                memcpy(slots + i * stride, &placed, sizeof placed);                     \
                before = kept;                                                          \
                here = next;                                                            \
            }                                                                           \
        }                                                                               \
        words_t median;                                                                 \
        memcpy(&median, slots + kernel_size / 2 * stride, sizeof median);               \
        median ^= KEY16;                                                                \
        memcpy(out + t * pixels + column, &median, sizeof median);                      \
    }                                                                                   \
}                                                                                       \
                                                                                        \
TARGET static int                                                                       \
NAME(const uint16_t *frames, uint16_t *out, Py_ssize_t pixels, Py_ssize_t kernel_size,  \
     Py_ssize_t output_size, Py_ssize_t start, Py_ssize_t width, uint16_t *sorted)      \
{                                                                                       \
    enum { LANES = NAME##_LANES };                                                      \
    const Py_ssize_t vectors = (width + LANES - 1) / LANES;                             \
    uint16_t *last_slots = width % LANES                                                \
        ? malloc((size_t)kernel_size * LANES * sizeof(uint16_t)) : NULL;                \
    if (width % LANES && last_slots == NULL)                                            \
        return -1;                                                                      \
    for (Py_ssize_t v = 0; v < vectors; v++) {                                          \
        const Py_ssize_t column = v * LANES < width - LANES ? v * LANES : width - LANES; \
        uint16_t *slots = (v + 1) * LANES <= width ? sorted + v * LANES * kernel_size   \
                                                   : last_slots;                        \
        for (Py_ssize_t row = 0; row < kernel_size - 1; row++)                          \
            NAME##_insert(slots, row, NAME##_keys(frames + row * pixels + start + column), \
                          LANES);                                                       \
    }                                                                                   \
    /* a few windows of each vector in turn: the vectors read a frame's */              \
    /* consecutive bytes one after the other, which the prefetchers follow */           \
    for (Py_ssize_t first = 0; first < output_size; first += WINDOW_CHUNK) {            \
        const Py_ssize_t last = output_size - first > WINDOW_CHUNK ? first + WINDOW_CHUNK \
                                                                   : output_size;       \
        for (Py_ssize_t v = 0; v < vectors; v++) {                                      \
            const Py_ssize_t column = v * LANES < width - LANES ? v * LANES : width - LANES; \
            uint16_t *slots = (v + 1) * LANES <= width ? sorted + v * LANES * kernel_size \
                                                       : last_slots;                    \
            NAME##_steps(frames, out, pixels, kernel_size, first, last, start + column, slots, \
                         LANES);                                                        \
        }                                                                               \
    }                                                                                   \
    free(last_slots);                                                                   \
    return 0;                                                                           \
}

#ifdef HAVE_SIMD128
typedef int16_t int16_vector128 __attribute__((vector_size(16)));
typedef int8_t int8_vector128 __attribute__((vector_size(16)));
#if defined(__SSE2__) && !defined(DCBG_GENERIC_VECTORS)
#define SUBTRACT_128(a, b) ((int16_vector128)_mm_subs_epi16((__m128i)(a), (__m128i)(b)))
#define NARROW_128(low, high) ((int8_vector128)_mm_packs_epi16((__m128i)(low), (__m128i)(high)))
#define WIDEN_LOW_128(bytes) \
    ((int16_vector128)_mm_unpacklo_epi8((__m128i)(bytes), _mm_setzero_si128()))
#define WIDEN_HIGH_128(bytes) \
    ((int16_vector128)_mm_unpackhi_epi8((__m128i)(bytes), _mm_setzero_si128()))
#define MIN_128(a, b) ((int16_vector128)_mm_min_epi16((__m128i)(a), (__m128i)(b)))
#define MAX_128(a, b) ((int16_vector128)_mm_max_epi16((__m128i)(a), (__m128i)(b)))
#else
/* Without SSE2's saturating instructions: keys clamped to -1 … 127, which
 * tell below, inside and above the window apart just as well */
typedef uint16_t uint16_vector128 __attribute__((vector_size(16)));
typedef int16_t int16_pair128 __attribute__((vector_size(32)));
typedef uint16_t uint16_pair128 __attribute__((vector_size(32)));
typedef uint8_t uint8_vector128 __attribute__((vector_size(16)));
static inline int16_vector128
subtract_128(int16_vector128 a, int16_vector128 b)
{
    const int16_vector128 below = a < b;
    uint16_vector128 difference = (uint16_vector128)(a - b);
    const uint16_vector128 large = (uint16_vector128)(difference > 127);
    difference = (difference & ~large) | (127 & large);
    return (int16_vector128)difference | below;
}
static inline int8_vector128
narrow_128(int16_vector128 low, int16_vector128 high)
{
    int16_pair128 both;
    memcpy(&both, &low, sizeof low);
    memcpy((char *)&both + sizeof low, &high, sizeof high);
    return __builtin_convertvector(both, int8_vector128);
}
static inline int16_vector128
widen_128(int8_vector128 bytes, int high)
{
    const uint16_pair128 both = __builtin_convertvector((uint8_vector128)bytes,
                                                          uint16_pair128);
    int16_vector128 words;
    memcpy(&words, (const char *)&both + (high ? sizeof words : 0), sizeof words);
    return words;
}
#define SUBTRACT_128 subtract_128
#define NARROW_128 narrow_128
#define WIDEN_LOW_128(bytes) widen_128(bytes, 0)
#define WIDEN_HIGH_128(bytes) widen_128(bytes, 1)
#define MIN_128 LANES_MIN
#define MAX_128 LANES_MAX
#endif
DEFINE_SORTED_LANES_MEDIAN(sorted_lanes_simd128, , 16, MIN_128, MAX_128)
DEFINE_KEYS_IN_BYTES(values16_counts8_levels32_simd128, , int16_vector128, int8_vector128,
                     SUBTRACT_128, NARROW_128, WIDEN_LOW_128, WIDEN_HIGH_128)
DEFINE_WINDOW16_MEDIAN(values16_counts8_levels32_simd128, , 16, uint8_t, int8_t, 32,
                       ANY_LANE_128, int16_vector128, sorted_lanes_simd128)
DEFINE_KEYS_IN_BYTES(values16_counts8_levels24_simd128, , int16_vector128, int8_vector128,
                     SUBTRACT_128, NARROW_128, WIDEN_LOW_128, WIDEN_HIGH_128)
DEFINE_WINDOW16_MEDIAN(values16_counts8_levels24_simd128, , 16, uint8_t, int8_t, 24,
                       ANY_LANE_128, int16_vector128, sorted_lanes_simd128)
DEFINE_KEYS_IN_WORDS(values16_counts16_levels12_simd128, , int16_vector128, SUBTRACT_128)
DEFINE_WINDOW16_MEDIAN(values16_counts16_levels12_simd128, , 16, uint16_t, int16_t, 12,
                       ANY_LANE_128, int16_vector128, sorted_lanes_simd128)
#endif

#ifdef HAVE_AVX2
typedef int16_t int16_vector256 __attribute__((vector_size(32)));
typedef int8_t int8_vector256 __attribute__((vector_size(32)));
#define SUBTRACT_256(a, b) ((int16_vector256)_mm256_subs_epi16((__m256i)(a), (__m256i)(b)))
/* AVX2 packs each half of a vector on its own; the permutation puts the lanes in order */
#define NARROW_256(low, high) ((int8_vector256)_mm256_permute4x64_epi64(                  \
    _mm256_packs_epi16((__m256i)(low), (__m256i)(high)), 0xD8))
#define WIDEN_LOW_256(bytes) \
    ((int16_vector256)_mm256_cvtepu8_epi16(_mm256_castsi256_si128((__m256i)(bytes))))
#define WIDEN_HIGH_256(bytes) \
    ((int16_vector256)_mm256_cvtepu8_epi16(_mm256_extracti128_si256((__m256i)(bytes), 1)))
#define MIN_256(a, b) ((int16_vector256)_mm256_min_epi16((__m256i)(a), (__m256i)(b)))
#define MAX_256(a, b) ((int16_vector256)_mm256_max_epi16((__m256i)(a), (__m256i)(b)))
DEFINE_SORTED_LANES_MEDIAN(sorted_lanes_avx2, TARGET_AVX2, 32, MIN_256, MAX_256)
DEFINE_KEYS_IN_BYTES(values16_counts8_levels32_avx2, TARGET_AVX2, int16_vector256,
                     int8_vector256, SUBTRACT_256, NARROW_256, WIDEN_LOW_256, WIDEN_HIGH_256)
DEFINE_WINDOW16_MEDIAN(values16_counts8_levels32_avx2, TARGET_AVX2, 32, uint8_t, int8_t, 32,
                       ANY_LANE_256, int16_vector256, sorted_lanes_avx2)
DEFINE_KEYS_IN_BYTES(values16_counts8_levels24_avx2, TARGET_AVX2, int16_vector256,
                     int8_vector256, SUBTRACT_256, NARROW_256, WIDEN_LOW_256, WIDEN_HIGH_256)
DEFINE_WINDOW16_MEDIAN(values16_counts8_levels24_avx2, TARGET_AVX2, 32, uint8_t, int8_t, 24,
                       ANY_LANE_256, int16_vector256, sorted_lanes_avx2)
DEFINE_KEYS_IN_WORDS(values16_counts16_levels12_avx2, TARGET_AVX2, int16_vector256,
                     SUBTRACT_256)
DEFINE_WINDOW16_MEDIAN(values16_counts16_levels12_avx2, TARGET_AVX2, 32, uint16_t, int16_t, 12,
                       ANY_LANE_256, int16_vector256, sorted_lanes_avx2)
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

/*
 * The median of 16-bit values in columns start:start+width with the fastest
 * implementation up to `implementation` that takes this kernel size and
 * width: the sorted lanes up to kernel_size SORTED_LANES_MAX, whose cost
 * grows with it, then the window kernel, which counts in lanes of 8 bits up
 * to kernel_size 255 (with more levels below SHORT_KERNEL16, whose medians
 * move further) and of 16 bits up to 65535. Both need a vector of columns;
 * the sorted windows take the rest. Returns -1 if it could not allocate its
 * scratch.
 */
#define SHORT_KERNEL16 160

static int
median_columns16(int implementation, const uint16_t *frames, uint16_t *out, Py_ssize_t pixels,
                 Py_ssize_t kernel_size, Py_ssize_t output_size, Py_ssize_t start,
                 Py_ssize_t width, uint16_t *sorted)
{
#if defined(HAVE_SIMD128) || defined(HAVE_AVX2)
    const int lane_bytes = kernel_size <= 0xFF ? 1 : kernel_size <= 0xFFFF ? 2 : 0;
    int (*kernel)(const uint16_t *, uint16_t *, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                  Py_ssize_t, uint16_t *) = NULL;
#ifdef HAVE_SIMD128
    if (implementation >= SIMD128 && kernel_size <= SORTED_LANES_MAX && width >= 8)
        kernel = sorted_lanes_simd128;
    else if (implementation >= SIMD128 && lane_bytes && width >= 16 / lane_bytes)
        kernel = lane_bytes == 2 ? values16_counts16_levels12_simd128
                 : kernel_size < SHORT_KERNEL16 ? values16_counts8_levels32_simd128
                                                : values16_counts8_levels24_simd128;
#endif
#ifdef HAVE_AVX2
    if (implementation >= AVX2 && kernel_size <= SORTED_LANES_MAX && width >= 16)
        kernel = sorted_lanes_avx2;
    else if (implementation >= AVX2 && lane_bytes && width >= 32 / lane_bytes)
        kernel = lane_bytes == 2 ? values16_counts16_levels12_avx2
                 : kernel_size < SHORT_KERNEL16 ? values16_counts8_levels32_avx2
                                                : values16_counts8_levels24_avx2;
#endif
    if (kernel != NULL)
        return kernel(frames, out, pixels, kernel_size, output_size, start, width, sorted);
#else
    (void)implementation;
#endif
    if (sorted_fill(frames, pixels, kernel_size, start, width, sorted) < 0)
        return -1;
    sorted_steps(frames, out, pixels, kernel_size, 0, output_size, start, width, sorted);
    return 0;
}

/* A C-contiguous 2-D buffer of unsigned integers of `obj` whose item size is
 * one of those in `sizes` (a bit per size: 1 << 1 for 1 byte, ...), which
 * `sizes_text` names */
static int
get_matrix(PyObject *obj, Py_buffer *view, int writable, unsigned sizes, const char *sizes_text,
           const char *name)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return -1;
    int unsigned_integer = view->format != NULL && view->format[0] != '\0'
                           && strchr("BHIL", view->format[0]) != NULL
                           && view->format[1] == '\0';
    if (view->ndim != 2 || !unsigned_integer || view->itemsize > 8
        || !(sizes & (1u << view->itemsize))) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be a C-contiguous 2-D array of unsigned integers of %s",
                     name, sizes_text);
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
"frames[t:t+kernel_size, p] for t < output_size. frames and out are both\n"
"uint8 or both uint16. counts is scratch space: for uint8 frames of shape\n"
"(stop - start, 256) whose unsigned type holds kernel_size, for uint16\n"
"frames uint16 of shape (stop - start, kernel_size).\n"
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
    if (get_matrix(frames_obj, &frames, 0, 1u << 1 | 1u << 2, "1 or 2 bytes", "frames") < 0)
        return NULL;
    const int wide = frames.itemsize == 2; /* 16-bit values */
    if (get_matrix(out_obj, &out, 1, 1u << frames.itemsize,
                   wide ? "2 bytes, as frames" : "1 byte, as frames", "out") < 0) {
        PyBuffer_Release(&frames);
        return NULL;
    }
    if (get_matrix(counts_obj, &counts, 1, wide ? 1u << 2 : 1u << 1 | 1u << 2 | 1u << 4,
                   wide ? "2 bytes for uint16 frames" : "1, 2 or 4 bytes", "counts") < 0) {
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
    else if (wide && (counts.shape[0] != width || counts.shape[1] != kernel_size))
        error = "counts must have the shape (stop - start, kernel_size) for uint16 frames";
    else if (!wide && (counts.shape[0] != width || counts.shape[1] != BINS))
        error = "counts must have the shape (stop - start, 256)";
    else if (!wide && (uint64_t)kernel_size > most)
        error = "counts has too narrow a type for kernel_size";
    int out_of_memory = 0;
    if (error == NULL && width > 0 && output_size > 0) {
        Py_BEGIN_ALLOW_THREADS
        if (wide)
            out_of_memory = median_columns16(implementation, frames.buf, out.buf, pixels,
                                             kernel_size, output_size, start, width,
                                             counts.buf) < 0;
        else
            out_of_memory = median_columns(implementation, frames.buf, out.buf, pixels,
                                           kernel_size, output_size, start, width,
                                           counts.buf, counts.itemsize) < 0;
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
"'avx2' and 'simd128' (the vector kernels on 32- and 16-byte vectors) where\n"
"built and supported, and 'scalar' (the histogram kernel for uint8 frames,\n"
"the sorted windows for uint16) always.");

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

/* The column loops of one item size: ITEM_T is the unsigned type of the values */
#define COLUMN_KERNELS(SUFFIX, ITEM_T)                                                       \
static void                                                                                  \
gather_rows##SUFFIX(const ITEM_T *source, Py_ssize_t pixels, const int64_t *index,           \
                    ITEM_T *out, Py_ssize_t rows, Py_ssize_t width)                          \
{                                                                                            \
    for (Py_ssize_t row = 0; row < rows; row++) {                                            \
        const ITEM_T *from = source + row * pixels;                                          \
        const ITEM_T *ahead = row + 1 < rows ? from + pixels : from;                         \
        ITEM_T *to = out + row * width;                                                      \
        for (Py_ssize_t j = 0; j < width; j++) {                                             \
            if (j % PREFETCH_EVERY == 0)                                                     \
                PREFETCH(ahead + index[j]);                                                  \
            to[j] = from[index[j]];                                                          \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
static Py_ssize_t                                                                            \
differing_row##SUFFIX(const ITEM_T *actual, Py_ssize_t pixels, const int64_t *index,         \
                      const ITEM_T *expected, Py_ssize_t rows, Py_ssize_t width)             \
{                                                                                            \
    for (Py_ssize_t row = 0; row < rows; row++) {                                            \
        const ITEM_T *got = actual + row * pixels;                                           \
        const ITEM_T *ahead = row + 1 < rows ? got + pixels : got;                           \
        const ITEM_T *want = expected + row * width;                                         \
        /* a row's differences ORed without a branch; it is searched only if any */          \
        unsigned differs = 0;                                                                \
        if (index == NULL)                                                                   \
            differs = memcmp(got, want, (size_t)width * sizeof(ITEM_T)) != 0;                \
        else                                                                                 \
            for (Py_ssize_t j = 0; j < width; j++) {                                         \
                if (j % PREFETCH_EVERY == 0)                                                 \
                    PREFETCH(ahead + index[j]);                                              \
                differs |= (unsigned)(got[index[j]] ^ want[j]);                              \
            }                                                                                \
        for (Py_ssize_t j = 0; differs && j < width; j++)                                    \
            if (got[index == NULL ? j : index[j]] != want[j])                                \
                return row * width + j;                                                      \
    }                                                                                        \
    return -1;                                                                               \
}

COLUMN_KERNELS(8, uint8_t)
COLUMN_KERNELS(16, uint16_t)

PyDoc_STRVAR(gather_columns_doc,
"gather_columns(source, columns, out)\n"
"--\n\n"
"out[r, j] = source[r, columns[j]] for every row r of out.\n\n"
"source and out are C-contiguous 2-D arrays of unsigned integers of 1 or 2\n"
"bytes (both of the same size), out with at most as many rows as source and\n"
"one column per entry of columns (int64, each a column of source). Runs\n"
"without the GIL.");

static PyObject *
gather_columns(PyObject *self, PyObject *args)
{
    PyObject *source_obj, *columns_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "OOO:gather_columns", &source_obj, &columns_obj, &out_obj))
        return NULL;
    Py_buffer source, columns, out;
    if (get_matrix(source_obj, &source, 0, 1u << 1 | 1u << 2, "1 or 2 bytes", "source") < 0)
        return NULL;
    if (get_columns(columns_obj, &columns, source.shape[1]) < 0) {
        PyBuffer_Release(&source);
        return NULL;
    }
    if (get_matrix(out_obj, &out, 1, 1u << source.itemsize,
                   source.itemsize == 2 ? "2 bytes, as source" : "1 byte, as source",
                   "out") < 0) {
        PyBuffer_Release(&source);
        PyBuffer_Release(&columns);
        return NULL;
    }
    const Py_ssize_t pixels = source.shape[1], rows = out.shape[0], width = out.shape[1];
    const int fits = rows <= source.shape[0] && width == columns.shape[0];
    if (fits) {
        const int64_t *index = columns.buf;
        Py_BEGIN_ALLOW_THREADS
        if (source.itemsize == 2)
            gather_rows16(source.buf, pixels, index, out.buf, rows, width);
        else
            gather_rows8(source.buf, pixels, index, out.buf, rows, width);
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
"actual and expected are C-contiguous 2-D arrays of unsigned integers of 1\n"
"or 2 bytes (both of the same size), actual with at least the rows of\n"
"expected. Runs without the GIL.");

static PyObject *
first_difference(PyObject *self, PyObject *args)
{
    PyObject *actual_obj, *columns_obj, *expected_obj;
    if (!PyArg_ParseTuple(args, "OOO:first_difference", &actual_obj, &columns_obj,
                          &expected_obj))
        return NULL;
    Py_buffer actual, columns, expected;
    const int every = columns_obj == Py_None;
    if (get_matrix(actual_obj, &actual, 0, 1u << 1 | 1u << 2, "1 or 2 bytes", "actual") < 0)
        return NULL;
    if (!every && get_columns(columns_obj, &columns, actual.shape[1]) < 0) {
        PyBuffer_Release(&actual);
        return NULL;
    }
    if (get_matrix(expected_obj, &expected, 0, 1u << actual.itemsize,
                   actual.itemsize == 2 ? "2 bytes, as actual" : "1 byte, as actual",
                   "expected") < 0) {
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
        if (actual.itemsize == 2)
            found = differing_row16(actual.buf, pixels, index, expected.buf, rows, width);
        else
            found = differing_row8(actual.buf, pixels, index, expected.buf, rows, width);
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
