/* One decoding step of attention: each head's single query against the first n slots of its ring
 * of keys and values, in one pass over them.
 *
 *   out[h] = Σ_j p_j · v[h, j] / Σ_j p_j,  p_j = exp(scale · q[h]·k[h, j] − max) for allowed slots j
 *
 * Keys and values are read once each, in the ring's own dtype (bf16 or fp32), and everything is
 * computed in fp32: the dot products, the softmax (its exponential accurate to about 1e-7
 * relative) and the weighted sum. At one query a head this is bound by reading the ring, which
 * the library matmuls do not reach: they cost per call (a bf16 matmul over a ring that grows by one
 * slot each step creates a new kernel for each shape) or run the bf16 products slowly on CPUs
 * without AMX. Heads are split over ``threads`` OpenMP threads. */
#include "vector.h"

#include <math.h>

/* e^x in fp32 vectors, for x ≤ 0 (below −87 it gives e^−87, which the caller masks or which
 * vanishes beside the maximum's e^0): x = n·ln2 + r with |r| ≤ ln2/2, e^r by its Taylor series to
 * r⁶ (relative error below 2e-7), 2^n put in the exponent bits. */
static inline vf exp_vector(vf x) {
    const vf low = (vf){0} - 87.0f;
    const vi below = x < low;
    x = (vf)(((vi)x & ~below) | ((vi)low & below));
    const float magic = 12582912.0f; /* 1.5 · 2^23: adding it rounds to a whole number */
    const vf n = (x * 1.44269504088896341f + magic) - magic;
    const vf r = (x - n * 0.693359375f) - n * -2.12194440e-4f; /* ln 2 in two parts: n · hi is exact */
    vf p = r * (1.0f / 720) + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)bits;
}

/* VW values of a ring from element ``at`` on, in fp32. */
static inline vf load_slot(const void *ring, int bf16, int64_t at) {
    return bf16 ? load_bf16((const uint16_t *)ring + at) : load_f((const float *)ring + at);
}

/* One head: ``scores`` is this thread's buffer of n floats. D is a literal where the caller can
 * make it one (64, 128), so that the value accumulators stay in registers. */
INLINE void attend_head(const float *q, const void *keys, const void *values, int bf16, int64_t n,
                        const uint8_t *allowed, float scale, float *scores, float *out, const int64_t D) {
    const int64_t slot_bytes = D * (bf16 ? 2 : 4);
    float best = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        for (int64_t line = 0; line < slot_bytes; line += 64) PREFETCH((const char *)keys + j * slot_bytes + line);
        if (!allowed[j]) {
            scores[j] = -INFINITY;
            continue;
        }
        vf acc = {0};
        for (int64_t d = 0; d < D; d += VW) acc += load_slot(keys, bf16, j * D + d) * load_f(q + d);
        scores[j] = hsum(acc) * scale;
        best = scores[j] > best ? scores[j] : best;
    }
    float o[D];
    memset(o, 0, sizeof o);
    if (best == -INFINITY) { /* nothing allowed: zeros (the caller always allows the query's own slot) */
        memcpy(out, o, sizeof o);
        return;
    }
    vf totals = {0};
    int64_t j = 0;
    for (; j + VW <= n; j += VW) {
        const vf s = load_f(scores + j);
        const vf p = (vf)((vi)exp_vector(s - best) & (s > -INFINITY)); /* masked slots: exactly 0 */
        memcpy(scores + j, &p, sizeof p);
        totals += p;
    }
    float total = hsum(totals);
    for (; j < n; j++) {
        scores[j] = scores[j] > -INFINITY ? expf(scores[j] - best) : 0.0f;
        total += scores[j];
    }
    for (j = 0; j < n; j++) {
        for (int64_t line = 0; line < slot_bytes; line += 64) PREFETCH((const char *)values + j * slot_bytes + line);
        const float p = scores[j];
        if (p == 0.0f) continue;
        for (int64_t d = 0; d < D; d += VW) {
            vf acc = load_f(o + d) + p * load_slot(values, bf16, j * D + d);
            memcpy(o + d, &acc, sizeof acc);
        }
    }
    for (int64_t d = 0; d < D; d++) out[d] = o[d] / total;
}

/* q and out: [batch · heads, D] fp32. keys and values: [batch, heads, capacity, D], bf16 (``bf16``)
 * or fp32, contiguous; slots [0, n) are attended where ``allowed`` [batch, n] is nonzero. Returns 0,
 * -1 for a head size this build does not take (a multiple of VW up to 256), -2 when out of memory. */
int moshi_attend(const float *q, const void *keys, const void *values, int bf16, int64_t batch, int64_t heads,
                 int64_t capacity, int64_t n, int64_t D, const uint8_t *allowed, float scale, float *out, int threads) {
    if (D % VW || D < VW || D > 256 || n < 1 || n > capacity || batch < 1 || heads < 1) return -1;
    const int64_t all = batch * heads, slot_bytes = D * (bf16 ? 2 : 4);
    if (threads < 1) threads = 1;
    if (threads > all) threads = (int)all;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * n);
        failed = !scores;
#pragma omp for schedule(static)
        for (int64_t h = 0; h < all; h++) {
            if (!scores) continue;
            const char *k = (const char *)keys + h * capacity * slot_bytes, *v = (const char *)values + h * capacity * slot_bytes;
            const uint8_t *a = allowed + (h / heads) * n;
            if (D == 128)
                attend_head(q + h * D, k, v, bf16, n, a, scale, scores, out + h * D, 128);
            else if (D == 64)
                attend_head(q + h * D, k, v, bf16, n, a, scale, scores, out + h * D, 64);
            else
                attend_head(q + h * D, k, v, bf16, n, a, scale, scores, out + h * D, D);
        }
        free(scores);
    }
    return failed ? -2 : 0;
}
