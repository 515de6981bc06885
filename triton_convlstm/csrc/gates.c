/* The ConvLSTM gate update on CPU, fp32: the forward and backward of
   triton_convlstm.reference.gate_forward_inplace_ref / gate_backward_from_gates_ref in one pass
   over memory each, instead of the ~10 torch ops (and their dispatches) the reference takes.

   Plain C, no torch headers: built with im2col.c and step.c into one library, once per machine
   (native_build.py compiles them on first use, -O3 -march=native -fopenmp-simd, ~2.5 s) and
   called through ctypes. The tensors are
   seen as B x M rows of N unit-stride elements (channels-last: M pixels, N channels;
   channels-first: M channels, N pixels), each row handed to a function the compiler
   vectorizes (the "omp simd" loops: the activations below are selects and arithmetic only). */

#include "kernels.h"

typedef union { float f; int32_t i; } f32_bits;

/* exp(x) for x <= 0: Cephes' range reduction and degree-6 polynomial (~1 ulp); 0 below -87
   (so that sigmoid(-inf) * inf is NaN, as torch's). A NaN stays NaN through the arithmetic;
   only its integer conversion (undefined in C) is steered to a defined value. Rounds by adding
   1.5 * 2^23 (gcc does not vectorize floorf here). Every select costs: the kernels' time is
   these polynomials (without a NaN select and a second clamp: 14 -> 12 us at hid16 16x16). */
static inline float exp_nonpos(float x) {
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
static inline void sigmoid_ratio(float x, float *num, float *den) {
    const float e = exp_nonpos(x < 0.0f ? x : -x);
    *num = x < 0.0f ? e : 1.0f;
    *den = 1.0f + e;
}

/* tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|); below |x| = 0.4 the odd Taylor series
   through x^11 (den 1), where the ratio's subtraction would cancel (as kernels/_common.tanh). */
static inline void tanh_ratio(float x, float *num, float *den) {
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

/* The forward. src: pre-activations (rows[0]); gates: where the activated gates go (src's
   strides; may be src), or NULL; c_prev, c_out, h_out: rows[1..3] (c_out may be c_prev);
   peep: (3, hid) contiguous or NULL; valid: (B,) multipliers or NULL. */
void tcl_gate_forward(const plan_t *plan, const float *src, float *gates, const float *c_prev,
                      float *c_out, float *h_out, const float *peep, const float *valid) {
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

/* The backward. gates: activated i, f, o, g (rows[0], gate_step[0]); c_prev, c: the step's
   cells; dh, dh2, dc: gradients or NULL; dz: the gate gradients (rows[6], gate_step[1]; may be
   the gates); dc_prev (may be dc); peep: (3, hid) contiguous or NULL; dpeep: (3, hid) floats
   the peephole gradient is added to (with peep; a thread's own). */
void tcl_gate_backward(const plan_t *plan, const float *gates, const float *c_prev,
                       const float *c, const float *dh, const float *dh2, const float *dc,
                       float *dz, float *dc_prev, const float *peep, float *dpeep) {
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
