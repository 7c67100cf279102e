/* MetaPerturb's perturbation function with phi frozen, as fused CPU kernels (float32, NCHW contiguous).
 *
 * The math is regularizers/_perturb.py's (PerturbFunction._reference_forward); regularizers/_perturb_native.py
 * builds this file with the system C compiler, loads it with ctypes and wires it into autograd. Every kernel works
 * on one sample b at a time (OpenMP over the batch), its planes held in small padded buffers that stay in cache,
 * For backward the forward keeps z = softplus(alpha + eps) (one float per element; sigmoid(alpha + eps) = 1 - exp(-z))
 * and one byte per element of indicator bits (the scale kernels' and relu(E1)'s), so backward runs neither the noise
 * trunk nor the generator again.
 *
 * Planes. A padded plane holds an H x W map at rows 1..H, columns 1..W of an (H + 2) x Wp grid (Wp = W + 2) with
 * zero borders, plus slack. conv3 computes a 3x3 cross-correlation (F.conv2d, padding 1) for all n >= H * Wp "flat"
 * positions i = y * Wp + x at once (one long vectorised loop whatever W is; n a whole number of vectors); positions
 * x >= W and i >= H * Wp are garbage. A flat result goes back into a padded plane at P[i + Wp + 1] with the garbage
 * replaced by 0, which is exactly the right border of row y + 1 and the left border of row y + 2.
 *
 * Noise: eps[b, c, y, x] is N(0, 1) by the Box-Muller transform of two 24-bit uniforms (as torch's CPU sampler)
 * taken from SplitMix64 of a counter (the plane's index and the position): counter-based, so the draw depends on
 * the seed only, not on the number of threads or the schedule.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- branch-free float32 exp, log and sin/cos (Cephes' polynomials, relative error ~1e-7) -------------------------
 * Written out rather than called from libm so that every loop that uses them vectorises, on any compiler and libc,
 * and no input takes a slow path. */

typedef union { float f; int32_t i; } bits_t;

static inline float max_f(float a, float b) { return a > b ? a : b; } /* fmaxf is a libm call unless -ffast-math */

static inline float exp_f(float x) { /* x <= 0 here; exp(-87.3) is the smallest normal result */
    x = max_f(x, -87.3f);
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest (1.5 * 2^23) */
    x = x - n * 0.693359375f + n * 2.12194440e-4f;
    const float z = x * x;
    const float p = (((((1.9875691500e-4f * x + 1.3981999507e-3f) * x + 8.3334519073e-3f) * x + 4.1665795894e-2f) *
                         x + 1.6666665459e-1f) * x + 5.0000001201e-1f) * z + x + 1.0f;
    bits_t b;
    b.i = ((int32_t)n + 127) << 23;
    return p * b.f;
}

static inline float log_f(float x) { /* x a positive normal float */
    bits_t b = {x};
    int32_t e = ((b.i >> 23) & 0xff) - 126;
    b.i = (b.i & 0x807fffff) | 0x3f000000; /* mantissa in [0.5, 1) */
    float m = b.f;
    const int lo = m < 0.707106781186547524f;
    e -= lo;
    m = lo ? m + m - 1.0f : m - 1.0f;
    const float z = m * m;
    float y = ((((((((7.0376836292e-2f * m - 1.1514610310e-1f) * m + 1.1676998740e-1f) * m - 1.2420140846e-1f) * m +
                   1.4249322787e-1f) * m - 1.6668057665e-1f) * m + 2.0000714765e-1f) * m - 2.4999993993e-1f) * m +
               3.3333331174e-1f) * m * z;
    const float fe = (float)e;
    y += -2.12194440e-4f * fe - 0.5f * z;
    return m + y + 0.693359375f * fe;
}

/* (sin, cos) of 2 pi u for u in [0, 1): quadrant q = round(4 u), r = 2 pi (u - q / 4) in [-pi/4, pi/4] */
static inline void sincos_turns(float u, float *sn, float *cs) {
    const float qf = (float)(int)(4.0f * u + 0.5f);
    const int q = (int)qf & 3;
    const float r = (u - 0.25f * qf) * 6.28318530717958647692f;
    const float z = r * r;
    const float sr = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
    const float cr = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                     0.5f * z + 1.0f;
    const float s_abs = (q & 1) ? cr : sr, c_abs = (q & 1) ? sr : cr;
    *sn = (q & 2) ? -s_abs : s_abs;
    *cs = ((q + 1) & 2) ? -c_abs : c_abs;
}

/* phi as passed in: kernel[4][9], phi_1.w_identity[9], phi_1.w_all[9], phi_2.w_identity[9], phi_2.w_all[9] */
#define PHI_K 0
#define PHI_W1 36
#define PHI_A1 45
#define PHI_W2 54
#define PHI_A2 63
#define NK 4

typedef struct {
    int H, W, Wp, n, pn; /* n = H * Wp flat positions rounded up to a whole number of vectors; pn = padded plane */
} geo_t;

#define VEC 16 /* floats per vector (AVX-512); loops of whole vectors leave no slow scalar remainder */

static geo_t geo(int H, int W) {
    const int n = (H * (W + 2) + VEC - 1) / VEC * VEC;
    geo_t g = {H, W, W + 2, n, n + 2 * (W + 2) + 2}; /* conv3 reads up to P[n - 1 + 2 Wp + 2] */
    return g;
}

static void rot180(const float *k, float *out) {
    for (int j = 0; j < 9; j++) out[j] = k[8 - j];
}

static float *zalloc(size_t count) { return (float *)calloc(count ? count : 1, sizeof(float)); }

/* 1 where flat position i is a real pixel (x < W), else 0 */
static unsigned char *valid_mask(geo_t g) {
    unsigned char *v = (unsigned char *)malloc((size_t)g.n);
    for (int i = 0; i < g.n; i++) v[i] = i < g.H * g.Wp && (i % g.Wp) < g.W;
    return v;
}

static inline void conv3(const float *restrict P, geo_t g, const float *restrict k, float *restrict O) {
    const float k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3], k4 = k[4], k5 = k[5], k6 = k[6], k7 = k[7], k8 = k[8];
    const float *restrict p0 = P, *restrict p1 = P + g.Wp, *restrict p2 = P + 2 * g.Wp;
#pragma omp simd
    for (int i = 0; i < g.n; i++)
        O[i] = k0 * p0[i] + k1 * p0[i + 1] + k2 * p0[i + 2] + k3 * p1[i] + k4 * p1[i + 1] + k5 * p1[i + 2] +
               k6 * p2[i] + k7 * p2[i + 1] + k8 * p2[i + 2];
}

/* O[k] = conv3(P; k36 + 9 k) for the 4 scale kernels in one pass over P (each input load serves 4 outputs) */
static inline void conv3x4(const float *restrict P, geo_t g, const float *restrict k, float *restrict O) {
    float w[36];
    for (int j = 0; j < 36; j++) w[j] = k[j];
    const float *restrict p0 = P, *restrict p1 = P + g.Wp, *restrict p2 = P + 2 * g.Wp;
    float *restrict O0 = O, *restrict O1 = O + g.n, *restrict O2 = O + 2 * g.n, *restrict O3 = O + 3 * g.n;
#pragma omp simd
    for (int i = 0; i < g.n; i++) {
        const float a0 = p0[i], a1 = p0[i + 1], a2 = p0[i + 2], a3 = p1[i], a4 = p1[i + 1], a5 = p1[i + 2], a6 = p2[i],
                    a7 = p2[i + 1], a8 = p2[i + 2];
        O0[i] = w[0] * a0 + w[1] * a1 + w[2] * a2 + w[3] * a3 + w[4] * a4 + w[5] * a5 + w[6] * a6 + w[7] * a7 +
                w[8] * a8;
        O1[i] = w[9] * a0 + w[10] * a1 + w[11] * a2 + w[12] * a3 + w[13] * a4 + w[14] * a5 + w[15] * a6 +
                w[16] * a7 + w[17] * a8;
        O2[i] = w[18] * a0 + w[19] * a1 + w[20] * a2 + w[21] * a3 + w[22] * a4 + w[23] * a5 + w[24] * a6 +
                w[25] * a7 + w[26] * a8;
        O3[i] = w[27] * a0 + w[28] * a1 + w[29] * a2 + w[30] * a3 + w[31] * a4 + w[32] * a5 + w[33] * a6 +
                w[34] * a7 + w[35] * a8;
    }
}

/* O = sum_k conv3(M[k]; kt + 9 k) over 4 padded planes M[k] (of pn floats each), in one pass */
static inline void conv3sum4(const float *restrict M, geo_t g, const float *restrict kt, float *restrict O) {
    float w[36];
    for (int j = 0; j < 36; j++) w[j] = kt[j];
    const int Wp = g.Wp;
    const float *restrict q0 = M, *restrict q1 = M + g.pn, *restrict q2 = M + 2 * g.pn, *restrict q3 = M + 3 * g.pn;
#pragma omp simd
    for (int i = 0; i < g.n; i++) {
        float acc = 0.0f;
        acc += w[0] * q0[i] + w[1] * q0[i + 1] + w[2] * q0[i + 2] + w[3] * q0[i + Wp] + w[4] * q0[i + Wp + 1] +
               w[5] * q0[i + Wp + 2] + w[6] * q0[i + 2 * Wp] + w[7] * q0[i + 2 * Wp + 1] + w[8] * q0[i + 2 * Wp + 2];
        acc += w[9] * q1[i] + w[10] * q1[i + 1] + w[11] * q1[i + 2] + w[12] * q1[i + Wp] + w[13] * q1[i + Wp + 1] +
               w[14] * q1[i + Wp + 2] + w[15] * q1[i + 2 * Wp] + w[16] * q1[i + 2 * Wp + 1] +
               w[17] * q1[i + 2 * Wp + 2];
        acc += w[18] * q2[i] + w[19] * q2[i + 1] + w[20] * q2[i + 2] + w[21] * q2[i + Wp] + w[22] * q2[i + Wp + 1] +
               w[23] * q2[i + Wp + 2] + w[24] * q2[i + 2 * Wp] + w[25] * q2[i + 2 * Wp + 1] +
               w[26] * q2[i + 2 * Wp + 2];
        acc += w[27] * q3[i] + w[28] * q3[i + 1] + w[29] * q3[i + 2] + w[30] * q3[i + Wp] + w[31] * q3[i + Wp + 1] +
               w[32] * q3[i + Wp + 2] + w[33] * q3[i + 2 * Wp] + w[34] * q3[i + 2 * Wp + 1] +
               w[35] * q3[i + 2 * Wp + 2];
        O[i] = acc;
    }
}

/* P (padded) <- the H x W plane src */
static inline void load_padded(const float *restrict src, geo_t g, float *restrict P) {
    for (int y = 0; y < g.H; y++) memcpy(P + (y + 1) * g.Wp + 1, src + (size_t)y * g.W, sizeof(float) * g.W);
}

/* F (flat) <- the H x W plane src (garbage columns untouched) */
static inline void load_flat(const float *restrict src, geo_t g, float *restrict F) {
    for (int y = 0; y < g.H; y++) memcpy(F + y * g.Wp, src + (size_t)y * g.W, sizeof(float) * g.W);
}

/* the H x W plane dst <- F (flat), or += when add */
static inline void store_plane(const float *restrict F, geo_t g, float *restrict dst, int add) {
    for (int y = 0; y < g.H; y++) {
        float *restrict d = dst + (size_t)y * g.W;
        const float *restrict f = F + y * g.Wp;
        if (add) {
#pragma omp simd
            for (int x = 0; x < g.W; x++) d[x] += f[x];
        } else {
            memcpy(d, f, sizeof(float) * g.W);
        }
    }
}

/* ---- noise ---------------------------------------------------------------------------------------------------- */

/* out[0 .. 2 * pairs) <- N(0, 1) from counters first .. first + pairs (two normals per counter) */
static void normal_fill(float *restrict out, int pairs, uint64_t seed, uint64_t first) {
#pragma omp simd
    for (int j = 0; j < pairs; j++) {
        uint64_t z = seed + (first + (uint64_t)j + 1u) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const float u1 = (float)((int32_t)(z >> 40) + 1) * 0x1p-24f;            /* (0, 1] */
        const float u2 = (float)(int32_t)((z >> 16) & 0xFFFFFFu) * 0x1p-24f;    /* [0, 1) */
        const float r = sqrtf(-2.0f * log_f(u1));
        float sn, cs;
        sincos_turns(u2, &sn, &cs);
        out[j] = r * cs;
        out[j + pairs] = r * sn;
    }
}

/* the flat eps of plane (b, c) into E: the given eps, or drawn (N holds 2 * pairs floats) */
static inline void load_eps(const float *eps, uint64_t seed, size_t plane, geo_t g, float *restrict N,
                            float *restrict E) {
    if (eps) {
        load_flat(eps + plane * g.H * g.W, g, E);
    } else {
        const int pairs = (g.H * g.W + 1) / 2;
        normal_fill(N, pairs, seed, (uint64_t)plane * (uint64_t)pairs);
        load_flat(N, g, E);
    }
}

/* ---- shared per-sample work ---------------------------------------------------------------------------------- */

typedef struct {
    float *M, *A, *O, *E, *N, *T; /* padded mean, flat A/O/E/T, normals */
    float *Hall, *R;              /* C padded planes each: the sample's h, and r = relu(E1(h)) */
} scratch_t;

static scratch_t scratch_new(int C, geo_t g) {
    scratch_t s;
    s.Hall = zalloc((size_t)C * g.pn);
    s.M = zalloc(g.pn);
    s.A = zalloc(g.n);
    s.O = zalloc(g.n);
    s.E = zalloc(g.n);
    s.T = zalloc(g.n);
    s.N = zalloc((size_t)g.H * g.W + 2);
    s.R = zalloc((size_t)C * g.pn);
    return s;
}

static void scratch_free(scratch_t *s) {
    free(s->Hall); free(s->M); free(s->A); free(s->O); free(s->E); free(s->T); free(s->N); free(s->R);
}

/* for one sample: its planes into the padded planes Hall, r = relu(E1(h)) into the padded planes R, and A <- the
 * channel-mean term of E2 (flat) */
static void noise_trunk(const float *restrict h, int C, geo_t g, const float *phi, const unsigned char *valid,
                        scratch_t *s) {
    const float inv = 1.0f / (float)C;
    memset(s->M, 0, sizeof(float) * g.pn);                  /* M <- mean_c h (borders stay 0) */
    for (int c = 0; c < C; c++) {
        float *restrict Hc = s->Hall + (size_t)c * g.pn;
        load_padded(h + (size_t)c * g.H * g.W, g, Hc);
        float *restrict m = s->M;
#pragma omp simd
        for (int i = 0; i < g.pn; i++) m[i] += inv * Hc[i];
    }
    conv3(s->M, g, phi + PHI_A1, s->A);                     /* A1 */
    memset(s->M, 0, sizeof(float) * g.pn);                  /* M <- mean_c r */
    for (int c = 0; c < C; c++) {
        conv3(s->Hall + (size_t)c * g.pn, g, phi + PHI_W1, s->O);
        float *restrict Rc = s->R + (size_t)c * g.pn + g.Wp + 1;
        float *restrict m = s->M + g.Wp + 1;
        const float *restrict O = s->O, *restrict A = s->A;
#pragma omp simd
        for (int i = 0; i < g.n; i++) {
            float r = O[i] + A[i];
            r = (valid[i] && r > 0.0f) ? r : 0.0f;
            Rc[i] = r;
            m[i] += inv * r;
        }
    }
    conv3(s->M, g, phi + PHI_A2, s->A);                     /* A2 */
}

/* softplus(t) = max(t, 0) + log(1 + e), e = exp(-|t|) */
static inline float softplus_e(float t, float e) { return max_f(t, 0.0f) + log_f(1.0f + e); }

/* ---- kernels ---------------------------------------------------------------------------------------------------- */

/* bytes per plane of the masks mp_stats writes (flat layout) */
int mp_mask_size(int H, int W) { return geo(H, W).n; }

/* g[b, c, k] = mean over the plane of relu(conv3x3(h[b, c]; kernel[k])) */
void mp_stats(const float *h, int B, int C, int H, int W, const float *phi, float *g_out, uint8_t *masks,
              int threads) {
    const geo_t g = geo(H, W);
    unsigned char *valid = valid_mask(g);
    const float inv = 1.0f / (float)(H * W);
#pragma omp parallel num_threads(threads)
    {
        float *Hp = zalloc(g.pn), *O = zalloc((size_t)NK * g.n);
#pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            for (int c = 0; c < C; c++) {
                const size_t plane = (size_t)b * C + c;
                load_padded(h + plane * H * W, g, Hp);
                conv3x4(Hp, g, phi + PHI_K, O);
                for (int k = 0; k < NK; k++) {
                    const float *restrict Ok = O + (size_t)k * g.n;
                    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                    for (int i = 0; i < g.n; i++) acc += (valid[i] && Ok[i] > 0.0f) ? Ok[i] : 0.0f;
                    g_out[plane * NK + k] = acc * inv;
                }
                if (masks) { /* bit k at flat position i of plane (b, c): conv3x3(h; kernel[k]) > 0 there, 0 at
                              * garbage positions (for mp_scale_backward; mp_mask_size bytes per plane) */
                    const float *restrict O0 = O, *restrict O1 = O + g.n, *restrict O2 = O + 2 * g.n,
                                          *restrict O3 = O + 3 * g.n;
                    uint8_t *restrict mb = masks + plane * g.n;
#pragma omp simd
                    for (int i = 0; i < g.n; i++)
                        mb[i] = valid[i] ? (uint8_t)((O0[i] > 0.0f) | ((O1[i] > 0.0f) << 1) | ((O2[i] > 0.0f) << 2) |
                                                     ((O3[i] > 0.0f) << 3))
                                         : 0;
                }
            }
        }
        free(Hp); free(O);
    }
    free(valid);
}

#define R_BIT 16 /* bit 4 of the masks: relu(E1(h)) > 0 (bits 0-3: the scale kernels, written by mp_stats) */

/* out = min(h * ((s[c] * z - 1) * nc + 1), clip), z = softplus(E2(relu(E1(h))) + eps) (no clip when has_clip == 0).
 * For backward (z_out not NULL): z (flat layout, mp_mask_size floats per plane) into z_out and bit R_BIT of masks. */
void mp_forward(const float *h, int B, int C, int H, int W, const float *phi, const float *s_c, float nc,
                int has_clip, float clip, uint64_t seed, const float *eps, float *out, float *z_out, uint8_t *masks,
                int threads) {
    const geo_t g = geo(H, W);
    unsigned char *valid = valid_mask(g);
#pragma omp parallel num_threads(threads)
    {
        scratch_t s = scratch_new(C, g);
#pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            const float *hb = h + (size_t)b * C * H * W;
            noise_trunk(hb, C, g, phi, valid, &s);
            for (int c = 0; c < C; c++) {
                const size_t plane = (size_t)b * C + c;
                const float *restrict Rc = s.R + (size_t)c * g.pn;
                conv3(Rc, g, phi + PHI_W2, s.O);
                load_eps(eps, seed, plane, g, s.N, s.E);
                const float sc = s_c[c];
                const float *restrict O = s.O, *restrict A = s.A, *restrict E = s.E;
                const float *restrict hv = s.Hall + (size_t)c * g.pn + g.Wp + 1;   /* h, flat */
                float *restrict T = s.T;
                float *restrict zz = z_out ? z_out + plane * g.n : s.E;   /* z is written over E when not kept */
#pragma omp simd
                for (int i = 0; i < g.n; i++) {
                    const float t = O[i] + A[i] + E[i];
                    const float z = softplus_e(t, exp_f(-fabsf(t)));
                    float o = hv[i] * ((sc * z - 1.0f) * nc + 1.0f);
                    if (has_clip) o = o > clip ? clip : o;
                    T[i] = o;
                    zz[i] = z;
                }
                store_plane(s.T, g, out + plane * H * W, 0);
                if (masks) {
                    uint8_t *restrict mb = masks + plane * g.n;
                    const float *restrict r = Rc + g.Wp + 1;
#pragma omp simd
                    for (int i = 0; i < g.n; i++) mb[i] = (uint8_t)(mb[i] | (r[i] > 0.0f ? R_BIT : 0));
                }
            }
        }
        scratch_free(&s);
    }
    free(valid);
}

/* dh (written) = the gradient with respect to h of sum(grad * out) through everything but the batch statistics of
 * the scale function, from the z and the mask bit R_BIT that mp_forward kept; ds[b, c] = sum over the plane of
 * grad * h * z (masked where clipped), from which the caller gets dL/ds = nc * sum_b ds and the scale
 * branch (mp_scale_backward). */
void mp_backward(const float *grad, const float *h, const float *z_in, const uint8_t *masks, int B, int C, int H,
                 int W, const float *phi, const float *s_c, float nc, int has_clip, float clip, float *dh, float *ds,
                 int threads) {
    const geo_t g = geo(H, W);
    unsigned char *valid = valid_mask(g);
    float a1t[9], w1t[9], a2t[9], w2t[9];
    rot180(phi + PHI_A1, a1t); rot180(phi + PHI_W1, w1t); rot180(phi + PHI_A2, a2t); rot180(phi + PHI_W2, w2t);
    const float inv = 1.0f / (float)C;
#pragma omp parallel num_threads(threads)
    {
        float *M = zalloc(g.pn), *A = zalloc(g.n), *O = zalloc(g.n), *T = zalloc(g.n), *G = zalloc(g.n);
        float *U = zalloc((size_t)C * g.pn);
#pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            const float *hb = h + (size_t)b * C * H * W;
            /* the output: direct term into dh, u = dL/dt into U, its channel mean into M */
            memset(M, 0, sizeof(float) * g.pn);
            for (int c = 0; c < C; c++) {
                const size_t plane = (size_t)b * C + c;
                load_flat(hb + (size_t)c * H * W, g, T);
                load_flat(grad + plane * H * W, g, G);
                const float sc = s_c[c], ucoef = nc * sc;
                const float *restrict zz = z_in + plane * g.n, *restrict Tv = T;
                float *restrict Gd = G;
                float *restrict Uc = U + (size_t)c * g.pn + g.Wp + 1;
                float *restrict m = M + g.Wp + 1;
                float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                for (int i = 0; i < g.n; i++) {
                    const float z = zz[i];
                    const float sig = 1.0f - exp_f(-z);          /* sigmoid(t), as exp(z) = 1 + exp(t) */
                    const float mult = (sc * z - 1.0f) * nc + 1.0f;
                    const float hv = Tv[i];
                    const int live = valid[i] && !(has_clip && hv * mult > clip);
                    const float gg = live ? Gd[i] : 0.0f;
                    const float u = live ? gg * hv * ucoef * sig : 0.0f;
                    acc += gg * hv * z;
                    Gd[i] = gg * mult;
                    Uc[i] = u;
                    m[i] += inv * u;
                }
                ds[plane] = acc;
                store_plane(G, g, dh + plane * H * W, 0);
            }
            /* E2^T, then relu(E1)'s mask: du into U, its channel mean into M */
            conv3(M, g, a2t, A);
            memset(M, 0, sizeof(float) * g.pn);
            for (int c = 0; c < C; c++) {
                float *Ucp = U + (size_t)c * g.pn;
                conv3(Ucp, g, w2t, O);
                const uint8_t *restrict mb = masks + ((size_t)b * C + c) * g.n;
                const float *restrict Ov = O, *restrict Av = A;
                float *restrict Uc = Ucp + g.Wp + 1;
                float *restrict m = M + g.Wp + 1;
#pragma omp simd
                for (int i = 0; i < g.n; i++) {
                    const float du = (mb[i] & R_BIT) ? Ov[i] + Av[i] : 0.0f;   /* the bit is 0 at garbage */
                    Uc[i] = du;
                    m[i] += inv * du;
                }
            }
            /* E1^T, added to dh */
            conv3(M, g, a1t, A);
            for (int c = 0; c < C; c++) {
                conv3(U + (size_t)c * g.pn, g, w1t, O);
                const float *restrict Av = A;
                float *restrict Ov = O;
#pragma omp simd
                for (int i = 0; i < g.n; i++) Ov[i] += Av[i];
                store_plane(O, g, dh + ((size_t)b * C + c) * H * W, 1);
            }
        }
        free(M); free(A); free(O); free(T); free(G); free(U);
    }
    free(valid);
}

/* dh[b, c] += sum_k w[b, c, k] * conv3x3^T(1[conv3x3(h[b, c]; kernel[k]) > 0]; kernel[k]): the gradient through the
 * batch statistics g of the scale function, w = dL/dg / (H W); the indicators are the bits mp_stats stored */
void mp_scale_backward(const uint8_t *masks, int B, int C, int H, int W, const float *phi, const float *w, float *dh,
                       int threads) {
    const geo_t g = geo(H, W);
    float kt[NK * 9];
    for (int k = 0; k < NK; k++) rot180(phi + PHI_K + 9 * k, kt + 9 * k);
#pragma omp parallel num_threads(threads)
    {
        float *O = zalloc(g.n), *M = zalloc((size_t)NK * g.pn);
#pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            for (int c = 0; c < C; c++) {
                const size_t plane = (size_t)b * C + c;
                const float *wp = w + plane * NK;
                const float w0 = wp[0], w1 = wp[1], w2 = wp[2], w3 = wp[3];
                const uint8_t *restrict mb = masks + plane * g.n;   /* the 4 masked planes: w[b, c, k] where */
                float *restrict m0 = M + g.Wp + 1, *restrict m1 = m0 + g.pn, *restrict m2 = m1 + g.pn, /* bit k */
                                *restrict m3 = m2 + g.pn;                                      /* is set, else 0 */
#pragma omp simd
                for (int i = 0; i < g.n; i++) {
                    const int v = mb[i];
                    m0[i] = (v & 1) ? w0 : 0.0f;
                    m1[i] = (v & 2) ? w1 : 0.0f;
                    m2[i] = (v & 4) ? w2 : 0.0f;
                    m3[i] = (v & 8) ? w3 : 0.0f;
                }
                conv3sum4(M, g, kt, O);                 /* sum_k conv3x3^T(mask_k; kernel[k]) */
                store_plane(O, g, dh + plane * H * W, 1);
            }
        }
        free(O); free(M);
    }
}
