// raytp's CPU decode attention over the paged KV pool: one query token per row, bf16 pool, fp32 arithmetic.
// Why by hand: see raytp/gang/attention/cpu_decode.py. Plain C ABI (raytp/gang/cpu_kernels.py builds it), called
// through a torch custom op (raytp.gang.attention.cpu_decode); OpenMP from the process's runtime (torch's libgomp).
//
// Each (row, KV head) is one unit of work, taken from a shared counter: it writes the row's new key and value into
// its slot (if given), then attends its query heads over the row's first lens[row] slots, keys in order: scores
// q.k * scale, a max-subtracted exp, and the weighted sum of values, all in fp32. A row's result depends only on
// its own query, table and length: not on the other rows, the table's padding or the thread count.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <atomic>
#include <vector>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

// 16 fp32 -> bf16, rounded to nearest even (AVX-512F only: no BF16 instructions needed)
TARGET static inline void store_bf16(uint16_t* p, __m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(r));
}

TARGET static inline __m512 load_bf16(const uint16_t* p) {  // 16 bf16 -> fp32: the high half of each word
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// exp(x) for x <= 0 (scores minus their max), 16 lanes: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], a degree-6
// polynomial (relative error ~2e-7, below fp32's rounding of the inputs); -inf and x < -87 give 0.
TARGET static inline __m512 exp_nonpositive(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 e = _mm512_scalef_ps(p, n);
  return _mm512_mask_mov_ps(e, tiny, _mm512_setzero_ps());
}

// Lane i of the result: the sum of v[i]'s 16 lanes (16 dot products finished at once: pairwise adds across
// lanes, a fixed order).
TARGET static inline __m512 sum16(__m512* v) {
  __m512 s1[8], s2[4];
  for (int i = 0; i < 8; ++i)
    s1[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int j = 0; j < 4; ++j) {
    const __m512d c = _mm512_castps_pd(s1[2 * j]), d = _mm512_castps_pd(s1[2 * j + 1]);
    s2[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
  }
  const __m512 t01 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[0], s2[1], 0x88), _mm512_shuffle_f32x4(s2[0], s2[1], 0xDD));
  const __m512 t23 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2], s2[3], 0x88), _mm512_shuffle_f32x4(s2[2], s2[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xDD));
}

// q: [B][Hq][D] bf16; k_new, v_new: [B][Hkv][D] bf16 or null (nothing written); keys, values: the layer's pool,
// [slots][Hkv][D] bf16; slots: [B] int64 (with k_new); tables: [B][W] int32 block ids; lens: [B] int32 context
// lengths (the new token included, at least 1); out: [B][Hq][D] bf16. D a multiple of 16, Hq a multiple of Hkv.
extern "C" TARGET void raytp_paged_decode_bf16(const uint16_t* q, const uint16_t* k_new, const uint16_t* v_new,
                                               uint16_t* keys, uint16_t* values, const int64_t* slots,
                                               const int32_t* tables, const int32_t* lens, uint16_t* out, int64_t B,
                                               int64_t Hq, int64_t Hkv, int64_t D, int64_t W, int64_t block_size,
                                               float scale, int threads) {
  const int64_t G = Hq / Hkv, V = D / 16;
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> qf(G * D), scores;
    std::vector<int64_t> offset;  // each key's element offset in the pool, from the table (no division per key)
    for (int64_t u = next.fetch_add(1, std::memory_order_relaxed); u < B * Hkv;
         u = next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t b = u / Hkv, h = u % Hkv, L = lens[b];
      if (k_new) {
        memcpy(keys + (slots[b] * Hkv + h) * D, k_new + (b * Hkv + h) * D, D * sizeof(uint16_t));
        memcpy(values + (slots[b] * Hkv + h) * D, v_new + (b * Hkv + h) * D, D * sizeof(uint16_t));
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < V; ++c)
          _mm512_storeu_ps(&qf[g * D + c * 16],
                           _mm512_mul_ps(load_bf16(q + (b * Hq + h * G + g) * D + c * 16), _mm512_set1_ps(scale)));
      scores.resize(G * (L + 16));
      const int64_t stride = L + 16;  // per query head, padded so the exp pass may run whole vectors
      const int32_t* table = tables + b * W;
      offset.resize(L + 32);
      for (int64_t t = 0, blk = 0; t < L; t += block_size, ++blk)
        for (int64_t i = 0; i < block_size && t + i < L; ++i)
          offset[t + i] = (((int64_t)table[blk]) * block_size + i) * Hkv * D + h * D;
      for (int64_t t = L; t < L + 32; ++t) offset[t] = offset[0];  // the last 16-key group's padding (masked)
      for (int64_t t0 = 0; t0 < L; t0 += 16) {  // 16 keys at a time (past L: zeros, masked below)
        const uint16_t* kp[16];
        for (int64_t i = 0; i < 16; ++i) kp[i] = keys + offset[t0 + i];
        if (t0 + 16 < L)  // the next group's keys: scattered lines the hardware prefetcher does not guess
          for (int64_t i = 0; i < 16; ++i)
            for (int64_t c = 0; c < D; c += 32) _mm_prefetch((const char*)(keys + offset[t0 + 16 + i] + c), _MM_HINT_T0);
        for (int64_t g = 0; g < G; ++g) {
          __m512 dots[16];
          for (int64_t i = 0; i < 16; ++i) {
            __m512 d = _mm512_mul_ps(_mm512_loadu_ps(&qf[g * D]), load_bf16(kp[i]));
            for (int64_t c = 1; c < V; ++c) d = _mm512_fmadd_ps(_mm512_loadu_ps(&qf[g * D + c * 16]), load_bf16(kp[i] + c * 16), d);
            dots[i] = d;
          }
          _mm512_storeu_ps(&scores[g * stride + t0], sum16(dots));
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* s = &scores[g * stride];
        float m = -INFINITY;
        for (int64_t t = 0; t < L; ++t) m = s[t] > m ? s[t] : m;
        for (int64_t t = L; t < stride; ++t) s[t] = -INFINITY;
        __m512 sum = _mm512_setzero_ps();
        for (int64_t t = 0; t < L; t += 16) {
          const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), _mm512_set1_ps(m)));
          _mm512_storeu_ps(s + t, e);
          sum = _mm512_add_ps(sum, e);
        }
        const float inv = 1.0f / _mm512_reduce_add_ps(sum);
        for (int64_t t = 0; t < L; ++t) s[t] *= inv;
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c0 = 0; c0 < V; c0 += 4) {  // four independent sums: FMA latency hidden
          const float* p = &scores[g * stride];
          const uint16_t* vc = values + c0 * 16;
          __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
          if (V - c0 >= 4) {
            for (int64_t t = 0; t < L; ++t) {
              if (g == 0) _mm_prefetch((const char*)(vc + offset[t + 16]), _MM_HINT_T0);
              const __m512 w = _mm512_set1_ps(p[t]);
              for (int j = 0; j < 4; ++j) a[j] = _mm512_fmadd_ps(w, load_bf16(vc + offset[t] + j * 16), a[j]);
            }
          } else {
            for (int64_t t = 0; t < L; ++t)
              for (int64_t j = 0; j < V - c0; ++j)
                a[j] = _mm512_fmadd_ps(_mm512_set1_ps(p[t]), load_bf16(vc + offset[t] + j * 16), a[j]);
          }
          for (int64_t j = 0; j < 4 && c0 + j < V; ++j) store_bf16(out + (b * Hq + h * G + g) * D + (c0 + j) * 16, a[j]);
        }
    }
  }
}
