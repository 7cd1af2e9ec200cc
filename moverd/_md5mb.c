/* Multi-buffer MD5: many independent MD5 streams hashed side by side in the 16 lanes of AVX-512,
 * or the 8 lanes of AVX2 where the CPU has no AVX-512.
 *
 * Why: MD5 is one long dependency chain, so a single stream runs at ~5 cycles per byte however
 * wide the CPU is (OpenSSL's assembly included). An archive hashes hundreds of files at once;
 * putting 16 (or 8) of them in the lanes of one vector register hashes 16 (8) blocks in about the
 * time of one.
 *
 * The module exposes `md5`, a hashlib-compatible object (its own `update` is a portable scalar
 * implementation), and `update_many(pairs)`, which hashes a list of (hasher, buffer) pairs with
 * the GIL released: pairs of one hasher are hashed in their order, the md5 objects of this module
 * share the vector lanes, any other hasher gets `update(buffer)` called on it.
 * `lanes()` says how many streams `update_many` hashes at once here: 16, 8, or 1 (no vector kernel
 * for this CPU). The environment variable MOVERD_MD5MB_LANES, read at import, lowers it (1, 8):
 * the tests check every kernel the CPU has against hashlib.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include <stdlib.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_VECTOR_KERNELS 1
#include <immintrin.h>
#endif

#define LANES 16
#define GIL_RELEASE_MIN 4096

typedef struct {
    PyObject_HEAD
    uint32_t h[4];
    uint64_t length; /* bytes hashed so far */
    uint8_t buf[64]; /* bytes waiting for a full block */
    uint32_t buflen;
    int stream;      /* index in the current update_many call, -1 outside one */
    const void *owner; /* the call hashing this object without the GIL, NULL when idle */
} Md5Object;

static PyTypeObject Md5Type;

/* ---- the scalar block function (RFC 1321) ---- */

static const uint32_t K[64] = {
    0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
    0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
    0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
    0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
    0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
    0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
    0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
    0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391,
};

static const int S[64] = {
    7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22,
    5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20,
    4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23,
    6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
};

/* Message word used by step i. */
static const int G[64] = {
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
    1, 6, 11, 0, 5, 10, 15, 4, 9, 14, 3, 8, 13, 2, 7, 12,
    5, 8, 11, 14, 1, 4, 7, 10, 13, 0, 3, 6, 9, 12, 15, 2,
    0, 7, 14, 5, 12, 3, 10, 1, 8, 15, 6, 13, 4, 11, 2, 9,
};

static inline uint32_t load_le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint32_t rotl32(uint32_t x, int s) { return (x << s) | (x >> (32 - s)); }

static void md5_block(uint32_t h[4], const uint8_t *block) {
    uint32_t m[16];
    for (int i = 0; i < 16; i++) m[i] = load_le32(block + 4 * i);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3];
    for (int i = 0; i < 64; i++) {
        uint32_t f;
        if (i < 16) f = (b & c) | (~b & d);
        else if (i < 32) f = (d & b) | (~d & c);
        else if (i < 48) f = b ^ c ^ d;
        else f = c ^ (b | ~d);
        uint32_t t = d;
        d = c;
        c = b;
        b = b + rotl32(a + f + K[i] + m[G[i]], S[i]);
        a = t;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d;
}

static void md5_init(Md5Object *o) {
    o->h[0] = 0x67452301; o->h[1] = 0xefcdab89; o->h[2] = 0x98badcfe; o->h[3] = 0x10325476;
    o->length = 0;
    o->buflen = 0;
    o->stream = -1;
    o->owner = NULL;
}

/* Hash bytes through the object's block buffer; the caller counts them in ``length``. */
static void md5_absorb(Md5Object *o, const uint8_t *p, size_t n) {
    if (o->buflen) {
        size_t take = 64 - o->buflen;
        if (take > n) take = n;
        memcpy(o->buf + o->buflen, p, take);
        o->buflen += (uint32_t)take;
        p += take;
        n -= take;
        if (o->buflen < 64) return;
        md5_block(o->h, o->buf);
        o->buflen = 0;
    }
    for (; n >= 64; p += 64, n -= 64) md5_block(o->h, p);
    if (n) {
        memcpy(o->buf, p, n);
        o->buflen = (uint32_t)n;
    }
}

static void md5_update_scalar(Md5Object *o, const uint8_t *p, size_t n) {
    o->length += n;
    md5_absorb(o, p, n);
}

static void md5_final(const Md5Object *o, uint8_t out[16]) {
    uint32_t h[4];
    uint8_t tail[128];
    memcpy(h, o->h, sizeof h);
    size_t n = o->buflen;
    memcpy(tail, o->buf, n);
    tail[n++] = 0x80;
    size_t total = n <= 56 ? 64 : 128;
    memset(tail + n, 0, total - n);
    uint64_t bits = o->length * 8;
    for (int i = 0; i < 8; i++) tail[total - 8 + i] = (uint8_t)(bits >> (8 * i));
    md5_block(h, tail);
    if (total == 128) md5_block(h, tail + 64);
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) out[4 * i + j] = (uint8_t)(h[i] >> (8 * j));
}

/* ---- streams of one update_many call ---- */

typedef struct {
    const uint8_t *data;
    size_t len;
    Py_ssize_t next; /* next segment of the same stream, -1 at the end */
} Segment;

typedef struct {
    Md5Object *obj;
    Py_ssize_t head, tail;
    size_t length;
} Stream;

typedef struct {
    Stream *stream; /* NULL: the lane is idle */
    Segment *segs;
    Py_ssize_t seg;
    size_t off;
    uint8_t tmp[64];
} Lane;

/* The lane's next 64-byte block, or NULL when its stream has no full block left (the rest is in
 * the object's buffer then). Blocks are read in place when they do not straddle segments. */
/* The lane's bytes left in its current segment, moving on past used-up segments (0: none left). */
static size_t lane_left(Lane *lane) {
    Segment *segs = lane->segs;
    while (lane->seg >= 0 && lane->off == segs[lane->seg].len) {
        lane->seg = segs[lane->seg].next;
        lane->off = 0;
    }
    return lane->seg < 0 ? 0 : segs[lane->seg].len - lane->off;
}

static const uint8_t *next_block(Lane *lane) {
    Md5Object *o = lane->stream->obj;
    size_t left;
    if (o->buflen == 0 && lane_left(lane) >= 64) {
        const uint8_t *p = lane->segs[lane->seg].data + lane->off;
        lane->off += 64;
        return p;
    }
    while (o->buflen < 64) {
        if ((left = lane_left(lane)) == 0) return NULL;
        size_t take = 64 - o->buflen;
        if (take > left) take = left;
        memcpy(o->buf + o->buflen, lane->segs[lane->seg].data + lane->off, take);
        o->buflen += (uint32_t)take;
        lane->off += take;
    }
    memcpy(lane->tmp, o->buf, 64);
    o->buflen = 0;
    return lane->tmp;
}

static void hash_streams_scalar(Stream *streams, Py_ssize_t nstreams, Segment *segs) {
    for (Py_ssize_t i = 0; i < nstreams; i++) {
        Md5Object *o = streams[i].obj;
        for (Py_ssize_t s = streams[i].head; s >= 0; s = segs[s].next) md5_absorb(o, segs[s].data, segs[s].len);
    }
}

#ifdef HAVE_VECTOR_KERNELS

static int cpu_lanes = 1; /* 16: AVX-512, 8: AVX2, 1: scalar */

#define AVX512 __attribute__((target("avx512f")))

/* Selection (F, G), parity (H) and I as one vpternlogd each: the immediate is the truth table
 * of the function of (x, y, z). */
#define TL_SELECT 0xCA /* x ? y : z */
#define TL_XOR3 0x96   /* x ^ y ^ z */
#define TL_I 0x39      /* y ^ (x | ~z) */

#define STEP(fn, a, b, c, d, i)                                                        \
    do {                                                                               \
        __m512i t = _mm512_add_epi32(a, _mm512_add_epi32(w[G[i]], _mm512_set1_epi32((int)K[i]))); \
        t = _mm512_add_epi32(t, fn);                                                   \
        a = _mm512_add_epi32(b, _mm512_rolv_epi32(t, _mm512_set1_epi32(S[i])));        \
    } while (0)

/* 16 steps of one round function, fully unrolled so that the message words, constants and
 * rotations are immediate. */
#define ROUND(FN, first)                                                   \
    _Pragma("GCC unroll 4") for (int i = (first); i < (first) + 16; i += 4) { \
        STEP(FN(b, c, d), a, b, c, d, i);                                  \
        STEP(FN(a, b, c), d, a, b, c, i + 1);                              \
        STEP(FN(d, a, b), c, d, a, b, i + 2);                              \
        STEP(FN(c, d, a), b, c, d, a, i + 3);                              \
    }

#define FF(b, c, d) _mm512_ternarylogic_epi32(b, c, d, TL_SELECT)
#define GG(b, c, d) _mm512_ternarylogic_epi32(d, b, c, TL_SELECT)
#define HH(b, c, d) _mm512_ternarylogic_epi32(b, c, d, TL_XOR3)
#define II(b, c, d) _mm512_ternarylogic_epi32(b, c, d, TL_I)

/* Rows (one lane's 16 message words each) to columns (one word of every lane each). */
AVX512 static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    _Pragma("GCC unroll 16") for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    _Pragma("GCC unroll 16") for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    _Pragma("GCC unroll 16") for (int i = 0; i < 2; i++)
        _Pragma("GCC unroll 16") for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
            t[8 * i + j + 4] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
        }
    _Pragma("GCC unroll 16") for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}

/* One block in each of the 16 lanes (`blocks[l]`: lane l's 64 bytes); state[k] holds word k of
 * every lane's state. */
AVX512 static void md5_x16(uint32_t state[4][LANES], const uint8_t *const blocks[LANES]) {
    __m512i w[16];
    _Pragma("GCC unroll 16") for (int l = 0; l < LANES; l++) w[l] = _mm512_loadu_si512(blocks[l]);
    transpose16(w);
    __m512i a = _mm512_loadu_si512(state[0]), b = _mm512_loadu_si512(state[1]);
    __m512i c = _mm512_loadu_si512(state[2]), d = _mm512_loadu_si512(state[3]);
    const __m512i a0 = a, b0 = b, c0 = c, d0 = d;
    ROUND(FF, 0);
    ROUND(GG, 16);
    ROUND(HH, 32);
    ROUND(II, 48);
    _mm512_storeu_si512(state[0], _mm512_add_epi32(a, a0));
    _mm512_storeu_si512(state[1], _mm512_add_epi32(b, b0));
    _mm512_storeu_si512(state[2], _mm512_add_epi32(c, c0));
    _mm512_storeu_si512(state[3], _mm512_add_epi32(d, d0));
}

static void lane_save(uint32_t state[4][LANES], int l, Md5Object *o) {
    for (int k = 0; k < 4; k++) o->h[k] = state[k][l];
}

static void lane_load(uint32_t state[4][LANES], int l, const Md5Object *o) {
    for (int k = 0; k < 4; k++) state[k][l] = o->h[k];
}

/* ---- AVX2: 8 lanes ----
 * No ternary logic and no vector rotate here: the round functions take two or three operations
 * each, and a rotation is two shifts and an or. */

#define AVX2 __attribute__((target("avx2")))
#define LANES8 8

#define ROTL8(t, s) _mm256_or_si256(_mm256_slli_epi32(t, s), _mm256_srli_epi32(t, 32 - (s)))

#define STEP8(fn, a, b, c, d, i)                                                        \
    do {                                                                                \
        __m256i t = _mm256_add_epi32(a, _mm256_add_epi32(w[G[i]], _mm256_set1_epi32((int)K[i]))); \
        t = _mm256_add_epi32(t, fn);                                                    \
        a = _mm256_add_epi32(b, ROTL8(t, S[i]));                                        \
    } while (0)

#define ROUND8(FN, first)                                                  \
    _Pragma("GCC unroll 4") for (int i = (first); i < (first) + 16; i += 4) { \
        STEP8(FN(b, c, d), a, b, c, d, i);                                 \
        STEP8(FN(a, b, c), d, a, b, c, i + 1);                             \
        STEP8(FN(d, a, b), c, d, a, b, i + 2);                             \
        STEP8(FN(c, d, a), b, c, d, a, i + 3);                             \
    }

/* F = d ^ (b & (c ^ d)), G = c ^ (d & (b ^ c)), H = b ^ c ^ d, I = c ^ (b | ~d). */
#define FF8(b, c, d) _mm256_xor_si256(d, _mm256_and_si256(b, _mm256_xor_si256(c, d)))
#define GG8(b, c, d) _mm256_xor_si256(c, _mm256_and_si256(d, _mm256_xor_si256(b, c)))
#define HH8(b, c, d) _mm256_xor_si256(_mm256_xor_si256(b, c), d)
#define II8(b, c, d) _mm256_xor_si256(c, _mm256_or_si256(b, _mm256_xor_si256(d, ones)))

/* Rows r[l] (8 message words of lane l) to columns (one word of every lane each). */
AVX2 static inline void transpose8(__m256i r[8]) {
    __m256i t[8], u[8];
    _Pragma("GCC unroll 8") for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    _Pragma("GCC unroll 8") for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    _Pragma("GCC unroll 8") for (int j = 0; j < 4; j++) {
        r[j] = _mm256_permute2x128_si256(u[j], u[j + 4], 0x20);
        r[j + 4] = _mm256_permute2x128_si256(u[j], u[j + 4], 0x31);
    }
}

/* One block in each of the first 8 lanes; state[k] holds word k of every lane's state. */
AVX2 static void md5_x8(uint32_t state[4][LANES], const uint8_t *const blocks[LANES]) {
    __m256i w[16];
    const __m256i ones = _mm256_set1_epi32(-1);
    _Pragma("GCC unroll 8") for (int l = 0; l < LANES8; l++) {
        w[l] = _mm256_loadu_si256((const __m256i *)blocks[l]);
        w[l + 8] = _mm256_loadu_si256((const __m256i *)(blocks[l] + 32));
    }
    transpose8(w);
    transpose8(w + 8);
    __m256i a = _mm256_loadu_si256((const __m256i *)state[0]), b = _mm256_loadu_si256((const __m256i *)state[1]);
    __m256i c = _mm256_loadu_si256((const __m256i *)state[2]), d = _mm256_loadu_si256((const __m256i *)state[3]);
    const __m256i a0 = a, b0 = b, c0 = c, d0 = d;
    ROUND8(FF8, 0);
    ROUND8(GG8, 16);
    ROUND8(HH8, 32);
    ROUND8(II8, 48);
    _mm256_storeu_si256((__m256i *)state[0], _mm256_add_epi32(a, a0));
    _mm256_storeu_si256((__m256i *)state[1], _mm256_add_epi32(b, b0));
    _mm256_storeu_si256((__m256i *)state[2], _mm256_add_epi32(c, c0));
    _mm256_storeu_si256((__m256i *)state[3], _mm256_add_epi32(d, d0));
}

typedef void (*LaneKernel)(uint32_t state[4][LANES], const uint8_t *const blocks[LANES]);

/* Hash every stream to its end, `nlanes` at a time: a lane whose stream ends takes the next one. */
static void hash_streams_lanes(Stream *streams, Py_ssize_t nstreams, Segment *segs, int nlanes, LaneKernel kernel) {
    Lane lanes[LANES];
    uint32_t state[4][LANES] __attribute__((aligned(64)));
    const uint8_t *blocks[LANES];
    static const uint8_t idle[64];
    Py_ssize_t next_stream = 0;
    memset(state, 0, sizeof state);
    for (int l = 0; l < nlanes; l++) lanes[l].stream = NULL, lanes[l].segs = segs;
    for (;;) {
        int active = 0;
        for (int l = 0; l < nlanes; l++) {
            Lane *lane = &lanes[l];
            const uint8_t *p = NULL;
            while (1) {
                if (lane->stream == NULL) {
                    if (next_stream == nstreams) break;
                    lane->stream = &streams[next_stream++];
                    lane->seg = lane->stream->head;
                    lane->off = 0;
                    lane_load(state, l, lane->stream->obj);
                }
                p = next_block(lane);
                if (p != NULL) break;
                lane_save(state, l, lane->stream->obj);
                lane->stream = NULL;
            }
            blocks[l] = p != NULL ? p : idle;
            active += p != NULL;
        }
        if (active == 0) return;
        if (active == 1) {
            /* One stream left: the scalar function does one block in a fraction of the work. */
            for (int l = 0; l < nlanes; l++) {
                if (lanes[l].stream == NULL) continue;
                Md5Object *o = lanes[l].stream->obj;
                lane_save(state, l, o);
                md5_block(o->h, blocks[l]);
                const uint8_t *p;
                while ((p = next_block(&lanes[l])) != NULL) md5_block(o->h, p);
                lanes[l].stream = NULL;
                break;
            }
            if (next_stream == nstreams) return;
            continue;
        }
        kernel(state, blocks);
    }
}
#endif

static void hash_streams(Stream *streams, Py_ssize_t nstreams, Segment *segs) {
#ifdef HAVE_VECTOR_KERNELS
    if (nstreams > 1 && cpu_lanes == 16) {
        hash_streams_lanes(streams, nstreams, segs, 16, md5_x16);
        return;
    }
    if (nstreams > 1 && cpu_lanes == 8) {
        hash_streams_lanes(streams, nstreams, segs, 8, md5_x8);
        return;
    }
#endif
    hash_streams_scalar(streams, nstreams, segs);
}

/* ---- Python objects ---- */

static PyObject *Md5_update(Md5Object *self, PyObject *arg) {
    Py_buffer view;
    if (self->owner != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "md5 hasher used by two threads at once");
        return NULL;
    }
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    if (view.len >= GIL_RELEASE_MIN) {
        self->owner = self;
        Py_BEGIN_ALLOW_THREADS
        md5_update_scalar(self, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
        self->owner = NULL;
    } else {
        md5_update_scalar(self, view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *Md5_digest(Md5Object *self, PyObject *Py_UNUSED(ignored)) {
    uint8_t out[16];
    md5_final(self, out);
    return PyBytes_FromStringAndSize((const char *)out, 16);
}

static PyObject *Md5_hexdigest(Md5Object *self, PyObject *Py_UNUSED(ignored)) {
    static const char hex[] = "0123456789abcdef";
    uint8_t out[16];
    char text[32];
    md5_final(self, out);
    for (int i = 0; i < 16; i++) {
        text[2 * i] = hex[out[i] >> 4];
        text[2 * i + 1] = hex[out[i] & 15];
    }
    return PyUnicode_FromStringAndSize(text, 32);
}

static PyObject *Md5_copy(Md5Object *self, PyObject *Py_UNUSED(ignored)) {
    Md5Object *copy = PyObject_New(Md5Object, &Md5Type);
    if (copy == NULL) return NULL;
    memcpy(copy->h, self->h, sizeof self->h);
    copy->length = self->length;
    memcpy(copy->buf, self->buf, sizeof self->buf);
    copy->buflen = self->buflen;
    copy->stream = -1;
    copy->owner = NULL;
    return (PyObject *)copy;
}

static PyObject *Md5_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"data", "usedforsecurity", NULL};
    PyObject *data = NULL;
    int usedforsecurity = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O$p:md5", kwlist, &data, &usedforsecurity)) return NULL;
    Md5Object *self = (Md5Object *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    md5_init(self);
    if (data != NULL) {
        PyObject *r = Md5_update(self, data);
        if (r == NULL) {
            Py_DECREF(self);
            return NULL;
        }
        Py_DECREF(r);
    }
    return (PyObject *)self;
}

static PyObject *Md5_get_name(PyObject *self, void *closure) { return PyUnicode_FromString("md5"); }
static PyObject *Md5_get_digest_size(PyObject *self, void *closure) { return PyLong_FromLong(16); }
static PyObject *Md5_get_block_size(PyObject *self, void *closure) { return PyLong_FromLong(64); }

static PyMethodDef Md5_methods[] = {
    {"update", (PyCFunction)Md5_update, METH_O, "Hash more bytes."},
    {"digest", (PyCFunction)Md5_digest, METH_NOARGS, "The digest of the bytes so far."},
    {"hexdigest", (PyCFunction)Md5_hexdigest, METH_NOARGS, "The digest as hexadecimal text."},
    {"copy", (PyCFunction)Md5_copy, METH_NOARGS, "A copy of the hasher's state."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Md5_getset[] = {
    {"name", Md5_get_name, NULL, NULL, NULL},
    {"digest_size", Md5_get_digest_size, NULL, NULL, NULL},
    {"block_size", Md5_get_block_size, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject Md5Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "moverd._md5mb.md5",
    .tp_basicsize = sizeof(Md5Object),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An MD5 hasher whose streams update_many() hashes side by side.",
    .tp_new = Md5_new,
    .tp_methods = Md5_methods,
    .tp_getset = Md5_getset,
};

/* update_many(pairs): see the module's docstring. */
static PyObject *update_many(PyObject *module, PyObject *arg) {
    /* A tuple copy: another hasher's update() (Python code) cannot change the pairs under us. */
    PyObject *seq = PySequence_Tuple(arg);
    if (seq == NULL) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    PyObject **items = &PyTuple_GET_ITEM(seq, 0);
    Py_buffer *views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    Segment *segs = PyMem_Calloc(n ? n : 1, sizeof(Segment));
    Stream *streams = PyMem_Calloc(n ? n : 1, sizeof(Stream));
    Py_ssize_t nviews = 0, nstreams = 0;
    size_t total = 0;
    PyObject *result = NULL;
    if (views == NULL || segs == NULL || streams == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = items[i];
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "update_many() takes a list of (hasher, buffer) pairs");
            goto done;
        }
        PyObject *hasher = PyTuple_GET_ITEM(pair, 0), *data = PyTuple_GET_ITEM(pair, 1);
        if (Py_TYPE(hasher) != &Md5Type) {
            PyObject *r = PyObject_CallMethod(hasher, "update", "O", data);
            if (r == NULL) goto done;
            Py_DECREF(r);
            continue;
        }
        if (PyObject_GetBuffer(data, &views[nviews], PyBUF_SIMPLE) < 0) goto done;
        Segment *seg = &segs[nviews];
        seg->data = views[nviews].buf;
        seg->len = (size_t)views[nviews].len;
        seg->next = -1;
        nviews++;
        total += seg->len;
        if (seg->len == 0) continue;
        Md5Object *o = (Md5Object *)hasher;
        if (o->owner != NULL && o->owner != streams) {
            /* Another thread hashes it right now: two calls would both move its state (and
             * this call's stream index would point into the other call's arrays). */
            PyBuffer_Release(&views[--nviews]);
            PyErr_SetString(PyExc_RuntimeError, "md5 hasher used by two threads at once");
            goto done;
        }
        if (o->stream < 0) {
            o->owner = streams;
            o->stream = (int)nstreams;
            streams[nstreams].obj = o;
            streams[nstreams].head = streams[nstreams].tail = seg - segs;
            streams[nstreams].length = seg->len;
            nstreams++;
        } else {
            Stream *st = &streams[o->stream];
            segs[st->tail].next = seg - segs;
            st->tail = seg - segs;
            st->length += seg->len;
        }
    }
    if (total >= GIL_RELEASE_MIN) {
        Py_BEGIN_ALLOW_THREADS
        hash_streams(streams, nstreams, segs);
        Py_END_ALLOW_THREADS
    } else {
        hash_streams(streams, nstreams, segs);
    }
    for (Py_ssize_t i = 0; i < nstreams; i++) streams[i].obj->length += streams[i].length;
    result = Py_None;
    Py_INCREF(result);
done:
    for (Py_ssize_t i = 0; i < nstreams; i++) {
        streams[i].obj->stream = -1;
        streams[i].obj->owner = NULL;
    }
    for (Py_ssize_t i = 0; i < nviews; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(segs);
    PyMem_Free(streams);
    Py_DECREF(seq);
    return result;
}

static PyObject *lanes(PyObject *module, PyObject *Py_UNUSED(ignored)) {
#ifdef HAVE_VECTOR_KERNELS
    return PyLong_FromLong(cpu_lanes);
#else
    return PyLong_FromLong(1);
#endif
}

static PyMethodDef module_methods[] = {
    {"update_many", update_many, METH_O, "Hash (hasher, buffer) pairs; md5 streams side by side."},
    {"lanes", lanes, METH_NOARGS, "How many md5 streams update_many() hashes at once on this CPU (16, 8 or 1)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef md5mb_module = {
    PyModuleDef_HEAD_INIT, "moverd._md5mb", "Multi-buffer MD5 (see update_many).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__md5mb(void) {
#ifdef HAVE_VECTOR_KERNELS
    __builtin_cpu_init();
    cpu_lanes = __builtin_cpu_supports("avx512f") ? 16 : __builtin_cpu_supports("avx2") ? 8 : 1;
    const char *cap = getenv("MOVERD_MD5MB_LANES");
    if (cap != NULL && *cap != '\0') {
        int most = atoi(cap);
        if (most < cpu_lanes) cpu_lanes = most >= 8 ? 8 : 1;
    }
#endif
    if (PyType_Ready(&Md5Type) < 0) return NULL;
    PyObject *m = PyModule_Create(&md5mb_module);
    if (m == NULL) return NULL;
    Py_INCREF(&Md5Type);
    if (PyModule_AddObject(m, "md5", (PyObject *)&Md5Type) < 0) {
        Py_DECREF(&Md5Type);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
