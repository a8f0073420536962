/* Fused CPU kernels for the Mamba2 layer's elementwise work (models/mamba2_cpu.py builds and loads them).

   Each kernel makes one pass over its rows where the PyTorch path (models/mamba2.py: _CausalConvSiLU,
   _GatedRMSNorm) makes several; same maths in float32, summed in the same order within a row, so results differ
   from the PyTorch path only by float32 rounding (tests/test_mamba2_cpu.py). The activations (the conv's input and
   output, the gate z and the norm's output, and their gradients) are float32 (`*_f32` kernels) or bfloat16
   (`*_bf16`, what bf16 autocast gives: read into float32, written back rounded to nearest even as torch rounds);
   weights, the norm's input y (the scan's float32 output) and every weight gradient are float32. This file is
   compiled once and includes itself once per activation type (the part after `#else`). Rows are independent and
   split over `nt` OpenMP threads; the weight gradients are summed per thread, then over threads. The sums over a
   norm group are vectorised (`omp simd reduction`), so their order is the vector unit's, as in ATen's own
   reductions.
   Shapes: R rows of D channels; x rows start at x + r * sx (a strided view of in_proj's output), every other
   tensor is contiguous. Conv: rows are (batch, time), n time steps per sequence, K taps stored (K, D). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef ACT /* ------------------------------------------------------------------ helpers, then the two types */
typedef long long i64;
typedef unsigned short bf16;

/* exp(v) for v in float32's range, vectorisable: 2^k * p(r), v = k ln2 + r, |r| <= ln2/2, degree-6 polynomial
   (max relative error ~2 ulp); clamped to [-87, 88] (NaN is handled by the callers, whose results multiply v). */
static inline float exp_f(float v) {
    v = v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v);
    float k = floorf(v * 1.44269504088896341f + 0.5f);
    float r = v - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { float f; int i; } s;
    s.i = ((int)k + 127) << 23;
    return p * s.f;
}

static inline float sigmoid_f(float v) { return 1.0f / (1.0f + exp_f(-v)); }

static inline float bf16_to_f(bf16 h) {
    unsigned u = (unsigned)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, NaN to the canonical 0x7FC0: c10::BFloat16's rounding. */
static inline bf16 f_to_bf16(float f) {
    unsigned u;
    memcpy(&u, &f, sizeof u);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (bf16)0x7FC0 : (bf16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#define ACT float
#define NAME(f) f##_f32
#define LD(p, i) ((p)[i])
#define ST(p, i, v) ((p)[i] = (v))
#include "mamba2_cpu.c" /* this file, its kernels part */
#undef ACT
#undef NAME
#undef LD
#undef ST
#define ACT bf16
#define NAME(f) f##_bf16
#define LD(p, i) bf16_to_f((p)[i])
#define ST(p, i, v) ((p)[i] = f_to_bf16(v))
#include "mamba2_cpu.c" /* this file, its kernels part */

#else /* ---------------------------------------------- the kernels, for activations of type ACT (LD / ST convert) */


/* pre_t = bias + sum_j x_{t-j} w_{K-1-j} (causal within a sequence: t = row r's time step) into p[0:D]. */
static inline void NAME(conv_row)(const ACT *xt, i64 sx, i64 t, i64 D, const float *w_KD, const float *bias, int K,
                                  float *p) {
    const float *wl = w_KD + (i64)(K - 1) * D;
    for (i64 d = 0; d < D; d++) p[d] = LD(xt, d) * wl[d] + (bias ? bias[d] : 0.0f);
    for (int j = 1; j < K && j <= t; j++) {
        const ACT *xs = xt - j * sx;
        const float *wj = w_KD + (i64)(K - 1 - j) * D;
        for (i64 d = 0; d < D; d++) p[d] += LD(xs, d) * wj[d];
    }
}

/* y = silu(pre), pre as in conv_row (not kept: the backward recomputes it from x, which it holds anyway). */
void NAME(conv_silu_fwd)(const ACT *x, i64 sx, i64 Bsz, i64 n, i64 D, const float *w_KD, const float *bias, int K,
                         ACT *y, int nt) {
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float *p = malloc((size_t)D * sizeof(float));
#pragma omp for schedule(static)
        for (i64 r = 0; r < Bsz * n; r++) {
            ACT *yo = y + r * D;
            NAME(conv_row)(x + r * sx, sx, r % n, D, w_KD, bias, K, p);
            for (i64 d = 0; d < D; d++) ST(yo, d, p[d] * sigmoid_f(p[d]));
        }
        free(p);
    }
}

#ifndef CONV_BLOCK
#define CONV_BLOCK 16 /* time steps per block of the backward: its dpre rows (+ K-1) stay in the L1/L2 cache */
#endif

/* From dy: dpre = dy silu'(pre), dx_s = sum_j dpre_{s+j} w_{K-1-j}, dw_{K-1-j} = sum dpre_t x_{t-j},
   dbias = sum dpre (dw_KD and dbias overwritten). Blocks of CONV_BLOCK steps of one sequence: a block recomputes
   pre and dpre for its steps and the K-1 after them into a small buffer, then writes its dx rows. */
void NAME(conv_silu_bwd)(const ACT *dy, const ACT *x, i64 sx, i64 Bsz, i64 n, i64 D, const float *w_KD,
                         const float *bias, int K, ACT *dx, float *dw_KD, float *dbias, int nt) {
    i64 blocks = (n + CONV_BLOCK - 1) / CONV_BLOCK;
    float *acc = calloc((size_t)nt * (K + 1) * D, sizeof(float)); /* per thread: dw (K x D), dbias (D) */
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        float *dw = acc + (i64)me * (K + 1) * D, *db = dw + (i64)K * D;
        float *buf = malloc((size_t)(CONV_BLOCK + K) * D * sizeof(float)); /* a block's dpre rows, one dx row */
        float *o = buf + (i64)(CONV_BLOCK + K - 1) * D;
#pragma omp for schedule(static)
        for (i64 bk = 0; bk < Bsz * blocks; bk++) {
            i64 b = bk / blocks, t0 = (bk % blocks) * CONV_BLOCK;
            i64 t1 = t0 + CONV_BLOCK < n ? t0 + CONV_BLOCK : n, te = t1 + K - 1 < n ? t1 + K - 1 : n;
            for (i64 t = t0; t < te; t++) {
                i64 r = b * n + t;
                float *q = buf + (t - t0) * D;
                const ACT *g = dy + r * D;
                NAME(conv_row)(x + r * sx, sx, t, D, w_KD, bias, K, q);
                for (i64 d = 0; d < D; d++) {
                    float s = sigmoid_f(q[d]);
                    q[d] = LD(g, d) * (s * (1.0f + q[d] * (1.0f - s)));
                }
            }
            for (i64 t = t0; t < t1; t++) {
                i64 r = b * n + t;
                const float *gt = buf + (t - t0) * D, *wl = w_KD + (i64)(K - 1) * D;
                const ACT *xt = x + r * sx;
                ACT *dxr = dx + r * D;
                for (i64 d = 0; d < D; d++) o[d] = gt[d] * wl[d];
                for (int j = 1; j < K && t + j < n; j++) {
                    const float *gs = gt + j * D, *wj = w_KD + (i64)(K - 1 - j) * D;
                    for (i64 d = 0; d < D; d++) o[d] += gs[d] * wj[d];
                }
                for (i64 d = 0; d < D; d++) ST(dxr, d, o[d]);
                for (int j = 0; j < K && j <= t; j++) {
                    const ACT *xs = xt - j * sx;
                    float *wj = dw + (i64)(K - 1 - j) * D;
                    for (i64 d = 0; d < D; d++) wj[d] += gt[d] * LD(xs, d);
                }
                for (i64 d = 0; d < D; d++) db[d] += gt[d];
            }
        }
        free(buf);
    }
    for (i64 i = 0; i < (i64)K * D; i++) dw_KD[i] = 0.0f;
    if (dbias)
        for (i64 d = 0; d < D; d++) dbias[d] = 0.0f;
    for (int m = 0; m < nt; m++) {
        const float *dwm = acc + (i64)m * (K + 1) * D;
        for (i64 i = 0; i < (i64)K * D; i++) dw_KD[i] += dwm[i];
        if (dbias)
            for (i64 d = 0; d < D; d++) dbias[d] += dwm[(i64)K * D + d];
    }
    free(acc);
}

/* Gated RMSNorm over groups of gs channels: v = y (norm_before_gate) or y silu(z); n = v rstd, rstd per group;
   out = n w, times silu(z) if norm_before_gate. y rows at y + r * sy, z rows at z + r * sz; rstd is R x (D / gs). */
void NAME(gated_norm_fwd)(const float *y, i64 sy, const ACT *z, i64 sz, const float *w, i64 R, i64 D, i64 gs,
                          float eps, int norm_before_gate, ACT *out, float *rstd, int nt) {
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float *v = malloc((size_t)D * sizeof(float)), *gate = malloc((size_t)D * sizeof(float));
#pragma omp for schedule(static)
        for (i64 r = 0; r < R; r++) {
            const float *yr = y + r * sy;
            const ACT *zr = z + r * sz;
            ACT *o = out + r * D;
            for (i64 g0 = 0; g0 < D; g0 += gs) {
                float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
                for (i64 d = g0; d < g0 + gs; d++) {
                    float zd = LD(zr, d);
                    gate[d] = zd * sigmoid_f(zd);
                    v[d] = norm_before_gate ? yr[d] : yr[d] * gate[d];
                    ss += v[d] * v[d];
                }
                float rs = 1.0f / sqrtf(ss / (float)gs + eps);
                rstd[r * (D / gs) + g0 / gs] = rs;
                for (i64 d = g0; d < g0 + gs; d++) {
                    float nw = v[d] * rs * w[d];
                    ST(o, d, norm_before_gate ? nw * gate[d] : nw);
                }
            }
        }
        free(v);
        free(gate);
    }
}

/* Backward of gated_norm_fwd: with do = d(n w), dn = do w, dv = (dn - n mean(dn n)) rstd per group; dy, dz
   (R x D) written, dw (D) overwritten. */
void NAME(gated_norm_bwd)(const ACT *dout, const float *y, i64 sy, const ACT *z, i64 sz, const float *w,
                          const float *rstd, i64 R, i64 D, i64 gs, int norm_before_gate, float *dy, ACT *dz,
                          float *dw, int nt) {
    float *acc = calloc((size_t)nt * D, sizeof(float));
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        float *dwm = acc + (i64)me * D, *sig = malloc((size_t)D * sizeof(float)), /* sigmoid(z) of a row */
              *nrm = malloc((size_t)D * sizeof(float)); /* n of a row */
#pragma omp for schedule(static)
        for (i64 r = 0; r < R; r++) {
            const float *yr = y + r * sy;
            const ACT *zr = z + r * sz, *g = dout + r * D;
            float *dyr = dy + r * D;
            ACT *dzr = dz + r * D;
            for (i64 g0 = 0; g0 < D; g0 += gs) {
                float rs = rstd[r * (D / gs) + g0 / gs], dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (i64 d = g0; d < g0 + gs; d++) { /* dyr holds dn for now */
                    float zd = LD(zr, d), s = sig[d] = sigmoid_f(zd), gate = zd * s;
                    float n_ = nrm[d] = (norm_before_gate ? yr[d] : yr[d] * gate) * rs;
                    float do_ = norm_before_gate ? LD(g, d) * gate : LD(g, d);
                    dwm[d] += do_ * n_;
                    dyr[d] = do_ * w[d];
                    dot += dyr[d] * n_;
                }
                float mean = dot / (float)gs;
                for (i64 d = g0; d < g0 + gs; d++) {
                    float zd = LD(zr, d), s = sig[d], gate = zd * s, dsilu = s * (1.0f + zd * (1.0f - s));
                    float dv = (dyr[d] - nrm[d] * mean) * rs;
                    if (norm_before_gate) {
                        ST(dzr, d, LD(g, d) * nrm[d] * w[d] * dsilu);
                        dyr[d] = dv;
                    } else {
                        ST(dzr, d, dv * yr[d] * dsilu);
                        dyr[d] = dv * gate;
                    }
                }
            }
        }
        free(sig);
        free(nrm);
    }
    for (i64 d = 0; d < D; d++) dw[d] = 0.0f;
    for (int m = 0; m < nt; m++)
        for (i64 d = 0; d < D; d++) dw[d] += acc[(i64)m * D + d];
    free(acc);
}
#endif
