/* y = x · Wᵀ for a few rows of x (fp32) and a weight W kept in a grouped low-bit format:
 *
 *   W[n, k] = q[n, k] · scale[n, g] (+ bias[n, g]),  g = k / group
 *
 * with 4-bit codes (two a byte, the even input in the low nibble: MLX's layout and ours) or 8-bit
 * codes (signed: GGUF's Q8_0; unsigned: MLX's q8), scales and biases bf16 or fp16.
 *
 * At batch 1 a product is memory-bound: each weight byte is read once. Every code is widened
 * exactly (to fp32, or to bf16 on the AVX512-BF16 path for 4-bit codes and bf16 activations, whose
 * products are then exact too), and per group the kernel sums q·x in fp32, then adds
 * scale · (Σ q·x) + bias · (Σ x over the group), the sums of x computed once per call. That is the
 * product with the dequantized weight rearranged: the result differs from the fp32 product with
 * the dequantized weight only by fp32 rounding in another order. Widening each code to its
 * weight instead (q · scale + bias, one more FMA per widened vector) measured alike within the
 * noise of a shared 2-core machine; the per-group form does fewer instructions.
 *
 * The same source is compiled once per instruction set (see setup.py); the vector width follows
 * the compiler's target. Rows of W are split over ``threads`` OpenMP threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX2__)
#define VW 8
#else
#define VW 4
#endif
/* Codes are prefetched this far ahead: the hardware prefetcher stops at each 4 KB page, and a
 * row is a few KB, so without it a single thread reads memory at half its bandwidth. */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048
#endif
#define MAX_ROWS 8 /* rows of x multiplied per pass over W; more rows take several passes */

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint8_t vu8 __attribute__((vector_size(VW)));
typedef int8_t vs8 __attribute__((vector_size(VW)));

static inline vf load_f(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }

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

static inline float hsum(vf v) {
    float s = 0;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
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
    const float *x; /* [rows, K]; for 4-bit codes, each 2·VW inputs reordered: VW even, VW odd */
    const uint16_t *x_bf16; /* bf16 4-bit path: [rows, K], each 64 inputs reordered: 32 even, 32 odd */
    const float *x_sums; /* [rows, K/group]: the sum of x over each group (with biases) */
    int64_t K, N;
    const uint8_t *codes; /* [N, K·bits/8] */
    const uint16_t *scales, *biases; /* [N, K/group]; biases may be NULL */
    int scales_fp16;
    float *y; /* [rows, N] */
    float *row_scales, *row_biases; /* [K/group] each: one row's, in fp32 (this thread's buffers) */
} Job;

/* One row's scales (and biases) in fp32, so that the hot loop only broadcasts them. */
static inline void widen_halves(const uint16_t *src, float *dst, int64_t count, int fp16) {
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
    widen_halves(j->scales + n * G, j->row_scales, G, j->scales_fp16);
    if (j->biases) widen_halves(j->biases + n * G, j->row_biases, G, j->scales_fp16);
}

/* Σ_g bias[g] · (Σ of x over group g): a row's bias term. */
static inline float bias_term(const float *biases, const float *x_sums, int64_t G) {
    vf acc = {0};
    int64_t g = 0;
    for (; g + VW <= G; g += VW) acc += load_f(biases + g) * load_f(x_sums + g);
    float total = hsum(acc);
    for (; g < G; g++) total += biases[g] * x_sums[g];
    return total;
}

/* Output rows [n0, n1) for R rows of x, groups of GROUP inputs; R, GROUP, the code kind and whether
 * there are biases are constants once inlined. Per group: Σ q·x in fp32 vectors (two partial sums,
 * so that the FMA latency does not bound a single row), then total += scale · that (two totals for
 * even and odd groups). The biases add Σ_g bias · Σ x over the group at the end. */
static inline __attribute__((always_inline)) void rows_grouped(const Job *j, int64_t n0, int64_t n1, const int R,
                                                               const int GROUP, const int bits, const int is_signed,
                                                               const int has_bias) {
    const int64_t K = j->K, G = K / GROUP;
    /* inputs per widened load: VW bytes hold 2·VW 4-bit codes (VW even then VW odd inputs), or VW 8-bit ones */
    const int STEP = bits == 4 ? 2 * VW : VW;
    const int64_t row_bytes = K * bits / 8;
    /* two partial sums and totals a row for one or two rows (latency); one for more (registers) */
    const int two = R <= 2;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *c = j->codes + n * row_bytes;
        widen_row(j, n, G);
        vf total[MAX_ROWS][2] = {{{0}}};
        for (int64_t g = 0; g < G; g++) {
            vf part[MAX_ROWS][2] = {{{0}}};
            for (int i = 0; i < GROUP / STEP; i++) {
                const int64_t k = g * GROUP + i * STEP;
                const uint8_t *bytes = c + k * bits / 8;
                __builtin_prefetch(bytes + PREFETCH_BYTES);
                if (bits == 4) {
                    const vi q = widen_u8(bytes);
                    const vf lo = __builtin_convertvector(q & 15, vf), hi = __builtin_convertvector(q >> 4, vf);
                    for (int r = 0; r < R; r++) {
                        part[r][0] += lo * load_f(j->x + r * K + k);
                        part[r][two] += hi * load_f(j->x + r * K + k + VW);
                    }
                } else {
                    const vf w = __builtin_convertvector(is_signed ? widen_s8(bytes) : widen_u8(bytes), vf);
                    for (int r = 0; r < R; r++) part[r][two & i] += w * load_f(j->x + r * K + k);
                }
            }
            for (int r = 0; r < R; r++)
                total[r][two & g] += (two ? part[r][0] + part[r][1] : part[r][0]) * j->row_scales[g];
        }
        for (int r = 0; r < R; r++) {
            float out = hsum(total[r][0] + total[r][1]);
            if (has_bias) out += bias_term(j->row_biases, j->x_sums + r * G, G);
            j->y[r * j->N + n] = out;
        }
    }
}

#if defined(__AVX512BF16__)
/* 4-bit codes and bf16 activations with AVX512-BF16: each code becomes its exact bf16 value through
 * a 16-entry table (vpermw), and vdpbf16ps sums pairs of exact bf16 products into fp32, 64 inputs
 * in 7 instructions where the fp32 path needs 16. Lane j of a 64-input step holds inputs 4j..4j+3:
 * with groups of 32, lanes 0-7 are one group and 8-15 the next. */
static inline __attribute__((always_inline)) void rows_q4_bf16(const Job *j, int64_t n0, int64_t n1, const int R,
                                                               const int GROUP, const int has_bias) {
    const int64_t K = j->K, G = K / GROUP;
    const int two = R <= 2, steps_per_group = GROUP >= 64 ? GROUP / 64 : 1;
    uint16_t table[32];
    for (int v = 0; v < 32; v++) {
        float f = (float)(v & 15);
        uint32_t u;
        memcpy(&u, &f, 4);
        table[v] = (uint16_t)(u >> 16);
    }
    const __m512i lut = _mm512_loadu_si512(table), low4 = _mm512_set1_epi16(15);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *c = j->codes + n * (K / 2);
        widen_row(j, n, G);
        __m512 total[MAX_ROWS][2], part[MAX_ROWS][2];
        for (int r = 0; r < R; r++) total[r][0] = total[r][1] = part[r][0] = part[r][1] = _mm512_setzero_ps();
        for (int64_t s = 0; s < K / 64; s++) {
            __builtin_prefetch(c + 32 * s + PREFETCH_BYTES);
            const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(c + 32 * s)));
            const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(w, low4), lut);
            const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), lut);
            for (int r = 0; r < R; r++) {
                const uint16_t *x = j->x_bf16 + r * K + 64 * s;
                part[r][0] = _mm512_dpbf16_ps(part[r][0], lo, (__m512bh)_mm512_loadu_si512(x));
                part[r][two] = _mm512_dpbf16_ps(part[r][two], hi, (__m512bh)_mm512_loadu_si512(x + 32));
            }
            if (GROUP == 32) { /* lanes 0-7: group 2s, lanes 8-15: group 2s + 1 */
                const __m512 scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(j->row_scales[2 * s]),
                                                          _mm512_set1_ps(j->row_scales[2 * s + 1]));
                for (int r = 0; r < R; r++) {
                    const __m512 p = two ? _mm512_add_ps(part[r][0], part[r][1]) : part[r][0];
                    total[r][two & s] = _mm512_fmadd_ps(p, scale, total[r][two & s]);
                    part[r][0] = part[r][1] = _mm512_setzero_ps();
                }
            } else if ((s + 1) % steps_per_group == 0) {
                const int64_t g = s / steps_per_group;
                const __m512 scale = _mm512_set1_ps(j->row_scales[g]);
                for (int r = 0; r < R; r++) {
                    const __m512 p = two ? _mm512_add_ps(part[r][0], part[r][1]) : part[r][0];
                    total[r][two & g] = _mm512_fmadd_ps(p, scale, total[r][two & g]);
                    part[r][0] = part[r][1] = _mm512_setzero_ps();
                }
            }
        }
        for (int r = 0; r < R; r++) {
            float out = _mm512_reduce_add_ps(_mm512_add_ps(total[r][0], total[r][1]));
            if (has_bias) out += bias_term(j->row_biases, j->x_sums + r * G, G);
            j->y[r * j->N + n] = out;
        }
    }
}
#define BF16_PATH 1
#else
#define BF16_PATH 0
#define rows_q4_bf16(...) ((void)0)
#endif

/* One copy per row count, group size and code kind, each with its constants. */
#define FOR_ROWS(CALL) \
    switch (R) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; default: CALL(8); break; \
    }
#define KIND(R_, GROUP_) \
    (j->x_bf16 ? (has_bias ? rows_q4_bf16(j, n0, n1, R_, GROUP_, 1) : rows_q4_bf16(j, n0, n1, R_, GROUP_, 0)) \
     : bits == 4 ? (has_bias ? rows_grouped(j, n0, n1, R_, GROUP_, 4, 0, 1) : rows_grouped(j, n0, n1, R_, GROUP_, 4, 0, 0)) \
     : is_signed ? rows_grouped(j, n0, n1, R_, GROUP_, 8, 1, 0) \
     : has_bias ? rows_grouped(j, n0, n1, R_, GROUP_, 8, 0, 1) : rows_grouped(j, n0, n1, R_, GROUP_, 8, 0, 0))
#define G32(R_) KIND(R_, 32)
#define G64(R_) KIND(R_, 64)
#define G128(R_) KIND(R_, 128)

static void rows(const Job *j, int64_t n0, int64_t n1, int R, int64_t group, int bits, int is_signed) {
    const int has_bias = j->biases != 0;
    if (group == 32) {
        FOR_ROWS(G32)
    } else if (group == 64) {
        FOR_ROWS(G64)
    } else {
        FOR_ROWS(G128)
    }
}

/* The inputs this build takes: K a multiple of this (and of the group). */
int moshi_k_multiple(void) { return 32; }

static inline float bf16_value(uint16_t h) { return half_to_float(h, 0); }

/* y [rows, N] = x [rows, K] · Wᵀ, x fp32 or (``x_is_bf16``) bf16. Returns 0, or -1 for arguments
 * this build does not take, -2 when out of memory. Signed codes take no biases (GGUF's Q8_0 has
 * none). bf16 activations with 4-bit codes take the AVX512-BF16 path where this build has it. */
int moshi_grouped_matmul(const void *x_in, int x_is_bf16, int64_t rows_x, int64_t K, int64_t N,
                         const uint8_t *codes, int bits, int is_signed, int64_t group, const uint16_t *scales,
                         int scales_fp16, const uint16_t *biases, float *y, int threads) {
    if ((bits != 4 && bits != 8) || (bits == 4 && is_signed) || (is_signed && biases) || rows_x < 1 || N < 1 ||
        (group != 32 && group != 64 && group != 128) || K % group || K % 32)
        return -1;
    const int64_t G = K / group, count = rows_x * K;
    const float *xf = x_is_bf16 ? 0 : x_in;
    const uint16_t *xb = x_is_bf16 ? x_in : 0;
    const int bf16_path = BF16_PATH && bits == 4 && x_is_bf16 && K % 64 == 0; /* its steps: 64 inputs */
    /* the activations as the kernel reads them: fp32 (4-bit codes: reordered) or bf16 reordered */
    float *x_work = bf16_path || (bits == 8 && !x_is_bf16) ? 0 : malloc(sizeof(float) * count);
    uint16_t *x_pairs = bf16_path ? malloc(sizeof(uint16_t) * count) : 0;
    float *x_sums = biases ? malloc(sizeof(float) * rows_x * G) : 0;
    if ((!x_work && !bf16_path && !(bits == 8 && !x_is_bf16)) || (bf16_path && !x_pairs) || (biases && !x_sums)) {
        free(x_work);
        free(x_pairs);
        free(x_sums);
        return -2;
    }
    if (bf16_path) /* each 64 inputs: the 32 even, then the 32 odd */
        for (int64_t i = 0; i < count; i += 64)
            for (int v = 0; v < 32; v++) {
                x_pairs[i + v] = xb[i + 2 * v];
                x_pairs[i + 32 + v] = xb[i + 2 * v + 1];
            }
    else if (bits == 4) /* the nibbles of VW bytes are VW even then VW odd inputs: x in that order */
        for (int64_t i = 0; i < count; i += 2 * VW)
            for (int v = 0; v < VW; v++) {
                x_work[i + v] = xb ? bf16_value(xb[i + 2 * v]) : xf[i + 2 * v];
                x_work[i + VW + v] = xb ? bf16_value(xb[i + 2 * v + 1]) : xf[i + 2 * v + 1];
            }
    else if (x_is_bf16)
        for (int64_t i = 0; i < count; i++) x_work[i] = bf16_value(xb[i]);
    for (int64_t i = 0; biases && i < rows_x * G; i++) {
        float sum = 0;
        for (int64_t k = i * group; k < (i + 1) * group; k++) sum += xb ? bf16_value(xb[k]) : xf[k];
        x_sums[i] = sum;
    }
    const float *x = x_work ? x_work : xf;
    int failed = 0;
    if (threads < 1) threads = 1;
    if (threads > N) threads = (int)N;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        int t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
        /* contiguous slices of output rows, cut at multiples of 16 (whole cache lines of y) */
        const int64_t per = ((N + T - 1) / T + 15) / 16 * 16;
        const int64_t n0 = t * per < N ? t * per : N, n1 = n0 + per < N ? n0 + per : N;
        float *row = malloc(sizeof(float) * 2 * G);
        failed = !row;
        for (int64_t r0 = 0; row && r0 < rows_x && n0 < n1; r0 += MAX_ROWS) {
            Job j = {x ? x + r0 * K : 0, x_pairs ? x_pairs + r0 * K : 0, biases ? x_sums + r0 * G : 0, K, N, codes,
                     scales, biases, scales_fp16, y + r0 * N, row, row + G};
            const int R = rows_x - r0 < MAX_ROWS ? (int)(rows_x - r0) : MAX_ROWS;
            rows(&j, n0, n1, R, group, bits, is_signed);
        }
        free(row);
    }
    free(x_work);
    free(x_pairs);
    free(x_sums);
    return failed ? -2 : 0;
}
