/* CPU kernels of fxfuse::selective_scan: one pass over time per (batch, channel), the state in registers,
   [B, D, L, N] never materialized. Plain C compiled at first use and called through ctypes.

   The exponential is our own (Cephes-style range reduction and a degree-6 polynomial, ~1 ulp, NaN, inf
   and underflow as expf) so that the compiler vectorizes the loop over the state: libm's expf is scalar.
   Layouts (contiguous float32): dt, x, y [B, D, L]; A [D, N]; Bm, Cm [B, L, N]; h0, hlast [B, D, N].
   The Mamba block's D skip and silu gate, y = (y + u * D) * silu(z) with Dv [D] and u, z [B, D, L], are
   applied to each y_t as it is read out; Dv and z may be NULL (no skip, no gate). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

/* exp of 8 (vf8) or 16 (vf16: one AVX-512 register where the CPU has them, two AVX2 ones elsewhere) floats:
   Cephes-style range reduction and a degree-6 polynomial (~1 ulp), with expf's NaN, overflow (inf),
   subnormal and underflow (0) behaviour. Written with GCC vector extensions: auto-vectorization gives up on
   the selects of a scalar version. */
#define DEFINE_EXP(NAME, VF, VI, SELECT)                                                                    \
    static inline VF SELECT(VI mask, VF yes, VF no) { return (VF)((mask & (VI)yes) | (~mask & (VI)no)); } \
    static inline VF NAME(VF v) {                                                                        \
        const VF lo = (VF){0} - 103.972084045410f, hi = (VF){0} + 88.72283935546875f;                    \
        const VF xc = SELECT(v < lo, lo, SELECT(v > hi, hi, v));                                         \
        const VF z = xc * 1.44269504088896341f + 0.5f;                                                   \
        VF n = __builtin_convertvector(__builtin_convertvector(z, VI), VF);                              \
        n = SELECT(n > z, n - 1.0f, n); /* floor */                                                      \
        const VF r = xc - n * 0.693359375f + n * 2.12194440e-4f;                                         \
        VF p = (VF){0} + 1.9875691500e-4f;                                                               \
        p = p * r + 1.3981999507e-3f;                                                                    \
        p = p * r + 8.3334519073e-3f;                                                                    \
        p = p * r + 4.1665795894e-2f;                                                                    \
        p = p * r + 1.6666665459e-1f;                                                                    \
        p = p * r + 5.0000001201e-1f;                                                                    \
        p = p * r * r + r + 1.0f;                                                                        \
        /* 2^n as two factors, so that both stay normal floats over the whole range n in [-150, 128] */  \
        const VI ni = __builtin_convertvector(n, VI), half = ni >> 1;                                    \
        VF out = p * (VF)((half + 127) << 23) * (VF)((ni - half + 127) << 23);                           \
        out = SELECT(v > 88.72283935546875f, (VF){0} + __builtin_inff(), out);                           \
        out = SELECT(v < -103.972084045410f, (VF){0}, out);                                              \
        return SELECT(v != v, v, out);                                                                   \
    }
DEFINE_EXP(exp8, vf8, vi8, select8)
DEFINE_EXP(exp16, vf16, vi16, select16)

/* buf[k] = exp(buf[k]) for k < count, in place; buf holds a multiple of 8 floats. 16 at a time (measured on
   an AVX-512 machine at [2, 512, 1024, 16], one thread: the op 34 -> 24 ms, the exponentials 20 -> 10 ms). */
static inline void exp_inplace(float *buf, int64_t count) {
    int64_t k = 0;
    for (; k + 16 <= count; k += 16) {
        vf16 v;
        memcpy(&v, buf + k, sizeof v);
        v = exp16(v);
        memcpy(buf + k, &v, sizeof v);
    }
    for (; k < count; k += 8) {
        vf8 v;
        memcpy(&v, buf + k, sizeof v);
        v = exp8(v);
        memcpy(buf + k, &v, sizeof v);
    }
}

/* One (batch, channel) row: the state stays in `h`, time runs in chunks of CHUNK steps whose decays and
   inputs are computed first in flat loops (vectorized, exp included), then the recurrence and the readout.
   Inlined into a switch over common state sizes, so the loops over n have a constant trip count. */
#define CHUNK 32
static inline __attribute__((always_inline)) void scan_row(
    const float *restrict dt, const float *restrict a_row, const float *restrict x, const float *restrict Bm,
    const float *restrict Cm, float *restrict h, float *restrict y, float *restrict work, int64_t length,
    const int64_t nstate) {
    float *restrict decay = work, *restrict input = work + CHUNK * nstate + 8;
    for (int64_t t0 = 0; t0 < length; t0 += CHUNK) {
        const int64_t steps = length - t0 < CHUNK ? length - t0 : CHUNK;
        for (int64_t i = 0; i < steps; ++i) {
            const float dtv = dt[t0 + i], xv = x[t0 + i];
            const float *restrict bt = Bm + (t0 + i) * nstate;
            for (int64_t n = 0; n < nstate; ++n) {
                decay[i * nstate + n] = dtv * a_row[n];
                input[i * nstate + n] = xv * bt[n];
            }
        }
        exp_inplace(decay, steps * nstate);
        for (int64_t i = 0; i < steps; ++i) {
            const float *restrict ct = Cm + (t0 + i) * nstate;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t n = 0; n < nstate; ++n) {
                h[n] = decay[i * nstate + n] * h[n] + input[i * nstate + n];
                acc += h[n] * ct[n];
            }
            y[t0 + i] = acc;
        }
    }
}

/* (y + u * D_d) * silu(z) for one row, in place; D_d NULL without a skip, z NULL without a gate. The gate
   runs 8 steps at a time through exp8 (libm's expf is scalar). */
static void skip_and_gate(float *restrict y, const float *restrict u, const float *D_d, const float *restrict z,
                          int64_t length) {
    if (D_d)
        for (int64_t t = 0; t < length; ++t) y[t] += u[t] * *D_d;
    if (!z) return;
    for (int64_t t0 = 0; t0 < length; t0 += 8) {
        const size_t bytes = sizeof(float) * (size_t)(length - t0 < 8 ? length - t0 : 8);
        float zb[8] = {0}, yb[8] = {0};
        memcpy(zb, z + t0, bytes);
        memcpy(yb, y + t0, bytes);
        vf8 zv, yv;
        memcpy(&zv, zb, sizeof zv);
        memcpy(&yv, yb, sizeof yv);
        yv = yv * (zv / (1.0f + exp8(-zv)));
        memcpy(yb, &yv, sizeof yv);
        memcpy(y + t0, yb, bytes);
    }
}

void fx_selective_scan_fwd(const float *dt, const float *A, const float *x, const float *Bm, const float *Cm,
                           const float *h0, const float *Dv, const float *z, const float *u, float *y,
                           float *hlast, int64_t batch, int64_t channels, int64_t length, int64_t nstate,
                           int threads) {
#pragma omp parallel num_threads(threads)
    {
        float *work = malloc(sizeof(float) * (2 * CHUNK * nstate + 16));
        float *h = malloc(sizeof(float) * nstate);
#pragma omp for schedule(static)
        for (int64_t bd = 0; bd < batch * channels; ++bd) {
            const int64_t b = bd / channels, d = bd % channels;
            for (int64_t n = 0; n < nstate; ++n) h[n] = h0 ? h0[bd * nstate + n] : 0.0f;
            const float *args_dt = dt + bd * length, *a_row = A + d * nstate, *args_x = x + bd * length;
            const float *bm = Bm + b * length * nstate, *cm = Cm + b * length * nstate;
            float *out = y + bd * length;
            switch (nstate) {
            case 4: scan_row(args_dt, a_row, args_x, bm, cm, h, out, work, length, 4); break;
            case 8: scan_row(args_dt, a_row, args_x, bm, cm, h, out, work, length, 8); break;
            case 16: scan_row(args_dt, a_row, args_x, bm, cm, h, out, work, length, 16); break;
            case 32: scan_row(args_dt, a_row, args_x, bm, cm, h, out, work, length, 32); break;
            default: scan_row(args_dt, a_row, args_x, bm, cm, h, out, work, length, nstate);
            }
            if (Dv || z) skip_and_gate(out, u + bd * length, Dv ? Dv + d : NULL, z ? z + bd * length : NULL, length);
            memcpy(hlast + bd * nstate, h, sizeof(float) * nstate);
        }
        free(work);
        free(h);
    }
}

/* Gradients of the forward above for the output gradient gy [B, D, L] and ghlast [B, D, N] (may be NULL).
   With a skip or gate the readout y_t is recomputed from the states, gy is taken through the gate and the
   skip to the scan's y, and dz, du [B, D, L] and dDrow [B, D] (dD per row, summed over batch by the caller)
   are written; dz, du and dDrow are only touched when z, respectively Dv, is given.
   Each (b, d) recomputes its states into a private [L + 1, N] buffer and walks time backwards; dA, dB and
   dC sum over channels or batch, so every thread accumulates into its own slice of `scratch`
   (threads * (D * N + 2 * B * L * N) floats) and the slices are added at the end. */
void fx_selective_scan_bwd(const float *gy, const float *ghlast, const float *dt, const float *A, const float *x,
                           const float *Bm, const float *Cm, const float *h0, const float *Dv, const float *z,
                           const float *u, float *ddt, float *dA, float *dx, float *dB, float *dC, float *dh0,
                           float *dz, float *du, float *dDrow, float *scratch, int64_t batch, int64_t channels,
                           int64_t length, int64_t nstate, int threads) {
    const int64_t per_thread = channels * nstate + 2 * batch * length * nstate;
    memset(scratch, 0, sizeof(float) * per_thread * threads);
#pragma omp parallel num_threads(threads)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *my_dA = scratch + tid * per_thread;
        float *my_dB = my_dA + channels * nstate, *my_dC = my_dB + batch * length * nstate;
        float *hs = malloc(sizeof(float) * (length + 1) * nstate);
        float *decays = malloc(sizeof(float) * (length * nstate + 8));
        float *g = malloc(sizeof(float) * nstate);
#pragma omp for schedule(static)
        for (int64_t bd = 0; bd < batch * channels; ++bd) {
            int64_t b = bd / channels, d = bd % channels;
            const float *a_row = A + d * nstate;
            for (int64_t n = 0; n < nstate; ++n) hs[n] = h0 ? h0[bd * nstate + n] : 0.0f;
            for (int64_t t = 0; t < length; ++t)
                for (int64_t n = 0; n < nstate; ++n) decays[t * nstate + n] = dt[bd * length + t] * a_row[n];
            exp_inplace(decays, length * nstate);
            for (int64_t t = 0; t < length; ++t) {
                const float xv = x[bd * length + t];
                const float *bt = Bm + (b * length + t) * nstate, *prev = hs + t * nstate;
                float *cur = hs + (t + 1) * nstate;
#pragma omp simd
                for (int64_t n = 0; n < nstate; ++n) cur[n] = decays[t * nstate + n] * prev[n] + xv * bt[n];
            }
            for (int64_t n = 0; n < nstate; ++n) g[n] = ghlast ? ghlast[bd * nstate + n] : 0.0f;
            const float D_d = Dv ? Dv[d] : 0.0f;
            float dD_acc = 0.0f;
            for (int64_t t = length - 1; t >= 0; --t) {
                const float dtv = dt[bd * length + t], xv = x[bd * length + t];
                const float *bt = Bm + (b * length + t) * nstate, *ct = Cm + (b * length + t) * nstate;
                const float *cur = hs + (t + 1) * nstate, *prev = hs + t * nstate;
                float gyt = gy[bd * length + t];
                if (z) { /* through the gate: d/dy of y * silu(z), and d/dz with y the skipped readout */
                    float yt = 0.0f;
#pragma omp simd reduction(+ : yt)
                    for (int64_t n = 0; n < nstate; ++n) yt += cur[n] * ct[n];
                    const float zv = z[bd * length + t], sig = 1.0f / (1.0f + expf(-zv));
                    if (Dv) yt += u[bd * length + t] * D_d;
                    dz[bd * length + t] = gyt * yt * sig * (1.0f + zv * (1.0f - sig));
                    gyt *= zv * sig;
                }
                if (Dv) {
                    du[bd * length + t] = gyt * D_d;
                    dD_acc += gyt * u[bd * length + t];
                }
                float *db = my_dB + (b * length + t) * nstate, *dc = my_dC + (b * length + t) * nstate;
                float *da = my_dA + d * nstate;
                float gx = 0.0f, gdt = 0.0f;
#pragma omp simd reduction(+ : gx, gdt)
                for (int64_t n = 0; n < nstate; ++n) {
                    float gn = g[n] + gyt * ct[n];
                    dc[n] += gyt * cur[n];
                    gx += gn * bt[n];
                    db[n] += gn * xv;
                    float a = decays[t * nstate + n];
                    float gu = gn * prev[n] * a; /* d/du of exp(u) * h_prev, u = dt * A */
                    gdt += gu * a_row[n];
                    da[n] += gu * dtv;
                    g[n] = gn * a;
                }
                dx[bd * length + t] = gx;
                ddt[bd * length + t] = gdt;
            }
            for (int64_t n = 0; n < nstate; ++n) dh0[bd * nstate + n] = g[n];
            if (Dv) dDrow[bd] = dD_acc;
        }
        free(hs);
        free(decays);
        free(g);
    }
    memset(dA, 0, sizeof(float) * channels * nstate);
    memset(dB, 0, sizeof(float) * batch * length * nstate);
    memset(dC, 0, sizeof(float) * batch * length * nstate);
    for (int tid = 0; tid < threads; ++tid) {
        const float *src = scratch + tid * per_thread;
        for (int64_t i = 0; i < channels * nstate; ++i) dA[i] += src[i];
        src += channels * nstate;
        for (int64_t i = 0; i < batch * length * nstate; ++i) dB[i] += src[i];
        src += batch * length * nstate;
        for (int64_t i = 0; i < batch * length * nstate; ++i) dC[i] += src[i];
    }
}
