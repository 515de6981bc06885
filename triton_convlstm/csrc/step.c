/* One whole ConvLSTM step in inference on CPU, fp32, in one call: the columns of [x, h]
   (im2col.c), their product with the weight (the BLAS sgemm torch itself links, found by
   native_build.py and handed over once by tcl_set_sgemm), the bias, and the gate update
   (gates.c); or, for 3x3 kernels with enough channels, the convolution by winograd.c (its
   products by the same sgemm). For small frames, where a step is a few torch ops of
   microseconds each, this replaces cat, convolution, and the gate kernel's own call
   (native_step.py has the numbers). */

#include <stddef.h>

#include "kernels.h"

static sgemm_fn SGEMM = NULL;

void tcl_set_sgemm(void *fn) { SGEMM = (sgemm_fn)fn; }

sgemm_fn tcl_sgemm(void) { return SGEMM; }

/* The product of sample's tiles k, k + n, k + 2n, ... (n threads, this one k), each tile's
   columns built from the padded sample into cols, added onto zb (the sample's z, holding the
   bias). */
static void tiles_of(const step_plan_t *p, i64 C, const float *pad, float *cols, float *zb,
                     const float *w, int k, int n) {
    const geom_t *g = &p->g;
    const i64 W = g->W, n_rows = g->D * g->H, tile = p->tile_rows * W;
    const i64 n_tiles = (n_rows + p->tile_rows - 1) / p->tile_rows;
    const int k32 = (int)p->rows, ldw = (int)p->w_row, o32 = (int)p->out, ldc = (int)tile;
    const float one = 1.0f;
    for (i64 t = k; t < n_tiles; t += n) {
        const i64 r0 = t * p->tile_rows;
        const i64 r1 = r0 + p->tile_rows < n_rows ? r0 + p->tile_rows : n_rows;
        const int cols_n = (int)((r1 - r0) * W);
        tcl_tile_columns(g, C, pad, r0, r1, cols, tile);
        if (p->z_pixel_major) {
            /* z rows r0*W.. (pixels, out) row-major; column-major: (out x n) = w (stored
               rows x out: transposed) cols (rows x n, stored n x rows at ld tile:
               transposed). */
            SGEMM("T", "T", &o32, &cols_n, &k32, &one, w, &ldw, cols, &ldc, &one,
                  zb + r0 * W * p->out, &o32);
        } else {
            /* z columns r0*W.. of (out, pixels) row-major; column-major: (n x out, ld P)
               = cols^T (n x rows at ld tile) w^T (rows x out at ld w_row). */
            const int p32 = (int)p->pixels;
            SGEMM("N", "N", &cols_n, &o32, &k32, &one, cols, &ldc, w, &ldw, &one,
                  zb + r0 * W, &p32);
        }
    }
}

/* The gate update of a columns step on n threads, a share of the plan's rows each. */
static void shared_gates(const step_plan_t *p, int n, const float *z, float *gates,
                         const float *c_prev, float *c_out, float *h_out, const float *peep,
                         const float *valid) {
#ifdef _OPENMP
#pragma omp parallel num_threads(n)
#endif
    {
        const i64 k = tcl_thread_index(), count = tcl_thread_count();
        const i64 rows = p->gates.m_end - p->gates.m_begin;
        plan_t share = p->gates;
        share.m_begin = p->gates.m_begin + rows * k / count;
        share.m_end = p->gates.m_begin + rows * (k + 1) / count;
        if (share.m_end > share.m_begin)
            tcl_gate_forward(&share, z, gates, c_prev, c_out, h_out, peep, valid);
    }
}

/* h_out, c_out = the step from x, h (NULL: the zero state, the weight's x columns alone),
   c_prev (c_out may be c_prev: each element is read before it is written), the weight (out,
   rows) at row stride w_row, bias (out) or NULL, peep (3, hid) or NULL; gates: where the
   activated gates go (training saves them), or NULL; valid: per-sample multipliers (B,) or
   NULL (gates.c's); scratch: the floats native_step._make_plan counts (a torch tensor of the
   caller's: memory tools see it) for the padded sample, a tile of columns for each of the
   plan's threads (with winograd: tcl_winograd_scratch's) and, unless z_in_gates, z; with
   winograd, w is the weight's transform (native_winograd.transform_weight). The columns are
   built tile_rows output rows at a time, so that the scratch stays small whatever the frame.
   h_out may be h: every h is read (into the padded copy, or the transformed tiles) before
   any gate is written. Returns 0; 1 where there is no sgemm (nothing written). */
int tcl_step_forward(const step_plan_t *p, const float *x, const float *h, const float *w,
                     const float *bias, const float *c_prev, const float *peep, float *c_out,
                     float *h_out, float *gates, const float *valid, float *scratch) {
    /* (a row stride under the row's length is overlapping rows: sgemm would refuse it and
       leave z unwritten) */
    if (p->winograd) {
        /* (the weight is winograd.c's transform; its scratch first, then z) */
        float *z = p->z_in_gates ? gates : scratch + tcl_winograd_scratch(&p->wino);
        if (tcl_winograd3x3(&p->wino, x, h, w, bias, z, scratch)) return 1;
        tcl_gate_forward(&p->gates, z, gates, c_prev, c_out, h_out, peep, valid);
        return 0;
    }
    if (SGEMM == NULL || p->w_row < p->rows || p->w_row > INT32_MAX) return 1;
    const geom_t *g = &p->g;
    const i64 B = g->B, P = p->pixels, O = p->out;
    const i64 C = p->x.channels + (h ? p->h.channels : 0);
    const i64 pad_size = C * tcl_padded_plane(g), tile = p->tile_rows * g->W;
    const int threads = p->threads > 1 ? (int)p->threads : 1;
    float *pad = scratch, *cols = scratch + pad_size;
    float *z = p->z_in_gates ? gates : cols + threads * p->rows * tile;
    for (i64 k = 0; k < pad_size; ++k) pad[k] = 0.0f;
    for (i64 b = 0; b < B; ++b) {
        float *zb = z + b * O * P;
        /* the bias first; each tile's product then adds onto it */
        if (p->z_pixel_major) {
            for (i64 i = 0; i < P; ++i) {
                float *row = zb + i * O;
                _Pragma("omp simd")
                for (i64 o = 0; o < O; ++o) row[o] = bias ? bias[o] : 0.0f;
            }
        } else {
            for (i64 o = 0; o < O; ++o) {
                float *row = zb + o * P;
                const float v = bias ? bias[o] : 0.0f;
                _Pragma("omp simd")
                for (i64 i = 0; i < P; ++i) row[i] = v;
            }
        }
        tcl_pad_sample(g, &p->x, x, &p->h, h, b, pad);
        if (threads == 1) {
            tiles_of(p, C, pad, cols, zb, w, 0, 1);
            continue;
        }
        /* On several threads each takes every threads-th tile into its own columns, its
           products on one BLAS thread (MKL would otherwise start its own threads in each).
           (Never a region of one thread: a step's MKL products inside one, after a torch op
           had woken torch's workers, took ~7 ms instead of ~0.25.) */
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
        {
            const int restore = tcl_blas_threads(1);
            const int k = tcl_thread_index();
            tiles_of(p, C, pad, cols + k * p->rows * tile, zb, w, k, tcl_thread_count());
            if (restore >= 0) tcl_blas_threads(restore);
        }
    }
    if (p->gate_threads > 1)
        shared_gates(p, (int)p->gate_threads, z, gates, c_prev, c_out, h_out, peep, valid);
    else
        tcl_gate_forward(&p->gates, z, gates, c_prev, c_out, h_out, peep, valid);
    return 0;
}
