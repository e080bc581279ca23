/*
 * dcbg's two CPU kernels in C: the rolling median of pixel columns and HDF5's
 * Fletcher-32 checksum. They compute exactly what jit.py computes (the same
 * loops, compiled by numba there); pip builds this module when it installs
 * dcbg, so that a process does not pay for importing numba and loading its
 * cache. Both release the GIL, so threads run them in parallel.
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
 */
#define DEFINE_ROLLING_MEDIAN(NAME, COUNT_T)                                            \
    static void NAME(const uint8_t *frames, uint8_t *out, Py_ssize_t pixels,            \
                     Py_ssize_t kernel_size, Py_ssize_t output_size,                    \
                     Py_ssize_t start, Py_ssize_t width, COUNT_T *counts,               \
                     int32_t *median, int32_t *below)                                   \
    {                                                                                   \
        const int32_t half = (int32_t)(kernel_size / 2);                                \
        memset(counts, 0, (size_t)width * BINS * sizeof(COUNT_T));                      \
        for (Py_ssize_t row = 0; row < kernel_size - 1; row++) {                        \
            const uint8_t *entering = frames + row * pixels + start;                    \
            for (Py_ssize_t j = 0; j < width; j++)                                      \
                counts[j * BINS + entering[j]]++;                                       \
        }                                                                               \
        for (Py_ssize_t t = 0; t < output_size; t++) {                                  \
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

DEFINE_ROLLING_MEDIAN(rolling_median_u8, uint8_t)
DEFINE_ROLLING_MEDIAN(rolling_median_u16, uint16_t)
DEFINE_ROLLING_MEDIAN(rolling_median_u32, uint32_t)

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

PyDoc_STRVAR(rolling_median_columns_doc,
"rolling_median_columns(frames, out, kernel_size, output_size, start, stop, counts)\n"
"--\n\n"
"Rolling median of the pixel columns start:stop of frames.\n\n"
"out[t, p] becomes the element of rank kernel_size // 2 of\n"
"frames[t:t+kernel_size, p] for t < output_size. counts is scratch space\n"
"of shape (stop - start, 256) whose unsigned type holds kernel_size; the\n"
"kernel zeroes it. Runs without the GIL.");

static PyObject *
rolling_median_columns(PyObject *self, PyObject *args)
{
    PyObject *frames_obj, *out_obj, *counts_obj;
    Py_ssize_t kernel_size, output_size, start, stop;
    if (!PyArg_ParseTuple(args, "OOnnnnO:rolling_median_columns", &frames_obj, &out_obj,
                          &kernel_size, &output_size, &start, &stop, &counts_obj))
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
        int32_t *state = calloc(2 * (size_t)width, sizeof(int32_t));
        if (state == NULL) {
            out_of_memory = 1;
        }
        else {
            Py_BEGIN_ALLOW_THREADS
            switch (counts.itemsize) {
            case 1:
                rolling_median_u8(frames.buf, out.buf, pixels, kernel_size, output_size, start,
                                  width, counts.buf, state, state + width);
                break;
            case 2:
                rolling_median_u16(frames.buf, out.buf, pixels, kernel_size, output_size,
                                   start, width, counts.buf, state, state + width);
                break;
            default:
                rolling_median_u32(frames.buf, out.buf, pixels, kernel_size, output_size,
                                   start, width, counts.buf, state, state + width);
            }
            Py_END_ALLOW_THREADS
            free(state);
        }
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

static PyMethodDef methods[] = {
    {"rolling_median_columns", rolling_median_columns, METH_VARARGS,
     rolling_median_columns_doc},
    {"fletcher32", fletcher32, METH_O, fletcher32_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_compiled",
    "dcbg's CPU kernels compiled from C (see dcbg.cpukernels)", -1, methods,
};

PyMODINIT_FUNC
PyInit__compiled(void)
{
    return PyModule_Create(&module);
}
