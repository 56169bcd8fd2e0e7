/* The monotonic rational-quadratic spline of neural spline flows (Durkan et al. 2019), one loop
 * over the points instead of ~90 tensor operations: the forward map with its log-Jacobian, its
 * gradients, and the inverse. The same arithmetic as the torch path in sbipipe/spline.py (README,
 * "Neural posterior estimation"), compiled once per machine by sbipipe/native.py.
 *
 * Layout (contiguous, row-major): points x [N * P]; point i uses parameter row p = i % P. The
 * tables come in computed (vectorised) by torch: softmax numerators e [2][P][K] (widths, heights)
 * and knot slopes d [P][K + 1]. This file is compiled twice
 * over, for float (suffix f32) and double (f64): it includes itself with REAL defined. */
#ifndef REAL
#include <math.h>
#include <stdint.h>

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define NAME(f) CAT(f, SUFFIX)

#define REAL float
#define SUFFIX f32
#define LOG logf
#define SQRT sqrtf
#define FABS fabsf
#include __FILE__
#undef REAL
#undef SUFFIX
#undef LOG
#undef SQRT
#undef FABS

#define REAL double
#define SUFFIX f64
#define LOG log
#define SQRT sqrt
#define FABS fabs
#include __FILE__

#else

/* One point's bin, from the tables e [2][P][K] of softmax numerators (widths, heights) and the
 * slopes d [P][K + 1] of the knots: the tables' scales 2B / total, the bin k, its left ends plus B
 * (x0 + B, y0 + B) and sizes (w, h), and its end slopes d0, d1. */
typedef struct {
    REAL scale_w, scale_h, left_w, left_h, w, h, d0, d1;
    int64_t k;
} NAME(bin_t);

static inline void NAME(locate)(REAL v, int row, const REAL *ew, const REAL *eh, const REAL *d, int64_t K, REAL B,
                                NAME(bin_t) *o) {
    REAL tw = 0, th = 0;
    for (int64_t j = 0; j < K; j++) {
        tw += ew[j];
        th += eh[j];
    }
    o->scale_w = (2 * B) / tw;
    o->scale_h = (2 * B) / th;
    const REAL *e = row ? eh : ew;
    const REAL threshold = (v + B) / (row ? o->scale_h : o->scale_w);
    REAL cum = 0, cum_w = 0, cum_h = 0;
    int64_t k = 0;
    for (int64_t j = 0; j < K; j++) { /* C_j < threshold for j < k */
        cum += e[j];
        k += cum < threshold;
    }
    if (k > K - 1) k = K - 1;
    for (int64_t j = 0; j <= k; j++) {
        cum_w += ew[j];
        cum_h += eh[j];
    }
    o->k = k;
    o->w = ew[k] * o->scale_w;
    o->h = eh[k] * o->scale_h;
    o->left_w = cum_w * o->scale_w - o->w;
    o->left_h = cum_h * o->scale_h - o->h;
    o->d0 = d[k];
    o->d1 = d[k + 1];
}

void NAME(spline_forward)(const REAL *x, const REAL *e, const REAL *d, int64_t n, int64_t P, int64_t K, double B_,
                          REAL *y, REAL *ladj) {
    const REAL B = (REAL)B_;
    NAME(bin_t) o;
    for (int64_t i = 0, p = 0; i < n; i++, p = p + 1 == P ? 0 : p + 1) {
        const REAL v = x[i];
        if (!(FABS(v) < B)) { /* outside the bound (or NaN): the identity */
            y[i] = v;
            ladj[i] = 0;
            continue;
        }
        NAME(locate)(v, 0, e + p * K, e + (P + p) * K, d + p * (K + 1), K, B, &o);
        const REAL s = o.h / o.w, d0 = o.d0, d1 = o.d1;
        REAL z = (v - (o.left_w - B)) / o.w;
        z = z < 0 ? 0 : (z > 1 ? 1 : z);
        const REAL zz = z * (1 - z);
        const REAL den = s + (d0 + d1 - 2 * s) * zz;
        const REAL num = s * z * z + d0 * zz;
        const REAL q = 2 * s * zz + d0 * (1 - z) * (1 - z) + d1 * z * z;
        y[i] = (o.left_h - B) + o.h * num / den;
        ladj[i] = LOG(s * s * q / (den * den));
    }
}

/* Gradients of the forward map: gx [n] is written; ge [2][P][K] and gd [P][K + 1] (with respect to
 * the tables) are accumulated into (zeroed by the caller), summed over the points of a row. */
void NAME(spline_backward)(const REAL *x, const REAL *e, const REAL *d, const REAL *gy, const REAL *gl, int64_t n,
                           int64_t P, int64_t K, double B_, REAL *gx, REAL *ge, REAL *gd) {
    const REAL B = (REAL)B_;
    NAME(bin_t) o;
    for (int64_t i = 0, p = 0; i < n; i++, p = p + 1 == P ? 0 : p + 1) {
        const REAL v = x[i];
        if (!(FABS(v) < B)) { /* y = x, log-Jacobian 0 */
            gx[i] = gy[i];
            continue;
        }
        NAME(locate)(v, 0, e + p * K, e + (P + p) * K, d + p * (K + 1), K, B, &o);
        const REAL s = o.h / o.w, w = o.w, h = o.h, d0 = o.d0, d1 = o.d1, g_y = gy[i], g_l = gl[i];
        REAL z = (v - (o.left_w - B)) / w;
        z = z < 0 ? 0 : (z > 1 ? 1 : z);
        const REAL zz = z * (1 - z), om = 1 - z;
        const REAL t = d0 + d1 - 2 * s;
        const REAL den = s + t * zz;
        const REAL num = s * z * z + d0 * zz;
        const REAL q = 2 * s * zz + d0 * om * om + d1 * z * z;
        /* d/dξ, d/ds, d/dd0, d/dd1 of y = y0 + h num/den and of log jac = 2 log s + log q − 2 log den */
        const REAL a = g_y * h / (den * den), b = g_l / q, zb = 2 * zz * g_l / den;
        const REAL g_z = a * s * q + 2 * b * (s * (om - z) - d0 * om + d1 * z) - 2 * t * (om - z) * g_l / den;
        const REAL g_s = a * (z * z * den - num * (1 - 2 * zz)) + 2 * g_l / s + 2 * b * zz - 2 * g_l / den + 2 * zb;
        /* ξ = (x − x0)/w, s = h/w; left + B = C_{k−1}·scale, size = e_k·scale, scale = 2B/C_{K−1} */
        const REAL g_zw = g_z / w;
        gx[i] = g_zw;
        const REAL gleft_w = -g_zw, gleft_h = g_y;
        const REAL gsize_w = -(g_zw * z + g_s * s / w), gsize_h = g_y * num / den + g_s / w;
        const REAL gtot_w = -(gleft_w * o.left_w + gsize_w * w) * o.scale_w / (2 * B);
        const REAL gtot_h = -(gleft_h * o.left_h + gsize_h * h) * o.scale_h / (2 * B);
        REAL *gw = ge + p * K, *gh = ge + (P + p) * K;
        for (int64_t j = 0; j < o.k; j++) { /* the bins left of k: through the left end and the total */
            gw[j] += gtot_w + gleft_w * o.scale_w;
            gh[j] += gtot_h + gleft_h * o.scale_h;
        }
        gw[o.k] += gtot_w + gsize_w * o.scale_w; /* bin k: its size and the total */
        gh[o.k] += gtot_h + gsize_h * o.scale_h;
        for (int64_t j = o.k + 1; j < K; j++) { /* the bins right of k: the total only */
            gw[j] += gtot_w;
            gh[j] += gtot_h;
        }
        REAL *g = gd + p * (K + 1);
        g[o.k] += a * zz * (den - num) + b * om * om - zb;
        g[o.k + 1] += b * z * z - a * num * zz - zb;
    }
}

/* The inverse: x for y [n] (the root in [0, 1] of a ξ² + b ξ + c of the bin that holds y). */
void NAME(spline_inverse)(const REAL *yv, const REAL *e, const REAL *d, int64_t n, int64_t P, int64_t K, double B_,
                          REAL *x) {
    const REAL B = (REAL)B_;
    NAME(bin_t) o;
    for (int64_t i = 0, p = 0; i < n; i++, p = p + 1 == P ? 0 : p + 1) {
        const REAL v = yv[i];
        if (!(FABS(v) < B)) {
            x[i] = v;
            continue;
        }
        NAME(locate)(v, 1, e + p * K, e + (P + p) * K, d + p * (K + 1), K, B, &o);
        const REAL s = o.h / o.w, d0 = o.d0, d1 = o.d1;
        REAL r = v - (o.left_h - B);
        r = r < 0 ? 0 : (r > o.h ? o.h : r);
        const REAL t = d0 + d1 - 2 * s;
        const REAL qa = o.h * (s - d0) + r * t, qb = o.h * d0 - r * t, qc = -s * r;
        const REAL z = 2 * qc / (-qb - SQRT(qb * qb - 4 * qa * qc));
        x[i] = (o.left_w - B) + z * o.w;
    }
}

#endif
