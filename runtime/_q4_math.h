/* The arithmetic of runtime/_kernels.c: y = x @ W.T for W in GGUF Q4_1 blocks of 32,
 * float activations, float accumulation.
 *
 * One weight is  w[n, k] = d[n, b] * (q[n, k] - 8) + o[b, n]   (b = k / 32, q in 0..15)
 * which is GGUF Q4_1 (d q + m) with o = m + 8d: centred codes, as MatMulNBits' default
 * zero point, so the two sums below do not cancel (GGUF's m is about -8d). d and o are
 * float16 (the exporter uses this op only where m + 8d is exact in float16); the codes are
 * MatMulNBits' layout ([N, blocks, 16]: byte j of a block holds element 2j in its low
 * nibble and 2j + 1 in its high one), d is [N, blocks] and o is [blocks, N]. So
 *
 *     y[r, n] = sum_b d[n, b] * sum_j (q[n, 32b + j] - 8) x[r, 32b + j]  +  sum_b o[b, n] s[r, b]
 *
 * with s the block sums of x. Per call, x is laid out once per block as its 16 even then
 * its 16 odd elements (`xs`), so a block's 16 code bytes widen to 16 lanes whose low
 * nibbles pair with the even half and high nibbles with the odd half; a 16-entry table
 * d * (-8..7) turns a nibble into its weight in one permute (AVX-512), or it is converted
 * and scaled (AVX2). Columns go 4 at a time and rows up to 4 at a time, so a widened block
 * serves up to 4 rows (prefill) and 16 accumulators stay in registers; the offsets are
 * added for 16 columns at once. Weights are read once per call, which is what a decode
 * step waits on: hence float16 d and o (20 bytes a block, as in the GGUF), not float32. */

#ifndef EDGE_Q4_MATH_H
#define EDGE_Q4_MATH_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define Q4_BLOCK 32
#define Q4_COLS 4      /* columns a step */
#define Q4_ROWS 4      /* rows a step */

/* the loops over a step's rows and columns unroll, so its accumulators stay in registers */
#if defined(__clang__)
#define Q4_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define Q4_UNROLL _Pragma("GCC unroll 16")
#else
#define Q4_UNROLL
#endif

typedef struct {
    const float *xs;        /* x by block: 16 even, then 16 odd elements (see q4_xs) */
    const float *xg;        /* x as [16-row group][k][16], or NULL (see q4_prepare_rows) */
    const float *sums;      /* [m][blocks] */
    const uint8_t *codes;   /* [n][blocks][16] */
    const uint16_t *scales;   /* float16 [n][blocks] */
    const uint16_t *offsets;  /* float16 [blocks][n]: o */
    float *y;                 /* [m][n] */
    int64_t m, n, blocks;
} q4_product;

/* IEEE float16 bits -> float (the scalar path; the vector ones convert in hardware). */
static inline float
q4_half(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f,
             mantissa = h & 0x3ff, bits;
    if (exponent == 0x1f)            /* inf, nan */
        bits = sign | 0x7f800000u | (mantissa << 13);
    else if (exponent != 0)          /* normal */
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    else if (mantissa == 0)          /* zero */
        bits = sign;
    else {                           /* subnormal: normalize */
        exponent = 113;
        while (!(mantissa & 0x400)) {
            mantissa <<= 1;
            exponent--;
        }
        bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
    }
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

#define Q4_GROUP 16   /* rows whose blocks b lie side by side in xs */

/* Floats xs takes for m rows: whole groups of rows. */
static inline int64_t
q4_xs_size(int64_t m, int64_t blocks)
{
    return (m + Q4_GROUP - 1) / Q4_GROUP * Q4_GROUP * blocks * Q4_BLOCK;
}

/* Row r's block b in xs: [group][block][row in group][32], so a step over 16 rows reads
 * one run of memory a block (one pointer, constant offsets). */
static inline const float *
q4_xs(const float *xs, int64_t blocks, int64_t r, int64_t b)
{
    return xs + (((r / Q4_GROUP) * blocks + b) * Q4_GROUP + r % Q4_GROUP) * Q4_BLOCK;
}

/* xs and sums from x [m][blocks * 32]. */
static void
q4_prepare(const float *x, int64_t m, int64_t blocks, float *xs, float *sums)
{
    for (int64_t r = 0; r < m; r++) {
        for (int64_t b = 0; b < blocks; b++) {
            const float *in = x + (r * blocks + b) * Q4_BLOCK;
            float *out = (float *)q4_xs(xs, blocks, r, b);
            float total = 0.0f;
            for (int j = 0; j < Q4_BLOCK / 2; j++) {
                out[j] = in[2 * j];
                out[Q4_BLOCK / 2 + j] = in[2 * j + 1];
            }
            for (int j = 0; j < Q4_BLOCK; j++)
                total += in[j];
            sums[r * blocks + b] = total;
        }
    }
}

/* x [m][k] as [group of 16 rows][k][16] (rows past m zero), and the block sums, for the
 * GEMM path. */
static void
q4_prepare_rows(const float *x, int64_t m, int64_t k, float *xg, float *sums)
{
    memset(xg, 0, (size_t)((m + Q4_GROUP - 1) / Q4_GROUP * Q4_GROUP * k) * sizeof(float));
    for (int64_t r = 0; r < m; r++) {
        for (int64_t i = 0; i < k; i++)
            xg[((r / Q4_GROUP) * k + i) * Q4_GROUP + r % Q4_GROUP] = x[r * k + i];
        for (int64_t b = 0; b < k / Q4_BLOCK; b++) {
            float total = 0.0f;
            for (int j = 0; j < Q4_BLOCK; j++)
                total += x[r * k + b * Q4_BLOCK + j];
            sums[r * (k / Q4_BLOCK) + b] = total;
        }
    }
}

/* x[r, i], from whichever layout the call prepared (xs, or xg for the GEMM paths). */
static inline float
q4_x(const q4_product *p, int64_t r, int64_t i)
{
    if (p->xs != NULL)
        return q4_xs(p->xs, p->blocks, r, i / Q4_BLOCK)[(i % 2) * (Q4_BLOCK / 2) + (i % Q4_BLOCK) / 2];
    return p->xg[((r / Q4_GROUP) * p->blocks * Q4_BLOCK + i) * Q4_GROUP + r % Q4_GROUP];
}

/* Columns [n0, n1) of every row, one column at a time: the reference the vector paths are
 * tested against (tests/test_kernels.py) and the tail they leave. */
static void
q4_columns_scalar(const q4_product *p, int64_t n0, int64_t n1)
{
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t r = 0; r < p->m; r++) {
            float total = 0.0f;
            for (int64_t b = 0; b < p->blocks; b++) {
                const uint8_t *c = p->codes + (n * p->blocks + b) * (Q4_BLOCK / 2);
                /* each weight d * (q - 8), as the vector paths and the function body make
                 * it: an infinite d then gives NaN at q = 8 there too, not +-inf */
                const float d = q4_half(p->scales[n * p->blocks + b]);
                for (int j = 0; j < Q4_BLOCK / 2; j++) {
                    total += d * (float)((c[j] & 15) - 8) * q4_x(p, r, b * Q4_BLOCK + 2 * j);
                    total += d * (float)((c[j] >> 4) - 8) * q4_x(p, r, b * Q4_BLOCK + 2 * j + 1);
                }
            }
            for (int64_t b = 0; b < p->blocks; b++)
                total += q4_half(p->offsets[b * p->n + n]) * p->sums[r * p->blocks + b];
            p->y[r * p->n + n] = total;
        }
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(Q4_NO_X86)
#define Q4_X86 1
#include <immintrin.h>

/* Bytes ahead of the codes being read that a step asks the cache for: a decode step reads
 * every weight once, and the hardware prefetcher alone left SmolLM2's decode waiting on
 * memory (measured: 65 -> 80-87 tokens/s at 2048-3072, 70 at 1024, 74 at 4096). */
#ifndef Q4_PREFETCH
#define Q4_PREFETCH 2048
#endif
#define Q4_CHUNK 16   /* columns whose offsets are added as one vector */

/* y[r, n:n+16] += sum_b o[b, n:n+16] * s[r, b] for every row (two chains, for latency). */
__attribute__((target("avx512f,fma,f16c"))) static inline __m512
q4_offsets16(const q4_product *p, int64_t b, int64_t n)
{
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p->offsets + b * p->n + n)));
}

__attribute__((target("avx512f,fma,f16c"))) static void
q4_offsets_avx512(const q4_product *p, int64_t n)
{
    for (int64_t r = 0; r < p->m; r++) {
        const float *s = p->sums + r * p->blocks;
        float *y = p->y + r * p->n + n;
        __m512 even = _mm512_loadu_ps(y), odd = _mm512_setzero_ps();
        int64_t b = 0;
        for (; b + 2 <= p->blocks; b += 2) {
            even = _mm512_fmadd_ps(q4_offsets16(p, b, n), _mm512_set1_ps(s[b]), even);
            odd = _mm512_fmadd_ps(q4_offsets16(p, b + 1, n), _mm512_set1_ps(s[b + 1]), odd);
        }
        if (b < p->blocks)
            even = _mm512_fmadd_ps(q4_offsets16(p, b, n), _mm512_set1_ps(s[b]), even);
        _mm512_storeu_ps(y, _mm512_add_ps(even, odd));
    }
}

/* Q4_COLS columns from n for `rows` rows from r0, offsets not yet added. The table holds
 * d * (i - 8) for i = 0..15, so one permute turns a nibble into its weight. */
__attribute__((target("avx512f,avx512bw,avx512dq,fma,f16c"), always_inline)) static inline void
q4_step_avx512(const q4_product *p, int64_t r0, const int rows, int64_t n, __m512 table)
{
    __m512 acc[Q4_ROWS][Q4_COLS];
    Q4_UNROLL
    for (int r = 0; r < Q4_ROWS; r++)
        Q4_UNROLL
        for (int c = 0; c < Q4_COLS; c++)
            acc[r][c] = _mm512_setzero_ps();
    float scales[Q4_COLS][16];   /* this group of 16 blocks' d, as float */
    for (int64_t b = 0; b < p->blocks; b++) {
        if (b % 16 == 0) {
            Q4_UNROLL
            for (int c = 0; c < Q4_COLS; c++) {
                const uint16_t *d = p->scales + (n + c) * p->blocks + b;
                if (b + 16 <= p->blocks)
                    _mm512_storeu_ps(scales[c], _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)d)));
                else
                    for (int64_t i = 0; i < p->blocks - b; i++)
                        scales[c][i] = _cvtsh_ss(d[i]);
            }
        }
        __m512 lo[Q4_COLS], hi[Q4_COLS];
        if (Q4_PREFETCH && b % 4 == 0)
            Q4_UNROLL
            for (int c = 0; c < Q4_COLS; c++)
                _mm_prefetch((const char *)(p->codes + ((n + c) * p->blocks + b) * (Q4_BLOCK / 2)
                                            + Q4_PREFETCH), _MM_HINT_T0);
        if (Q4_PREFETCH && b % 32 == 0)
            _mm_prefetch((const char *)(p->scales + n * p->blocks + b) + Q4_PREFETCH / 8,
                         _MM_HINT_T0);
        Q4_UNROLL
        for (int c = 0; c < Q4_COLS; c++) {
            const int64_t at = (n + c) * p->blocks + b;
            __m512i v = _mm512_cvtepu8_epi32(
                _mm_loadu_si128((const __m128i *)(p->codes + at * (Q4_BLOCK / 2))));
            __m512 weights = _mm512_mul_ps(table, _mm512_set1_ps(scales[c][b % 16]));
            lo[c] = _mm512_permutexvar_ps(v, weights);
            hi[c] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), weights);
        }
        Q4_UNROLL
        for (int r = 0; r < rows; r++) {
            const float *xs = q4_xs(p->xs, p->blocks, r0 + r, b);
            __m512 even = _mm512_loadu_ps(xs), odd = _mm512_loadu_ps(xs + Q4_BLOCK / 2);
            Q4_UNROLL
            for (int c = 0; c < Q4_COLS; c++)
                acc[r][c] = _mm512_fmadd_ps(hi[c], odd, _mm512_fmadd_ps(lo[c], even, acc[r][c]));
        }
    }
    Q4_UNROLL
    for (int r = 0; r < rows; r++)
        Q4_UNROLL
        for (int c = 0; c < Q4_COLS; c++)
            p->y[(r0 + r) * p->n + n + c] = _mm512_reduce_add_ps(acc[r][c]);
}

/* Prefill (16 rows or more), as a float GEMM: a task's 16 columns are widened, a slab of
 * Q4_SLAB blocks at a time, into a float tile [k][16] that stays in L1, then every 16 rows
 * take one FMA per 16 products with no horizontal sums (lanes over columns; x grouped as
 * [16-row group][k][16], see q4_prepare_rows). */
#define Q4_SLAB 8   /* blocks a tile: 256 x 16 floats, 16 KB */

__attribute__((target("avx512f,avx512bw,avx512dq,fma,f16c"))) static void
q4_tile_avx512(const q4_product *p, int64_t n, int64_t b0, int64_t b1, __m512 table, float *tile)
{
    /* natural order from the even (low nibble) and odd (high nibble) halves */
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30,
                                             15, 31);
    const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176,
                                             192, 208, 224, 240);
    for (int c = 0; c < Q4_CHUNK; c++) {
        const uint16_t *d = p->scales + (n + c) * p->blocks;
        const uint8_t *codes = p->codes + (n + c) * p->blocks * (Q4_BLOCK / 2);
        for (int64_t b = b0; b < b1; b++) {
            __m512i v = _mm512_cvtepu8_epi32(
                _mm_loadu_si128((const __m128i *)(codes + b * (Q4_BLOCK / 2))));
            __m512 weights = _mm512_mul_ps(table, _mm512_set1_ps(_cvtsh_ss(d[b])));
            __m512 lo = _mm512_permutexvar_ps(v, weights);
            __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), weights);
            float *at = tile + (b - b0) * Q4_BLOCK * Q4_CHUNK + c;
            _mm512_i32scatter_ps(at, column, _mm512_permutex2var_ps(lo, first, hi), 4);
            _mm512_i32scatter_ps(at + 16 * Q4_CHUNK, column, _mm512_permutex2var_ps(lo, second, hi), 4);
        }
    }
}

/* y[:, n:n+16] (+)= x[:, k0:k1] @ tile, over all rows; `first`: the first slab (y unset). */
__attribute__((target("avx512f,avx512bw,avx512dq,fma,f16c"))) static void
q4_rows_avx512(const q4_product *p, int64_t n, int64_t k0, int64_t k1, const float *tile, int first)
{
    const int64_t k = p->blocks * Q4_BLOCK;
    for (int64_t r0 = 0; r0 < p->m; r0 += Q4_GROUP) {
        const float *x = p->xg + r0 * k;   /* [k][16] */
        const int rows = p->m - r0 < Q4_GROUP ? (int)(p->m - r0) : Q4_GROUP;
        __m512 acc[Q4_GROUP];
        Q4_UNROLL
        for (int r = 0; r < Q4_GROUP; r++)
            acc[r] = first || r >= rows ? _mm512_setzero_ps()
                                        : _mm512_loadu_ps(p->y + (r0 + r) * p->n + n);
        for (int64_t i = k0; i < k1; i++) {
            const __m512 w = _mm512_loadu_ps(tile + (i - k0) * Q4_CHUNK);
            Q4_UNROLL
            for (int r = 0; r < Q4_GROUP; r++)
                acc[r] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[i * Q4_GROUP + r]), acc[r]);
        }
        for (int r = 0; r < rows; r++)
            _mm512_storeu_ps(p->y + (r0 + r) * p->n + n, acc[r]);
    }
}

/* As q4_rows_avx512 for two chunks side by side (32 columns), 8 rows at a time: 10 loads
 * per 16 FMAs instead of 17 (measured, 128 rows, one thread: 1.21x -> 1.06x MLAS's time
 * on 576 x 3072, 1.41x -> 1.28x on 1536 x 576). */
__attribute__((target("avx512f,avx512bw,avx512dq,fma,f16c"))) static void
q4_rows2_avx512(const q4_product *p, int64_t n, int64_t k0, int64_t k1, const float *tiles,
                int first)
{
    const int64_t k = p->blocks * Q4_BLOCK, width = (k1 - k0) * Q4_CHUNK;
    for (int64_t r0 = 0; r0 < p->m; r0 += 8) {
        const float *x = p->xg + (r0 / Q4_GROUP) * Q4_GROUP * k + r0 % Q4_GROUP;
        const int rows = p->m - r0 < 8 ? (int)(p->m - r0) : 8;
        __m512 acc[8][2];
        Q4_UNROLL
        for (int r = 0; r < 8; r++)
            Q4_UNROLL
            for (int h = 0; h < 2; h++)
                acc[r][h] = first || r >= rows ? _mm512_setzero_ps()
                    : _mm512_loadu_ps(p->y + (r0 + r) * p->n + n + h * Q4_CHUNK);
        for (int64_t i = k0; i < k1; i++) {
            const __m512 w0 = _mm512_loadu_ps(tiles + (i - k0) * Q4_CHUNK);
            const __m512 w1 = _mm512_loadu_ps(tiles + width + (i - k0) * Q4_CHUNK);
            Q4_UNROLL
            for (int r = 0; r < 8; r++) {
                const __m512 xr = _mm512_set1_ps(x[i * Q4_GROUP + r]);
                acc[r][0] = _mm512_fmadd_ps(w0, xr, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(w1, xr, acc[r][1]);
            }
        }
        for (int r = 0; r < rows; r++)
            for (int h = 0; h < 2; h++)
                _mm512_storeu_ps(p->y + (r0 + r) * p->n + n + h * Q4_CHUNK, acc[r][h]);
    }
}

/* Columns [n0, n1): 16 rows or more as a GEMM over float tiles (q4_rows_avx512), fewer
 * rows in steps of 4, then 1, columns at a time (decode). */
__attribute__((target("avx512f,avx512bw,avx512dq,fma,f16c"))) static void
q4_columns_avx512(const q4_product *p, int64_t n0, int64_t n1)
{
    const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const int64_t end = n0 + (n1 - n0) / Q4_CHUNK * Q4_CHUNK;   /* whole chunks */
    if (p->xg != NULL) {
        float tile[2 * Q4_SLAB * Q4_BLOCK * Q4_CHUNK];
        for (int64_t c = n0; c < end; c += Q4_CHUNK) {
            const int pair = c + 2 * Q4_CHUNK <= end;
            for (int64_t b = 0; b < p->blocks; b += Q4_SLAB) {
                const int64_t b1 = b + Q4_SLAB < p->blocks ? b + Q4_SLAB : p->blocks;
                q4_tile_avx512(p, c, b, b1, table, tile);
                if (pair) {
                    q4_tile_avx512(p, c + Q4_CHUNK, b, b1, table,
                                   tile + (b1 - b) * Q4_BLOCK * Q4_CHUNK);
                    q4_rows2_avx512(p, c, b * Q4_BLOCK, b1 * Q4_BLOCK, tile, b == 0);
                }
                else {
                    q4_rows_avx512(p, c, b * Q4_BLOCK, b1 * Q4_BLOCK, tile, b == 0);
                }
            }
            c += pair ? Q4_CHUNK : 0;
        }
    } else {   /* a few rows */
        int64_t r = 0;
        for (; r + Q4_ROWS <= p->m; r += Q4_ROWS)
            for (int64_t c = n0; c < end; c += Q4_COLS)
                q4_step_avx512(p, r, Q4_ROWS, c, table);
        if (r < p->m) {
            for (int64_t c = n0; c < end; c += Q4_COLS) {
                switch (p->m - r) {
                case 3: q4_step_avx512(p, r, 3, c, table); break;
                case 2: q4_step_avx512(p, r, 2, c, table); break;
                default: q4_step_avx512(p, r, 1, c, table); break;
                }
            }
        }
    }
    for (int64_t c = n0; c < end; c += Q4_CHUNK)
        q4_offsets_avx512(p, c);
    q4_columns_scalar(p, end, n1);
}

__attribute__((target("avx2,fma,f16c"))) static inline float
q4_hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* AVX2: 8 lanes, so a block's 16 bytes widen in two halves; a nibble becomes a float by
 * conversion (vpermps holds only 8 entries). One column's block at a time (16 registers). */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void
q4_step_avx2(const q4_product *p, int64_t r0, const int rows, int64_t n)
{
    const __m256i mask = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
    __m256 acc[2][Q4_COLS];
    Q4_UNROLL
    for (int r = 0; r < 2; r++)
        Q4_UNROLL
        for (int c = 0; c < Q4_COLS; c++)
            acc[r][c] = _mm256_setzero_ps();
    for (int64_t b = 0; b < p->blocks; b++) {
        if (Q4_PREFETCH && b % 4 == 0)
            Q4_UNROLL
            for (int c = 0; c < Q4_COLS; c++)
                _mm_prefetch((const char *)(p->codes + ((n + c) * p->blocks + b) * (Q4_BLOCK / 2)
                                            + Q4_PREFETCH), _MM_HINT_T0);
        Q4_UNROLL
        for (int c = 0; c < Q4_COLS; c++) {
            const int64_t at = (n + c) * p->blocks + b;
            const uint8_t *codes = p->codes + at * (Q4_BLOCK / 2);
            const __m256 d = _mm256_set1_ps(_cvtsh_ss(p->scales[at]));
            __m256 w[4];   /* even 0-7, even 8-15, odd 0-7, odd 8-15 */
            Q4_UNROLL
            for (int h = 0; h < 2; h++) {
                __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + 8 * h)));
                w[h] = _mm256_mul_ps(_mm256_cvtepi32_ps(
                    _mm256_sub_epi32(_mm256_and_si256(v, mask), eight)), d);
                w[2 + h] = _mm256_mul_ps(_mm256_cvtepi32_ps(
                    _mm256_sub_epi32(_mm256_srli_epi32(v, 4), eight)), d);
            }
            Q4_UNROLL
            for (int r = 0; r < rows; r++) {
                const float *xs = q4_xs(p->xs, p->blocks, r0 + r, b);
                Q4_UNROLL
                for (int h = 0; h < 4; h++)
                    acc[r][c] = _mm256_fmadd_ps(w[h], _mm256_loadu_ps(xs + 8 * h), acc[r][c]);
            }
        }
    }
    Q4_UNROLL
    for (int r = 0; r < rows; r++)
        Q4_UNROLL
        for (int c = 0; c < Q4_COLS; c++)
            p->y[(r0 + r) * p->n + n + c] = q4_hsum256(acc[r][c]);
}

__attribute__((target("avx2,fma,f16c"))) static void
q4_offsets_avx2(const q4_product *p, int64_t n)
{
    for (int64_t r = 0; r < p->m; r++) {
        const float *s = p->sums + r * p->blocks;
        for (int h = 0; h < Q4_CHUNK; h += 8) {
            float *y = p->y + r * p->n + n + h;
            __m256 total = _mm256_loadu_ps(y);
            for (int64_t b = 0; b < p->blocks; b++)
                total = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(
                                            (const __m128i *)(p->offsets + b * p->n + n + h))),
                                        _mm256_set1_ps(s[b]), total);
            _mm256_storeu_ps(y, total);
        }
    }
}

/* Prefill on AVX2: as q4_rows_avx512, 16 columns as two 8-lane halves, 4 rows at a time
 * (8 accumulators of 16 registers); the tile is widened with scalar stores. */
__attribute__((target("avx2,fma,f16c"))) static void
q4_tile_avx2(const q4_product *p, int64_t n, int64_t b0, int64_t b1, float *tile)
{
    for (int c = 0; c < Q4_CHUNK; c++) {
        const uint16_t *d = p->scales + (n + c) * p->blocks;
        const uint8_t *codes = p->codes + (n + c) * p->blocks * (Q4_BLOCK / 2);
        for (int64_t b = b0; b < b1; b++) {
            const float scale = _cvtsh_ss(d[b]);
            float *at = tile + (b - b0) * Q4_BLOCK * Q4_CHUNK + c;
            for (int j = 0; j < Q4_BLOCK / 2; j++) {
                const uint8_t byte = codes[b * (Q4_BLOCK / 2) + j];
                at[(2 * j) * Q4_CHUNK] = scale * (float)((byte & 15) - 8);
                at[(2 * j + 1) * Q4_CHUNK] = scale * (float)((byte >> 4) - 8);
            }
        }
    }
}

__attribute__((target("avx2,fma,f16c"))) static void
q4_rows_avx2(const q4_product *p, int64_t n, int64_t k0, int64_t k1, const float *tile, int first)
{
    const int64_t k = p->blocks * Q4_BLOCK;
    for (int64_t r0 = 0; r0 < p->m; r0 += 4) {
        const float *x = p->xg + (r0 / Q4_GROUP) * Q4_GROUP * k + r0 % Q4_GROUP;
        const int rows = p->m - r0 < 4 ? (int)(p->m - r0) : 4;
        __m256 acc[4][2];
        Q4_UNROLL
        for (int r = 0; r < 4; r++)
            Q4_UNROLL
            for (int h = 0; h < 2; h++)
                acc[r][h] = first || r >= rows
                    ? _mm256_setzero_ps() : _mm256_loadu_ps(p->y + (r0 + r) * p->n + n + 8 * h);
        for (int64_t i = k0; i < k1; i++) {
            const __m256 w0 = _mm256_loadu_ps(tile + (i - k0) * Q4_CHUNK);
            const __m256 w1 = _mm256_loadu_ps(tile + (i - k0) * Q4_CHUNK + 8);
            Q4_UNROLL
            for (int r = 0; r < 4; r++) {
                const __m256 xr = _mm256_broadcast_ss(x + i * Q4_GROUP + r);
                acc[r][0] = _mm256_fmadd_ps(w0, xr, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(w1, xr, acc[r][1]);
            }
        }
        for (int r = 0; r < rows; r++)
            for (int h = 0; h < 2; h++)
                _mm256_storeu_ps(p->y + (r0 + r) * p->n + n + 8 * h, acc[r][h]);
    }
}

__attribute__((target("avx2,fma,f16c"))) static void
q4_columns_avx2(const q4_product *p, int64_t n0, int64_t n1)
{
    int64_t n = n0;
    if (p->xg != NULL) {
        float tile[Q4_SLAB * Q4_BLOCK * Q4_CHUNK];
        for (; n + Q4_CHUNK <= n1; n += Q4_CHUNK) {
            for (int64_t b = 0; b < p->blocks; b += Q4_SLAB) {
                const int64_t b1 = b + Q4_SLAB < p->blocks ? b + Q4_SLAB : p->blocks;
                q4_tile_avx2(p, n, b, b1, tile);
                q4_rows_avx2(p, n, b * Q4_BLOCK, b1 * Q4_BLOCK, tile, b == 0);
            }
            q4_offsets_avx2(p, n);
        }
        q4_columns_scalar(p, n, n1);
        return;
    }
    for (; n + Q4_CHUNK <= n1; n += Q4_CHUNK) {
        for (int64_t c = n; c < n + Q4_CHUNK; c += Q4_COLS) {
            int64_t r = 0;
            for (; r + 2 <= p->m; r += 2)
                q4_step_avx2(p, r, 2, c);
            if (r < p->m)
                q4_step_avx2(p, r, 1, c);
        }
        q4_offsets_avx2(p, n);
    }
    q4_columns_scalar(p, n, n1);
}
#endif /* x86 */

#endif /* EDGE_Q4_MATH_H */
