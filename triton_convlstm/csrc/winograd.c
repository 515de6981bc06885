/* A 3x3 'same' convolution of [x, h] (stride 1, dilation 1, one pixel of zeros around) on
   CPU, fp32, by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, 2015): each 2x2 block
   of output pixels ("tile") takes 16 products a channel pair instead of 36, as 16 matrix
   products of (tiles x C) by (C x O), each by the BLAS sgemm torch links (step.c's SGEMM).

   Why: a ConvLSTM's step is mostly its convolution, and at C + hidden >= ~16 channels
   oneDNN's direct convolution already runs near the core's peak, so only fewer multiplies
   make it faster (measured in native_winograd.py). F(4x4, 3x3) was tried: 9e-6 relative
   error against float64 (F(2x2, 3x3): 4e-7, below the direct sum's 1e-6) and its 6x6
   transforms spilled registers (slower than oneDNN).

   The tiles run a block at a time (plan->block of them), so that the transformed inputs V
   (16 x block x C) and products M (16 x block x O) stay in the core's L2 between the input
   transform, the 16 products and the output transform. The transforms are vectorized over
   the channels (unit stride in channels-last frames; other layouts are packed per tile). */

#include <stddef.h>

#include "kernels.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* A tile's place: its image and its top-left output pixel. Tiles are counted image by
   image, row by row; a block's first is found by division, the next ones by stepping (the
   divisions per tile had cost ~30% of a convolution of few channels: 9 -> 32 at 64x64). */
typedef struct { i64 b, y, x; } tile_at_t;

ALWAYS_INLINE tile_at_t tile_at(const winograd_plan_t *p, i64 t) {
    const i64 per_image = p->tiles_h * p->tiles_w, r = t % per_image;
    const tile_at_t at = {t / per_image, 2 * (r / p->tiles_w), 2 * (r % p->tiles_w)};
    return at;
}

ALWAYS_INLINE void next_tile(const winograd_plan_t *p, tile_at_t *at) {
    at->x += 2;
    if (at->x >= p->W) {
        at->x = 0;
        at->y += 2;
        if (at->y >= p->H) {
            at->y = 0;
            ++at->b;
        }
    }
}

/* The tile's 16 input pixels (rows y - 1..y + 2, columns x - 1..x + 2) of one tensor:
   pointers to their channel 0, or to `zeros` (C floats) outside the frame. off: the 16
   pixels' offsets from the first, for a tile inside the frame. */
ALWAYS_INLINE void tile_inputs(const winograd_plan_t *p, const layout_t *l, const float *src,
                               tile_at_t at, const float *zeros, const i64 off[16],
                               const float *q[16]) {
    const i64 y0 = at.y - 1, x0 = at.x - 1;
    const float *image = src + at.b * l->sample;
    if (y0 >= 0 && y0 + 3 < p->H && x0 >= 0 && x0 + 3 < p->W) {
        const float *first = image + (y0 * p->W + x0) * l->pixel;
        for (int k = 0; k < 16; ++k) q[k] = first + off[k];
        return;
    }
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
            const i64 y = y0 + i, x = x0 + j;
            const int in = y >= 0 && y < p->H && x >= 0 && x < p->W;
            q[4 * i + j] = in ? image + (y * p->W + x) * l->pixel : zeros;
        }
}

/* V's channels c0.. for tiles t0..t0 + n - 1 of one tensor (x or h) of C channels. */
static void transform_inputs(const winograd_plan_t *p, const layout_t *l, const float *src,
                             i64 c0, i64 t0, i64 n, float *V, const float *zeros,
                             float *packed) {
    const i64 C = l->channels, ld = p->channels, ks = p->block * ld;
    i64 off[16];
    for (int k = 0; k < 16; ++k) off[k] = ((k / 4) * p->W + k % 4) * l->pixel;
    tile_at_t at = tile_at(p, t0);
    for (i64 t = 0; t < n; ++t, next_tile(p, &at)) {
        const float *q[16];
        tile_inputs(p, l, src, at, zeros, off, q);
        if (l->channel != 1 && C > 1) {
            /* channels apart (a channels-first frame): each pixel's channels packed first */
            for (int k = 0; k < 16; ++k) {
                const i64 step = q[k] == zeros ? 0 : l->channel;
                for (i64 c = 0; c < C; ++c) packed[k * C + c] = q[k][c * step];
                q[k] = packed + k * C;
            }
        }
        float *v = V + t * ld + c0;
        /* V = B^T d B for the tile's 16 inputs d (4x4, row-major), with
           B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]; V[k] at
           v[k * ks]. (Written out in the loop: an array handed to an inline function inside
           an "omp simd" loop becomes a per-lane array in memory, and nothing vectorizes.) */
        _Pragma("omp simd")
        for (i64 c = 0; c < C; ++c) {
            float d[16], u[16];
            for (int k = 0; k < 16; ++k) d[k] = q[k][c];
            for (int j = 0; j < 4; ++j) {
                u[0 + j] = d[0 + j] - d[8 + j];
                u[4 + j] = d[4 + j] + d[8 + j];
                u[8 + j] = d[8 + j] - d[4 + j];
                u[12 + j] = d[4 + j] - d[12 + j];
            }
            for (int i = 0; i < 4; ++i) {
                v[(4 * i + 0) * ks + c] = u[4 * i + 0] - u[4 * i + 2];
                v[(4 * i + 1) * ks + c] = u[4 * i + 1] + u[4 * i + 2];
                v[(4 * i + 2) * ks + c] = u[4 * i + 2] - u[4 * i + 1];
                v[(4 * i + 3) * ks + c] = u[4 * i + 1] - u[4 * i + 3];
            }
        }
    }
}

/* z's pixels of tiles t0..t0 + n - 1 from the block's products M (16 x block x O). */
static void transform_outputs(const winograd_plan_t *p, const float *M, i64 t0, i64 n,
                              const float *bias, float *z, float *spill) {
    const i64 O = p->out, ks = p->block * O;
    tile_at_t at = tile_at(p, t0);
    for (i64 t = 0; t < n; ++t, next_tile(p, &at)) {
        float *out[4];
        const int whole = at.y + 1 < p->H && at.x + 1 < p->W;
        for (int k = 0; k < 4; ++k) {
            const i64 y = at.y + k / 2, x = at.x + k % 2;
            out[k] = y < p->H && x < p->W
                         ? z + at.b * p->z_sample + (y * p->W + x) * p->z_pixel : NULL;
        }
        /* a tile past an odd frame's edge: its 4 pixels computed into spill, the inside
           ones copied out */
        float *dst[4];
        for (int k = 0; k < 4; ++k) dst[k] = whole ? out[k] : spill + k * O;
        const float *m = M + t * O;
        float *d0 = dst[0], *d1 = dst[1], *d2 = dst[2], *d3 = dst[3];
        /* the products' 16 values m (4x4) to the tile's 2x2 outputs A^T m A + bias, with
           A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] */
        _Pragma("omp simd")
        for (i64 o = 0; o < O; ++o) {
            float a[16], s[8];
            for (int k = 0; k < 16; ++k) a[k] = m[k * ks + o];
            for (int j = 0; j < 4; ++j) {
                s[j] = a[j] + a[4 + j] + a[8 + j];
                s[4 + j] = a[4 + j] - a[8 + j] - a[12 + j];
            }
            const float bo = bias ? bias[o] : 0.0f;
            d0[o] = s[0] + s[1] + s[2] + bo;
            d1[o] = s[1] - s[2] - s[3] + bo;
            d2[o] = s[4] + s[5] + s[6] + bo;
            d3[o] = s[5] - s[6] - s[7] + bo;
        }
        if (!whole)
            for (int k = 0; k < 4; ++k)
                if (out[k])
                    for (i64 o = 0; o < O; ++o) out[k][o] = dst[k][o];
    }
}

/* The weight's transform G of F(2x2, 3x3): U = G g G^T for each 3x3 tap set g. */
static const double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};

/* U (16, C, O) for a (O, C, 3, 3) weight w at element strides (so, sc, sy, sx):
   U[4a + b][c][o] = (G w[o][c] G^T)[a][b], summed in double; transposed: the input
   gradient's weight (w's channels swapped, its taps flipped), U (16, O, C). Written in place:
   made in the backward, where the training peak is, torch ops' float64 temporaries had cost
   5x U. */
void tcl_winograd_weight(i64 O, i64 C, const float *w, i64 so, i64 sc, i64 sy, i64 sx,
                         int transposed, float *u) {
    const i64 plane = O * C;
    for (i64 o = 0; o < O; ++o)
        for (i64 c = 0; c < C; ++c) {
            double g[3][3], t[4][3];
            for (int y = 0; y < 3; ++y)
                for (int x = 0; x < 3; ++x) {
                    const i64 yy = transposed ? 2 - y : y, xx = transposed ? 2 - x : x;
                    g[y][x] = w[o * so + c * sc + yy * sy + xx * sx];
                }
            for (int a = 0; a < 4; ++a)
                for (int x = 0; x < 3; ++x)
                    t[a][x] = G[a][0] * g[0][x] + G[a][1] * g[1][x] + G[a][2] * g[2][x];
            float *dst = u + (transposed ? o * C + c : c * O + o);
            for (int a = 0; a < 4; ++a)
                for (int b = 0; b < 4; ++b)
                    dst[(4 * a + b) * plane] =
                        (float)(t[a][0] * G[b][0] + t[a][1] * G[b][1] + t[a][2] * G[b][2]);
        }
}

/* MKL's MKL_Set_Num_Threads_Local, its C interface (found in torch's library, handed over by
   native_build.py), or NULL: threads that each run a share of the tiles keep their products
   on one thread each (else every product would start the BLAS's own threads: 4 on 2 cores). */
typedef int (*blas_threads_fn)(int);
static blas_threads_fn BLAS_THREADS = NULL;

void tcl_set_blas_threads(void *fn) { BLAS_THREADS = (blas_threads_fn)fn; }

/* This thread's BLAS threads set to n: the previous setting (0: none), or -1 without MKL's
   setter (nothing set). */
int tcl_blas_threads(int n) { return BLAS_THREADS ? BLAS_THREADS(n) : -1; }

/* The most channels a zero pixel stands for (x's, h's, or the output gradient's). */
ALWAYS_INLINE i64 widest(const winograd_plan_t *p) {
    const i64 w = p->x.channels > p->h.channels ? p->x.channels : p->h.channels;
    return w > p->out ? w : p->out;
}

/* A call's scratch (tcl_winograd_scratch counts its floats): V, M, the zeros a pixel outside
   the frame reads, a tile's packed channels, a partial tile's outputs; as offsets, then
   carved from the caller's floats. */
typedef struct { i64 M, zeros, packed, spill, end; } offsets_t;
typedef struct { float *V, *M, *zeros, *packed, *spill; } scratch_t;

ALWAYS_INLINE offsets_t scratch_offsets(const winograd_plan_t *p) {
    offsets_t o;
    o.M = 16 * p->block * p->channels;
    o.zeros = o.M + 16 * p->block * p->out;
    o.packed = o.zeros + widest(p);
    o.spill = o.packed + 16 * widest(p);
    o.end = o.spill + 4 * p->out;
    return o;
}

i64 tcl_winograd_scratch(const winograd_plan_t *p) { return scratch_offsets(p).end; }

ALWAYS_INLINE scratch_t carve(const winograd_plan_t *p, float *scratch) {
    const offsets_t o = scratch_offsets(p);
    const scratch_t s = {scratch, scratch + o.M, scratch + o.zeros, scratch + o.packed,
                         scratch + o.spill};
    return s;
}

/* The setup both entry points share: the channels the call convolves (x's, and h's where
   given), or 0 where it cannot run (no sgemm, more channels than the plan's rows, sizes past
   the BLAS's ints: nothing written); the scratch carved, its zeros zeroed; the thread's BLAS
   threads set to the plan's (*restore: the previous setting for blas_threads_restore). */
ALWAYS_INLINE i64 begin_call(const winograd_plan_t *p, const float *h, float *scratch,
                             scratch_t *s, int *restore) {
    const i64 C = p->x.channels + (h ? p->h.channels : 0);
    if (tcl_sgemm() == NULL || C > p->channels || p->out > INT32_MAX
        || p->block * p->channels > INT32_MAX)
        return 0;
    *s = carve(p, scratch);
    for (i64 c = 0; c < widest(p); ++c) s->zeros[c] = 0.0f;
    *restore = p->gemm_threads ? tcl_blas_threads((int)p->gemm_threads) : -1;
    return C;
}

ALWAYS_INLINE void blas_threads_restore(int restore) {
    if (restore >= 0) tcl_blas_threads(restore);  /* (the thread's previous setting) */
}

/* The block of tiles from t0 (at most p->block, up to the plan's end): their transformed
   inputs, x's channels then h's, into s->V; answers how many tiles. Both entry points'. */
ALWAYS_INLINE i64 transform_block(const winograd_plan_t *p, const float *x, const float *h,
                                  i64 t0, const scratch_t *s) {
    const i64 n = p->tile_end - t0 < p->block ? p->tile_end - t0 : p->block;
    transform_inputs(p, &p->x, x, 0, t0, n, s->V, s->zeros, s->packed);
    if (h) transform_inputs(p, &p->h, h, p->x.channels, t0, n, s->V, s->zeros, s->packed);
    return n;
}

int tcl_winograd3x3(const winograd_plan_t *p, const float *x, const float *h, const float *u,
                    const float *bias, float *z, float *scratch) {
    scratch_t s;
    int restore;
    const i64 C = begin_call(p, h, scratch, &s, &restore), O = p->out;
    if (C == 0) return 1;
    sgemm_fn sgemm = tcl_sgemm();
    float *V = s.V, *M = s.M;
    const int o32 = (int)O, c32 = (int)C, ldv = (int)p->channels;
    const float one = 1.0f, zero = 0.0f;
    for (i64 t0 = p->tile_begin; t0 < p->tile_end; t0 += p->block) {
        const i64 n = transform_block(p, x, h, t0, &s);
        const int n32 = (int)n;
        /* column-major: M[k]^T (O x n) = U[k]^T (O x C, U[k] stored C x O row-major at
           u_step apart) V[k]^T (C x n, V[k] stored n x C at row stride channels) */
        for (int k = 0; k < 16; ++k)
            sgemm("N", "N", &o32, &n32, &c32, &one, u + k * p->u_step, &o32,
                  V + k * p->block * p->channels, &ldv, &zero, M + k * p->block * O, &o32);
        transform_outputs(p, M, t0, n, bias, z, s.spill);
    }
    blas_threads_restore(restore);
    return 0;
}

/* The gradients' tiles for the weight gradient: dM = A dY A^T for each tile's 2x2 output
   gradients dY (zero past the frame's edge), A = [[1, 0], [1, 1], [1, -1], [0, -1]] (the
   adjoint of the output transform), into M (16 x block x O); dz read at z's strides. */
static void transform_grads(const winograd_plan_t *p, const float *dz, i64 t0, i64 n,
                            float *M, const float *zeros) {
    const i64 O = p->out, ks = p->block * O;
    tile_at_t at = tile_at(p, t0);
    for (i64 t = 0; t < n; ++t, next_tile(p, &at)) {
        const float *g[4];
        for (int k = 0; k < 4; ++k) {
            const i64 y = at.y + k / 2, x = at.x + k % 2;
            g[k] = y < p->H && x < p->W
                       ? dz + at.b * p->z_sample + (y * p->W + x) * p->z_pixel : zeros;
        }
        const float *g0 = g[0], *g1 = g[1], *g2 = g[2], *g3 = g[3];
        float *m = M + t * O;
        _Pragma("omp simd")
        for (i64 o = 0; o < O; ++o) {
            /* t = A dY (4 x 2), then dM = t A^T, row by row */
            const float d00 = g0[o], d01 = g1[o], d10 = g2[o], d11 = g3[o];
            const float r[4][2] = {{d00, d01}, {d00 + d10, d01 + d11}, {d00 - d10, d01 - d11},
                                   {-d10, -d11}};
            for (int i = 0; i < 4; ++i) {
                m[(4 * i + 0) * ks + o] = r[i][0];
                m[(4 * i + 1) * ks + o] = r[i][0] + r[i][1];
                m[(4 * i + 2) * ks + o] = r[i][0] - r[i][1];
                m[(4 * i + 3) * ks + o] = -r[i][1];
            }
        }
    }
}

/* du (16, C, O) += the weight gradient in the transformed domain, summed over the plan's
   tiles: du[k] += V[k]^T dM[k] (each tile's transformed inputs [x, h] against its
   transformed output gradients dz, at z's strides). tcl_winograd_weight_back then takes du
   to the (O, C, 3, 3) gradient. The products are (C x O) by the block's tiles: the long
   dimension is summed, where the BLAS runs near peak. scratch: tcl_winograd_scratch's. */
int tcl_winograd_weight_grad(const winograd_plan_t *p, const float *x, const float *h,
                             const float *dz, float *du, float *scratch) {
    scratch_t s;
    int restore;
    const i64 C = begin_call(p, h, scratch, &s, &restore), O = p->out;
    if (C == 0) return 1;
    sgemm_fn sgemm = tcl_sgemm();
    float *V = s.V, *M = s.M;
    const int o32 = (int)O, c32 = (int)C, ldv = (int)p->channels;
    const float one = 1.0f;
    for (i64 t0 = p->tile_begin; t0 < p->tile_end; t0 += p->block) {
        const i64 n = transform_block(p, x, h, t0, &s);
        transform_grads(p, dz, t0, n, M, s.zeros);
        const int n32 = (int)n;
        /* column-major: du[k]^T (O x C, ld O) += dM[k]^T (O x n, ld O) V[k] (n x C: V[k]
           stored n x C at row stride channels, read transposed) */
        for (int k = 0; k < 16; ++k)
            sgemm("N", "T", &o32, &c32, &n32, &one, M + k * p->block * O, &o32,
                  V + k * p->block * p->channels, &ldv, &one, du + k * C * O, &o32);
    }
    blas_threads_restore(restore);
    return 0;
}

/* dw (O, C, 3, 3) contiguous = G^T du[o][c] G for each (o, c) of du (16, C, O): the adjoint
   of tcl_winograd_weight's transform, summed in double. */
void tcl_winograd_weight_back(i64 O, i64 C, const float *du, float *dw) {
    const i64 plane = C * O;
    for (i64 o = 0; o < O; ++o)
        for (i64 c = 0; c < C; ++c) {
            double d[4][4], t[3][4];
            for (int k = 0; k < 16; ++k) d[k / 4][k % 4] = du[k * plane + c * O + o];
            for (int y = 0; y < 3; ++y)
                for (int b = 0; b < 4; ++b)
                    t[y][b] = G[0][y] * d[0][b] + G[1][y] * d[1][b] + G[2][y] * d[2][b]
                              + G[3][y] * d[3][b];
            float *w = dw + (o * C + c) * 9;
            for (int y = 0; y < 3; ++y)
                for (int x = 0; x < 3; ++x)
                    w[3 * y + x] = (float)(t[y][0] * G[0][x] + t[y][1] * G[1][x]
                                           + t[y][2] * G[2][x] + t[y][3] * G[3][x]);
        }
}
