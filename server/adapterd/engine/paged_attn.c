/* Decode attention over a paged KV cache, float32, for the CPU.
 *
 * One query token per row attends to its row's keys 0..ctx-1, which live in fixed-size
 * blocks of a shared pool: key j of a row is at slot table[j / block_size] * block_size
 * + j % block_size. The pool is token-major, [slots, kv_heads, head_dim], so one slot
 * holds one token's keys for every kv head. Grouped-query attention: the
 * heads / kv_heads query heads of a group share that group's keys and values, which are
 * read once for the whole group.
 *
 * Reading the keys where they are is the point: gathering a batch's blocks into a padded
 * tensor for SDPA copies the whole cache every step (16 rows x 700 tokens on SmolLM2:
 * 17 MB per layer), which cost more than the attention itself. The plain reference this
 * is tested against is attention.reference_attention. Work items (row, kv head) are split
 * over the OpenMP threads; torch's own libgomp is already loaded, so they share one pool.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

void paged_decode_f32(
    const float *q,             /* [rows, heads, dim] */
    const float *k_pool,        /* [slots, kv_heads, dim] */
    const float *v_pool,        /* [slots, kv_heads, dim] */
    float *out,                 /* [rows, heads, dim] */
    const int32_t *tables,      /* every row's block table, back to back */
    const int64_t *table_start, /* [rows]: where row r's table starts in `tables` */
    const int32_t *ctx,         /* [rows]: keys row r attends to (its position + 1) */
    int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim,
    int64_t block_size, int64_t max_ctx, float scale)
{
    const int64_t group = heads / kv_heads;
#pragma omp parallel
    {
        /* Scores of one group: group x max_ctx floats, per thread. */
        float *scores = (float *)malloc(sizeof(float) * (size_t)(group * max_ctx + 1));
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int64_t r = 0; r < rows; r++) {
            for (int64_t kh = 0; kh < kv_heads; kh++) {
                const int32_t *table = tables + table_start[r];
                const int64_t n = ctx[r];
                const float *qr = q + (r * heads + kh * group) * dim;
                const int64_t nblocks = (n + block_size - 1) / block_size;
                for (int64_t b = 0, j = 0; b < nblocks; b++) {
                    const int64_t base = (int64_t)table[b] * block_size;
                    const int64_t end = j + block_size < n ? j + block_size : n;
                    for (int64_t slot = base; j < end; j++, slot++) {
                        const float *kp = k_pool + (slot * kv_heads + kh) * dim;
                        for (int64_t g = 0; g < group; g++) {
                            const float *qg = qr + g * dim;
                            float s = 0.f;
#pragma omp simd reduction(+ : s)
                            for (int64_t d = 0; d < dim; d++) s += qg[d] * kp[d];
                            scores[g * max_ctx + j] = s * scale;
                        }
                    }
                }
                for (int64_t g = 0; g < group; g++) {
                    float *sg = scores + g * max_ctx;
                    float m = -INFINITY;
                    for (int64_t j = 0; j < n; j++) m = sg[j] > m ? sg[j] : m;
                    float sum = 0.f;
                    for (int64_t j = 0; j < n; j++) {
                        sg[j] = expf(sg[j] - m);
                        sum += sg[j];
                    }
                    const float inv = 1.f / sum;
                    for (int64_t j = 0; j < n; j++) sg[j] *= inv;
                    float *og = out + (r * heads + kh * group + g) * dim;
                    for (int64_t d = 0; d < dim; d++) og[d] = 0.f;
                }
                for (int64_t b = 0, j = 0; b < nblocks; b++) {
                    const int64_t base = (int64_t)table[b] * block_size;
                    const int64_t end = j + block_size < n ? j + block_size : n;
                    for (int64_t slot = base; j < end; j++, slot++) {
                        const float *vp = v_pool + (slot * kv_heads + kh) * dim;
                        for (int64_t g = 0; g < group; g++) {
                            const float p = scores[g * max_ctx + j];
                            float *og = out + (r * heads + kh * group + g) * dim;
#pragma omp simd
                            for (int64_t d = 0; d < dim; d++) og[d] += p * vp[d];
                        }
                    }
                }
            }
        }
        free(scores);
    }
}
