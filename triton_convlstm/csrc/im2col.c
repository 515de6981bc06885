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

/* dx[b] = the adjoint of tcl_im2col for one input: each column entry added back to the pixel
   its tap read (in a fixed order: the same sums every run). Returns 0, or 1 where the padded
   copy could not be allocated (nothing written). */
int tcl_col2im(const geom_t *g, const layout_t *lc, const float *dcols, const layout_t *lx,
               float *dx) {
    const i64 C = lx->channels, plane = padded_plane(g);
    float *pad = malloc((size_t)(C * plane) * sizeof(float));
    if (pad == NULL) return 1;
    for (i64 b = 0; b < g->B; ++b) {
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
    free(pad);
    return 0;
}
