/* One whole ConvLSTM step in inference on CPU, fp32, in one call: the columns of [x, h]
   (im2col.c), their product with the weight (the BLAS sgemm torch itself links, found by
   native_build.py and handed over once by tcl_set_sgemm), the bias, and the gate update
   (gates.c). For small frames, where a step is a few torch ops of microseconds each, this
   replaces cat, convolution, and the gate kernel's own call (native_step.py has the numbers). */

#include <stdlib.h>

#include "kernels.h"

/* Fortran BLAS (LP64): C = alpha op(A) op(B) + beta C, column-major, every argument by
   reference. */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *,
                         const float *, const float *, const int *, const float *, const int *,
                         const float *, float *, const int *);

static sgemm_fn SGEMM = NULL;

void tcl_set_sgemm(void *fn) { SGEMM = (sgemm_fn)fn; }

/* A step's sizes (native_step builds one per signature and keeps it). */
typedef struct {
    geom_t g;
    layout_t x, h, cols;  /* cols: (B, rows, pixels), dense, in the scratch */
    plan_t gates;         /* the update over z (B, out, pixels), dense, in the scratch */
    i64 rows, out, pixels, w_row; /* w_row: the weight's row stride (a slice may have gaps) */
} step_plan_t;

/* A scratch block per thread, kept and grown (and never freed: one per thread that ran a step,
   at most the largest step's columns and gates, ~1.3 MiB): a fresh one per step would cost the
   page faults of a large malloc each time. */
static _Thread_local float *scratch = NULL;
static _Thread_local i64 scratch_size = 0;

static float *scratch_of(i64 n) {
    if (n > scratch_size) {
        float *grown = realloc(scratch, (size_t)n * sizeof(float));
        if (grown == NULL) return NULL;
        scratch = grown;
        scratch_size = n;
    }
    return scratch;
}

/* h_out, c_out = the step from x, h (NULL: the zero state, the weight's x columns alone),
   c_prev, the weight (out, rows) at row stride w_row, bias (out) or NULL, peep (3, hid) or
   NULL. Returns 0; 1 where there is no sgemm or no memory (nothing written). */
int tcl_step_forward(const step_plan_t *p, const float *x, const float *h, const float *w,
                     const float *bias, const float *c_prev, const float *peep, float *c_out,
                     float *h_out) {
    if (SGEMM == NULL) return 1;
    const i64 B = p->g.B, cols_size = B * p->rows * p->pixels;
    float *buf = scratch_of(cols_size + B * p->out * p->pixels);
    if (buf == NULL) return 1;
    float *cols = buf, *z = buf + cols_size;
    if (tcl_im2col(&p->g, &p->x, x, &p->h, h, &p->cols, cols)) return 1;
    const int m = (int)p->pixels, n = (int)p->out, k = (int)p->rows, ldb = (int)p->w_row;
    const float one = 1.0f, zero = 0.0f;
    for (i64 b = 0; b < B; ++b) {
        float *zb = z + b * p->out * p->pixels;
        if (bias) {
            for (i64 o = 0; o < p->out; ++o) {
                float *row = zb + o * p->pixels;
                const float v = bias[o];
                _Pragma("omp simd")
                for (i64 i = 0; i < p->pixels; ++i) row[i] = v;
            }
        }
        /* z_b (out, pixels) row-major = w (out, rows) @ cols_b (rows, pixels): column-major,
           z_b^T (pixels x out) = cols_b^T (pixels x rows) w^T (rows x out). */
        SGEMM("N", "N", &m, &n, &k, &one, cols + b * p->rows * p->pixels, &m, w, &ldb,
              bias ? &one : &zero, zb, &m);
    }
    tcl_gate_forward(&p->gates, z, NULL, c_prev, c_out, h_out, peep, NULL);
    return 0;
}
