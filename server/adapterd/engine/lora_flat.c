/* The LoRA delta of a decode-sized flat run, for the CPU: a BGMV-style kernel.
 *
 * Every token t of the run is on one adapter slot s (slot 0, the base, has no delta):
 *
 *     y[t] += (x[t] @ A_s^T) @ (scale * B_s)^T
 *
 * read from the layer's slot stacks where they are: A as [slots, r_max, in] and
 * (scale * B)^T as [slots, r_max, out], each adapter at its own rank in this layer
 * (rank[s], 0 where the adapter does not touch the layer). Tokens come grouped by slot
 * (`tokens`, with `group_start` offsets), so each adapter's weights are read once per
 * step whatever its number of tokens, and no token is multiplied by another adapter's
 * weights. No stack is copied or gathered when the batch's adapters change.
 *
 * The weights are float32 or bfloat16 (the stacks' dtype); either way the products and
 * sums are float32. bfloat16 halves the bytes a step reads, and a decode step's LoRA is
 * bound by those bytes: 8 rank-16 adapters over the 210 linears of SmolLM2-135M are 78 MB
 * in bfloat16. The plain reference this is tested against is lora.reference_forward.
 *
 * Two phases in one parallel region: the shrink xa = x A^T, one adapter per work item;
 * then the expand, the output columns split over the threads, each adding into its own
 * columns of y (no two threads write one element).
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline float bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The inner loops, one per weight type, so that each is vectorized for its type (the
 * choice between them is made once per row of weights, outside them).
 *
 * dot4: the dot products of one row of weights with four inputs at once: four independent
 * sums (one would wait on its own additions), and the row loaded once for all four. */
static inline void dot4_f32(const float *x0, const float *x1, const float *x2, const float *x3,
                            const float *w, int64_t n, float out[4])
{
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        const float wi = w[i];
        a0 += x0[i] * wi;
        a1 += x1[i] * wi;
        a2 += x2[i] * wi;
        a3 += x3[i] * wi;
    }
    out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
}

static inline void dot4_bf16(const float *x0, const float *x1, const float *x2, const float *x3,
                             const uint16_t *w, int64_t n, float out[4])
{
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        const float wi = bf16_to_f32(w[i]);
        a0 += x0[i] * wi;
        a1 += x1[i] * wi;
        a2 += x2[i] * wi;
        a3 += x3[i] * wi;
    }
    out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
}

/* y[0:n] += sum over c < r of xa[c] * w[c * stride : c * stride + n], n <= 64, for two
 * tokens at once (y1 may be NULL): a whole block of 64 columns (the usual case) keeps both
 * rows of y in registers across the r rows of weights, each loaded once for both. */
#define EXPAND(NAME, W, LOAD)                                                                  \
    static inline void NAME(float *y0, float *y1, const float *xa0, const float *xa1,          \
                            const W *w, int64_t r, int64_t stride, int64_t n)                  \
    {                                                                                          \
        if (n == 64 && y1 != NULL) {                                                           \
            float acc0[64], acc1[64];                                                          \
            for (int o = 0; o < 64; o++)                                                       \
                acc0[o] = y0[o], acc1[o] = y1[o];                                              \
            for (int64_t c = 0; c < r; c++)                                                    \
                for (int o = 0; o < 64; o++) {                                                 \
                    const float wo = LOAD(w[c * stride + o]);                                  \
                    acc0[o] += xa0[c] * wo;                                                    \
                    acc1[o] += xa1[c] * wo;                                                    \
                }                                                                              \
            for (int o = 0; o < 64; o++)                                                       \
                y0[o] = acc0[o], y1[o] = acc1[o];                                              \
            return;                                                                            \
        }                                                                                      \
        for (int64_t c = 0; c < r; c++)                                                        \
            for (int64_t o = 0; o < n; o++) {                                                  \
                const float wo = LOAD(w[c * stride + o]);                                      \
                y0[o] += xa0[c] * wo;                                                          \
                if (y1 != NULL)                                                                \
                    y1[o] += xa1[c] * wo;                                                      \
            }                                                                                  \
    }
#define AS_F32(v) (v)
EXPAND(expand_f32, float, AS_F32)
EXPAND(expand_bf16, uint16_t, bf16_to_f32)

/* Below this many weight bytes a call runs on one thread: waking the others costs more. */
#define PARALLEL_BYTES (256 * 1024)

static void lora_flat(
    const float *x,             /* [T, in] the run's inputs */
    float *y,                   /* [T, out] the base outputs, updated in place */
    int64_t in, int64_t out, int64_t r_max,
    const void *a,              /* [slots, r_max, in]: A per slot */
    const void *b,              /* [slots, r_max, out]: (scale * B)^T per slot */
    const int32_t *rank,        /* [slots]: each slot's rank in this layer */
    const int32_t *group_slot,  /* [groups]: the slot of each group of tokens */
    const int64_t *group_start, /* [groups + 1]: each group's span of `tokens` */
    const int32_t *tokens,      /* the tokens (rows of x and y) on an adapter, by group */
    int64_t groups,
    float *xa,                  /* [len(tokens), r_max] scratch */
    const int bf16)
{
    int64_t bytes = 0;
    for (int64_t g = 0; g < groups; g++)
        bytes += rank[group_slot[g]] * (in + out) * (bf16 ? 2 : 4);
#pragma omp parallel if (bytes > PARALLEL_BYTES)
    {
        /* Shrink: xa[j][c] = x[token j] . A_s[c], one rank row of A per work item: each
         * row is read once, its tokens' dot products then read it from the cache. */
#pragma omp for collapse(2) schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            for (int64_t c = 0; c < r_max; c++) {
                const int64_t s = group_slot[g];
                if (c >= rank[s])
                    continue;
                const int64_t row = (s * r_max + c) * in, j1 = group_start[g + 1];
                for (int64_t j = group_start[g]; j < j1; j += 4) {
                    /* four tokens at a time; past the group's end, its last token again */
                    const float *xs[4];
                    for (int k = 0; k < 4; k++)
                        xs[k] = x + (int64_t)tokens[j + k < j1 ? j + k : j1 - 1] * in;
                    float dots[4];
                    if (bf16)
                        dot4_bf16(xs[0], xs[1], xs[2], xs[3], (const uint16_t *)a + row, in, dots);
                    else
                        dot4_f32(xs[0], xs[1], xs[2], xs[3], (const float *)a + row, in, dots);
                    for (int k = 0; k < 4 && j + k < j1; k++)
                        xa[(j + k) * r_max + c] = dots[k];
                }
            }
        }
        /* (the loop's implicit barrier: every xa is ready) */
        /* Expand: y[token j] += xa[j] (scale B_s)^T, the output columns split over the
         * threads, 64 columns of a row at a time. */
#ifdef _OPENMP
        const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
#else
        const int64_t threads = 1, me = 0;
#endif
        const int64_t chunk = ((out + threads - 1) / threads + 63) / 64 * 64;
        const int64_t o_end = (me + 1) * chunk < out ? (me + 1) * chunk : out;
        for (int64_t g = 0; g < groups; g++) {
            const int64_t s = group_slot[g], r = rank[s];
            for (int64_t o0 = me * chunk; o0 < o_end; o0 += 64) {
                const int64_t n = o_end - o0 < 64 ? o_end - o0 : 64;
                const int64_t at = s * r_max * out + o0;
                const int64_t j1 = group_start[g + 1];
                for (int64_t j = group_start[g]; j < j1; j += 2) {
                    float *y0 = y + (int64_t)tokens[j] * out + o0;
                    float *y1 = j + 1 < j1 ? y + (int64_t)tokens[j + 1] * out + o0 : NULL;
                    const float *xa0 = xa + j * r_max, *xa1 = xa0 + r_max;
                    if (bf16)
                        expand_bf16(y0, y1, xa0, xa1, (const uint16_t *)b + at, r, out, n);
                    else
                        expand_f32(y0, y1, xa0, xa1, (const float *)b + at, r, out, n);
                }
            }
        }
    }
}

#define ARGS const float *x, float *y, int64_t in, int64_t out, int64_t r_max, const void *a, \
    const void *b, const int32_t *rank, const int32_t *group_slot, const int64_t *group_start, \
    const int32_t *tokens, int64_t groups, float *xa
#define PASS x, y, in, out, r_max, a, b, rank, group_slot, group_start, tokens, groups, xa

void lora_flat_f32(ARGS) { lora_flat(PASS, 0); }
void lora_flat_bf16(ARGS) { lora_flat(PASS, 1); }
