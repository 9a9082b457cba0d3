"""C source of the compressors' CPU fast path (built by :mod:`._native`; kept as strings so
that a plain ``pip install`` ships it without package-data entries): here the common part and
the ``sign`` kernels, in :mod:`._native_src_codes` the finite scan, QSGD and top-k; ``SOURCE``
is the two, in that order (the second uses ``piece`` and the thread macros of the first).

Every kernel computes exactly what the pure-torch reference computes, bit for bit
(tests/test_fast_path.py): sign bits by the float comparison ``x >= 0`` (NaN gives 0, -0.0 gives
1), the L1 norm as exact integer sums of fp32 mantissas per exponent (order-independent, so the
thread count cannot change them), decoded values copied from the same ±scale table.

Threads: every exported kernel takes ``threads`` and splits its range into that many pieces
(multiples of 64 elements, so that bit-packed pieces are whole bytes and whole 64-bit words)
inside one OpenMP parallel region.  :mod:`._native` builds with ``-fopenmp`` only when torch's
own libgomp is already loaded in the process, so the regions run on torch's thread pool: no
second runtime, and no thread of ours competing with torch's workers, which spin for several ms
after each torch op (on the 2-core benchmark machine a Python thread pool beside them gained
nothing from its second thread).  Built without OpenMP the pragmas are ignored and every kernel
runs on the calling thread.
"""

from ._native_src_codes import CODES_SOURCE

SIGN_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define TABLES 8
typedef int64_t bins_t[TABLES][256];

/* Bit-reversed bytes: movemask gives element i at bit i, the wire wants it at bit 7-i. */
static uint8_t reversed_byte[256];
static void init_reversed(void) {
    for (int b = 0; b < 256; b++) {
        int r = 0;
        for (int i = 0; i < 8; i++) r |= ((b >> i) & 1) << (7 - i);
        reversed_byte[b] = (uint8_t)r;
    }
}

/* One byte of sign bits, MSB first: bit 7-i is (x[i] >= 0) (NaN: 0, -0.0: 1). */
static inline uint8_t sign_byte(const float *x, int count) {
    uint8_t byte = 0;
    for (int i = 0; i < count; i++)
        byte |= (uint8_t)((x[i] >= 0.0f) << (7 - i));
    return byte;
}

/* Add the mantissa (with its implicit bit) of each fp32 element to the bin of its biased
   exponent.  Interleaved tables keep consecutive elements of equal exponent from waiting on
   each other's store.  Integer sums: exact, in any order. */
static inline void bin_elements(const uint32_t *u, int count, bins_t bins) {
    for (int i = 0; i < count; i++) {
        uint32_t e = (u[i] >> 23) & 0xFFu;
        uint32_t m = (u[i] & 0x7FFFFFu) | ((uint32_t)(e != 0) << 23);
        bins[i & (TABLES - 1)][e] += m;
    }
}

/* 8 elements: their sign byte, and their bins when bins is not NULL. */
static inline uint8_t encode8(const float *x, bins_t bins) {
#ifdef __AVX2__
    __m256 v = _mm256_loadu_ps(x);
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ));
    if (bins) {
        __m256i w = _mm256_castps_si256(v);
        __m256i e = _mm256_and_si256(_mm256_srli_epi32(w, 23), _mm256_set1_epi32(0xFF));
        __m256i implicit = _mm256_andnot_si256(_mm256_cmpeq_epi32(e, _mm256_setzero_si256()),
                                               _mm256_set1_epi32(0x800000));
        __m256i m = _mm256_or_si256(_mm256_and_si256(w, _mm256_set1_epi32(0x7FFFFF)), implicit);
        uint32_t es[8], ms[8];
        _mm256_storeu_si256((__m256i *)es, e);
        _mm256_storeu_si256((__m256i *)ms, m);
        for (int i = 0; i < 8; i++) bins[i][es[i]] += ms[i];
    }
    return reversed_byte[mask];
#else
    if (bins) bin_elements((const uint32_t *)x, 8, bins);
    return sign_byte(x, 8);
#endif
}

#ifdef __AVX2__
static inline int hmax8(__m256i v) {
    __m128i a = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    a = _mm_max_epi32(a, _mm_shuffle_epi32(a, 0x4E));
    return _mm_cvtsi128_si32(_mm_max_epi32(a, _mm_shuffle_epi32(a, 0xB1)));
}

static inline int hmin8(__m256i v) {
    __m128i a = _mm_min_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    a = _mm_min_epi32(a, _mm_shuffle_epi32(a, 0x4E));
    return _mm_cvtsi128_si32(_mm_min_epi32(a, _mm_shuffle_epi32(a, 0xB1)));
}
#endif

/* The L1 bins of 64 elements.  When their non-zero exponents (max(e, 1)) span at most 23, every
   |x_i| is a multiple of 2^(lo-150) below 2^(hi-126), so their sum in float64 is exact in any
   order (below 2^53 units); it is added as two integers, its low 26 bits in units of
   2^(lo-150) to bin lo and the rest to bin lo+26 (the same exact total as per-element bins).
   Otherwise (wider span, Inf/NaN, huge values) per element. */
static inline void bin64(const float *x, bins_t bins, int table) {
#ifdef __AVX2__
    const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF), none = _mm256_set1_epi32(255);
    __m256i emax = _mm256_setzero_si256(), emin = none;
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    for (int k = 0; k < 8; k++) {
        __m256i w = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + 8 * k)), absmask);
        __m256i e = _mm256_srli_epi32(w, 23);
        __m256i nonzero = _mm256_cmpgt_epi32(w, _mm256_setzero_si256());
        emax = _mm256_max_epi32(emax, e);
        emin = _mm256_min_epi32(emin, _mm256_blendv_epi8(
            none, _mm256_max_epi32(e, _mm256_set1_epi32(1)), nonzero));
        __m256 a = _mm256_castsi256_ps(w);
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
    }
    int hi = hmax8(emax), lo = hmin8(emin);
    if (lo == 255) return;                                   /* all zero */
    if (hi < 255 && hi - lo <= 23 && lo <= 229) {
        __m256d s = _mm256_add_pd(s0, s1);
        __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
        double sum = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
        uint64_t scale_bits = (uint64_t)(1023 + 150 - lo) << 52;  /* 2^(150 - lo) */
        double scale;
        memcpy(&scale, &scale_bits, sizeof scale);
        int64_t units = (int64_t)(sum * scale);
        bins[table][lo] += units & ((1 << 26) - 1);
        bins[table][lo + 26] += units >> 26;
        return;
    }
#endif
    (void)table;
    bin_elements((const uint32_t *)x, 64, bins);
}

/* x[i] = g[i] + x[i] for n elements (one float addition each, as torch.add(g, x, out=x)). */
static inline void add_into(const float *g, float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = g[i] + x[i];
}

/* Sign bytes of n elements (n a multiple of 64) and, with bins, their L1 bins; with g, each
   block of 64 is first written as g + x, so the sum is encoded while it is in cache. */
static void encode_blocks(const float *g, float *x, int64_t n, bins_t bins, uint8_t *bits) {
    for (int64_t b = 0; b < n / 64; b++) {
        float *block = x + 64 * b;
        if (g) add_into(g + 64 * b, block, 64);
        for (int k = 0; k < 8; k++) bits[8 * b + k] = encode8(block + 8 * k, NULL);
        if (bins) bin64(block, bins, (int)(b & (TABLES - 1)));
    }
}

/* Piece t of T of [0, n): starts are multiples of 64 elements (whole bytes of sign bits, whole
   64-bit words of QSGD codes). */
static void piece(int64_t n, int t, int T, int64_t *start, int64_t *stop) {
    int64_t step = ((n + T - 1) / T + 63) / 64 * 64;
    *start = t * step < n ? t * step : n;
    *stop = (t + 1) * step < n ? (t + 1) * step : n;
}

#ifdef _OPENMP
#define THREAD_ID omp_get_thread_num()
#define THREAD_COUNT omp_get_num_threads()
#else
#define THREAD_ID 0
#define THREAD_COUNT 1
#endif

/* Called once when the library is loaded, before any thread uses the kernels. */
void hv_init(void) { init_reversed(); }

static void add_tables(bins_t local, int64_t *bins) {
    for (int t = 0; t < TABLES; t++)
        for (int e = 0; e < 256; e++)
            bins[e] += local[t][e];
}

/* Sign bits of x[0..n) into bits[0..ceil(n/8)); when bins is not NULL, also ADD the L1 bins of
   x into bins[256].  When g is not NULL, x is first written as g + x (x is read-only
   otherwise): the worker's p = g + e written over e in the encoder's pass. */
static void sign_encode(const float *g, float *x, int64_t n, int64_t *bins, uint8_t *bits) {
    int64_t whole = n / 8;
    int tail = (int)(n % 8);
    int64_t blocks = n / 64 * 64;
    bins_t local;
    memset(local, 0, sizeof local);
    encode_blocks(g, x, blocks, bins ? local : NULL, bits);
    if (g) add_into(g + blocks, x + blocks, n - blocks);
    for (int64_t q = blocks / 8; q < whole; q++)
        bits[q] = encode8(x + 8 * q, bins ? local : NULL);
    if (tail) {
        bin_elements((const uint32_t *)(x + 8 * whole), tail, local);
        bits[whole] = sign_byte(x + 8 * whole, tail);
    }
    if (bins) add_tables(local, bins);
}

/* ADD the L1 bins of x[0..n) into bins[256] (Sign.partial_norm). */
static void l1_bins(const float *x, int64_t n, int64_t *bins) {
    bins_t local;
    memset(local, 0, sizeof local);
    for (int64_t b = 0; b < n / 64; b++)
        bin64(x + 64 * b, local, (int)(b & (TABLES - 1)));
    for (int64_t i = n / 64 * 64; i < n; i++)
        bin_elements((const uint32_t *)(x + i), 1, local);
    add_tables(local, bins);
}

/* out[8q + i] = table[bits[q]][i] for the n elements; table is the (256, 8) ±scale table. */
static void sign_decode(const uint8_t *bits, int64_t n, const float *table, float *out) {
    int64_t whole = n / 8;
    for (int64_t q = 0; q < whole; q++)
        memcpy(out + 8 * q, table + 8 * (int)bits[q], 8 * sizeof(float));
    if (n % 8)
        memcpy(out + 8 * whole, table + 8 * (int)bits[whole], (size_t)(n % 8) * sizeof(float));
}

/* out[8q + i] = (out[8q + i] + table[bits[q]][i]) * scale when scaled, else without the
   product: the decode, the server's sum and Horovod's average scaling in one pass (one float
   addition and one float product per element, as torch's add_ then mul_). */
static void sign_decode_add(const uint8_t *bits, int64_t n, const float *table, float *out,
                            int scaled, float scale) {
    int64_t whole = n / 8;
    for (int64_t q = 0; q < whole; q++) {
        const float *row = table + 8 * (int)bits[q];
        if (scaled)
            for (int i = 0; i < 8; i++) out[8 * q + i] = (out[8 * q + i] + row[i]) * scale;
        else
            for (int i = 0; i < 8; i++) out[8 * q + i] += row[i];
    }
    for (int i = 0; i < (int)(n % 8); i++) {
        float sum = out[8 * whole + i] + table[8 * (int)bits[whole] + i];
        out[8 * whole + i] = scaled ? sum * scale : sum;
    }
}

/* out[8q + i] = (out[8q + i] + ta[bits_a[q]][i]) + tb[bits_b[q]][i]: two table decodes added in
   one pass, in that order (the compensated update (x - C(x)) + C(v), with ta the -scale table). */
static void sign_decode_add2(const uint8_t *bits_a, const float *ta, const uint8_t *bits_b,
                             const float *tb, int64_t n, float *out) {
    int64_t whole = n / 8;
    for (int64_t q = 0; q < whole; q++) {
        const float *ra = ta + 8 * (int)bits_a[q], *rb = tb + 8 * (int)bits_b[q];
        for (int i = 0; i < 8; i++) out[8 * q + i] = (out[8 * q + i] + ra[i]) + rb[i];
    }
    for (int i = 0; i < (int)(n % 8); i++)
        out[8 * whole + i] = (out[8 * whole + i] + ta[8 * (int)bits_a[whole] + i])
                             + tb[8 * (int)bits_b[whole] + i];
}

/* out[i] = out[i] + ((t_0 + t_1) + ... + t_{k-1}) * scale, where t_j is element i of payload
   j's table row (the product only when k > 1): the server's v = m + e with m the mean of k
   decoded payloads, in one pass over e.  The same float operations, in the same order, as
   decoding payload 0, adding the others (the last with the product) and adding the result to
   e; the bits start at byte `first` of every payload. */
static void sign_mean_add(const uint8_t *const *bits, const float *const *tables, int k,
                          int64_t first, int64_t n, float scale, float *out) {
    float acc[8];
    for (int64_t q = 0; q < (n + 7) / 8; q++) {
        int width = n - 8 * q < 8 ? (int)(n - 8 * q) : 8;
        const float *row = tables[0] + 8 * (int)bits[0][first + q];
        for (int i = 0; i < 8; i++) acc[i] = row[i];
        for (int j = 1; j < k; j++) {
            row = tables[j] + 8 * (int)bits[j][first + q];
            for (int i = 0; i < 8; i++) acc[i] += row[i];
        }
        if (k > 1)
            for (int i = 0; i < 8; i++) acc[i] *= scale;
        if (width == 8)
            for (int i = 0; i < 8; i++) out[8 * q + i] += acc[i];
        else
            for (int i = 0; i < width; i++) out[8 * q + i] += acc[i];
    }
}

/* --- exported kernels: one OpenMP region each, a piece per thread ------------------------ */
/* Sign bits of x[0..n) into bits; with bins (256 int64), also ADD the L1 bins of x to them;
   with g, x is first written as g + x and the sums are encoded (x is not written otherwise). */
void hv_sign_encode_f32(const float *g, float *x, int64_t n, int64_t *bins, uint8_t *bits,
                        int threads) {
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t start, stop, mine[256];
        memset(mine, 0, sizeof mine);
        piece(n, THREAD_ID, THREAD_COUNT, &start, &stop);
        sign_encode(g ? g + start : NULL, x + start, stop - start, bins ? mine : NULL,
                    bits + start / 8);
        if (bins) {
            #pragma omp critical
            for (int e = 0; e < 256; e++) bins[e] += mine[e];
        }
    }
}

void hv_l1_bins_f32(const float *x, int64_t n, int64_t *bins, int threads) {
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t start, stop, mine[256];
        memset(mine, 0, sizeof mine);
        piece(n, THREAD_ID, THREAD_COUNT, &start, &stop);
        l1_bins(x + start, stop - start, mine);
        #pragma omp critical
        for (int e = 0; e < 256; e++) bins[e] += mine[e];
    }
}

void hv_sign_decode_f32(const uint8_t *bits, int64_t n, const float *table, float *out,
                        int threads) {
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t start, stop;
        piece(n, THREAD_ID, THREAD_COUNT, &start, &stop);
        sign_decode(bits + start / 8, stop - start, table, out + start);
    }
}

void hv_sign_decode_add_f32(const uint8_t *bits, int64_t n, const float *table, float *out,
                            int scaled, float scale, int threads) {
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t start, stop;
        piece(n, THREAD_ID, THREAD_COUNT, &start, &stop);
        sign_decode_add(bits + start / 8, stop - start, table, out + start, scaled, scale);
    }
}

void hv_sign_decode_add2_f32(const uint8_t *bits_a, const float *ta, const uint8_t *bits_b,
                             const float *tb, int64_t n, float *out, int threads) {
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t start, stop;
        piece(n, THREAD_ID, THREAD_COUNT, &start, &stop);
        sign_decode_add2(bits_a + start / 8, ta, bits_b + start / 8, tb, stop - start,
                         out + start);
    }
}

void hv_sign_mean_add_f32(const uint8_t *const *bits, const float *const *tables, int k,
                          int64_t n, float scale, float *out, int threads) {
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t start, stop;
        piece(n, THREAD_ID, THREAD_COUNT, &start, &stop);
        sign_mean_add(bits, tables, k, start / 8, stop - start, scale, out + start);
    }
}

"""

SOURCE = SIGN_SOURCE + CODES_SOURCE
