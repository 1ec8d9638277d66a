/* CPU kernel of fxfuse::complex_scan: h_t = a * h_{t-1} + x_t with complex a, x, h per channel, every
   state written out. Plain C compiled at first use and called through ctypes.

   Layouts (contiguous float32, complex numbers as (real, imaginary) pairs): a, h0 [C, 2]; x, hs [L, C, 2].
   Channels are cut into blocks that stay in cache while time runs over them; blocks go to threads. */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define BLOCK 256

void fx_complex_scan_fwd(const float *restrict a, const float *restrict x, const float *restrict h0,
                         float *restrict hs, int64_t length, int64_t channels, int threads) {
    const int64_t blocks = (channels + BLOCK - 1) / BLOCK;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks > 1)
#endif
    for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t c0 = blk * BLOCK, c1 = c0 + BLOCK < channels ? c0 + BLOCK : channels;
        float hr[BLOCK], hi[BLOCK], ar[BLOCK], ai[BLOCK];
        for (int64_t c = c0; c < c1; ++c) {
            ar[c - c0] = a[2 * c];
            ai[c - c0] = a[2 * c + 1];
            hr[c - c0] = h0 ? h0[2 * c] : 0.0f;
            hi[c - c0] = h0 ? h0[2 * c + 1] : 0.0f;
        }
        for (int64_t t = 0; t < length; ++t) {
            const float *restrict xt = x + 2 * (t * channels + c0);
            float *restrict ht = hs + 2 * (t * channels + c0);
            for (int64_t k = 0; k < c1 - c0; ++k) {
                const float re = ar[k] * hr[k] - ai[k] * hi[k] + xt[2 * k];
                const float im = ar[k] * hi[k] + ai[k] * hr[k] + xt[2 * k + 1];
                hr[k] = re;
                hi[k] = im;
                ht[2 * k] = re;
                ht[2 * k + 1] = im;
            }
        }
    }
    (void)threads;
}
