/* What the CPU kernels share (gates.c, im2col.c, step.c): the types the Python side mirrors
   in native_build.py (Plan, Rows, Geometry, Layout, StepPlan) and the entry points one file
   calls in another. */

#ifndef TCL_KERNELS_H
#define TCL_KERNELS_H

#include <stdint.h>

typedef int64_t i64;

/* Strides, in elements, of one tensor seen as rows: (batch, row). */
typedef struct { i64 b, m; } rows_t;

/* A gate update's sizes (native_gates builds one per layout and keeps it): rows
   m_begin..m_end - 1 of B x M rows of N elements (a caller may split the rows between threads:
   each writes only its own rows); gate k of a gates-like tensor at k * gate_step[0] (the
   backward's dz: [1]) from gate i; peep_on_n: a row's elements are channels (one peephole value
   each), else the row is one channel. rows: each tensor's strides, in the order of the
   function's arguments. */
typedef struct {
    i64 B, m_begin, m_end, N, hid, peep_on_n;
    i64 gate_step[2];
    rows_t rows[8];
} plan_t;

/* A small convolution's sizes: the frame (1-d and 2-d with unit leading dims), the kernel, the
   dilation, the pads before each dim and each dim's total pad (an odd total pads one more at
   the end). */
typedef struct {
    i64 B, D, H, W, KD, KH, KW, dd, dh, dw, pd, ph, pw, td, th, tw;
} geom_t;

/* A tensor seen as (B, channels, pixels): element strides per sample, channel and pixel, the
   pixels (z, y, x) in order at the one pixel stride. */
typedef struct { i64 channels, sample, channel, pixel; } layout_t;

void tcl_gate_forward(const plan_t *plan, const float *src, float *gates, const float *c_prev,
                      float *c_out, float *h_out, const float *peep, const float *valid);

int tcl_im2col(const geom_t *g, const layout_t *lx, const float *x, const layout_t *lh,
               const float *h, const layout_t *lc, float *cols);

#endif
