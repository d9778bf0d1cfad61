/*
 * tvix_store._cdc: the hot loop of content-defined chunking (FastCDC-style gear hash with
 * normalized chunking), as a small CPython extension (plain C API).
 *
 * This file only finds cut points. Chunk parameters, the streaming state and the pure-Python
 * reference implementation (which must give identical cut points) live in
 * tvix_store/chunker.py; read its docstring for the algorithm. It is NOT a hasher and does
 * no I/O. The GIL is released while a buffer is scanned.
 *
 * scan(data, pos, hash, min_size, normal_size, max_size, mask_s, mask_l) -> (cuts, pos, hash)
 *   data: any contiguous buffer; pos/hash: the state carried over from the previous buffer
 *   (bytes of the current unfinished chunk, gear hash); cuts: list of offsets into `data`
 *   where a chunk ends (exclusive), ascending.
 * gear_table() -> tuple of the 256 gear values (for the test comparing both implementations).
 * cut2020(data, gear, min_size, avg_size, max_size, mask_s, mask_l) -> length of the first chunk
 *   FastCDC 2020 (normalization level 1, two bytes per step) exactly as the Rust `fastcdc`
 *   crate's `v2020::cut` (the chunker of tvix/snix's object-store layout); `gear` is its
 *   256-entry table as 2048 bytes of native-endian u64 (chunking/v2020.py builds it).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static uint64_t GEAR[256];

static void init_gear(void) {
    /* splitmix64 from a fixed seed; chunker.py computes the same table */
    uint64_t state = 0x7476697873746f72ULL; /* "tvixstor" */
    for (int i = 0; i < 256; i++) {
        state += 0x9E3779B97F4A7C15ULL;
        uint64_t z = state;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        GEAR[i] = z ^ (z >> 31);
    }
}

typedef struct {
    Py_ssize_t *items;
    Py_ssize_t len, cap;
    int oom;
} cutvec;

static void push(cutvec *v, Py_ssize_t x) {
    if (v->oom) return;
    if (v->len == v->cap) {
        Py_ssize_t ncap = v->cap ? v->cap * 2 : 64;
        Py_ssize_t *n = realloc(v->items, (size_t)ncap * sizeof(Py_ssize_t));
        if (!n) { v->oom = 1; return; }
        v->items = n;
        v->cap = ncap;
    }
    v->items[v->len++] = x;
}

/* The scan, GIL released. Semantics are exactly chunker._py_scan's. */
static void scan_buf(const uint8_t *p, Py_ssize_t n, uint64_t *pos_io, uint64_t *hash_io, uint64_t min_size,
                     uint64_t normal_size, uint64_t max_size, uint64_t mask_s, uint64_t mask_l, cutvec *out) {
    uint64_t pos = *pos_io, h = *hash_io;
    Py_ssize_t i = 0;
    while (i < n) {
        if (pos < min_size) { /* the first min_size bytes of a chunk are never a cut: skip them */
            uint64_t skip = min_size - pos;
            if ((uint64_t)(n - i) < skip) skip = (uint64_t)(n - i);
            i += (Py_ssize_t)skip;
            pos += skip;
            continue;
        }
        int cut = 0;
        if (pos < normal_size) { /* before the normal size: the harder mask */
            uint64_t room = normal_size - pos;
            Py_ssize_t end = (uint64_t)(n - i) < room ? n : i + (Py_ssize_t)room;
            Py_ssize_t start = i;
            while (i < end) {
                h = (h << 1) + GEAR[p[i++]];
                if (!(h & mask_s)) { cut = 1; break; }
            }
            pos += (uint64_t)(i - start);
        } else { /* after it: the easier mask, and a forced cut at max_size */
            uint64_t room = max_size - pos;
            Py_ssize_t end = (uint64_t)(n - i) < room ? n : i + (Py_ssize_t)room;
            Py_ssize_t start = i;
            while (i < end) {
                h = (h << 1) + GEAR[p[i++]];
                if (!(h & mask_l)) { cut = 1; break; }
            }
            pos += (uint64_t)(i - start);
        }
        if (pos >= max_size) cut = 1;
        if (cut) {
            push(out, i);
            pos = 0;
            h = 0;
        }
    }
    *pos_io = pos;
    *hash_io = h;
}

static PyObject *cdc_scan(PyObject *self, PyObject *args) {
    Py_buffer buf;
    unsigned long long pos, h, min_size, normal_size, max_size, mask_s, mask_l;
    if (!PyArg_ParseTuple(args, "y*KKKKKKK:scan", &buf, &pos, &h, &min_size, &normal_size, &max_size, &mask_s,
                          &mask_l))
        return NULL;
    if (min_size < 1 || normal_size < min_size || max_size < normal_size || pos >= max_size) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "need 1 <= min_size <= normal_size <= max_size and pos < max_size");
        return NULL;
    }
    cutvec v = {NULL, 0, 0, 0};
    uint64_t upos = pos, uh = h;
    Py_BEGIN_ALLOW_THREADS
    scan_buf((const uint8_t *)buf.buf, buf.len, &upos, &uh, min_size, normal_size, max_size, mask_s, mask_l, &v);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    if (v.oom) {
        free(v.items);
        return PyErr_NoMemory();
    }
    PyObject *cuts = PyList_New(v.len);
    if (!cuts) {
        free(v.items);
        return NULL;
    }
    for (Py_ssize_t k = 0; k < v.len; k++) {
        PyObject *x = PyLong_FromSsize_t(v.items[k]);
        if (!x) {
            free(v.items);
            Py_DECREF(cuts);
            return NULL;
        }
        PyList_SET_ITEM(cuts, k, x);
    }
    free(v.items);
    return Py_BuildValue("(NKK)", cuts, (unsigned long long)upos, (unsigned long long)uh);
}

static PyObject *cdc_gear_table(PyObject *self, PyObject *unused) {
    PyObject *t = PyTuple_New(256);
    if (!t) return NULL;
    for (int i = 0; i < 256; i++) {
        PyObject *x = PyLong_FromUnsignedLongLong(GEAR[i]);
        if (!x) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, x);
    }
    return t;
}

/* v2020::cut: the byte that makes the hash match ends the chunk BEFORE it (the chunk is
 * source[0..a]); bytes are hashed two at a time, so the odd last byte of a short tail is not. */
static Py_ssize_t cut2020(const uint8_t *src, Py_ssize_t len, const uint64_t *gear, uint64_t min_size,
                          uint64_t avg_size, uint64_t max_size, uint64_t mask_s, uint64_t mask_l) {
    uint64_t remaining = (uint64_t)len;
    if (remaining <= min_size) return (Py_ssize_t)remaining;
    uint64_t center = avg_size;
    if (remaining > max_size) remaining = max_size;
    else if (remaining < center) center = remaining;
    uint64_t mask_s_ls = mask_s << 1, mask_l_ls = mask_l << 1;
    uint64_t index = min_size / 2, hash = 0;
    while (index < center / 2) {
        uint64_t a = index * 2;
        hash = (hash << 2) + (gear[src[a]] << 1);
        if (!(hash & mask_s_ls)) return (Py_ssize_t)a;
        hash += gear[src[a + 1]];
        if (!(hash & mask_s)) return (Py_ssize_t)(a + 1);
        index++;
    }
    while (index < remaining / 2) {
        uint64_t a = index * 2;
        hash = (hash << 2) + (gear[src[a]] << 1);
        if (!(hash & mask_l_ls)) return (Py_ssize_t)a;
        hash += gear[src[a + 1]];
        if (!(hash & mask_l)) return (Py_ssize_t)(a + 1);
        index++;
    }
    return (Py_ssize_t)remaining;
}

static PyObject *cdc_cut2020(PyObject *self, PyObject *args) {
    Py_buffer buf, gear;
    unsigned long long min_size, avg_size, max_size, mask_s, mask_l;
    if (!PyArg_ParseTuple(args, "y*y*KKKKK:cut2020", &buf, &gear, &min_size, &avg_size, &max_size, &mask_s, &mask_l))
        return NULL;
    if (gear.len != 256 * (Py_ssize_t)sizeof(uint64_t) || min_size < 2 || avg_size < min_size || max_size < avg_size) {
        PyBuffer_Release(&buf);
        PyBuffer_Release(&gear);
        PyErr_SetString(PyExc_ValueError, "need a 2048-byte gear table and 2 <= min_size <= avg_size <= max_size");
        return NULL;
    }
    uint64_t table[256];
    memcpy(table, gear.buf, sizeof(table));
    Py_ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = cut2020((const uint8_t *)buf.buf, buf.len, table, min_size, avg_size, max_size, mask_s, mask_l);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    PyBuffer_Release(&gear);
    return PyLong_FromSsize_t(n);
}

static PyMethodDef methods[] = {
    {"scan", cdc_scan, METH_VARARGS,
     "scan(data, pos, hash, min_size, normal_size, max_size, mask_s, mask_l) -> (cuts, pos, hash)\n\n"
     "Find the content-defined cut points in `data`, continuing a chunk of `pos` bytes whose gear hash is "
     "`hash`. Returns the offsets in `data` where chunks end and the state to carry to the next buffer."},
    {"gear_table", cdc_gear_table, METH_NOARGS, "The 256 gear hash values."},
    {"cut2020", cdc_cut2020, METH_VARARGS,
     "cut2020(data, gear, min_size, avg_size, max_size, mask_s, mask_l) -> length of the first chunk of `data` "
     "(FastCDC 2020, as the Rust fastcdc crate's v2020::cut)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "tvix_store._cdc", "Content-defined chunking cut points (see tvix_store.chunker).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cdc(void) {
    init_gear();
    return PyModule_Create(&module);
}
