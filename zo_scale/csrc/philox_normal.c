/* Counter-based directions for zo_scale: Philox4x32-10, then Box-Muller Gaussians or
 * Rademacher signs, float32 out.
 *
 * Element i of a stream (key k0,k1; counter words c2,c3) comes from the Philox block
 * b = i / 4 with counter (lo32(b), hi32(b), c2, c3): words (x0,x1) give elements 4b, 4b+1,
 * words (x2,x3) give 4b+2, 4b+3 (Gaussian); for signs, word k's top bit gives element 4b+k
 * (0: +1, 1: -1). This must match zo_scale/rng.py integer for integer.
 *
 * Work is done in tiles of TILE elements aligned to the global index, each tile by the
 * same fixed-trip-count loop, so an element's float value never depends on which range
 * it was requested in (vector and scalar math paths would round differently).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define TILE 256
#define BLOCKS (TILE / 4)

static void tile_words(uint64_t tile, uint32_t k0_in, uint32_t k1_in, uint32_t c2_in, uint32_t c3_in,
                       uint32_t *restrict x0, uint32_t *restrict x1, uint32_t *restrict x2,
                       uint32_t *restrict x3) {
    const uint64_t first = tile * BLOCKS;
#pragma omp simd
    for (int j = 0; j < BLOCKS; ++j) {
        uint64_t b = first + (uint64_t)j;
        uint32_t c0 = (uint32_t)b, c1 = (uint32_t)(b >> 32), c2 = c2_in, c3 = c3_in;
        uint32_t k0 = k0_in, k1 = k1_in;
        for (int r = 0; r < 10; ++r) {
            uint64_t p0 = (uint64_t)0xD2511F53u * c0;
            uint64_t p1 = (uint64_t)0xCD9E8D57u * c2;
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
            c1 = (uint32_t)p1;
            c3 = (uint32_t)p0;
            c0 = n0;
            c2 = n2;
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        x0[j] = c0; x1[j] = c1; x2[j] = c2; x3[j] = c3;
    }
}

static void tile_normals(uint64_t tile, uint32_t k0, uint32_t k1, uint32_t c2, uint32_t c3,
                         float *restrict out) {
    uint32_t x0[BLOCKS], x1[BLOCKS], x2[BLOCKS], x3[BLOCKS];
    tile_words(tile, k0, k1, c2, c3, x0, x1, x2, x3);
    const float inv24 = 1.0f / 16777216.0f, two_pi = 6.283185307179586f;
#pragma omp simd
    for (int j = 0; j < BLOCKS; ++j) {
        /* u1 in (0, 1] so the log is finite; u2 in [0, 1) for the angle; both exact in fp32 */
        float ua = (float)((x0[j] >> 8) + 1u) * inv24, va = (float)(x1[j] >> 8) * inv24;
        float ub = (float)((x2[j] >> 8) + 1u) * inv24, vb = (float)(x3[j] >> 8) * inv24;
        float ra = sqrtf(-2.0f * logf(ua)), rb = sqrtf(-2.0f * logf(ub));
        out[4 * j + 0] = ra * cosf(two_pi * va);
        out[4 * j + 1] = ra * sinf(two_pi * va);
        out[4 * j + 2] = rb * cosf(two_pi * vb);
        out[4 * j + 3] = rb * sinf(two_pi * vb);
    }
}

static void tile_signs(uint64_t tile, uint32_t k0, uint32_t k1, uint32_t c2, uint32_t c3,
                       float *restrict out) {
    uint32_t x0[BLOCKS], x1[BLOCKS], x2[BLOCKS], x3[BLOCKS];
    tile_words(tile, k0, k1, c2, c3, x0, x1, x2, x3);
#pragma omp simd
    for (int j = 0; j < BLOCKS; ++j) {
        out[4 * j + 0] = 1.0f - 2.0f * (float)(x0[j] >> 31);
        out[4 * j + 1] = 1.0f - 2.0f * (float)(x1[j] >> 31);
        out[4 * j + 2] = 1.0f - 2.0f * (float)(x2[j] >> 31);
        out[4 * j + 3] = 1.0f - 2.0f * (float)(x3[j] >> 31);
    }
}

typedef void (*tile_fn)(uint64_t, uint32_t, uint32_t, uint32_t, uint32_t, float *restrict);

/* Fill out[0:n] with the stream's elements [start, start + n). */
static void fill_range(tile_fn tile_values, uint64_t start, int64_t n, uint32_t k0, uint32_t k1,
                       uint32_t c2, uint32_t c3, float *out, int num_threads) {
    if (n <= 0) return;
    const uint64_t end = start + (uint64_t)n;
    const int64_t t_first = (int64_t)(start / TILE), t_last = (int64_t)((end - 1) / TILE);
    /* small ranges stay on the calling thread: a thread team costs more than it saves */
#pragma omp parallel for schedule(static) num_threads(num_threads) if (n >= (1 << 16))
    for (int64_t t = t_first; t <= t_last; ++t) {
        uint64_t t0 = (uint64_t)t * TILE;
        if (t0 >= start && t0 + TILE <= end) {
            tile_values((uint64_t)t, k0, k1, c2, c3, out + (t0 - start));
        } else { /* edge tile: compute whole, copy the overlap */
            float buf[TILE];
            tile_values((uint64_t)t, k0, k1, c2, c3, buf);
            uint64_t lo = t0 > start ? t0 : start, hi = t0 + TILE < end ? t0 + TILE : end;
            memcpy(out + (lo - start), buf + (lo - t0), (size_t)(hi - lo) * sizeof(float));
        }
    }
}

void zo_philox_normal(uint64_t start, int64_t n, uint32_t k0, uint32_t k1, uint32_t c2, uint32_t c3,
                      float *out, int num_threads) {
    fill_range(tile_normals, start, n, k0, k1, c2, c3, out, num_threads);
}

void zo_philox_sign(uint64_t start, int64_t n, uint32_t k0, uint32_t k1, uint32_t c2, uint32_t c3,
                    float *out, int num_threads) {
    fill_range(tile_signs, start, n, k0, k1, c2, c3, out, num_threads);
}
