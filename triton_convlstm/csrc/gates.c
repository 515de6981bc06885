/* The ConvLSTM gate update on CPU, fp32: the forward and backward of
   triton_convlstm.reference.gate_forward_inplace_ref / gate_backward_from_gates_ref in one pass
   over memory each, instead of the ~10 torch ops (and their dispatches) the reference takes.

   Plain C, no torch headers: built with im2col.c and step.c into one library, once per machine
   (native_build.py compiles them on first use, -O3 -march=native -fopenmp-simd, ~4 s) and
   called through ctypes. The tensors are
   seen as B x M rows of N unit-stride elements (channels-last: M pixels, N channels;
   channels-first: M channels, N pixels), each row handed to a function the compiler
   vectorizes (the "omp simd" loops: the activations below are selects and arithmetic only). */

#include "kernels.h"

typedef union { float f; int32_t i; } f32_bits;

/* The activations must inline into every row function (36 of them): with a second set of
   row functions, tried, gcc passed its growth limits, called them out of line, and no loop
   vectorized (60 ns a cell). */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* exp(x) for x <= 0: Cephes' range reduction and degree-6 polynomial (~1 ulp); 0 below -87
   (so that sigmoid(-inf) * inf is NaN, as torch's). A NaN stays NaN through the arithmetic;
   only its integer conversion (undefined in C) is steered to a defined value. Rounds by adding
   1.5 * 2^23 (gcc does not vectorize floorf here). Every select costs: the kernels' time is
   these polynomials (without a NaN select and a second clamp: 14 -> 12 us at hid16 16x16). */
ALWAYS_INLINE float exp_nonpos(float x) {
    const float xc = x < -87.0f ? -87.0f : x;
    const float fx = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = xc - fx * 0.693359375f + fx * 2.12194440e-4f;
    float y = 1.9875691500E-4f;
    y = y * r + 1.3981999507E-3f;
    y = y * r + 8.3334519073E-3f;
    y = y * r + 4.1665795894E-2f;
    y = y * r + 1.6666665459E-1f;
    y = y * r + 5.0000001201E-1f;
    y = y * r * r + r + 1.0f;
    f32_bits scale;
    scale.i = ((int32_t)(fx > -127.0f ? fx : -127.0f) + 127) << 23;  /* NaN: -127 */
    return x < -87.0f ? 0.0f : y * scale.f;
}

/* The activations as a ratio num / den (den in [1, 2]), so that a row's several activations
   share one division. sigmoid(x) = 1 / (1 + e) or e / (1 + e), e = exp(-|x|). */
ALWAYS_INLINE void sigmoid_ratio(float x, float *num, float *den) {
    const float e = exp_nonpos(x < 0.0f ? x : -x);
    *num = x < 0.0f ? e : 1.0f;
    *den = 1.0f + e;
}

/* tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|); below |x| = 0.4 the odd Taylor series
   through x^11 (den 1), where the ratio's subtraction would cancel (as kernels/_common.tanh). */
ALWAYS_INLINE void tanh_ratio(float x, float *num, float *den) {
    const float ax = x < 0.0f ? -x : x;
    const float e = exp_nonpos(-2.0f * ax);
    const float x2 = x * x;
    float s = 62.0f / 2835.0f + x2 * (-1382.0f / 155925.0f);
    s = 1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f + x2 * s)));
    const float t = x < 0.0f ? e - 1.0f : 1.0f - e;
    const int small = ax < 0.4f;
    *num = small ? x * s : t;
    *den = small ? 1.0f : 1.0f + e;
}

/* ---- rows of odd lengths ---------------------------------------------------------------- */

/* A row's elements past its last whole vector may run as scalar code, where the activations'
   selects become branches that random signs mispredict: built before these paths, hid 8
   (channels-last rows of 8) took 52 ns a cell, hid 16 3.2. Rows of a multiple of VEC floats
   (AVX-512's 16; AVX2's 8 divides it) run in place. Any other length is packed into PACK-float
   local arrays run as one row: where c and h store their rows back to back (dense_rows), whole
   rows a piece with only the gates copied (a cell's time against hid 16's: hid 8 1.2x, hid 12
   1.3x, hid 4 2x), else and for the rows left over, every tensor copied, rows back to back (a
   piece may split a row), padded with zeros to whole vectors (hid 8 1.9x, hid 4 3.2x; with
   8-float vectors in place, tried, hid 8 was 1.45x). Peepholes are spread to one
   value per element there, so packed rows take the per-element (PN) functions. */
#define VEC 16
#define PACK 256

/* Where a piece starts: row m, element n of it (for sample b's rows m_begin..m_end - 1). */
typedef struct { i64 m, n; } cursor_t;

/* The next segment of a piece at cursor *c: min(what is left of the row, room) elements, from
   element c->n of row c->m; advances the cursor. */
static inline i64 next_segment(const plan_t *plan, cursor_t *c, i64 room, i64 *m, i64 *n) {
    const i64 left = plan->N - c->n, take = left < room ? left : room;
    *m = c->m;
    *n = c->n;
    c->n += take;
    if (c->n == plan->N) {
        c->n = 0;
        ++c->m;
    }
    return take;
}

/* A segment (a row of 4 to 12 channels: 16 to 48 bytes) copied inline: a memcpy call each
   cost the packed rows more than their math (hid 4: 0.82x torch ops). gcc would turn the loop
   back into a call (its loop distribution) in the functions that do not say otherwise. */
#if defined(__GNUC__) && !defined(__clang__)
#define NO_MEMCPY_CALLS __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define NO_MEMCPY_CALLS
#endif

static inline void copy(float *restrict dst, const float *restrict src, i64 count) {
    for (i64 k = 0; k < count; ++k) dst[k] = src[k];
}

static inline void fill(float *dst, float value, i64 count) {
    for (i64 k = 0; k < count; ++k) dst[k] = value;
}

/* The packing's moves, inlined into its NO_MEMCPY_CALLS functions. Each local array is its own
   argument: gathered into an array of pointers, the arrays' addresses escaped and gcc stopped
   vectorizing the rows (hid 4: 0.24 -> 0.32 ms a gate step). A segment of count elements: its
   four gates (k at k * step from src) into a..d at at, and back. */
ALWAYS_INLINE void gather_gates(float *a, float *b, float *c, float *d, i64 at,
                                const float *src, i64 step, i64 count) {
    copy(a + at, src, count);
    copy(b + at, src + step, count);
    copy(c + at, src + 2 * step, count);
    copy(d + at, src + 3 * step, count);
}

ALWAYS_INLINE void scatter_gates(float *dst, i64 step, const float *a, const float *b,
                                 const float *c, const float *d, i64 at, i64 count) {
    copy(dst, a + at, count);
    copy(dst + step, b + at, count);
    copy(dst + 2 * step, c + at, count);
    copy(dst + 3 * step, d + at, count);
}

/* The peepholes (3, hid) of elements n.. of row m, one value per element into a..c at at: an
   element's own (pn: the elements are channels), else the row's (the row is one channel). */
ALWAYS_INLINE void spread_peepholes(float *a, float *b, float *c, i64 at, const float *peep,
                                    i64 hid, int pn, i64 m, i64 n, i64 count) {
    if (pn) {
        copy(a + at, peep + n, count);
        copy(b + at, peep + hid + n, count);
        copy(c + at, peep + 2 * hid + n, count);
    } else {
        fill(a + at, peep[m], count);
        fill(b + at, peep[hid + m], count);
        fill(c + at, peep[2 * hid + m], count);
    }
}

/* The peephole-gradient terms of those elements (a..c at at) added into dpeep per channel. */
ALWAYS_INLINE void add_peephole_terms(float *dpeep, i64 hid, int pn, i64 m, i64 n,
                                      const float *a, const float *b, const float *c, i64 at,
                                      i64 count) {
    float *dst = pn ? dpeep + n : dpeep + m;
    for (i64 j = 0; j < count; ++j) {
        const i64 e = pn ? j : 0;
        dst[e] += a[at + j];
        dst[hid + e] += b[at + j];
        dst[2 * hid + e] += c[at + j];
    }
}

/* Whole rows a dense piece holds: as many as fit in PACK with a multiple of VEC elements (so
   no scalar remainder), or 0 where none do. A piece is dense where c and h (and, backward, the
   gradients of the same shape) store their rows back to back (row stride N, channels-last
   frames): only the gates are copied, the rest is read and written in place. */
static i64 dense_rows(const plan_t *plan, const int *tensors, int count) {
    const i64 N = plan->N;
    for (int k = 0; k < count; ++k)
        if (plan->rows[tensors[k]].m != N) return 0;
    i64 g = N, v = VEC;  /* gcd(N, VEC) */
    while (v) {
        const i64 r = g % v;
        g = v;
        v = r;
    }
    const i64 q = VEC / g;  /* rows whose elements are a multiple of VEC */
    return N > PACK ? 0 : PACK / N / q * q;
}

/* dense_rows for the backward: c_prev, c, dc_prev and whichever gradients are given. */
static i64 dense_rows_backward(const plan_t *plan, const float *dh, const float *dh2,
                               const float *dc) {
    int tensors[6] = {1, 2, 7}, count = 3;
    if (dh) tensors[count++] = 3;
    if (dh2) tensors[count++] = 4;
    if (dc) tensors[count++] = 5;
    return dense_rows(plan, tensors, count);
}

/* ---- forward ---------------------------------------------------------------------------- */

/* One row of the forward. z*: pre-activations; g*: where the activated gates go (G); p*:
   peepholes (P; one per element when PN, else one per row); v: the sample's valid multiplier
   (V: 0 shuts i and o and opens f, so c = c_prev and h = 0). */
#define ROW_FORWARD(NAME, P, PN, G, V)                                                        \
    static void NAME(const float *zi, const float *zf, const float *zo, const float *zg,     \
                     const float *cp, float *co, float *ho, float *gi, float *gf, float *go, \
                     float *gg, const float *pi, const float *pf, const float *po, i64 n_el, \
                     float v) {                                                               \
        _Pragma("omp simd")                                                                   \
        for (i64 n = 0; n < n_el; ++n) {                                                      \
            const float c0 = cp[n];                                                           \
            float a_i = zi[n], a_f = zf[n], a_o = zo[n];                                      \
            const float a_g = zg[n];                                                          \
            if (P) {                                                                          \
                a_i += (PN ? pi[n] : pi[0]) * c0;                                             \
                a_f += (PN ? pf[n] : pf[0]) * c0;                                             \
            }                                                                                 \
            float ni, di, nf, df, ng, dg;                                                     \
            sigmoid_ratio(a_i, &ni, &di);                                                     \
            sigmoid_ratio(a_f, &nf, &df);                                                     \
            tanh_ratio(a_g, &ng, &dg);                                                        \
            const float r = 1.0f / (di * df * dg);                                            \
            float i = ni * (df * dg) * r, f = nf * (di * dg) * r;                             \
            const float g = ng * (di * df) * r;                                               \
            if (V) {                                                                          \
                i *= v;                                                                       \
                f = f * v + (1.0f - v);                                                       \
            }                                                                                 \
            const float c = f * c0 + i * g;                                                   \
            if (P) a_o += (PN ? po[n] : po[0]) * c;                                           \
            float no, dO, nt, dt;                                                             \
            sigmoid_ratio(a_o, &no, &dO);                                                     \
            tanh_ratio(c, &nt, &dt);                                                          \
            const float r2 = 1.0f / (dO * dt);                                                \
            float o = no * dt * r2;                                                           \
            if (V) o *= v; /* by 1 exact: a valid sample's values are the unmasked ones */    \
            co[n] = c;                                                                        \
            ho[n] = o * (nt * dO * r2);                                                       \
            if (G) {                                                                          \
                gi[n] = i;                                                                    \
                gf[n] = f;                                                                    \
                go[n] = o;                                                                    \
                gg[n] = g;                                                                    \
            }                                                                                 \
        }                                                                                     \
    }

ROW_FORWARD(row_forward_0000, 0, 0, 0, 0)
ROW_FORWARD(row_forward_0001, 0, 0, 0, 1)
ROW_FORWARD(row_forward_0010, 0, 0, 1, 0)
ROW_FORWARD(row_forward_0011, 0, 0, 1, 1)
ROW_FORWARD(row_forward_1000, 1, 0, 0, 0)
ROW_FORWARD(row_forward_1001, 1, 0, 0, 1)
ROW_FORWARD(row_forward_1010, 1, 0, 1, 0)
ROW_FORWARD(row_forward_1011, 1, 0, 1, 1)
ROW_FORWARD(row_forward_1100, 1, 1, 0, 0)
ROW_FORWARD(row_forward_1101, 1, 1, 0, 1)
ROW_FORWARD(row_forward_1110, 1, 1, 1, 0)
ROW_FORWARD(row_forward_1111, 1, 1, 1, 1)

typedef void (*row_forward_fn)(const float *, const float *, const float *, const float *,
                               const float *, float *, float *, float *, float *, float *,
                               float *, const float *, const float *, const float *, i64, float);

static const row_forward_fn ROW_FORWARD_FNS[12] = {
    row_forward_0000, row_forward_0001, row_forward_0010, row_forward_0011,
    row_forward_1000, row_forward_1001, row_forward_1010, row_forward_1011,
    row_forward_1100, row_forward_1101, row_forward_1110, row_forward_1111};

/* tcl_gate_forward for rows of odd lengths (see VEC): each piece is read whole before any of
   it is written, so gates may be src and c_out c_prev as there. */
NO_MEMCPY_CALLS static void gate_forward_packed(const plan_t *plan, const float *src, float *gates,
                                const float *c_prev, float *c_out, float *h_out,
                                const float *peep, const float *valid) {
    const row_forward_fn row =
        ROW_FORWARD_FNS[(peep ? 8 : 0) + (gates ? 2 : 0) + (valid ? 1 : 0)];
    const i64 gs = plan->gate_step[0], hid = plan->hid;
    const int pn = plan->peep_on_n;
    const rows_t s_z = plan->rows[0], s_cp = plan->rows[1], s_co = plan->rows[2],
                 s_h = plan->rows[3];
    float zi[PACK], zf[PACK], zo[PACK], zg[PACK], cp[PACK], co[PACK], ho[PACK];
    float gi[PACK], gf[PACK], go[PACK], gg[PACK], pi[PACK], pf[PACK], po[PACK];
    float ti[PACK], tf[PACK], to[PACK];  /* a dense piece's peepholes (pi.. the tail's) */
    const int in_place[3] = {1, 2, 3};
    const i64 N = plan->N, per = dense_rows(plan, in_place, 3);
    if (peep && pn && per)  /* per element: the same for every dense piece, made once */
        for (i64 r = 0; r < per; ++r) spread_peepholes(ti, tf, to, r * N, peep, hid, 1, 0, 0, N);
    for (i64 b = 0; b < plan->B; ++b) {
        const float v = valid ? valid[b] : 1.0f;
        i64 m0 = plan->m_begin;
        for (; per && m0 + per <= plan->m_end; m0 += per) {  /* dense pieces */
            for (i64 r = 0; r < per; ++r) {
                gather_gates(zi, zf, zo, zg, r * N, src + b * s_z.b + (m0 + r) * s_z.m, gs, N);
                if (peep && !pn) spread_peepholes(ti, tf, to, r * N, peep, hid, 0, m0 + r, 0, N);
            }
            row(zi, zf, zo, zg, c_prev + b * s_cp.b + m0 * N, c_out + b * s_co.b + m0 * N,
                h_out + b * s_h.b + m0 * N, gi, gf, go, gg, ti, tf, to, per * N, v);
            if (gates)
                for (i64 r = 0; r < per; ++r)
                    scatter_gates(gates + b * s_z.b + (m0 + r) * s_z.m, gs, gi, gf, go, gg,
                                  r * N, N);
        }
        cursor_t at = {m0, 0};
        while (at.m < plan->m_end) {
            const cursor_t start = at;
            i64 len = 0, m, n;
            while (len < PACK && at.m < plan->m_end) {
                const i64 take = next_segment(plan, &at, PACK - len, &m, &n);
                gather_gates(zi, zf, zo, zg, len, src + b * s_z.b + m * s_z.m + n, gs, take);
                copy(cp + len, c_prev + b * s_cp.b + m * s_cp.m + n, take);
                if (peep) spread_peepholes(pi, pf, po, len, peep, hid, pn, m, n, take);
                len += take;
            }
            const i64 padded = (len + VEC - 1) / VEC * VEC;
            float *const pads[8] = {zi, zf, zo, zg, cp, pi, pf, po};
            for (int k = 0; k < (peep ? 8 : 5); ++k) fill(pads[k] + len, 0.0f, padded - len);
            row(zi, zf, zo, zg, cp, co, ho, gi, gf, go, gg, pi, pf, po, padded, v);
            at = start;
            len = 0;
            while (len < PACK && at.m < plan->m_end) {
                const i64 take = next_segment(plan, &at, PACK - len, &m, &n);
                copy(c_out + b * s_co.b + m * s_co.m + n, co + len, take);
                copy(h_out + b * s_h.b + m * s_h.m + n, ho + len, take);
                if (gates)
                    scatter_gates(gates + b * s_z.b + m * s_z.m + n, gs, gi, gf, go, gg, len,
                                  take);
                len += take;
            }
        }
    }
}

/* The forward. src: pre-activations (rows[0]); gates: where the activated gates go (src's
   strides; may be src), or NULL; c_prev, c_out, h_out: rows[1..3] (c_out may be c_prev);
   peep: (3, hid) contiguous or NULL; valid: (B,) multipliers or NULL. */
void tcl_gate_forward(const plan_t *plan, const float *src, float *gates, const float *c_prev,
                      float *c_out, float *h_out, const float *peep, const float *valid) {
    if (plan->N % VEC) {
        gate_forward_packed(plan, src, gates, c_prev, c_out, h_out, peep, valid);
        return;
    }
    const int pn = peep && plan->peep_on_n;
    const row_forward_fn row =
        ROW_FORWARD_FNS[(peep ? (pn ? 8 : 4) : 0) + (gates ? 2 : 0) + (valid ? 1 : 0)];
    const i64 gs = plan->gate_step[0], hid = plan->hid;
    const rows_t s_z = plan->rows[0], s_cp = plan->rows[1], s_co = plan->rows[2],
                 s_h = plan->rows[3];
    for (i64 b = 0; b < plan->B; ++b) {
        const float v = valid ? valid[b] : 1.0f;
        for (i64 m = plan->m_begin; m < plan->m_end; ++m) {
            const float *z = src + b * s_z.b + m * s_z.m;
            float *g = gates ? gates + b * s_z.b + m * s_z.m : 0;
            const float *p = peep ? (pn ? peep : peep + m) : 0;
            row(z, z + gs, z + 2 * gs, z + 3 * gs, c_prev + b * s_cp.b + m * s_cp.m,
                c_out + b * s_co.b + m * s_co.m, h_out + b * s_h.b + m * s_h.m, g,
                g ? g + gs : 0, g ? g + 2 * gs : 0, g ? g + 3 * gs : 0, p, p ? p + hid : 0,
                p ? p + 2 * hid : 0, plan->N, v);
        }
    }
}

/* ---- backward --------------------------------------------------------------------------- */

/* One row of the backward from the activated gates g* (i, f, o, g). dh, dh2: the h gradients
   summed (either NULL: zero, H1/H2); dc: the c gradient (DC); dz*: where dz goes (may be the
   gates); dcp: where dc_prev goes (may be dc). With peepholes (P), acc* take the row's
   peephole-gradient terms, summed over the row when the row is one channel (!PN). */
#define ROW_BACKWARD(NAME, P, PN, H1, H2, DC)                                                   \
    static void NAME(const float *gi, const float *gf, const float *go, const float *gg,       \
                     const float *cp, const float *cc, const float *dh, const float *dh2,      \
                     const float *dc, float *dzi, float *dzf, float *dzo, float *dzg,          \
                     float *dcp, const float *pi, const float *pf, const float *po,            \
                     float *acc_i, float *acc_f, float *acc_o, i64 n_el) {                     \
        float si = 0.0f, sf = 0.0f, so = 0.0f;                                                  \
        _Pragma("omp simd reduction(+ : si, sf, so)")                                           \
        for (i64 n = 0; n < n_el; ++n) {                                                        \
            const float i = gi[n], f = gf[n], o = go[n], g = gg[n], c0 = cp[n], c = cc[n];      \
            float d_h = 0.0f;                                                                   \
            if (H1) d_h += dh[n];                                                               \
            if (H2) d_h += dh2[n];                                                              \
            float nt, dt;                                                                       \
            tanh_ratio(c, &nt, &dt);                                                            \
            const float tc = nt / dt;                                                           \
            const float dzo_ = d_h * tc * (o * (1.0f - o));                                     \
            float dct = d_h * o * (1.0f - tc * tc);                                             \
            if (DC) dct += dc[n];                                                               \
            if (P) dct += dzo_ * (PN ? po[n] : po[0]);                                          \
            const float dzi_ = dct * g * (i * (1.0f - i));                                      \
            const float dzf_ = dct * c0 * (f * (1.0f - f));                                     \
            const float dzg_ = dct * i * (1.0f - g * g);                                        \
            float dcp_ = dct * f;                                                               \
            if (P) {                                                                            \
                dcp_ += dzi_ * (PN ? pi[n] : pi[0]) + dzf_ * (PN ? pf[n] : pf[0]);              \
                if (PN) {                                                                       \
                    acc_i[n] += dzi_ * c0;                                                      \
                    acc_f[n] += dzf_ * c0;                                                      \
                    acc_o[n] += dzo_ * c;                                                       \
                } else {                                                                        \
                    si += dzi_ * c0;                                                            \
                    sf += dzf_ * c0;                                                            \
                    so += dzo_ * c;                                                             \
                }                                                                               \
            }                                                                                   \
            dzi[n] = dzi_;                                                                      \
            dzf[n] = dzf_;                                                                      \
            dzo[n] = dzo_;                                                                      \
            dzg[n] = dzg_;                                                                      \
            dcp[n] = dcp_;                                                                      \
        }                                                                                       \
        if (P && !PN) {                                                                         \
            acc_i[0] += si;                                                                     \
            acc_f[0] += sf;                                                                     \
            acc_o[0] += so;                                                                     \
        }                                                                                       \
    }

/* Peepholes none / per row / per element, times dh, dh2, dc present or not. */
#define ROW_BACKWARD_P(P, PN, NAME)                \
    ROW_BACKWARD(NAME##_000, P, PN, 0, 0, 0)       \
    ROW_BACKWARD(NAME##_001, P, PN, 0, 0, 1)       \
    ROW_BACKWARD(NAME##_010, P, PN, 0, 1, 0)       \
    ROW_BACKWARD(NAME##_011, P, PN, 0, 1, 1)       \
    ROW_BACKWARD(NAME##_100, P, PN, 1, 0, 0)       \
    ROW_BACKWARD(NAME##_101, P, PN, 1, 0, 1)       \
    ROW_BACKWARD(NAME##_110, P, PN, 1, 1, 0)       \
    ROW_BACKWARD(NAME##_111, P, PN, 1, 1, 1)

ROW_BACKWARD_P(0, 0, row_backward_nopeep)
ROW_BACKWARD_P(1, 0, row_backward_peeprow)
ROW_BACKWARD_P(1, 1, row_backward_peepel)

typedef void (*row_backward_fn)(const float *, const float *, const float *, const float *,
                                const float *, const float *, const float *, const float *,
                                const float *, float *, float *, float *, float *, float *,
                                const float *, const float *, const float *, float *, float *,
                                float *, i64);

#define ROW_BACKWARD_SET(NAME)                                                          \
    NAME##_000, NAME##_001, NAME##_010, NAME##_011, NAME##_100, NAME##_101, NAME##_110, \
        NAME##_111

static const row_backward_fn ROW_BACKWARD_FNS[24] = {ROW_BACKWARD_SET(row_backward_nopeep),
                                                     ROW_BACKWARD_SET(row_backward_peeprow),
                                                     ROW_BACKWARD_SET(row_backward_peepel)};

/* tcl_gate_backward for rows of odd lengths (see VEC), read a piece at a time before it is
   written (dz may be the gates, dc_prev dc). The peephole terms come back per element and are
   summed into dpeep per channel. */
NO_MEMCPY_CALLS static void gate_backward_packed(const plan_t *plan, const float *gates, const float *c_prev,
                                 const float *c, const float *dh, const float *dh2,
                                 const float *dc, float *dz, float *dc_prev, const float *peep,
                                 float *dpeep) {
    const row_backward_fn row = ROW_BACKWARD_FNS[(peep ? 16 : 0) + (dh ? 4 : 0) +
                                                 (dh2 ? 2 : 0) + (dc ? 1 : 0)];
    const i64 gs = plan->gate_step[0], ds = plan->gate_step[1], hid = plan->hid;
    const int pn = plan->peep_on_n;
    const rows_t *r = plan->rows;
    float gi[PACK], gf[PACK], go[PACK], gg[PACK], cp[PACK], cc[PACK], d1[PACK], d2[PACK];
    float dcl[PACK], dzi[PACK], dzf[PACK], dzo[PACK], dzg[PACK], dcp[PACK];
    float pi[PACK], pf[PACK], po[PACK], ai[PACK], af[PACK], ao[PACK];
    float ti[PACK], tf[PACK], to[PACK];  /* a dense piece's peepholes (pi.. the tail's) */
    const i64 N = plan->N, per = dense_rows_backward(plan, dh, dh2, dc);
    if (peep && pn && per)  /* per element: the same for every dense piece, made once */
        for (i64 q = 0; q < per; ++q) spread_peepholes(ti, tf, to, q * N, peep, hid, 1, 0, 0, N);
    for (i64 b = 0; b < plan->B; ++b) {
        i64 m0 = plan->m_begin;
        for (; per && m0 + per <= plan->m_end; m0 += per) {  /* dense pieces */
            for (i64 q = 0; q < per; ++q) {
                gather_gates(gi, gf, go, gg, q * N, gates + b * r[0].b + (m0 + q) * r[0].m, gs, N);
                if (peep && !pn) spread_peepholes(ti, tf, to, q * N, peep, hid, 0, m0 + q, 0, N);
            }
            if (peep) {
                fill(ai, 0.0f, per * N);
                fill(af, 0.0f, per * N);
                fill(ao, 0.0f, per * N);
            }
            row(gi, gf, go, gg, c_prev + b * r[1].b + m0 * N, c + b * r[2].b + m0 * N,
                dh ? dh + b * r[3].b + m0 * N : 0, dh2 ? dh2 + b * r[4].b + m0 * N : 0,
                dc ? dc + b * r[5].b + m0 * N : 0, dzi, dzf, dzo, dzg,
                dc_prev + b * r[7].b + m0 * N, ti, tf, to, ai, af, ao, per * N);
            for (i64 q = 0; q < per; ++q) {
                scatter_gates(dz + b * r[6].b + (m0 + q) * r[6].m, ds, dzi, dzf, dzo, dzg, q * N,
                              N);
                if (peep) add_peephole_terms(dpeep, hid, pn, m0 + q, 0, ai, af, ao, q * N, N);
            }
        }
        cursor_t at = {m0, 0};
        while (at.m < plan->m_end) {
            const cursor_t start = at;
            i64 len = 0, m, n;
            while (len < PACK && at.m < plan->m_end) {
                const i64 take = next_segment(plan, &at, PACK - len, &m, &n);
                gather_gates(gi, gf, go, gg, len, gates + b * r[0].b + m * r[0].m + n, gs, take);
                copy(cp + len, c_prev + b * r[1].b + m * r[1].m + n, take);
                copy(cc + len, c + b * r[2].b + m * r[2].m + n, take);
                if (dh) copy(d1 + len, dh + b * r[3].b + m * r[3].m + n, take);
                if (dh2) copy(d2 + len, dh2 + b * r[4].b + m * r[4].m + n, take);
                if (dc) copy(dcl + len, dc + b * r[5].b + m * r[5].m + n, take);
                if (peep) spread_peepholes(pi, pf, po, len, peep, hid, pn, m, n, take);
                len += take;
            }
            const i64 padded = (len + VEC - 1) / VEC * VEC;
            float *const pads[12] = {gi, gf, go, gg, cp, cc, d1, d2, dcl, pi, pf, po};
            for (int k = 0; k < (peep ? 12 : 9); ++k) fill(pads[k] + len, 0.0f, padded - len);
            if (peep) {
                fill(ai, 0.0f, padded);
                fill(af, 0.0f, padded);
                fill(ao, 0.0f, padded);
            }
            row(gi, gf, go, gg, cp, cc, d1, d2, dcl, dzi, dzf, dzo, dzg, dcp, pi, pf, po, ai, af,
                ao, padded);
            at = start;
            len = 0;
            while (len < PACK && at.m < plan->m_end) {
                const i64 take = next_segment(plan, &at, PACK - len, &m, &n);
                scatter_gates(dz + b * r[6].b + m * r[6].m + n, ds, dzi, dzf, dzo, dzg, len, take);
                copy(dc_prev + b * r[7].b + m * r[7].m + n, dcp + len, take);
                if (peep) add_peephole_terms(dpeep, hid, pn, m, n, ai, af, ao, len, take);
                len += take;
            }
        }
    }
}

/* The backward. gates: activated i, f, o, g (rows[0], gate_step[0]); c_prev, c: the step's
   cells; dh, dh2, dc: gradients or NULL; dz: the gate gradients (rows[6], gate_step[1]; may be
   the gates); dc_prev (may be dc); peep: (3, hid) contiguous or NULL; dpeep: (3, hid) floats
   the peephole gradient is added to (with peep; a thread's own). */
void tcl_gate_backward(const plan_t *plan, const float *gates, const float *c_prev,
                       const float *c, const float *dh, const float *dh2, const float *dc,
                       float *dz, float *dc_prev, const float *peep, float *dpeep) {
    if (plan->N % VEC) {
        gate_backward_packed(plan, gates, c_prev, c, dh, dh2, dc, dz, dc_prev, peep, dpeep);
        return;
    }
    const int pn = peep && plan->peep_on_n;
    const row_backward_fn row = ROW_BACKWARD_FNS[(peep ? (pn ? 16 : 8) : 0) + (dh ? 4 : 0) +
                                                 (dh2 ? 2 : 0) + (dc ? 1 : 0)];
    const i64 gs = plan->gate_step[0], ds = plan->gate_step[1], hid = plan->hid;
    const rows_t *r = plan->rows;
    for (i64 b = 0; b < plan->B; ++b) {
        for (i64 m = plan->m_begin; m < plan->m_end; ++m) {
            const float *g = gates + b * r[0].b + m * r[0].m;
            float *d = dz + b * r[6].b + m * r[6].m;
            const float *p = peep ? (pn ? peep : peep + m) : 0;
            float *a = peep ? (pn ? dpeep : dpeep + m) : 0;
            row(g, g + gs, g + 2 * gs, g + 3 * gs, c_prev + b * r[1].b + m * r[1].m,
                c + b * r[2].b + m * r[2].m, dh ? dh + b * r[3].b + m * r[3].m : 0,
                dh2 ? dh2 + b * r[4].b + m * r[4].m : 0, dc ? dc + b * r[5].b + m * r[5].m : 0,
                d, d + ds, d + 2 * ds, d + 3 * ds, dc_prev + b * r[7].b + m * r[7].m, p,
                p ? p + hid : 0, p ? p + 2 * hid : 0, a, a ? a + hid : 0, a ? a + 2 * hid : 0,
                plan->N);
        }
    }
}
