/* One whole ConvLSTM step in inference on CPU, fp32, in one call: the columns of [x, h]
   (im2col.c), their product with the weight (the BLAS sgemm torch itself links, found by
   native_build.py and handed over once by tcl_set_sgemm), the bias, and the gate update
   (gates.c). For small frames, where a step is a few torch ops of microseconds each, this
   replaces cat, convolution, and the gate kernel's own call (native_step.py has the numbers). */

#include <stddef.h>

#include "kernels.h"

/* Fortran BLAS (LP64): C = alpha op(A) op(B) + beta C, column-major, every argument by
   reference. */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *,
                         const float *, const float *, const int *, const float *, const int *,
                         const float *, float *, const int *);

static sgemm_fn SGEMM = NULL;

void tcl_set_sgemm(void *fn) { SGEMM = (sgemm_fn)fn; }

/* h_out, c_out = the step from x, h (NULL: the zero state, the weight's x columns alone),
   c_prev (c_out may be c_prev: each element is read before it is written), the weight (out,
   rows) at row stride w_row, bias (out) or NULL, peep (3, hid) or NULL; gates: where the
   activated gates go (training saves them), or NULL; valid: per-sample multipliers (B,) or
   NULL (gates.c's); scratch: B * (rows + out) * pixels floats for the columns and z (a torch
   tensor of the caller's: memory tools see it). Returns 0; 1 where there is no sgemm or no
   memory (nothing written). */
int tcl_step_forward(const step_plan_t *p, const float *x, const float *h, const float *w,
                     const float *bias, const float *c_prev, const float *peep, float *c_out,
                     float *h_out, float *gates, const float *valid, float *scratch) {
    /* (a row stride under the row's length is overlapping rows: sgemm would refuse it and
       leave z unwritten) */
    if (SGEMM == NULL || p->w_row < p->rows || p->w_row > INT32_MAX) return 1;
    const i64 B = p->g.B, P = p->pixels, O = p->out;
    float *cols = scratch, *z = scratch + B * p->rows * P;
    if (tcl_im2col(&p->g, &p->x, x, &p->h, h, &p->cols, cols)) return 1;
    const int k = (int)p->rows, ldw = (int)p->w_row, o32 = (int)O, p32 = (int)P;
    const float one = 1.0f, zero = 0.0f;
    const float *beta = bias ? &one : &zero;
    for (i64 b = 0; b < B; ++b) {
        float *zb = z + b * O * P;
        const float *cb = cols + b * p->rows * P;
        if (p->z_pixel_major) {
            /* z_b (pixels, out) row-major = cols_b^T w^T; column-major: z_b^T (out x pixels)
               = w (out x rows, stored rows x out: transposed) cols_b (rows x pixels, stored
               pixels x rows: transposed). */
            if (bias) {
                for (i64 i = 0; i < P; ++i) {
                    float *row = zb + i * O;
                    _Pragma("omp simd")
                    for (i64 o = 0; o < O; ++o) row[o] = bias[o];
                }
            }
            SGEMM("T", "T", &o32, &p32, &k, &one, w, &ldw, cb, &p32, beta, zb, &o32);
        } else {
            /* z_b (out, pixels) row-major = w cols_b; column-major: z_b^T (pixels x out) =
               cols_b^T (pixels x rows) w^T (rows x out), both as stored. */
            if (bias) {
                for (i64 o = 0; o < O; ++o) {
                    float *row = zb + o * P;
                    const float v = bias[o];
                    _Pragma("omp simd")
                    for (i64 i = 0; i < P; ++i) row[i] = v;
                }
            }
            SGEMM("N", "N", &p32, &o32, &k, &one, cb, &p32, w, &ldw, beta, zb, &p32);
        }
    }
    tcl_gate_forward(&p->gates, z, gates, c_prev, c_out, h_out, peep, valid);
    return 0;
}
