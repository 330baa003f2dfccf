/* y = x · Wᵀ for a few rows of x and a weight W kept in a low-bit format, read as stored:
 *
 *   W[n, k] = q[n, k] · scale[n, g] (+ bias[n, g]),  g = k / group
 *
 * with 4-bit codes (two a byte, the even input in the low nibble: MLX's layout and ours) or 8-bit
 * codes (signed: GGUF's Q8_0; unsigned: MLX's q8), scales and biases bf16 or fp16.
 *
 * At batch 1 a product is memory-bound: each weight byte is read once, so the loops are built to
 * keep up with memory on one core (on AVX-512 only two ports run 512-bit instructions: every one
 * per byte counts). Three paths, all exact up to the order of the fp32 sums; activations are never
 * quantized:
 *
 * - fp32: each code is widened to its weight in fp32, q · scale (+ bias) in one rounding (q · scale
 *   is exact: at most 8 + 11 significant bits), which is the dequantized weight itself; then one
 *   FMA per row and weight vector. Several accumulators a row, so that the FMA latency never
 *   bounds a pass.
 * - table (AVX-512, 4-bit codes in groups of 64 or 128): the group's 16 dequantized weights in a
 *   vector, each code looked up in it (rows_q4_table).
 * - bf16 (AVX512-BF16, other 4-bit codes with bf16 activations): each code becomes its exact bf16
 *   value through a 16-entry table (vpermw) and vdpbf16ps sums pairs of exact products into fp32;
 *   per group, total += scale · Σ q·x, and the biases add Σ_g bias · (Σ x over the group) at the end.
 *
 * The buffers of activations the kernel fills start on cache lines. The same source is compiled
 * once per instruction set (see setup.py); the vector width follows the compiler's target. Rows of
 * W are split over ``threads`` OpenMP threads. (Cutting the inputs into slices that keep several
 * rows of activations in the L1 cache measured slower: the weight then streams from memory in
 * strided pieces.)
 */
#include "vector.h"

#define MAX_ROWS 8 /* rows of x multiplied per pass over W; more rows take several passes */
#define CHUNK 128 /* inputs a fully unrolled pass of the fp32 path takes (then 32 at a time) */

typedef uint8_t vu8 __attribute__((vector_size(VW)));
typedef int8_t vs8 __attribute__((vector_size(VW)));

/* VW bytes widened to VW int32: zero- or sign-extended (GCC's generic vector conversion of bytes
 * goes element by element, so the x86 builds say which instruction to use) */
static inline vi widen_u8(const uint8_t *p) {
#if defined(__AVX512F__)
    return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__)
    return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    vu8 raw;
    memcpy(&raw, p, VW);
    return __builtin_convertvector(raw, vi);
#endif
}

static inline vi widen_s8(const uint8_t *p) {
#if defined(__AVX512F__)
    return (vi)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__)
    return (vi)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    vs8 raw;
    memcpy(&raw, p, VW);
    return __builtin_convertvector(raw, vi);
#endif
}

static inline float half_to_float(uint16_t h, int fp16) {
    if (!fp16) { /* bf16: the top half of an fp32 */
        uint32_t u = (uint32_t)h << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000 | (man << 13);
    } else if (exp) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal: normalize */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        u = sign | (exp << 23) | ((man & 0x3ff) << 13);
    } else {
        u = sign;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

typedef struct {
    const float *x; /* fp32 path: [rows, K]; for 4-bit codes, each 2·VW inputs reordered: VW even, VW odd */
    const uint16_t *x_bf16; /* bf16 path: [rows, K], each 64 inputs reordered: 32 even, 32 odd */
    const float *x_sums; /* bf16 path with biases: [rows, K/group], the sum of x over each group */
    int64_t K, N;
    const uint8_t *codes; /* [N, K·bits/8] */
    const void *scales, *biases; /* [N, K/group]; biases may be NULL */
    int scales_kind; /* 0: bf16, 1: fp16, 2: fp32 */
    float *y; /* [rows, N], or y_bf16 */
    uint16_t *y_bf16;
    float *row_scales, *row_biases; /* [K/group] each: one row's, in fp32 (this thread's buffers) */
    int table; /* 4-bit codes on the table path (x reordered for it) */
    const int8_t *xq; /* int8 path: [rows, K] x's codes (4-bit weights: each 128 inputs, 64 even then 64 odd) */
    const float *x_lanes; /* int8 path: [rows, steps, 16] each lane's activation scale */
    const float *x_shift; /* int8 path, shifted codes: [rows, K/group] -128 · Σ_block scale · Σ codes */
    const int32_t *x_code_sums; /* int8 path, one scale a row: [rows] Σ of each row's codes (x_lanes: its scale) */
} Job;

/* ``count`` scales (or biases) from ``first`` on in fp32, so that the hot loop only broadcasts them. */
static inline void widen_scales(const void *all, int64_t first, float *dst, int64_t count, int kind) {
    if (kind == 2) {
        memcpy(dst, (const float *)all + first, sizeof(float) * count);
        return;
    }
    const uint16_t *src = (const uint16_t *)all + first;
    const int fp16 = kind == 1;
    int64_t i = 0;
#if defined(__F16C__)
    if (fp16)
        for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    if (!fp16)
        for (; i < count; i++) dst[i] = half_to_float(src[i], 0); /* a shift: the compiler vectorizes it */
    for (; i < count; i++) dst[i] = half_to_float(src[i], fp16);
}

static inline void widen_row(const Job *j, int64_t n, int64_t G) {
    widen_scales(j->scales, n * G, j->row_scales, G, j->scales_kind);
    if (j->biases) widen_scales(j->biases, n * G, j->row_biases, G, j->scales_kind);
}

/* Σ_g bias[g] · (Σ of x over group g): a row's bias term on the bf16 path. */
static inline float bias_term(const float *biases, const float *x_sums, int64_t G) {
    vf acc = {0};
    int64_t g = 0;
    for (; g + VW <= G; g += VW) acc += load_f(biases + g) * load_f(x_sums + g);
    float total = hsum(acc);
    for (; g < G; g++) total += biases[g] * x_sums[g];
    return total;
}

/* Output n of x's row r: fp32, or bf16 rounded as PyTorch's CPU kernels round fp32 to bf16 (to
 * nearest, even; every NaN becomes 0xFFFF), so that the caller needs no conversion of its own. */
static inline void put_y(const Job *j, int r, int64_t n, float value) {
    if (!j->y_bf16) {
        j->y[r * j->N + n] = value;
        return;
    }
    uint32_t u;
    memcpy(&u, &value, 4);
    j->y_bf16[r * j->N + n] = value != value ? 0xFFFF : (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* The fp32 weights at input k of row codes ``c``: one vector of 8-bit codes, or two of 4-bit ones
 * (w[0]: VW even inputs, w[1]: the VW odd ones). */
INLINE void weights_at(const Job *j, const uint8_t *c, int64_t k, const int GROUP, const int bits,
                       const int is_signed, const int has_bias, vf w[2]) {
    if (bits == 4) {
        const vi q = widen_u8(c + k / 2);
        w[0] = __builtin_convertvector(q & 15, vf);
        w[1] = __builtin_convertvector(q >> 4, vf);
    } else {
        w[0] = __builtin_convertvector(is_signed ? widen_s8(c + k) : widen_u8(c + k), vf);
    }
    const float scale = j->row_scales[k / GROUP], bias = has_bias ? j->row_biases[k / GROUP] : 0;
    for (int h = 0; h < (bits == 4 ? 2 : 1); h++) w[h] = has_bias ? w[h] * scale + bias : w[h] * scale;
}

/* Output rows [n0, n1) for R rows of x on the fp32 path; R, GROUP, the code kind and whether there
 * are biases are constants once inlined, and every loop over them is unrolled, so that the
 * accumulators stay in registers: A a row, R · A ≤ 8 chains of FMAs in flight. */
INLINE void rows_f32(const Job *j, int64_t n0, int64_t n1, const int R, const int GROUP, const int bits,
                     const int is_signed, const int has_bias) {
    const int64_t K = j->K, G = K / GROUP, row_bytes = K * bits / 8;
    const int A = R <= 2 ? 4 : R <= 4 ? 2 : 1;
    const int H = bits == 4 ? 2 : 1; /* weight vectors a load gives */
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *c = j->codes + n * row_bytes;
        widen_row(j, n, G);
        vf acc[MAX_ROWS][4];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int a = 0; a < A; a++) acc[r][a] = (vf){0};
        int64_t k = 0;
        for (; k + CHUNK <= K; k += CHUNK) {
#pragma GCC unroll 2
            for (int line = 0; line < CHUNK * bits / 8; line += 64) PREFETCH(c + k * bits / 8 + line);
#pragma GCC unroll 32
            for (int v = 0; v < CHUNK / VW; v += H) {
                vf w[2];
                weights_at(j, c, k + v * VW, GROUP, bits, is_signed, has_bias, w);
#pragma GCC unroll 2
                for (int h = 0; h < H; h++)
#pragma GCC unroll 8
                    for (int r = 0; r < R; r++)
                        acc[r][(v + h) % A] += w[h] * load_f(j->x + r * K + k + (v + h) * VW);
            }
        }
        for (; k < K; k += 32) { /* K is a multiple of 32 */
#pragma GCC unroll 8
            for (int v = 0; v < 32 / VW; v += H) {
                vf w[2];
                weights_at(j, c, k + v * VW, GROUP, bits, is_signed, has_bias, w);
#pragma GCC unroll 2
                for (int h = 0; h < H; h++)
#pragma GCC unroll 8
                    for (int r = 0; r < R; r++) acc[r][0] += w[h] * load_f(j->x + r * K + k + (v + h) * VW);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
#pragma GCC unroll 4
            for (int a = 1; a < A; a++) acc[r][0] += acc[r][a];
            put_y(j, r, n, hsum(acc[r][0]));
        }
    }
}

#if VW == 16
/* Group g's 16 weights, q · scale (+ bias) for q = 0..15 (``iota``), in fp32. */
INLINE __m512 group_table(const Job *j, int64_t g, const int has_bias, __m512 iota) {
    const __m512 scale = _mm512_set1_ps(j->row_scales[g]);
    return has_bias ? _mm512_fmadd_ps(iota, scale, _mm512_set1_ps(j->row_biases[g])) : _mm512_mul_ps(iota, scale);
}

/* 4-bit codes in groups of 64 or 128 on AVX-512: a group's 16 possible weights, q · scale + bias in
 * fp32 (the dequantized weights themselves), sit in one vector, and vpermps looks each code up in it,
 * 16 at a time, straight from the packed bytes: lane l of a 64-byte load holds the 8 codes of inputs
 * 8l..8l+7, and shifting it by 4m puts input 8l + m in the bits vpermps reads (x is reordered to
 * match). Groups of 64 put two groups side by side (lanes 0-7 and 8-15) and look up in both tables
 * at once (vpermt2ps). One lookup and one FMA a row per 16 inputs: on CPUs whose vdpbf16ps issues
 * one every two cycles, this beats the bf16 path at every row count. */
INLINE void rows_q4_table(const Job *j, int64_t n0, int64_t n1, const int R, const int GROUP, const int has_bias) {
    const int64_t K = j->K, G = K / GROUP;
    const int A = R <= 2 ? 4 : R <= 4 ? 2 : 1;
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i low4 = _mm512_set1_epi32(15), second = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 16, 16, 16, 16, 16, 16, 16, 16);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *c = j->codes + n * (K / 2);
        widen_row(j, n, G);
        __m512 acc[MAX_ROWS][4];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int a = 0; a < A; a++) acc[r][a] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 128) {
            PREFETCH(c + k / 2);
            const __m512i raw = _mm512_loadu_si512(c + k / 2);
            const int64_t g = k / GROUP;
            const __m512 table = group_table(j, g, has_bias, iota);
            const __m512 table2 = GROUP == 128 ? table : group_table(j, g + 1, has_bias, iota);
#pragma GCC unroll 8
            for (int m = 0; m < 8; m++) {
                const __m512i shifted = m ? _mm512_srli_epi32(raw, 4 * m) : raw;
                /* (shifted & 15) | second: the code, and in bit 4 which of the two tables */
                const __m512 w = GROUP == 128 ? _mm512_permutexvar_ps(shifted, table)
                                              : _mm512_permutex2var_ps(table, _mm512_ternarylogic_epi32(shifted, low4, second, 0xEA), table2);
#pragma GCC unroll 8
                for (int r = 0; r < R; r++)
                    acc[r][m % A] = _mm512_fmadd_ps(w, _mm512_loadu_ps(j->x + r * K + k + 16 * m), acc[r][m % A]);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
#pragma GCC unroll 4
            for (int a = 1; a < A; a++) acc[r][0] = _mm512_add_ps(acc[r][0], acc[r][a]);
            put_y(j, r, n, _mm512_reduce_add_ps(acc[r][0]));
        }
    }
}
#define TABLE_PATH 1
#else
#define TABLE_PATH 0
#define rows_q4_table(...) ((void)0)
#endif

#if defined(__AVX512BF16__)
/* One 64-input step of the bf16 path: lane l of the products holds inputs 4l..4l+3 of the step, so
 * with groups of 32, lanes 0-7 are one group and 8-15 the next. SPLIT: the even and odd inputs'
 * products in two chains (for one or two rows, whose few chains would otherwise wait on latency). */
INLINE void q4_step(const Job *j, const uint8_t *c, int64_t s, const int R, const int GROUP, const int SPLIT,
                    __m512 *total, const int T, const int t, __m512i lut) {
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(c + 32 * s)));
    const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(w, _mm512_set1_epi16(15)), lut);
    const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), lut);
    const float *sc = j->row_scales;
    const __m512 scale = GROUP == 32 ? _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sc[2 * s]), _mm512_set1_ps(sc[2 * s + 1]))
                         : _mm512_set1_ps(sc[s * 64 / GROUP]);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        const uint16_t *x = j->x_bf16 + r * j->K + 64 * s;
        __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), lo, (__m512bh)_mm512_loadu_si512(x));
        if (SPLIT)
            p = _mm512_add_ps(p, _mm512_dpbf16_ps(_mm512_setzero_ps(), hi, (__m512bh)_mm512_loadu_si512(x + 32)));
        else
            p = _mm512_dpbf16_ps(p, hi, (__m512bh)_mm512_loadu_si512(x + 32));
        total[r * T + t] = _mm512_fmadd_ps(p, scale, total[r * T + t]);
    }
}

/* Output rows [n0, n1) for R rows on the bf16 path: steps in pairs, each of a pair into its own
 * total where registers allow (T = 2), so that no FMA waits on the one before. */
INLINE void rows_q4_bf16(const Job *j, int64_t n0, int64_t n1, const int R, const int GROUP, const int has_bias) {
    const int64_t K = j->K, G = K / GROUP, S = K / 64;
    const int T = R <= 4 ? 2 : 1, SPLIT = R <= 2;
    uint16_t table[32];
    for (int v = 0; v < 32; v++) {
        float f = (float)(v & 15);
        uint32_t u;
        memcpy(&u, &f, 4);
        table[v] = (uint16_t)(u >> 16);
    }
    const __m512i lut = _mm512_loadu_si512(table);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *c = j->codes + n * (K / 2);
        widen_row(j, n, G);
        __m512 total[MAX_ROWS * 2];
#pragma GCC unroll 16
        for (int i = 0; i < R * T; i++) total[i] = _mm512_setzero_ps();
        int64_t s = 0;
        for (; s + 2 <= S; s += 2) {
            PREFETCH(c + 32 * s);
            q4_step(j, c, s, R, GROUP, SPLIT, total, T, 0, lut);
            q4_step(j, c, s + 1, R, GROUP, SPLIT, total, T, T - 1, lut);
        }
        if (s < S) q4_step(j, c, s, R, GROUP, SPLIT, total, T, 0, lut);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            float out = _mm512_reduce_add_ps(T == 2 ? _mm512_add_ps(total[2 * r], total[2 * r + 1]) : total[r]);
            if (has_bias) out += bias_term(j->row_biases, j->x_sums + r * G, G);
            put_y(j, r, n, out);
        }
    }
}
#define BF16_PATH 1
#else
#define BF16_PATH 0
#define rows_q4_bf16(...) ((void)0)
#endif

#if defined(__AVX512VNNI__) || (defined(__AVX2__) && !defined(__AVX512F__))
/* The int8 path: x is quantized in blocks of 32 inputs, each with its own scale d = max|x| / 127
 * and codes round(x / d) (GGUF's Q8_0 for activations, what candle and llama.cpp multiply their
 * Q8_0 weights with), and bytes are multiplied by bytes, four products summed into each int32 lane.
 * One 64-byte piece of codes is a step: 64 inputs of 8-bit codes (lanes 0-7 the first block, 8-15
 * the second) or 128 inputs of 4-bit ones (the low nibbles are the 64 even inputs and the high ones
 * the 64 odd, x's codes are stored in that order, and lanes 4b..4b+3 are block b). Each step a row:
 * the int32 lanes in fp32, times the activations' block scales, times the weights' group scales,
 * into an fp32 total. Biases add Σ_g bias · (Σ x over group g) with the unquantized x. The one
 * error is x's rounding, at most d/2 an input: |y − exact| ≤ Σ_k |w_k| · d_k / 2.
 *
 * Two instruction sets do the byte products, and each takes one kind of 8-bit code as it is and
 * shifts the other by 128 (an exclusive or), taking 128 · Σ x's codes back per block (x_shift):
 * - AVX512-VNNI: vpdpbusd multiplies unsigned by signed bytes: signed codes are shifted.
 * - AVX2: vpmaddubsw multiplies unsigned by signed bytes into pairs summed in a saturating int16,
 *   and vpmaddwd by ones sums those pairs into int32. Signed codes w go in as |w| times x · sign(w)
 *   (vpsignb), so that a pair stays within 2 · 128 · 127 < 2^15; unsigned 8-bit codes are shifted;
 *   4-bit codes (0..15) go in as they are, and their even and odd pairs add in int16 (4 · 15 · 127). */
#if defined(__AVX512VNNI__)
#define SHIFTS(bits, is_signed) (is_signed)
#else
#define SHIFTS(bits, is_signed) ((bits) == 8 && !(is_signed))
#endif

static inline vf load_x(const float *xf, const uint16_t *xb, int64_t k) {
    return xb ? load_bf16(xb + k) : load_f(xf + k);
}

static inline vf abs_f(vf v) { return (vf)((vi)v & 0x7fffffff); }

static inline float max_abs(const float *xf, const uint16_t *xb, int64_t k, int64_t count) {
#if VW == 16
    __m512 most = _mm512_setzero_ps();
    for (int64_t i = k; i < k + count; i += VW) most = _mm512_max_ps(most, (__m512)abs_f(load_x(xf, xb, i)));
    return _mm512_reduce_max_ps(most);
#else
    __m256 most = _mm256_setzero_ps();
    for (int64_t i = k; i < k + count; i += VW) most = _mm256_max_ps(most, (__m256)abs_f(load_x(xf, xb, i)));
    float lanes[VW], amax = 0;
    memcpy(lanes, &most, sizeof lanes);
    for (int l = 0; l < VW; l++) amax = lanes[l] > amax ? lanes[l] : amax;
    return amax;
#endif
}

/* ``count`` codes round(x · inverse) (to nearest, even: the CPU's rounding) from input k on; returns their sum. */
static inline int32_t to_codes(const float *xf, const uint16_t *xb, int64_t k, int64_t count, float inverse,
                               int8_t *out) {
    vi sum = {0};
    for (int64_t i = 0; i < count; i += VW) {
        const vf scaled = load_x(xf, xb, k + i) * inverse;
#if VW == 16
        const vi q = (vi)_mm512_cvtps_epi32((__m512)scaled);
        _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtepi32_epi8((__m512i)q));
#else
        const vi q = (vi)_mm256_cvtps_epi32((__m256)scaled);
        const __m256i narrow = _mm256_packs_epi16(_mm256_packs_epi32((__m256i)q, (__m256i)q), _mm256_setzero_si256());
        _mm_storel_epi64((__m128i *)(out + i), _mm_unpacklo_epi32(_mm256_castsi256_si128(narrow),
                                                                   _mm256_extracti128_si256(narrow, 1)));
#endif
        sum += q;
    }
    int32_t total = 0;
    for (int l = 0; l < VW; l++) total += sum[l];
    return total;
}

/* Rows of x for weights with one scale a row (GROUP 0 below): codes, each row's scale d and the
 * sum of its codes. */
static void quantize_rows(const float *xf, const uint16_t *xb, int64_t rows, int64_t K, int8_t *xq, float *d,
                          int32_t *code_sums) {
    for (int64_t r = 0; r < rows; r++) {
        const float amax = max_abs(xf, xb, r * K, K), inverse = amax > 0 ? 127 / amax : 0;
        d[r] = amax / 127;
        code_sums[r] = to_codes(xf, xb, r * K, K, inverse, xq + r * K);
    }
}

/* x's rows as the int8 path reads them (see above): codes, each lane's block scale, and per group
 * the sums of x (biases) or the shift of shifted codes. */
static void quantize_x(const float *xf, const uint16_t *xb, int64_t rows, int64_t K, int bits, int64_t group,
                       int8_t *xq, float *lanes, float *x_sums, float *x_shift) {
    const int64_t STEP = bits == 8 ? 64 : 128, G = K / group;
    int8_t natural[128];
    float d[4];
    for (int64_t r = 0; r < rows; r++)
        for (int64_t k0 = 0; k0 < K; k0 += STEP) {
            for (int b = 0; b < STEP / 32; b++) {
                const int64_t k = r * K + k0 + 32 * b, g = r * G + (k0 + 32 * b) / group;
                const float amax = max_abs(xf, xb, k, 32), inverse = amax > 0 ? 127 / amax : 0;
                d[b] = amax / 127;
                const int32_t code_sum = to_codes(xf, xb, k, 32, inverse, natural + 32 * b);
                if (x_sums) {
                    vf sum = {0};
                    for (int i = 0; i < 32; i += VW) sum += load_x(xf, xb, k + i);
                    x_sums[g] += hsum(sum);
                }
                if (x_shift) x_shift[g] -= 128 * d[b] * (float)code_sum;
            }
            int8_t *out = xq + r * K + k0;
            if (bits == 8) {
                memcpy(out, natural, 64);
            } else { /* the 64 even inputs, then the 64 odd */
                for (int i = 0; i < 64; i++) {
                    out[i] = natural[2 * i];
                    out[64 + i] = natural[2 * i + 1];
                }
            }
            float *lane = lanes + (r * (K / STEP) + k0 / STEP) * 16;
            for (int l = 0; l < 16; l++) lane[l] = d[l / (bits == 8 ? 8 : 4)];
        }
}
#endif

#if defined(__AVX512VNNI__)
/* Each lane's weight scale for the step at input k (a lane covers 4 inputs of 8-bit codes, 8 of
 * 4-bit ones); the row's scales are padded, so reading 4 past the last group is harmless. */
INLINE __m512 step_scales(const float *scales, int64_t k, const int GROUP, const int bits) {
    const int lane_inputs = bits == 8 ? 4 : 8;
    if (GROUP >= 16 * lane_inputs) return _mm512_set1_ps(scales[k / GROUP]);
    const int lanes = GROUP / lane_inputs; /* per group */
    const __m512i index = lanes == 8 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                                     : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(index, _mm512_castps128_ps512(_mm_loadu_ps(scales + k / GROUP)));
}

/* Output rows [n0, n1) for R rows of x on the int8 path: A totals a row, as on the fp32 path.
 *
 * GROUP 0: signed 8-bit codes with one scale a row (the layout of ``--quantize int8`` and Kyutai's
 * q8 checkpoints), x quantized a whole row at a time with one scale d_r. No scale then changes
 * along the row: each step is one vpdpbusd a row into int32 totals, and a row's product is
 * scale · d_r · (Σ (q + 128) · xq − 128 · Σ xq), scaled once. This is the scheme of the reference's
 * q8 path (bitsandbytes' LLM.int8) and of oneDNN's int8 matmul. */
INLINE void rows_int8(const Job *j, int64_t n0, int64_t n1, const int R, const int GROUP, const int bits,
                      const int is_signed, const int has_bias) {
    const int64_t K = j->K, G = GROUP ? K / GROUP : 1, STEP = bits == 8 ? 64 : 128, S = K / STEP, row_bytes = K * bits / 8;
    const int A = R <= 2 ? 4 : R <= 4 ? 2 : 1;
    const __m512i low4 = _mm512_set1_epi8(15), flip = _mm512_set1_epi8((char)0x80);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *c = j->codes + n * row_bytes;
        widen_row(j, n, G);
        __m512 acc[MAX_ROWS][4]; /* fp32 totals; with one scale a row, int32 ones (whole) */
        __m512i whole[MAX_ROWS][4];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int a = 0; a < A; a++) {
                acc[r][a] = _mm512_setzero_ps();
                whole[r][a] = _mm512_setzero_si512();
            }
        for (int64_t s0 = 0; s0 < S; s0 += A) {
#pragma GCC unroll 4
            for (int a = 0; a < A; a++) {
                const int64_t s = s0 + a;
                if (A > 1 && s >= S) break;
                PREFETCH(c + 64 * s);
                const __m512i raw = _mm512_loadu_si512(c + 64 * s);
                const __m512 scale = GROUP ? step_scales(j->row_scales, s * STEP, GROUP, bits) : _mm512_setzero_ps();
                const __m512i lo = bits == 8 ? (is_signed ? _mm512_xor_si512(raw, flip) : raw) : _mm512_and_si512(raw, low4);
                const __m512i hi = bits == 8 ? lo : _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
#pragma GCC unroll 8
                for (int r = 0; r < R; r++) {
                    const int8_t *xq = j->xq + r * K + s * STEP;
                    if (!GROUP) {
                        whole[r][a] = _mm512_dpbusd_epi32(whole[r][a], lo, _mm512_loadu_si512(xq));
                        continue;
                    }
                    __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xq));
                    if (bits == 4) p = _mm512_dpbusd_epi32(p, hi, _mm512_loadu_si512(xq + 64));
                    const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(p), _mm512_loadu_ps(j->x_lanes + (r * S + s) * 16));
                    acc[r][a] = _mm512_fmadd_ps(f, scale, acc[r][a]);
                }
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
#pragma GCC unroll 4
            for (int a = 1; a < A; a++) {
                acc[r][0] = _mm512_add_ps(acc[r][0], acc[r][a]);
                whole[r][0] = _mm512_add_epi32(whole[r][0], whole[r][a]);
            }
            if (!GROUP) {
                const int32_t total = _mm512_reduce_add_epi32(whole[r][0]) - 128 * j->x_code_sums[r];
                put_y(j, r, n, j->row_scales[0] * j->x_lanes[r] * (float)total);
                continue;
            }
            float out = _mm512_reduce_add_ps(acc[r][0]);
            if (has_bias) out += bias_term(j->row_biases, j->x_sums + r * G, G);
            if (SHIFTS(bits, is_signed)) out += bias_term(j->row_scales, j->x_shift + r * G, G);
            put_y(j, r, n, out);
        }
    }
}

#define INT8_PATH 1
#elif defined(__AVX2__) && !defined(__AVX512F__)
/* Each lane's weight scale for the half step (32 bytes of codes) from input k: a lane covers 4
 * inputs of 8-bit codes, 8 of 4-bit ones, so only 4-bit codes in groups of 32 change scale within
 * a half (lanes 0-3, then 4-7). */
INLINE __m256 half_scales(const float *scales, int64_t k, const int GROUP, const int bits) {
    if (bits == 8 || GROUP > 32) return _mm256_set1_ps(scales[k / GROUP]);
    return _mm256_setr_m128(_mm_set1_ps(scales[k / 32]), _mm_set1_ps(scales[k / 32 + 1]));
}

/* The int8 path's rows (see rows_int8 for AVX512-VNNI) on AVX2: a step is two halves of 32 bytes,
 * each with its own A-th total, so that x's codes and lanes are laid out as for VNNI. GROUP 0:
 * signed codes with one scale a row, summed in int32 over the whole row (no shift to take back). */
INLINE void rows_int8(const Job *j, int64_t n0, int64_t n1, const int R, const int GROUP, const int bits,
                      const int is_signed, const int has_bias) {
    const int64_t K = j->K, G = GROUP ? K / GROUP : 1, HALF = bits == 8 ? 32 : 64, H = K / HALF, row_bytes = K * bits / 8;
    const int A = R <= 2 ? 4 : R <= 4 ? 2 : 1;
    const __m256i low4 = _mm256_set1_epi8(15), flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *c = j->codes + n * row_bytes;
        widen_row(j, n, G);
        __m256 acc[MAX_ROWS][4]; /* fp32 totals; with one scale a row, int32 ones (whole) */
        __m256i whole[MAX_ROWS][4];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int a = 0; a < A; a++) {
                acc[r][a] = _mm256_setzero_ps();
                whole[r][a] = _mm256_setzero_si256();
            }
        for (int64_t h0 = 0; h0 < H; h0 += A) {
#pragma GCC unroll 4
            for (int a = 0; a < A; a++) {
                const int64_t h = h0 + a;
                if (A > 1 && h >= H) break;
                if (h % 2 == 0) PREFETCH(c + 32 * h);
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(c + 32 * h));
                const __m256 scale = GROUP ? half_scales(j->row_scales, h * HALF, GROUP, bits) : _mm256_setzero_ps();
                /* 8-bit codes as signed bytes, their magnitudes; 4-bit codes: low and high nibbles */
                const __m256i w = bits == 4 ? _mm256_and_si256(raw, low4) : is_signed ? raw : _mm256_xor_si256(raw, flip);
                const __m256i other = bits == 4 ? _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4) : _mm256_abs_epi8(w);
#pragma GCC unroll 8
                for (int r = 0; r < R; r++) {
                    /* 8-bit codes: x's 32 codes of this half; 4-bit: the 32 even inputs', then 64 on the odd ones' */
                    const int8_t *xq = j->xq + r * K + (bits == 8 ? 32 * h : 128 * (h / 2) + 32 * (h % 2));
                    const __m256i x = _mm256_loadu_si256((const __m256i *)xq);
                    const __m256i pairs = bits == 8 ? _mm256_maddubs_epi16(other, _mm256_sign_epi8(x, w))
                        : _mm256_add_epi16(_mm256_maddubs_epi16(w, x), _mm256_maddubs_epi16(other, _mm256_loadu_si256((const __m256i *)(xq + 64))));
                    const __m256i p = _mm256_madd_epi16(pairs, ones);
                    if (!GROUP) {
                        whole[r][a] = _mm256_add_epi32(whole[r][a], p);
                        continue;
                    }
                    const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_loadu_ps(j->x_lanes + r * H * 8 + 8 * h));
                    acc[r][a] = _mm256_fmadd_ps(f, scale, acc[r][a]);
                }
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
#pragma GCC unroll 4
            for (int a = 1; a < A; a++) {
                acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][a]);
                whole[r][0] = _mm256_add_epi32(whole[r][0], whole[r][a]);
            }
            if (!GROUP) {
                int32_t lanes[8], total = 0;
                memcpy(lanes, &whole[r][0], sizeof lanes);
                for (int l = 0; l < 8; l++) total += lanes[l];
                put_y(j, r, n, j->row_scales[0] * j->x_lanes[r] * (float)total);
                continue;
            }
            float out = hsum((vf)acc[r][0]);
            if (has_bias) out += bias_term(j->row_biases, j->x_sums + r * G, G);
            if (SHIFTS(bits, is_signed)) out -= bias_term(j->row_scales, j->x_shift + r * G, G);
            put_y(j, r, n, out);
        }
    }
}
#define INT8_PATH 1
#else
#define INT8_PATH 0
#define SHIFTS(bits, is_signed) 0
#define rows_int8(...) ((void)0)
#define quantize_x(...) ((void)0)
#define quantize_rows(...) ((void)0)
#endif

/* One copy per row count, group size and code kind, each with its constants. */
#define FOR_ROWS(CALL) \
    switch (R) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; default: CALL(8); break; \
    }
#define KIND(R_, GROUP_) \
    (j->xq ? (bits == 4 ? (has_bias ? rows_int8(j, n0, n1, R_, GROUP_, 4, 0, 1) : rows_int8(j, n0, n1, R_, GROUP_, 4, 0, 0)) \
              : is_signed ? rows_int8(j, n0, n1, R_, GROUP_, 8, 1, 0) \
              : has_bias ? rows_int8(j, n0, n1, R_, GROUP_, 8, 0, 1) : rows_int8(j, n0, n1, R_, GROUP_, 8, 0, 0)) \
     : j->table ? (GROUP_ == 32 ? (void)0 : has_bias ? rows_q4_table(j, n0, n1, R_, GROUP_, 1) : rows_q4_table(j, n0, n1, R_, GROUP_, 0)) \
     : j->x_bf16 ? (has_bias ? rows_q4_bf16(j, n0, n1, R_, GROUP_, 1) : rows_q4_bf16(j, n0, n1, R_, GROUP_, 0)) \
     : bits == 4 ? (has_bias ? rows_f32(j, n0, n1, R_, GROUP_, 4, 0, 1) : rows_f32(j, n0, n1, R_, GROUP_, 4, 0, 0)) \
     : is_signed ? rows_f32(j, n0, n1, R_, GROUP_, 8, 1, 0) \
     : has_bias ? rows_f32(j, n0, n1, R_, GROUP_, 8, 0, 1) : rows_f32(j, n0, n1, R_, GROUP_, 8, 0, 0))
#define G32(R_) KIND(R_, 32)
#define G64(R_) KIND(R_, 64)
#define G128(R_) KIND(R_, 128)

#define ROW_SCALE(R_) rows_int8(j, n0, n1, R_, 0, 8, 1, 0)

static void rows(const Job *j, int64_t n0, int64_t n1, int R, int64_t group, int bits, int is_signed) {
    const int has_bias = j->biases != 0;
    if (group != 32 && group != 64 && group != 128) { /* group == K: signed codes, one scale a row */
        FOR_ROWS(ROW_SCALE)
    } else if (group == 32) {
        FOR_ROWS(G32)
    } else if (group == 64) {
        FOR_ROWS(G64)
    } else {
        FOR_ROWS(G128)
    }
}

/* Σ of ``bytes`` bytes (a multiple of 64) read as the kernels read their weights, prefetching
 * PREFETCH_BYTES ahead: the benchmarks' measure of what one thread can read from memory. */
int64_t moshi_read_bytes(const uint8_t *data, int64_t bytes) {
    int64_t total = 0;
    uint64_t lanes[8] = {0};
    for (int64_t i = 0; i < bytes; i += 64) {
        PREFETCH(data + i);
        uint64_t line[8];
        memcpy(line, data + i, 64);
        for (int l = 0; l < 8; l++) lanes[l] += line[l];
    }
    for (int l = 0; l < 8; l++) total += (int64_t)lanes[l];
    return total;
}

/* Whether this build has the int8 path (else ``int8_x`` changes nothing). */
int moshi_int8_path(void) { return INT8_PATH; }

/* The inputs this build takes: K a multiple of this (and of the group). */
int moshi_k_multiple(void) { return 32; }

static inline float bf16_value(uint16_t h) { return half_to_float(h, 0); }

/* A buffer that starts on a cache line: a vector load that straddles two lines costs two. */
static void *aligned(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* y [rows, N] = x [rows, K] · Wᵀ, x and y fp32 or (``x_is_bf16``, ``y_is_bf16``) bf16; ``scales`` (and ``biases``)
 * [N, K/group] in bf16, fp16 or fp32 (``scales_kind`` 0, 1, 2). ``int8_x``: take the int8 path where
 * this build has it (x quantized, see rows_int8); otherwise the exact paths. Groups of 32, 64 or
 * 128 inputs, or on the int8 path, for signed 8-bit codes, one group a row (group == K). Returns 0,
 * or -1 for arguments this build does not take, -2 when out of memory. Signed codes take no biases
 * (GGUF's Q8_0 has none). */
int moshi_grouped_matmul(const void *x_in, int x_is_bf16, int64_t rows_x, int64_t K, int64_t N,
                         const uint8_t *codes, int bits, int is_signed, int64_t group, const void *scales,
                         int scales_kind, const void *biases, void *y, int y_is_bf16, int threads, int int8_x) {
    const int int8_path = INT8_PATH && int8_x && K % (bits == 8 ? 64 : 128) == 0;
    const int row_scale = group == K && group != 32 && group != 64 && group != 128;
    if ((bits != 4 && bits != 8) || (bits == 4 && is_signed) || (is_signed && biases) || rows_x < 1 || N < 1 ||
        (group != 32 && group != 64 && group != 128 && !row_scale) || K % group || K % 32 || scales_kind < 0 ||
        scales_kind > 2 || (row_scale && !(int8_path && bits == 8 && is_signed)))
        return -1;
    const int64_t G = K / group, count = rows_x * K;
    const float *xf = x_is_bf16 ? 0 : x_in;
    const uint16_t *xb = x_is_bf16 ? x_in : 0;
    /* the int8 path where asked (its steps: 64 inputs of 8-bit codes, 128 of 4-bit ones); else for
     * 4-bit codes the table path where it takes the groups (its steps: 128 inputs), else the bf16
     * path for bf16 activations (its steps: 64 inputs), else the fp32 path */
    const int table_path = !int8_path && TABLE_PATH && bits == 4 && (group == 64 || group == 128) && K % 128 == 0;
    const int bf16_path = !int8_path && BF16_PATH && bits == 4 && x_is_bf16 && K % 64 == 0 && !table_path;
    const int f32_path = !int8_path && !bf16_path;
    /* the activations as the kernel reads them: fp32 (4-bit codes: reordered) or bf16 reordered, or
     * int8 codes with their scales; and per group, sums of x (for biases) or shifts (signed codes) */
    const int reorder = f32_path && (bits == 4 || x_is_bf16); /* else the fp32 path reads x as given */
    float *x_work = reorder ? aligned(sizeof(float) * count) : 0;
    uint16_t *x_pairs = bf16_path ? aligned(sizeof(uint16_t) * count) : 0;
    int8_t *xq = int8_path ? aligned(count) : 0;
    /* one scale a row: x_lanes holds each row's scale */
    float *x_lanes = int8_path ? aligned(sizeof(float) * (row_scale ? rows_x : count / (bits == 8 ? 4 : 8))) : 0;
    int32_t *x_code_sums = row_scale ? malloc(sizeof(int32_t) * rows_x) : 0;
    float *x_sums = (bf16_path || int8_path) && biases ? calloc(rows_x * G, sizeof(float)) : 0;
    float *x_shift = int8_path && SHIFTS(bits, is_signed) && !row_scale ? calloc(rows_x * G, sizeof(float)) : 0;
    int failed = (reorder && !x_work) || (bf16_path && !x_pairs) ||
                 (int8_path && (!xq || !x_lanes || (SHIFTS(bits, is_signed) && !row_scale && !x_shift) || (row_scale && !x_code_sums))) || ((bf16_path || int8_path) && biases && !x_sums);
    if (failed) {
        /* nothing to compute: the buffers that were allocated are freed below */
    } else if (row_scale) {
        quantize_rows(xf, xb, rows_x, K, xq, x_lanes, x_code_sums);
    } else if (int8_path) {
        quantize_x(xf, xb, rows_x, K, bits, group, xq, x_lanes, x_sums, x_shift);
    } else if (bf16_path) { /* each 64 inputs: the 32 even, then the 32 odd */
        for (int64_t i = 0; i < count; i += 64)
            for (int v = 0; v < 32; v++) {
                x_pairs[i + v] = xb[i + 2 * v];
                x_pairs[i + 32 + v] = xb[i + 2 * v + 1];
            }
        for (int64_t i = 0; x_sums && i < rows_x * G; i++)
            for (int64_t k = i * group; k < (i + 1) * group; k++) x_sums[i] += bf16_value(xb[k]);
    } else if (table_path) { /* each 128 inputs: lane l of lookup m takes input 8l + m */
        for (int64_t i = 0; i < count; i += 128)
            for (int m = 0; m < 8; m++)
                for (int l = 0; l < 16; l++)
                    x_work[i + 16 * m + l] = xb ? bf16_value(xb[i + 8 * l + m]) : xf[i + 8 * l + m];
    } else if (bits == 4) { /* the nibbles of VW bytes are VW even then VW odd inputs: x in that order */
        for (int64_t i = 0; i < count; i += 2 * VW)
            for (int v = 0; v < VW; v++) {
                x_work[i + v] = xb ? bf16_value(xb[i + 2 * v]) : xf[i + 2 * v];
                x_work[i + VW + v] = xb ? bf16_value(xb[i + 2 * v + 1]) : xf[i + 2 * v + 1];
            }
    } else if (x_is_bf16) {
        for (int64_t i = 0; i < count; i++) x_work[i] = bf16_value(xb[i]);
    }
    const float *x = x_work ? x_work : xf;
    if (threads < 1) threads = 1;
    if (threads > N) threads = (int)N;
    int no_row = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : no_row)
    if (!failed) {
        int t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
        /* contiguous slices of output rows, cut at multiples of 16 (whole cache lines of y) */
        const int64_t per = ((N + T - 1) / T + 15) / 16 * 16;
        const int64_t n0 = t * per < N ? t * per : N, n1 = n0 + per < N ? n0 + per : N;
        /* one row's scales and biases in fp32; 16 more, as the int8 path reads a little ahead */
        float *row = malloc(sizeof(float) * (2 * G + 16));
        no_row = !row;
        const int64_t lanes_per_row = row_scale ? 1 : K / (bits == 8 ? 64 : 128) * 16;
        for (int64_t r0 = 0; row && r0 < rows_x && n0 < n1; r0 += MAX_ROWS) {
            Job j = {x && !int8_path ? x + r0 * K : 0, x_pairs ? x_pairs + r0 * K : 0, x_sums ? x_sums + r0 * G : 0, K, N,
                     codes, scales, biases, scales_kind, y_is_bf16 ? 0 : (float *)y + r0 * N, y_is_bf16 ? (uint16_t *)y + r0 * N : 0,
                     row, row + G, table_path,
                     xq ? xq + r0 * K : 0, x_lanes ? x_lanes + r0 * lanes_per_row : 0, x_shift ? x_shift + r0 * G : 0,
                     x_code_sums ? x_code_sums + r0 : 0};
            const int R = rows_x - r0 < MAX_ROWS ? (int)(rows_x - r0) : MAX_ROWS;
            rows(&j, n0, n1, R, group, bits, is_signed);
        }
        free(row);
    }
    free(x_work);
    free(x_pairs);
    free(xq);
    free(x_lanes);
    free(x_sums);
    free(x_shift);
    free(x_code_sums);
    return failed || no_row ? -2 : 0;
}
