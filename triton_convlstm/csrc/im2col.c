/* The columns of a small 'same'-padded convolution on CPU, fp32, and their adjoint: with them
   the convolution and both its gradients are matrix products (torch.mm and kin, MKL's sgemm).
   For small 1-d and 3-d frames that beats the convolutions torch picks (its 3-d CPU
   convolution builds its columns itself, slowly; native_conv.py has the numbers).

   A tensor is seen as (B, C, pixels) (layout_t), which covers channels-first (pixel stride 1)
   and channels-last (pixel stride C) frames of 1 to 3 dims (1-d and 2-d as D = H = 1 and
   D = 1). The columns are (B, C * KD * KH * KW, pixels) at any strides: row (c, kz, ky, kx),
   column the output pixel, zero where the tap falls in the padding. Both kernels go through a
   zero-padded channels-first copy of one sample, so that no tap needs a bounds test. */

#include <stdlib.h>

#include "kernels.h"

/* One row of n floats from s to d at pixel stride ps (1: contiguous). Rows of 3-d and small
   2-d frames are short: a constant length lets the compiler emit one or two vector moves
   instead of a loop with a remainder (3-d 8x8x8 columns: ~55 -> ~25 us). */
#define COPY_FIXED(N)                                                     \
    case N:                                                              \
        _Pragma("omp simd") for (i64 i = 0; i < N; ++i) d[i] = s[i];     \
        return;

static inline void copy_row(float *restrict d, i64 ps, const float *restrict s, i64 n) {
    if (ps != 1) {
        for (i64 i = 0; i < n; ++i) d[i * ps] = s[i];
        return;
    }
    switch (n) {
        COPY_FIXED(4)
        COPY_FIXED(8)
        COPY_FIXED(16)
        default:
            _Pragma("omp simd") for (i64 i = 0; i < n; ++i) d[i] = s[i];
    }
}

static i64 padded_plane(const geom_t *g) {
    return (g->D + g->td) * (g->H + g->th) * (g->W + g->tw);
}

/* The padded copy's element for (channel c, tap (kz, ky, kx), output pixel row (z, y)). */
static i64 tap_row(const geom_t *g, i64 c, i64 kz, i64 ky, i64 kx, i64 z, i64 y) {
    const i64 Hp = g->H + g->th, Wp = g->W + g->tw;
    return c * padded_plane(g) + ((z + kz * g->dd) * Hp + y + ky * g->dh) * Wp + kx * g->dw;
}

/* Sample b of src into the padded copy's channels from ``first`` on (its borders stay 0). */
static void pad_in(float *pad, const geom_t *g, const layout_t *src, const float *data, i64 b,
                   i64 first) {
    const i64 Hp = g->H + g->th, Wp = g->W + g->tw;
    for (i64 c = 0; c < src->channels; ++c) {
        const float *s = data + b * src->sample + c * src->channel;
        float *p = pad + (first + c) * padded_plane(g) + (g->pd * Hp + g->ph) * Wp + g->pw;
        for (i64 z = 0; z < g->D; ++z)
            for (i64 y = 0; y < g->H; ++y) {
                const float *row = s + ((z * g->H + y) * g->W) * src->pixel;
                float *out = p + (z * Hp + y) * Wp;
                if (src->pixel == 1) {
                    _Pragma("omp simd")
                    for (i64 x = 0; x < g->W; ++x) out[x] = row[x];
                } else {
                    for (i64 x = 0; x < g->W; ++x) out[x] = row[x * src->pixel];
                }
            }
    }
}

/* The padded copy's interior, channels from ``first`` on, into sample b of dst. */
static void pad_out(const float *pad, const geom_t *g, const layout_t *dst, float *data, i64 b,
                    i64 first) {
    const i64 Hp = g->H + g->th, Wp = g->W + g->tw;
    for (i64 c = 0; c < dst->channels; ++c) {
        float *d = data + b * dst->sample + c * dst->channel;
        const float *p = pad + (first + c) * padded_plane(g) + (g->pd * Hp + g->ph) * Wp + g->pw;
        for (i64 z = 0; z < g->D; ++z)
            for (i64 y = 0; y < g->H; ++y) {
                float *row = d + ((z * g->H + y) * g->W) * dst->pixel;
                const float *in = p + (z * Hp + y) * Wp;
                if (dst->pixel == 1) {
                    _Pragma("omp simd")
                    for (i64 x = 0; x < g->W; ++x) row[x] = in[x];
                } else {
                    for (i64 x = 0; x < g->W; ++x) row[x * dst->pixel] = in[x];
                }
            }
    }
}

i64 tcl_padded_plane(const geom_t *g) { return padded_plane(g); }

/* Sample b of [x, h] (h may be NULL) into the padded copy's interior (its borders, zeroed by
   the caller once, stay zero). */
void tcl_pad_sample(const geom_t *g, const layout_t *lx, const float *x, const layout_t *lh,
                    const float *h, i64 b, float *pad) {
    pad_in(pad, g, lx, x, b, 0);
    if (h) pad_in(pad, g, lh, h, b, lx->channels);
}

/* The columns of output rows r0..r1 - 1 (a row: the W pixels of one (z, y)) of a padded
   sample of C channels: cols[r][p - r0 * W] at row stride ld. */
void tcl_tile_columns(const geom_t *g, i64 C, const float *pad, i64 r0, i64 r1, float *cols,
                      i64 ld) {
    for (i64 c = 0; c < C; ++c)
        for (i64 kz = 0; kz < g->KD; ++kz)
            for (i64 ky = 0; ky < g->KH; ++ky)
                for (i64 kx = 0; kx < g->KW; ++kx) {
                    const i64 r = ((c * g->KD + kz) * g->KH + ky) * g->KW + kx;
                    for (i64 row = r0; row < r1; ++row)
                        copy_row(cols + r * ld + (row - r0) * g->W, 1,
                                 pad + tap_row(g, c, kz, ky, kx, row / g->H, row % g->H),
                                 g->W);
                }
}

/* cols[b] = the columns of sample b of [x, h] (h's channels after x's; h may be NULL).
   Returns 0, or 1 where the padded copy could not be allocated (nothing written). */
int tcl_im2col(const geom_t *g, const layout_t *lx, const float *x, const layout_t *lh,
               const float *h, const layout_t *lc, float *cols) {
    const i64 C = lx->channels + (h ? lh->channels : 0);
    float *pad = calloc((size_t)(C * padded_plane(g)), sizeof(float));
    if (pad == NULL) return 1;
    for (i64 b = 0; b < g->B; ++b) {
        pad_in(pad, g, lx, x, b, 0);
        if (h) pad_in(pad, g, lh, h, b, lx->channels);
        for (i64 c = 0; c < C; ++c)
            for (i64 kz = 0; kz < g->KD; ++kz)
                for (i64 ky = 0; ky < g->KH; ++ky)
                    for (i64 kx = 0; kx < g->KW; ++kx) {
                        const i64 r = ((c * g->KD + kz) * g->KH + ky) * g->KW + kx;
                        float *out = cols + b * lc->sample + r * lc->channel;
                        for (i64 z = 0; z < g->D; ++z)
                            for (i64 y = 0; y < g->H; ++y) {
                                copy_row(out + (z * g->H + y) * g->W * lc->pixel,
                                         lc->pixel, pad + tap_row(g, c, kz, ky, kx, z, y),
                                         g->W);
                            }
                    }
    }
    free(pad);
    return 0;
}

/* Sample b's columns (dcols at lc) added back into the zero-filled padded copy, then its
   interior written to sample b of dx (lx): the adjoint of the columns of one sample. */
static void col2im_sample(const geom_t *g, const layout_t *lc, const float *dcols,
                          const layout_t *lx, float *dx, i64 b, float *pad) {
    const i64 C = lx->channels, plane = padded_plane(g);
    for (i64 k = 0; k < C * plane; ++k) pad[k] = 0.0f;
    for (i64 c = 0; c < C; ++c)
        for (i64 kz = 0; kz < g->KD; ++kz)
            for (i64 ky = 0; ky < g->KH; ++ky)
                for (i64 kx = 0; kx < g->KW; ++kx) {
                    const i64 r = ((c * g->KD + kz) * g->KH + ky) * g->KW + kx;
                    const float *in = dcols + b * lc->sample + r * lc->channel;
                    for (i64 z = 0; z < g->D; ++z)
                        for (i64 y = 0; y < g->H; ++y) {
                            float *s = pad + tap_row(g, c, kz, ky, kx, z, y);
                            const float *d = in + (z * g->H + y) * g->W * lc->pixel;
                            if (lc->pixel == 1) {
                                _Pragma("omp simd")
                                for (i64 i = 0; i < g->W; ++i) s[i] += d[i];
                            } else {
                                for (i64 i = 0; i < g->W; ++i) s[i] += d[i * lc->pixel];
                            }
                        }
                }
    pad_out(pad, g, lx, dx, b, 0);
}

/* dx[b] = the adjoint of tcl_im2col for one input: each column entry added back to the pixel
   its tap read (in a fixed order: the same sums every run). Returns 0, or 1 where the padded
   copy could not be allocated (nothing written). */
int tcl_col2im(const geom_t *g, const layout_t *lc, const float *dcols, const layout_t *lx,
               float *dx) {
    float *pad = malloc((size_t)(lx->channels * padded_plane(g)) * sizeof(float));
    if (pad == NULL) return 1;
    for (i64 b = 0; b < g->B; ++b) col2im_sample(g, lc, dcols, lx, dx, b, pad);
    free(pad);
    return 0;
}

/* The output gradient's leading dimension for the BLAS: the stride between its dense runs
   (a single run: its stride unused, its length the BLAS's least). */
static int grad_ld(const conv_grad_plan_t *p) {
    return (int)(p->grad_pixel == 1 ? (p->out > 1 ? p->grad_channel : p->pixels)
                                    : (p->pixels > 1 ? p->grad_pixel : p->out));
}

/* Whether a piece's sizes and strides fit the BLAS's ints, and the weight's rows (dw's) do
   not overlap (a leading dimension under the row's length: the BLAS would refuse it and leave
   the result unwritten). */
static int grad_sizes_fit(const conv_grad_plan_t *p) {
    const i64 taps = p->g.KD * p->g.KH * p->g.KW, rows = p->chunk * taps;
    return p->pixels <= INT32_MAX && rows <= INT32_MAX && p->out <= INT32_MAX
           && p->w_row <= INT32_MAX && p->grad_channel <= INT32_MAX
           && p->grad_pixel <= INT32_MAX && (p->out == 1 || p->w_row >= p->x.channels * taps);
}

/* The pieces a plan's channels make (chunk channels each, the last the rest). */
static i64 chunks_of(const conv_grad_plan_t *p) {
    return (p->x.channels + p->chunk - 1) / p->chunk;
}

/* Piece k of a gradient, from a (the weight, or x), grad into out (dx, or dw), with this
   thread's columns and padded copy. */
typedef void (*piece_fn)(const conv_grad_plan_t *p, sgemm_fn sgemm, const float *a,
                         const float *grad, float *out, i64 k, float *cols, float *pad);

/* Input gradient piece k: frame k / chunks' channels from (k % chunks) * chunk, their columns
   the product of the weight's rows for them (transposed) with the frame's output gradient,
   added back into dx by col2im_sample. */
static void input_grad_piece(const conv_grad_plan_t *p, sgemm_fn sgemm, const float *w,
                             const float *grad, float *dx, i64 k, float *cols, float *pad) {
    const i64 taps = p->g.KD * p->g.KH * p->g.KW, f = k / chunks_of(p);
    const i64 c0 = k % chunks_of(p) * p->chunk;
    const i64 n = p->x.channels - c0 < p->chunk ? p->x.channels - c0 : p->chunk;
    const int m32 = (int)p->pixels, n32 = (int)(n * taps), k32 = (int)p->out;
    const int lda = grad_ld(p), ldw = (int)p->w_row;
    const float one = 1.0f, zero = 0.0f;
    /* column-major: cols^T (pixels x n taps, ld pixels) = grad_f^T (pixels x out: stored
       out x pixels, or pixels x out where the channels are dense) w_rows (out x n taps: the
       weight stored out x rows at ld w_row, transposed) */
    sgemm(p->grad_pixel == 1 ? "N" : "T", "T", &m32, &n32, &k32, &one,
          grad + f * p->grad_frame, &lda, w + c0 * taps, &ldw, &zero, cols, &m32);
    const layout_t lc = {n * taps, 0, p->pixels, 1};
    layout_t lx = p->x;
    lx.channels = n;
    col2im_sample(&p->g, &lc, cols, &lx, dx + f * p->x.sample + c0 * p->x.channel, 0, pad);
}

/* Weight gradient piece k: channels from k * chunk (dw's columns for them), summed over the
   frames: each frame's columns of those channels (from the padded copy, whose borders are
   zero) times its output gradient. */
static void weight_grad_piece(const conv_grad_plan_t *p, sgemm_fn sgemm, const float *x,
                              const float *grad, float *dw, i64 k, float *cols, float *pad) {
    const i64 taps = p->g.KD * p->g.KH * p->g.KW, n_rows = p->g.D * p->g.H, c0 = k * p->chunk;
    const i64 n = p->x.channels - c0 < p->chunk ? p->x.channels - c0 : p->chunk;
    const int m32 = (int)(n * taps), n32 = (int)p->out, k32 = (int)p->pixels;
    const int ldg = grad_ld(p), ldw = (int)p->w_row;
    const float one = 1.0f, zero = 0.0f;
    layout_t lx = p->x;
    lx.channels = n;
    for (i64 f = 0; f < p->frames; ++f) {
        tcl_pad_sample(&p->g, &lx, x + c0 * p->x.channel, NULL, NULL, f, pad);
        tcl_tile_columns(&p->g, n, pad, 0, n_rows, cols, p->pixels);
        /* column-major: dw^T's rows for the chunk (n taps x out, ld w_row) (+)= cols (stored
           n taps x pixels row-major: transposed) grad_f^T (pixels x out: stored out x pixels,
           or pixels x out where the channels are dense) */
        sgemm("T", p->grad_pixel == 1 ? "N" : "T", &m32, &n32, &k32, &one, cols, &k32,
              grad + f * p->grad_frame, &ldg, f ? &one : &zero, dw + c0 * taps, &ldw);
    }
}

/* The pieces 0..pieces - 1, each with its thread's part of scratch (tcl_conv_grad_scratch
   floats a thread, zeroed first: the padded copies' borders); on p->threads threads, each
   every threads-th piece (its products on one BLAS thread). Returns 0; 1 where there is no
   sgemm or the sizes pass the BLAS's ints (nothing written). */
static int run_pieces(const conv_grad_plan_t *p, i64 pieces, piece_fn fn, const float *a,
                      const float *grad, float *out, float *scratch) {
    sgemm_fn sgemm = tcl_sgemm();
    if (sgemm == NULL || !grad_sizes_fit(p)) return 1;
    const i64 per_thread = tcl_conv_grad_scratch(p);
    const i64 cols = p->chunk * p->g.KD * p->g.KH * p->g.KW * p->pixels;
    const int threads = p->threads > 1 ? (int)p->threads : 1;
    if (threads == 1) {  /* (no OpenMP region of one thread: see step.c) */
        for (i64 k = 0; k < per_thread; ++k) scratch[k] = 0.0f;
        for (i64 k = 0; k < pieces; ++k) fn(p, sgemm, a, grad, out, k, scratch, scratch + cols);
        return 0;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
    {
        const int restore = tcl_blas_threads(1);
        const int k0 = tcl_thread_index(), n = tcl_thread_count();
        float *own = scratch + k0 * per_thread;
        for (i64 k = 0; k < per_thread; ++k) own[k] = 0.0f;
        for (i64 k = k0; k < pieces; k += n) fn(p, sgemm, a, grad, out, k, own, own + cols);
        if (restore >= 0) tcl_blas_threads(restore);
    }
    return 0;
}

/* dx (frames, C, pixels at p->x) = the input gradient of a small 'same' convolution from
   grad (frames, out, pixels at the plan's strides, the channels or the pixels dense) and the
   weight (out, C * taps) at row stride w_row, a piece (a frame's chunk of channels) at a
   time (run_pieces). */
int tcl_input_grad(const conv_grad_plan_t *p, const float *w, const float *grad, float *dx,
                   float *scratch) {
    return run_pieces(p, p->frames * chunks_of(p), input_grad_piece, w, grad, dx, scratch);
}

/* dw (out, C * taps) at row stride w_row = the weight gradient of a small 'same' convolution
   of x (frames, C, pixels at p->x) given grad (as tcl_input_grad's), summed over the frames,
   a piece (a chunk of channels, all frames) at a time (run_pieces). */
int tcl_weight_grad(const conv_grad_plan_t *p, const float *x, const float *grad, float *dw,
                    float *scratch) {
    return run_pieces(p, chunks_of(p), weight_grad_piece, x, grad, dw, scratch);
}

/* A thread's scratch floats for tcl_input_grad and tcl_weight_grad: a piece's columns and
   its padded copy. */
i64 tcl_conv_grad_scratch(const conv_grad_plan_t *p) {
    return p->chunk * (p->g.KD * p->g.KH * p->g.KW * p->pixels + padded_plane(&p->g));
}
