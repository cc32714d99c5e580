/* bimask-hf's eager CPU mask kernels: N:M forward masks, Bi-Mask backward masks and the SR-STE decay
 * term, each in one pass over a contiguous float32 weight (bimask_hf/kernels.py builds and loads this
 * file; bimask_hf/masks.py holds the tensor-op versions, which give the same masks).
 *
 * Ranking inside a group of m scores s_0..s_{m-1}: entry i is beaten by an earlier entry j when
 * s_j >= s_i and by a later entry k when !(s_i >= s_k); it is kept when fewer than n entries beat it
 * (the larger score wins, ties go to the lower index; these are the tensor-op path's comparisons, so
 * NaN scores rank the same way in both). With the paper's tie order (high != 0) an earlier entry beats
 * a later one only when s_j > s_i, so ties go to the higher index. Masks are written as 0/1 bytes
 * (uint8 or bool tensors).
 *
 * The groups of a chunk are first split into m planes (member i of every group side by side), then
 * ranked pair of members by pair of members over whole planes: plain loops over 32-bit values that the
 * compiler vectorises, on data that stays in the core's cache.
 */
#include <math.h>
#include <stdint.h>

#define MAX_M 16
#define CHUNK 256

typedef struct {
    float s[MAX_M][CHUNK];   /* scores, one plane per group member */
    int32_t r[MAX_M][CHUNK]; /* how many members beat it; then 1 if kept, else 0 */
} planes;

static inline void rank_planes(planes *restrict pl, int64_t m, int64_t n, int64_t len, int high) {
    for (int64_t i = 0; i < m; ++i)
        for (int64_t g = 0; g < len; ++g) pl->r[i][g] = 0;
    for (int64_t j = 0; j < m; ++j) {
        for (int64_t i = j + 1; i < m; ++i) {
            const float *restrict sj = pl->s[j], *restrict si = pl->s[i];
            int32_t *restrict rj = pl->r[j], *restrict ri = pl->r[i];
            if (high) {
                for (int64_t g = 0; g < len; ++g) {
                    int32_t beats = sj[g] > si[g]; /* the later member wins ties */
                    ri[g] += beats;
                    rj[g] += 1 - beats;
                }
            } else {
                for (int64_t g = 0; g < len; ++g) {
                    int32_t beats = sj[g] >= si[g]; /* the earlier member wins ties */
                    ri[g] += beats;
                    rj[g] += 1 - beats;
                }
            }
        }
    }
    const int32_t keep_below = (int32_t)n; /* 32-bit, like the counts, so that this loop vectorises too */
    for (int64_t i = 0; i < m; ++i)
        for (int64_t g = 0; g < len; ++g) pl->r[i][g] = pl->r[i][g] < keep_below; /* fewer than n beat it */
}

/* Split nb blocks of (m, d) weights at p into the score planes, and write the keeps back. Called with a
 * constant m and, for Linear rows, d = 1, so that the compiler specialises the loops. */
static inline void load_blocks(planes *restrict pl, const float *restrict p, int64_t nb, int64_t m, int64_t d) {
    if (d == 1) {
        for (int64_t g = 0; g < nb; ++g)
            for (int64_t i = 0; i < m; ++i) pl->s[i][g] = fabsf(p[g * m + i]);
        return;
    }
    for (int64_t b = 0; b < nb; ++b)
        for (int64_t i = 0; i < m; ++i)
            for (int64_t k = 0; k < d; ++k) pl->s[i][b * d + k] = fabsf(p[(b * m + i) * d + k]);
}

static inline void store_blocks(const planes *restrict pl, uint8_t *restrict q, int64_t nb, int64_t m, int64_t d) {
    if (d == 1) {
        for (int64_t g = 0; g < nb; ++g)
            for (int64_t i = 0; i < m; ++i) q[g * m + i] = (uint8_t)pl->r[i][g];
        return;
    }
    for (int64_t b = 0; b < nb; ++b)
        for (int64_t i = 0; i < m; ++i)
            for (int64_t k = 0; k < d; ++k) q[(b * m + i) * d + k] = (uint8_t)pl->r[i][b * d + k];
}

static inline void forward_chunks(const float *restrict w, uint8_t *restrict mask, int64_t blocks, int64_t m,
                                  int64_t d, int64_t n, int high, planes *restrict pl) {
    int64_t per_chunk = CHUNK / d; /* whole blocks per chunk */
    for (int64_t b0 = 0; b0 < blocks; b0 += per_chunk) {
        int64_t nb = blocks - b0 < per_chunk ? blocks - b0 : per_chunk;
        load_blocks(pl, w + b0 * m * d, nb, m, d);
        rank_planes(pl, m, n, nb * d, high);
        store_blocks(pl, mask + b0 * m * d, nb, m, d);
    }
}

/* Forward mask of a weight viewed as (blocks, m, d): groups of m entries d apart (d = kh*kw for the
 * channels-last groups of a conv, 1 for Linear rows and the flat layout); group (b, k) holds
 * w[b*m*d + i*d + k], i = 0..m-1. high != 0: the paper's tie order (see the top of this file). */
int bm_forward_mask(const float *restrict w, uint8_t *restrict mask, int64_t blocks, int64_t m, int64_t d,
                    int64_t n, int64_t high) {
    if (m < 1 || m > MAX_M || d < 1 || d > CHUNK) return 1;
    planes pl;
    int h = high != 0;
    if (m == 4 && d == 1) forward_chunks(w, mask, blocks, 4, 1, n, h, &pl);
    else if (m == 4) forward_chunks(w, mask, blocks, 4, d, n, h, &pl);
    else if (d == 1) forward_chunks(w, mask, blocks, m, 1, n, h, &pl);
    else forward_chunks(w, mask, blocks, m, d, n, h, &pl);
    return 0;
}

/* Backward mask of a (rows, cols) weight: rows grouped m at a time in the order given by perm (row
 * perm[g*m + k] is member k of group g); in every column the n largest scores of a group stay, where
 * the score is kept*|W| + (kept - 1): |W| for entries the forward mask fm keeps, -1 for pruned ones
 * (the tensor-op formula), and pruned entries are never kept. With high != 0 the paper's ranking: the
 * score is kept*|W| (pruned entries score 0, tying with kept exact zeros) and ties go to the higher
 * group member. */
int bm_backward_mask(const float *restrict w, const uint8_t *restrict fm, const int64_t *restrict perm,
                     uint8_t *restrict mask, int64_t rows, int64_t cols, int64_t m, int64_t n, int64_t high) {
    if (m < 1 || m > MAX_M || rows % m) return 1;
    planes pl;
    int64_t row[MAX_M];
    const float pruned_offset = high ? 0.0f : 1.0f; /* a pruned entry scores -1, or 0 with the paper's order */
    for (int64_t g = 0; g < rows / m; ++g) {
        for (int64_t k = 0; k < m; ++k) {
            row[k] = perm[g * m + k];
            if (row[k] < 0 || row[k] >= rows) return 2;
        }
        for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
            int64_t len = cols - c0 < CHUNK ? cols - c0 : CHUNK;
            for (int64_t k = 0; k < m; ++k) {
                const float *restrict wk = w + row[k] * cols + c0;
                const uint8_t *restrict fk = fm + row[k] * cols + c0;
                float *restrict sk = pl.s[k];
                for (int64_t c = 0; c < len; ++c) {
                    float kept = fk[c] != 0;
                    sk[c] = fabsf(wk[c]) * kept + (kept - 1.0f) * pruned_offset;
                }
            }
            rank_planes(&pl, m, n, len, high != 0);
            for (int64_t k = 0; k < m; ++k) {
                const uint8_t *restrict fk = fm + row[k] * cols + c0;
                uint8_t *restrict ok = mask + row[k] * cols + c0;
                const int32_t *restrict rk = pl.r[k];
                for (int64_t c = 0; c < len; ++c) ok[c] = (uint8_t)(rk[c] & (fk[c] != 0));
            }
        }
    }
    return 0;
}

/* grad += (w - w * fm) * decay, in place: the SR-STE decay term of the weight gradient, rounded as the
 * tensor ops round it (fm is 0 or 1). */
void bm_add_decay(float *restrict grad, const float *restrict w, const uint8_t *restrict fm, int64_t numel,
                  float decay) {
    for (int64_t i = 0; i < numel; ++i) {
        float kept = fm[i];
        grad[i] += (w[i] - w[i] * kept) * decay;
    }
}
