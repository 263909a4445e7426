// Fused attention for CPU inference in float32 (m3jax.native compiles this file on first use and calls it from an
// XLA custom call; see m3jax/native.py).
//
// Flash attention's recurrence, one (batch row, head, block of QB queries) per work item: the probabilities of a
// QB x KB tile of keys go into a buffer that stays in the core's L2 (exponentiated and summed straight from the
// micro-kernel's registers once each row's shift is fixed; see attend_block) and are multiplied into a QB x H
// accumulator, so the [T, T] scores never travel through memory. Both
// products run in register-blocked MR x NR micro-kernels written with GCC/Clang vector extensions (AVX2/FMA or NEON
// with -march=native); keys and values are packed once per head into NR-wide panels, zero-padded to whole panels.
// Keys past the last real one of a row are skipped; other masked keys get the -1e30 bias the XLA paths use.
//
// Layout: q, k, v, out [B, T, N, H] (XLA's row-major buffers); bias [B, T] (0 for a real key, -1e30 for padding).
// The caller allocates every buffer (see m3jax.native for their sizes); nothing here allocates or fails.
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#define MR 6    // query rows per micro-kernel
#define NR 16   // keys (q.k) or head dims (p.v) per micro-kernel: two vectors of 8
#define QB 96   // queries per work item (a multiple of MR)
#define KB 512  // keys per tile (a multiple of NR); QB x KB float32 scores = 192 KiB
#define ALIGN 16
#define EXP_SAFE_LOG 80.f  // m3jax.attention.EXP_SAFE_LOG
#define MAX_THREADS 256

static inline v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }
static inline v8 vmax(v8 a, v8 b) { v8i m = a > b; return (v8)((m & (v8i)a) | (~m & (v8i)b)); }
static inline float hmax(v8 x) { float m = x[0]; for (int i = 1; i < 8; i++) m = x[i] > m ? x[i] : m; return m; }
static inline float hsum(v8 x) { float s = 0.f; for (int i = 0; i < 8; i++) s += x[i]; return s; }
static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
static inline float *aligned(float *p) { return (float *)(((uintptr_t)p + 4 * ALIGN - 1) & ~(uintptr_t)(4 * ALIGN - 1)); }

// exp(x) as Cephes' expf (Cody-Waite reduction, degree-6 polynomial): within 2 ulp of the true value for
// x in [-87.3, 88.7]; callers keep x <= 80 (EXP_SAFE_LOG) and pass lower x (down to -inf) only to vexp_or_0.
static inline v8 vexp(v8 x) {
  const v8 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  v8 n = (x * splat(1.44269504088896341f) + magic) - magic;
  v8 r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + r + splat(1.0f);
  v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
  return p * (v8)e;
}

// exp(x) for x <= 0: 0 below -87.3, where float32's exp is denormal or 0 (and vexp's exponent would wrap).
static inline v8 vexp_or_0(v8 x) { return (v8)((x >= splat(-87.3f)) & (v8i)vexp(x)); }

// acc[MR][2] = scale * q[MR, hp] . kp[hp][NR]. The two halves of the head dims are summed apart (one after the
// other, the first half parked in `first`) and added at the end, and the scale comes last: a score's rounding
// error grows with the length of its sum, and with sharp attention (logits of 100 and more) that error is what exp
// amplifies (one chain over 64 dims measured 1.7x XLA's error against float64 there; two, as close as XLA's).
static inline void qk_half(const float *q, int64_t hp, const float *kp, int64_t d0, int64_t d1, v8 h[MR][2]) {
  for (int r = 0; r < MR; r++) h[r][0] = h[r][1] = splat(0.f);
  for (int64_t d = d0; d < d1; d++) {
    v8 k0 = *(const v8 *)(kp + d * NR), k1 = *(const v8 *)(kp + d * NR + 8);
    for (int r = 0; r < MR; r++) {
      v8 x = splat(q[r * hp + d]);
      h[r][0] += x * k0;
      h[r][1] += x * k1;
    }
  }
}

static inline void qk_product(const float *q, int64_t hp, const float *kp, float scale, v8 acc[MR][2]) {
  v8 first[MR][2];
  qk_half(q, hp, kp, 0, hp / 2, first);
  qk_half(q, hp, kp, hp / 2, hp, acc);
  for (int r = 0; r < MR; r++) {
    acc[r][0] = (first[r][0] + acc[r][0]) * splat(scale);
    acc[r][1] = (first[r][1] + acc[r][1]) * splat(scale);
  }
}

// s[MR, NR] = scale * q[MR, hp] . kp[hp][NR] (a panel of NR keys, transposed); mx[r] = max(mx[r], s[r, :])
// lane-wise.
static inline void qk_micro(const float *q, int64_t hp, const float *kp, float scale, float *s, v8 *mx) {
  v8 acc[MR][2];
  qk_product(q, hp, kp, scale, acc);
  for (int r = 0; r < MR; r++) {
    *(v8 *)(s + r * KB) = acc[r][0];
    *(v8 *)(s + r * KB + 8) = acc[r][1];
    mx[r] = vmax(mx[r], vmax(acc[r][0], acc[r][1]));
  }
}

// The fused tile: p[MR, NR] = exp(s - m[r]) with each row's shift m[r] fixed in advance, zero past the panel's
// `valid` keys, written in place of the scores, its row sums added to sum[r] lane-wise. Lanes of `over` are set
// where a score exceeds its row's shift by more than `room` (exp could overflow the sums: the tile is redone).
static inline void qk_exp_micro(const float *q, int64_t hp, const float *kp, float scale, float *s, const float *m,
                                float room, v8 *sum, v8i *over, int valid) {
  v8 acc[MR][2];
  qk_product(q, hp, kp, scale, acc);
  for (int r = 0; r < MR; r++) *over |= (acc[r][0] > splat(m[r] + room)) | (acc[r][1] > splat(m[r] + room));
  v8i keep0 = splat(-1.f) == splat(-1.f), keep1 = keep0;
  if (valid < NR) {
    const v8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    keep0 = lane < splat((float)valid);
    keep1 = lane + splat(8.f) < splat((float)valid);
  }
  for (int r = 0; r < MR; r++) {
    v8 p0 = (v8)(keep0 & (v8i)vexp_or_0(acc[r][0] - splat(m[r])));
    v8 p1 = (v8)(keep1 & (v8i)vexp_or_0(acc[r][1] - splat(m[r])));
    *(v8 *)(s + r * KB) = p0;
    *(v8 *)(s + r * KB + 8) = p1;
    sum[r] += p0 + p1;
  }
}

// o[MR, NR] += p[MR, nk] . vp[nk][NR] (a panel of NR head dims); o has row stride hp.
static inline void pv_micro(const float *p, const float *vp, int64_t nk, float *o, int64_t hp) {
  v8 acc[MR][2];
  for (int r = 0; r < MR; r++) {
    acc[r][0] = *(v8 *)(o + r * hp);
    acc[r][1] = *(v8 *)(o + r * hp + 8);
  }
  for (int64_t j = 0; j < nk; j++) {
    v8 v0 = *(const v8 *)(vp + j * NR), v1 = *(const v8 *)(vp + j * NR + 8);
    for (int r = 0; r < MR; r++) {
      v8 x = splat(p[r * KB + j]);
      acc[r][0] += x * v0;
      acc[r][1] += x * v1;
    }
  }
  for (int r = 0; r < MR; r++) {
    *(v8 *)(o + r * hp) = acc[r][0];
    *(v8 *)(o + r * hp + 8) = acc[r][1];
  }
}

typedef struct {
  const float *q, *k, *v, *bias;
  float *out, *packed, *scratch;
  int32_t *meta;  // [2, B]: per row, one past its last real key; whether a masked key comes before that
  int64_t b, t, n, h, hp, tp, scratch_stride, nqb;
  float scale;
  int64_t items, next;  // the current phase's work items; the next unclaimed one (atomic)
  int phase;
} Job;

// Phase 0: pack one head's keys as [TP/NR][HP][NR] and values as [HP/NR][TP][NR], zero-padded; and record
// the largest norm of its real keys and log(T) + log(1 + largest |value|) for attend_block's bound.
static void pack_head(const Job *j, int64_t bn) {
  const int64_t b = bn / j->n, n = bn % j->n, ld = j->n * j->h, hp = j->hp, tp = j->tp, kend = j->meta[b];
  float *kt = aligned(j->packed) + bn * 2 * tp * hp, *vp = kt + tp * hp;
  float *bound = aligned(j->packed) + j->b * j->n * 2 * tp * hp + 2 * bn;
  float kn = 0.f, vmax = 0.f;
  memset(kt, 0, sizeof(float) * 2 * tp * hp);
  for (int64_t t = 0; t < j->t; t++) {
    const float *ks = j->k + (b * j->t + t) * ld + n * j->h, *vs = j->v + (b * j->t + t) * ld + n * j->h;
    float *kd = kt + (t / NR) * hp * NR + t % NR, sq = 0.f;
    for (int64_t d = 0; d < j->h; d++) {
      kd[d * NR] = ks[d];
      vp[((d / NR) * tp + t) * NR + d % NR] = vs[d];
      sq += ks[d] * ks[d];
      if (t < kend) vmax = fmaxf(vmax, fabsf(vs[d]));
    }
    if (t < kend) kn = fmaxf(kn, sqrtf(sq));
  }
  bound[0] = kn;
  bound[1] = logf((float)j->t) + log1pf(vmax);
}

// Phase 1: one block of QB queries of one head against all its keys, written to out.
static void attend_block(const Job *j, int64_t item, float *scratch) {
  const int64_t bn = item / j->nqb, b = bn / j->n, n = bn % j->n, ld = j->n * j->h, hp = j->hp, tp = j->tp;
  const int64_t r0 = (item % j->nqb) * QB, rows = j->t - r0 < QB ? j->t - r0 : QB, rp = round_up(rows, MR);
  const int64_t kend = j->meta[b] > 0 ? j->meta[b] : j->t;  // a row of padding only attends to every key alike
  const int holes = j->meta[j->b + b];
  const float *kt = aligned(j->packed) + bn * 2 * tp * hp, *vp = kt + tp * hp, *bias = j->bias + b * j->t;
  const float *bound = aligned(j->packed) + j->b * j->n * 2 * tp * hp + 2 * bn;
  float *qs = scratch, *o = qs + QB * hp, *s = o + QB * hp, *m = s + QB * KB, *l = m + QB;
  v8 *mx = (v8 *)(l + QB);
  float qn = 0.f;
  for (int64_t i = 0; i < rp; i++) {
    const float *src = j->q + (b * j->t + r0 + i) * ld + n * j->h;
    float sq = 0.f;
    for (int64_t d = 0; d < hp; d++) {
      qs[i * hp + d] = i < rows && d < j->h ? src[d] : 0.f;
      sq += qs[i * hp + d] * qs[i * hp + d];
    }
    qn = fmaxf(qn, sqrtf(sq) * j->scale);
    m[i] = -INFINITY;
    l[i] = 0.f;
  }
  memset(o, 0, sizeof(float) * rp * hp);
  // Each tile is fused (scores, exp and row sums in one pass, the scores never stored) once every row's shift
  // m[i] is fixed, as long as no score passes its shift by more than `room`: no exp, row sum or value product can
  // then overflow (scores <= m + room, at most T of them, times max |v|). The first tile fixes the shifts at its
  // row maxima; where the Cauchy-Schwarz bound |q| |k| already keeps every score within `room` of 0, the shifts
  // are 0 from the start and no tile needs a separate pass. A tile that breaks the bound, and every tile of a row
  // with masked keys before its last real one (the bias must go in first), takes the general pass: scores stored
  // with their maxima, shifts raised to the new maxima (rescaling what was summed), exp, sums.
  const float room = EXP_SAFE_LOG - bound[1];
  int fixed = !holes && qn * bound[0] <= room;
  if (fixed)
    for (int64_t i = 0; i < rp; i++) m[i] = 0.f;
  for (int64_t j0 = 0; j0 < kend; j0 += KB) {
    const int64_t nk = kend - j0 < KB ? kend - j0 : KB, nkp = round_up(nk, NR);
    int fused = fixed;
    if (fused) {
      v8i over = {0};
      for (int64_t i = 0; i < rp; i++) mx[i] = splat(0.f);
      for (int64_t jp = 0; jp < nkp; jp += NR)
        for (int64_t i = 0; i < rp; i += MR)
          qk_exp_micro(qs + i * hp, hp, kt + (j0 + jp) * hp, j->scale, s + i * KB + jp, m + i, room, mx + i, &over,
                       nk - jp < NR ? (int)(nk - jp) : NR);
      for (int c = 0; c < 8; c++) fused &= !over[c];
      if (fused)
        for (int64_t i = 0; i < rp; i++) l[i] += hsum(mx[i]);
    }
    if (!fused) {
      for (int64_t i = 0; i < rp; i++) mx[i] = splat(-INFINITY);
      for (int64_t jp = 0; jp < nkp; jp += NR)
        for (int64_t i = 0; i < rp; i += MR)
          qk_micro(qs + i * hp, hp, kt + (j0 + jp) * hp, j->scale, s + i * KB + jp, mx + i);
      for (int64_t i = 0; i < rp; i++) {
        float *si = s + i * KB, mi = m[i];
        if (holes || nkp != nk) {  // the micro-kernel's max saw neither the bias nor the panel's zero padding
          if (holes)
            for (int64_t c = 0; c < nk; c++) si[c] += bias[j0 + c];
          for (int64_t c = nk; c < nkp; c++) si[c] = -INFINITY;
          v8 mv = splat(mi);
          for (int64_t c = 0; c < nkp; c += 8) mv = vmax(mv, *(v8 *)(si + c));
          mi = hmax(mv);
        } else {
          mi = fmaxf(mi, hmax(mx[i]));
        }
        const float corr = expf(m[i] - mi);  // 0 on the first tile (m = -inf)
        v8 sum = splat(0.f);
        for (int64_t c = 0; c < nkp; c += 8) {
          v8 e = vexp_or_0(*(v8 *)(si + c) - splat(mi));
          *(v8 *)(si + c) = e;
          sum += e;
        }
        m[i] = mi;
        l[i] = l[i] * corr + hsum(sum);
        if (corr != 1.f)
          for (int64_t d = 0; d < hp; d++) o[i * hp + d] *= corr;
      }
      fixed = !holes;
    }
    for (int64_t c = 0; c < hp; c += NR)
      for (int64_t i = 0; i < rp; i += MR)
        pv_micro(s + i * KB, vp + ((c / NR) * tp + j0) * NR, nkp, o + i * hp + c, hp);
  }
  for (int64_t i = 0; i < rows; i++) {
    float *dst = j->out + (b * j->t + r0 + i) * ld + n * j->h;
    const float inv = 1.f / l[i];
    for (int64_t d = 0; d < j->h; d++) dst[d] = o[i * hp + d] * inv;
  }
}

typedef struct {
  Job *job;
  int worker;
} Worker;

static void *work(void *arg) {
  Worker *w = (Worker *)arg;
  Job *j = w->job;
  float *scratch = aligned(j->scratch) + w->worker * j->scratch_stride;
  for (;;) {
    int64_t i = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
    if (i >= j->items) return NULL;
    if (j->phase == 0)
      pack_head(j, i);
    else
      attend_block(j, i, scratch);
  }
}

// Runs the phase's items on `threads` workers: the calling thread and threads - 1 new ones (fewer if the system
// will not create them; the calling thread then takes their share).
static void run_phase(Job *j, int phase, int64_t items, int threads) {
  pthread_t ids[MAX_THREADS];
  Worker workers[MAX_THREADS];
  int started[MAX_THREADS] = {0};
  j->phase = phase;
  j->items = items;
  j->next = 0;
  for (int i = 0; i < threads; i++) workers[i] = (Worker){j, i};
  for (int i = 1; i < threads; i++) started[i] = pthread_create(&ids[i], NULL, work, &workers[i]) == 0;
  work(&workers[0]);
  for (int i = 1; i < threads; i++)
    if (started[i]) pthread_join(ids[i], NULL);
}

// Floats of per-worker scratch for head width h (a multiple of ALIGN, so every worker's block stays aligned).
int64_t m3jax_flash_scratch_floats(int64_t h) {
  const int64_t hp = round_up(h, NR);
  return round_up(2 * QB * hp + QB * KB + 2 * QB + 8 * QB, ALIGN);
}

// Floats of packed keys and values (and two per head for the bound) for [b, t, n, h] inputs.
int64_t m3jax_flash_packed_floats(int64_t b, int64_t t, int64_t n, int64_t h) {
  return 2 * b * n * round_up(t, NR) * round_up(h, NR) + 2 * b * n;
}

// The buffers `packed` and `scratch` hold m3jax_flash_packed_floats(...) + ALIGN and
// threads * m3jax_flash_scratch_floats(h) + ALIGN floats; `meta` holds 2 * b int32.
void m3jax_flash_attention(const float *q, const float *k, const float *v, const float *bias, float *out,
                           float *packed, float *scratch, int32_t *meta, int64_t b, int64_t t, int64_t n, int64_t h,
                           int threads) {
  Job j = {q, k, v, bias, out, packed, scratch, meta, b, t, n, h, round_up(h, NR), round_up(t, NR),
           m3jax_flash_scratch_floats(h), (t + QB - 1) / QB, (float)(1.0 / sqrt((double)h)), 0, 0, 0};
  threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
  for (int64_t r = 0; r < b; r++) {
    int32_t end = 0, holes = 0;
    for (int64_t i = 0; i < t; i++)
      if (bias[r * t + i] == 0.f) end = (int32_t)(i + 1);
    for (int64_t i = 0; i < end; i++) holes |= bias[r * t + i] != 0.f;
    holes |= end == 0;  // padding only: every key keeps its bias, so all weigh alike (as in the XLA paths)
    meta[r] = end;
    meta[b + r] = holes;
  }
  run_phase(&j, 0, b * n, threads);
  run_phase(&j, 1, b * n * j.nqb, threads);
}
