/* What the native kernels share: the vector width of the build's target, GCC's generic vectors of
 * that width, and how weights and caches are prefetched. Every source is compiled once per
 * instruction set (see setup.py), so VW follows the compiler's flags. */
#ifndef MOSHI_VECTOR_H
#define MOSHI_VECTOR_H

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

/* Weights (and attention's keys and values) are prefetched this far ahead: the hardware
 * prefetcher stops at each 4 KB page, and a row is a few KB, so without it a single thread reads
 * memory at half its bandwidth. PREFETCH brings the line into L2 only (prefetcht2): a line bound
 * for L1 holds one of its few fill buffers until it arrives, which caps the lines in flight; into
 * L2, twice as far ahead, a Sapphire Rapids thread's Q8_0 layer ran at 12.7 GB/s against 11.3
 * (int4 12.4 against 10.7, reads 15.5). */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 8192
#endif
#define PREFETCH(p) __builtin_prefetch((const char *)(p) + PREFETCH_BYTES, 0, 1)
#define INLINE static inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

static inline vf load_f(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }

/* VW bf16 values in fp32: each is the top half of its fp32. */
static inline vf load_bf16(const uint16_t *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#elif defined(__AVX2__)
    return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#else
    uint16_t raw[VW];
    memcpy(raw, p, sizeof raw);
    vi v;
    for (int i = 0; i < VW; i++) v[i] = (int32_t)((uint32_t)raw[i] << 16);
    return (vf)v;
#endif
}

static inline float hsum(vf v) {
    float s = 0;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
}

#endif
