"""C source of the CPU fast path's kernels that scan or code values (appended to the ``sign``
source of :mod:`._native_src`, whose ``piece`` and thread macros they use): the count of
non-finite elements behind the finite check, QSGD's encode and decode, and top-k's candidates.
The same rules hold: every kernel computes what the torch reference computes, bit for bit
(tests/test_fast_path.py)."""

CODES_SOURCE = r"""
/* Count of non-finite fp32 elements (exponent all ones). */
static int64_t count_nonfinite_f32(const uint32_t *x, int64_t n) {
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++)
        count += (x[i] & 0x7F800000u) == 0x7F800000u;
    return count;
}

/* Count of non-finite 16-bit floats: exponent bits ``mask`` all ones (fp16 0x7C00, bf16
   0x7F80). */
static int64_t count_nonfinite_u16(const uint16_t *x, int64_t n, int mask) {
    int64_t count = 0;
    const uint16_t m = (uint16_t)mask;
    for (int64_t i = 0; i < n; i++)
        count += (x[i] & m) == m;
    return count;
}

/* QSGD's counter-based uniform for element i (see quantize.counter_uniforms). */
static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16;
    return x;
}

/* QSGD codes of x[start..stop) (global element indices; start a multiple of 8) into the packed
   field codes (nbytes in all): group g of 8 codes of ``bits`` bits at bytes [g*bits, (g+1)*bits),
   code j of the group at bits [bits*j, bits*(j+1)) of the little-endian word.  Same float32
   operations as the torch reference, in the same order (built with -ffp-contract=off). */
static void qsgd_codes(const float *restrict x, int64_t first, int n, float norm, int s,
                       uint32_t k1, uint32_t k2, int32_t *restrict code) {
    const float levels = (float)s;
    for (int j = 0; j < n; j++) {      /* straight-line: the compiler vectorises it */
        float v = x[j];
        float a = v < 0 ? -v : v;
        float scaled = (a / norm) * levels;
        float level = floorf(scaled);
        uint32_t h = lowbias32(lowbias32(((uint32_t)first + (uint32_t)j) ^ k1) ^ k2);
        float u = (float)(int32_t)(h >> 8) * 0x1p-24f;
        level += (u < scaled - level) ? 1.0f : 0.0f;
        level = level > levels ? levels : level;
        int32_t step = (int32_t)level;
        code[j] = v >= 0 ? s + step : s - step;
    }
}

#define QSGD_BLOCK 512

static void qsgd_values(const int32_t *restrict code, int n, int s, float step,
                        float *restrict out) {
    for (int j = 0; j < n; j++) out[j] = (float)(code[j] - s) * step;
}


/* Codes of ``bits`` bits where 64 % bits == 0, packed word by word (the bit stream's layout:
   code j of word w at bits [bits*j, bits*(j+1))); a last partial word writes only its bytes.
   Returns the next destination byte. */
static uint8_t *pack_words(const int32_t *code, int n, int bits, uint8_t *dst) {
    const int per = 64 / bits;
    int j = 0;
    for (; j + per <= n; j += per) {
        uint64_t word = 0;
        for (int i = 0; i < per; i++) word |= (uint64_t)(uint32_t)code[j + i] << (bits * i);
        memcpy(dst, &word, 8);
        dst += 8;
    }
    if (j < n) {
        uint64_t word = 0;
        for (int i = 0; j + i < n; i++) word |= (uint64_t)(uint32_t)code[j + i] << (bits * i);
        memcpy(dst, &word, (size_t)(((n - j) * bits + 7) / 8));
    }
    return dst;
}

/* Inverse of pack_words for n codes from byte ``pos`` of the nbytes-long stream. */
static void unpack_words(const uint8_t *codes, int64_t nbytes, int64_t pos, int n, int bits,
                         int32_t *code) {
    const int per = 64 / bits;
    const uint64_t mask = (1u << bits) - 1;
    for (int j = 0; j < n; j += per, pos += 8) {
        uint64_t word = 0;
        memcpy(&word, codes + pos, nbytes - pos >= 8 ? 8 : (size_t)(nbytes - pos));
        int count = n - j < per ? n - j : per;
        for (int i = 0; i < count; i++) code[j + i] = (int32_t)((word >> (bits * i)) & mask);
    }
}

/* The packed codes are one little-endian bit stream: code i at bits [bits*i, bits*(i+1)).
   A range that starts at a multiple of 64 codes starts on a whole 64-bit word. */
static void qsgd_encode(const float *x, int64_t start, int64_t stop, float norm, int s,
                        int bits, uint32_t k1, uint32_t k2, uint8_t *codes) {
    int32_t code[QSGD_BLOCK];
    uint8_t *dst = codes + start * bits / 8;
    uint64_t acc = 0;
    int filled = 0;
    for (int64_t b = start; b < stop; b += QSGD_BLOCK) {
        int n = stop - b < QSGD_BLOCK ? (int)(stop - b) : QSGD_BLOCK;
        qsgd_codes(x + b, b, n, norm, s, k1, k2, code);
        if (64 % bits == 0) {        /* whole codes per word (1, 2, 4, 8 bits): no carries */
            dst = pack_words(code, n, bits, dst);
            continue;
        }
        for (int j = 0; j < n; j++) {
            acc |= (uint64_t)(uint32_t)code[j] << filled;
            filled += bits;
            if (filled >= 64) {
                memcpy(dst, &acc, 8);
                dst += 8;
                filled -= 64;
                acc = (uint64_t)(uint32_t)code[j] >> (bits - filled);
            }
        }
    }
    memcpy(dst, &acc, (size_t)((filled + 7) / 8));   /* the stream's last, partial word */
}

/* out[i] = (code_i - s) * step for i in [start, stop) (start a multiple of 64). */
static void qsgd_decode(const uint8_t *codes, int64_t nbytes, int64_t start, int64_t stop,
                        int s, int bits, float step, float *out) {
    const uint64_t mask = (1u << bits) - 1;
    int32_t code[QSGD_BLOCK];
    int64_t pos = start * bits / 8;
    uint64_t acc = 0;
    int avail = 0;
    for (int64_t b = start; b < stop; b += QSGD_BLOCK) {
        int n = stop - b < QSGD_BLOCK ? (int)(stop - b) : QSGD_BLOCK;
        if (64 % bits == 0) {        /* whole codes per word: each code from one load */
            unpack_words(codes, nbytes, b * bits / 8, n, bits, code);
            qsgd_values(code, n, s, step, out + b);
            continue;
        }
        for (int j = 0; j < n; j++) {
            if (avail >= bits) {
                code[j] = (int32_t)(acc & mask);
                acc >>= bits;
                avail -= bits;
                continue;
            }
            uint64_t word = 0;
            if (nbytes - pos >= 8) memcpy(&word, codes + pos, 8);
            else memcpy(&word, codes + pos, (size_t)(nbytes - pos));
            pos += 8;
            code[j] = (int32_t)((acc | (word << avail)) & mask);
            int used = bits - avail;
            acc = word >> used;
            avail = 64 - used;
        }
        qsgd_values(code, n, s, step, out + b);
    }
}

/* --- exported kernels ------------------------------------------------------------------ */
/* Non-finite elements of x: fp32 when mask is 0, else 16-bit floats whose exponent bits are
   mask (fp16 0x7C00, bf16 0x7F80). */
int64_t hv_count_nonfinite(const void *x, int64_t n, int mask, int threads) {
    int64_t count = 0;
    #pragma omp parallel num_threads(threads) if (threads > 1) reduction(+:count)
    {
        int64_t start, stop;
        piece(n, THREAD_ID, THREAD_COUNT, &start, &stop);
        count += mask ? count_nonfinite_u16((const uint16_t *)x + start, stop - start, mask)
                      : count_nonfinite_f32((const uint32_t *)x + start, stop - start);
    }
    return count;
}

void hv_qsgd_encode_f32(const float *x, int64_t n, float norm, int s, int bits, uint32_t k1,
                        uint32_t k2, uint8_t *codes, int threads) {
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t start, stop;
        piece(n, THREAD_ID, THREAD_COUNT, &start, &stop);
        if (stop > start) qsgd_encode(x, start, stop, norm, s, bits, k1, k2, codes);
    }
}

void hv_qsgd_decode_f32(const uint8_t *codes, int64_t nbytes, int64_t n, int s, int bits,
                        float step, float *out, int threads) {
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t start, stop;
        piece(n, THREAD_ID, THREAD_COUNT, &start, &stop);
        if (stop > start) qsgd_decode(codes, nbytes, start, stop, s, bits, step, out);
    }
}

/* Indices i (ascending) with |x[i]| >= threshold, at most capacity of them; returns how many
   there are (may exceed capacity: the caller then retries with more room).  max_abs receives
   the largest |x| (any NaN makes it NaN, as numpy's max of np.abs(x)). */
int64_t hv_candidates_f32(const float *x, int64_t n, float threshold, int64_t *out,
                          int64_t capacity, float *max_abs) {
    int64_t count = 0;
    float largest = 0.0f;
    int nan_seen = 0;
    for (int64_t i = 0; i < n; i++) {
        float a = x[i] < 0 ? -x[i] : x[i];
        nan_seen |= (a != a);
        largest = a > largest ? a : largest;
        if (a >= threshold) {
            if (count < capacity) out[count] = i;
            count++;
        }
    }
    *max_abs = nan_seen ? __builtin_nanf("") : largest;
    return count;
}
"""
