/* What the CPU kernels share (gates.c, im2col.c, winograd.c, step.c, parallel.c): the types
   the Python side mirrors in native_build.py (Plan, Rows, Geometry, Layout, WinogradPlan,
   StepPlan) and the entry points (ctypes calls them all; step.c and parallel.c also call the
   others). */

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

/* A 3x3 'same' convolution by winograd.c: frames of H x W pixels, the tiles (2x2 output
   pixels each) per column and row, x's and h's layouts (h.channels 0: the calls have no h),
   V's row stride (the most channels a call convolves), the outputs, the floats from one of
   the transformed weight's 16 (channels x out) matrices to the next, z's strides per sample
   and pixel (its channels dense), the tiles run at a time, the call's tiles (a thread's
   share: tile_begin..tile_end - 1, counted image by image, row by row) and the threads its
   products may use (0: the BLAS's own setting; 1 where threads share the tiles). */
typedef struct {
    i64 B, H, W, tiles_h, tiles_w;
    layout_t x, h;
    i64 channels, out, u_step, z_sample, z_pixel, block, tile_begin, tile_end, gemm_threads;
} winograd_plan_t;

/* Fortran BLAS (LP64): C = alpha op(A) op(B) + beta C, column-major, every argument by
   reference. */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *,
                         const float *, const float *, const int *, const float *, const int *,
                         const float *, float *, const int *);

/* A fused step's sizes (native_step builds one per signature and keeps it). z, the
   pre-activations, lives in the scratch: (B, out, pixels) dense, or (B, pixels, out) where
   z_pixel_major (channels-last frames). gates: the update over z (its rows[0]) and c_prev,
   c_out, h_out (rows[1..3]); the saved gates, if any, have z's strides. */
typedef struct {
    geom_t g;
    layout_t x, h;  /* (each tile's columns are dense at row stride tile_rows * W) */
    plan_t gates;
    i64 rows, out, pixels, w_row; /* w_row: the weight's row stride (a slice may have gaps) */
    i64 z_pixel_major;
    i64 tile_rows;   /* output rows (W pixels each) whose columns are built at a time */
    i64 z_in_gates;  /* z is computed in the saved gates' buffer (then activated in place) */
    i64 winograd;    /* z by winograd.c (the weight is then its transform), not columns */
    winograd_plan_t wino;
    i64 threads;     /* columns: threads sharing a sample's tiles, each its own columns */
    i64 gate_threads; /* columns: threads sharing the gate update's rows */
} step_plan_t;

void tcl_gate_forward(const plan_t *plan, const float *src, float *gates, const float *c_prev,
                      float *c_out, float *h_out, const float *peep, const float *valid);

void tcl_gate_backward(const plan_t *plan, const float *gates, const float *c_prev,
                       const float *c, const float *dh, const float *dh2, const float *dc,
                       float *dz, float *dc_prev, const float *peep, float *dpeep);

int tcl_im2col(const geom_t *g, const layout_t *lx, const float *x, const layout_t *lh,
               const float *h, const layout_t *lc, float *cols);

i64 tcl_padded_plane(const geom_t *g);

void tcl_pad_sample(const geom_t *g, const layout_t *lx, const float *x, const layout_t *lh,
                    const float *h, i64 b, float *pad);

void tcl_tile_columns(const geom_t *g, i64 C, const float *pad, i64 r0, i64 r1, float *cols,
                      i64 ld);

int tcl_col2im(const geom_t *g, const layout_t *lc, const float *dcols, const layout_t *lx,
               float *dx);

/* A small convolution's gradients (tcl_input_grad, tcl_weight_grad), piece by piece: g one
   frame's sizes (B = 1); frames, the output channels, pixels a frame; grad's element strides
   per frame, channel and pixel (the channels or the pixels dense); the weight's (or dw's) row
   stride; the input's layout (dx's, or x's for the weight gradient; all its channels); the
   channels a piece takes; the threads sharing the pieces. */
typedef struct {
    geom_t g;
    i64 frames, out, pixels, grad_frame, grad_channel, grad_pixel, w_row;
    layout_t x;
    i64 chunk, threads;
} conv_grad_plan_t;

int tcl_input_grad(const conv_grad_plan_t *p, const float *w, const float *grad, float *dx,
                   float *scratch);

int tcl_weight_grad(const conv_grad_plan_t *p, const float *x, const float *grad, float *dw,
                    float *scratch);

i64 tcl_conv_grad_scratch(const conv_grad_plan_t *p);

/* This thread's index in its OpenMP team and the team's size (0 and 1 without OpenMP). */
int tcl_thread_index(void);

int tcl_thread_count(void);

void tcl_set_sgemm(void *fn);

void tcl_set_blas_threads(void *fn);

sgemm_fn tcl_sgemm(void);

int tcl_blas_threads(int n);

void tcl_winograd_weight(i64 O, i64 C, const float *w, i64 so, i64 sc, i64 sy, i64 sx,
                         int transposed, float *u);

i64 tcl_winograd_scratch(const winograd_plan_t *p);

int tcl_winograd3x3(const winograd_plan_t *p, const float *x, const float *h, const float *u,
                    const float *bias, float *z, float *scratch);

int tcl_winograd_weight_grad(const winograd_plan_t *p, const float *x, const float *h,
                             const float *dz, float *du, float *scratch);

void tcl_winograd_weight_back(i64 O, i64 C, const float *du, float *dw);

/* The entry points tcl_parallel runs in shares (native_gates mirrors these numbers). */
enum tcl_parallel_fn {
    TCL_GATE_FORWARD = 0,
    TCL_GATE_BACKWARD = 1,
    TCL_WINOGRAD3X3 = 2,
    TCL_WINOGRAD_WEIGHT_GRAD = 3
};

int tcl_parallel(int fn, i64 n, const void *const *plans, void *const *args, i64 n_args);

int tcl_parallel_threads(void);

int tcl_step_forward(const step_plan_t *p, const float *x, const float *h, const float *w,
                     const float *bias, const float *c_prev, const float *peep, float *c_out,
                     float *h_out, float *gates, const float *valid, float *scratch);

#endif
