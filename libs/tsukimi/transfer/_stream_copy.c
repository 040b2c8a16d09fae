/* Large copies with non-temporal (streaming) stores, for the transfer engine's shm path.
 *
 * A copy of a block into another process's shared memory (or out of it into a worker's buffer) is not read
 * back by the copying core soon. glibc's memcpy streams only above a threshold derived from the shared
 * cache size, which on VMs that report a large L3 is far above a KV block: below it every destination line is
 * first read into the cache (read-for-ownership), so each byte crosses the memory bus three times instead of
 * two. Streaming stores skip that read; measured on this project's 2-core VMs, 256 KiB copies ran 1.5-2x
 * faster. Smaller copies (below STREAM_MIN_BYTES) keep cached stores: their destination is likely used from
 * cache; glibc's memcpy makes them, except from 4 KiB up when source and destination are not aligned alike.
 *
 * copy(dst, src): dst a writable buffer, src a readable buffer of the same length; the GIL is released.
 * copy_at(dst, dst_offset, src, src_offset, n): the same for n bytes at offsets (no slice objects per copy).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#include <xmmintrin.h>
#define HAVE_STREAMING_STORES 1
#else
#define HAVE_STREAMING_STORES 0
#endif

#define STREAM_MIN_BYTES (64 * 1024)
#define MISALIGNED_MIN_BYTES 4096
#define PAGE 4096

static void stream_copy(char *dst, const char *src, size_t n)
{
#if HAVE_STREAMING_STORES
    if (n >= STREAM_MIN_BYTES) {
        size_t head = (64 - ((uintptr_t)dst & 63)) & 63;
        memcpy(dst, src, head);
        dst += head;
        src += head;
        n -= head;
        /* Four pages at a time, a cache line from each in turn (as glibc's large memcpy does): four streams
         * for the prefetchers instead of one. */
        size_t body = n & ~(size_t)(4 * PAGE - 1);
        for (size_t base = 0; base < body; base += 4 * PAGE) {
            for (size_t off = 0; off < PAGE; off += 64) {
                for (size_t p = 0; p < 4; p++) {
                    const char *from = src + base + p * PAGE + off;
                    char *to = dst + base + p * PAGE + off;
                    _mm_prefetch(from + 128, _MM_HINT_T0);
                    __m128i a = _mm_loadu_si128((const __m128i *)from);
                    __m128i b = _mm_loadu_si128((const __m128i *)(from + 16));
                    __m128i c = _mm_loadu_si128((const __m128i *)(from + 32));
                    __m128i d = _mm_loadu_si128((const __m128i *)(from + 48));
                    _mm_stream_si128((__m128i *)to, a);
                    _mm_stream_si128((__m128i *)(to + 16), b);
                    _mm_stream_si128((__m128i *)(to + 32), c);
                    _mm_stream_si128((__m128i *)(to + 48), d);
                }
            }
        }
        /* NOTE: streaming stores are weakly ordered; the fence makes them visible before whatever the caller
         * does next (telling another process the bytes are there). */
        _mm_sfence();
        dst += body;
        src += body;
        n -= body;
    }
    if (n >= MISALIGNED_MIN_BYTES && ((uintptr_t)dst - (uintptr_t)src) & 63) {
        /* glibc's memcpy uses REP MOVSB in this range, which some CPUs run several times slower when source and
         * destination are not aligned alike (measured on an AMD EPYC: 1.5-2.8 GB/s instead of 7): a plain
         * unaligned SIMD loop does not care. */
        size_t body = n & ~(size_t)63;
        for (size_t off = 0; off < body; off += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(src + off));
            __m128i b = _mm_loadu_si128((const __m128i *)(src + off + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + off + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + off + 48));
            _mm_storeu_si128((__m128i *)(dst + off), a);
            _mm_storeu_si128((__m128i *)(dst + off + 16), b);
            _mm_storeu_si128((__m128i *)(dst + off + 32), c);
            _mm_storeu_si128((__m128i *)(dst + off + 48), d);
        }
        dst += body;
        src += body;
        n -= body;
    }
#endif
    memcpy(dst, src, n);
}

/* n bytes from s to d with the GIL released: a memmove when the ranges overlap, else stream_copy. */
static void copy_released(char *d, const char *s, size_t n)
{
    int overlap = d < s + n && s < d + n;
    Py_BEGIN_ALLOW_THREADS
    if (overlap)
        memmove(d, s, n);
    else
        stream_copy(d, s, n);
    Py_END_ALLOW_THREADS
}

static PyObject *copy(PyObject *self, PyObject *args)
{
    Py_buffer dst, src;
    if (!PyArg_ParseTuple(args, "w*y*:copy", &dst, &src))
        return NULL;
    PyObject *result = NULL;
    if (dst.len != src.len) {
        PyErr_Format(PyExc_ValueError, "copy: destination has %zd bytes, source %zd", dst.len, src.len);
    } else if (!PyBuffer_IsContiguous(&dst, 'C') || !PyBuffer_IsContiguous(&src, 'C')) {
        PyErr_SetString(PyExc_ValueError, "copy: buffers must be contiguous");
    } else {
        copy_released(dst.buf, src.buf, (size_t)dst.len);
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    return result;
}

static PyObject *copy_at(PyObject *self, PyObject *args)
{
    Py_buffer dst, src;
    Py_ssize_t dst_offset, src_offset, n;
    if (!PyArg_ParseTuple(args, "w*ny*nn:copy_at", &dst, &dst_offset, &src, &src_offset, &n))
        return NULL;
    PyObject *result = NULL;
    if (dst_offset < 0 || src_offset < 0 || n < 0 || dst_offset > dst.len - n || src_offset > src.len - n) {
        PyErr_Format(PyExc_ValueError, "copy_at: %zd bytes at %zd of %zd / at %zd of %zd are out of range", n,
                     dst_offset, dst.len, src_offset, src.len);
    } else if (!PyBuffer_IsContiguous(&dst, 'C') || !PyBuffer_IsContiguous(&src, 'C')) {
        PyErr_SetString(PyExc_ValueError, "copy_at: buffers must be contiguous");
    } else {
        copy_released((char *)dst.buf + dst_offset, (const char *)src.buf + src_offset, (size_t)n);
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    return result;
}

static PyMethodDef methods[] = {
    {"copy", copy, METH_VARARGS, "copy(dst, src): dst[:] = src with streaming stores for large copies."},
    {"copy_at", copy_at, METH_VARARGS,
     "copy_at(dst, dst_offset, src, src_offset, n): dst[dst_offset:][:n] = src[src_offset:][:n], as copy does."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_stream_copy", "Large copies with non-temporal stores.", -1, methods,
};

PyMODINIT_FUNC PyInit__stream_copy(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL)
        PyModule_AddIntConstant(m, "STREAM_MIN_BYTES", STREAM_MIN_BYTES);
    return m;
}
