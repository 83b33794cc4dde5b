// raytp's CPU bf16 linear: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), fp32 accumulation, AVX-512 BF16 (vdpbf16ps).
// Why by hand: see raytp/gang/cpu_linear.py. Plain C ABI (no torch headers: builds in about a second), called
// through ctypes; OpenMP from the process's runtime (torch's libgomp, already loaded).
//
// Packed weight layout: [ceil(N/16)][K/2][16][2] bf16, zero padded past N. One 64-byte line holds two
// consecutive k of 16 outputs, the operand vdpbf16ps takes; a block of 16 outputs is one sequential stream.
//
// Every output is accumulated in the same order (k ascending, one fp32 lane per output) whatever M, the row's
// place among the M rows and the thread count: a row's result is bit-identical alone or in any batch.
#include <immintrin.h>
#include <atomic>
#include <stdint.h>
#include <string.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

extern "C" void raytp_pack_bf16(const uint16_t* w, uint16_t* out, int64_t N, int64_t K) {
  const int64_t blocks = (N + 15) / 16, K2 = K / 2;
  memset(out, 0, blocks * K2 * 32 * sizeof(uint16_t));
#pragma omp parallel for
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t n = b * 16; n < N && n < b * 16 + 16; ++n)
      for (int64_t k = 0; k < 2 * K2; ++k) out[(b * K2 + k / 2) * 32 + (n - b * 16) * 2 + (k & 1)] = w[n * K + k];
}

// MR rows x NB blocks of 16 outputs: MR*NB fp32 accumulators (<= 24 of the 32 zmm registers).
// While it runs it prefetches (into L2) pf_blocks 16-output blocks of another weight at pf, a line of each per k2.
template <int MR, int NB>
TARGET static inline void tile(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K2, uint16_t* y,
                               int64_t ldy, int64_t n_left, const uint16_t* bias, const uint16_t* pf,
                               int64_t pf_blocks) {
  __m512 acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  const int64_t block = K2 * 32;  // elements between consecutive 16-output blocks
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * block + k2 * 32);
    for (int64_t j = 0; j < pf_blocks; ++j) _mm_prefetch((const char*)(pf + j * block + k2 * 32), _MM_HINT_T1);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      memcpy(&pair, x + m * ldx + 2 * k2, sizeof pair);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], wv[j], xv);
    }
  }
  for (int j = 0; j < NB; ++j) {
    const int64_t left = n_left - j * 16;
    const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    __m512 b = _mm512_setzero_ps();
    if (bias) {
      const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, bias + j * 16));
      b = _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));  // bf16 -> fp32: the high half of the word
    }
    for (int m = 0; m < MR; ++m) {
      const __m256bh r = _mm512_cvtneps_pbh(_mm512_add_ps(acc[m][j], b));
      _mm256_mask_storeu_epi16(y + m * ldy + j * 16, mask, (__m256i)r);
    }
  }
}

constexpr int64_t MR = 6;  // rows per tile

// Every row (MR at a time) times NB blocks of 16 outputs: the blocks' weights (64 x K bf16 at most) stay in L2
// while the row tiles pass over them, so memory streams each weight once per call whatever M. `next` (nb_next
// blocks, or null): the unit this thread computes next, prefetched a share per pass (see raytp_linear_bf16).
template <int NB>
TARGET static void column(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K2, uint16_t* y, int64_t N,
                          int64_t M, int64_t left, const uint16_t* bias, const uint16_t* next, int64_t nb_next) {
  const int64_t passes = (M + MR - 1) / MR;
  for (int64_t m0 = 0, p = 0; m0 < M; m0 += MR, ++p) {
    const uint16_t* xm = x + m0 * ldx;
    uint16_t* ym = y + m0 * N;
    const int64_t lo = next ? nb_next * p / passes : 0, hi = next ? nb_next * (p + 1) / passes : 0;
    const uint16_t* pf = next ? next + lo * K2 * 32 : nullptr;
    switch (M - m0 < MR ? M - m0 : MR) {
      case 6: tile<6, NB>(xm, ldx, w, K2, ym, N, left, bias, pf, hi - lo); break;
      case 5: tile<5, NB>(xm, ldx, w, K2, ym, N, left, bias, pf, hi - lo); break;
      case 4: tile<4, NB>(xm, ldx, w, K2, ym, N, left, bias, pf, hi - lo); break;
      case 3: tile<3, NB>(xm, ldx, w, K2, ym, N, left, bias, pf, hi - lo); break;
      case 2: tile<2, NB>(xm, ldx, w, K2, ym, N, left, bias, pf, hi - lo); break;
      default: tile<1, NB>(xm, ldx, w, K2, ym, N, left, bias, pf, hi - lo); break;
    }
  }
}

// x: M rows of K (even) bf16, row stride ldx; w: packed as above; bias: N bf16 or null; y: [M][N] contiguous.
// The work is cut into units of four blocks (64 outputs) over every row, which the `threads` OpenMP threads take
// from a shared counter, not in fixed shares: a thread the OS preempts (on a CPU shared with the server's own
// processes) delays the call by the units it holds, not by its whole share.
// With more than one row tile (M > MR) only the first pass over a unit would read memory and the others L2, so
// memory would idle while they compute: a thread takes its next unit before computing this one and prefetches it
// meanwhile, spread over this unit's passes (16 rows on the 0.5B's linears, two threads: 1.07-1.15x; a pass or
// one row tile gains nothing, its loads are the stream already).
extern "C" void raytp_linear_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, const uint16_t* bias,
                                  uint16_t* y, int64_t M, int64_t N, int64_t K, int threads) {
  const int64_t blocks = (N + 15) / 16, K2 = K / 2, groups = (blocks + 3) / 4;
  const bool ahead = M > MR;
  std::atomic<int64_t> counter{0};
  auto take = [&counter] { return counter.fetch_add(1, std::memory_order_relaxed); };
  auto unit_blocks = [blocks](int64_t g) { return blocks - g * 4 < 4 ? blocks - g * 4 : 4; };  // the last may be short
#pragma omp parallel num_threads(threads)
  {
    int64_t u = take();
    while (u < groups) {
      const int64_t next = ahead ? take() : groups;  // taken before computing u, to be prefetched meanwhile
      const int64_t b = u * 4, nb = unit_blocks(u);
      const uint16_t* wb = w + b * K2 * 32;
      const uint16_t* bb = bias ? bias + b * 16 : nullptr;
      uint16_t* yb = y + b * 16;
      const int64_t left = N - b * 16;
      const uint16_t* wn = next < groups ? w + next * 4 * K2 * 32 : nullptr;
      const int64_t nb_next = next < groups ? unit_blocks(next) : 0;
      switch (nb) {
        case 4: column<4>(x, ldx, wb, K2, yb, N, M, left, bb, wn, nb_next); break;
        case 3: column<3>(x, ldx, wb, K2, yb, N, M, left, bb, wn, nb_next); break;
        case 2: column<2>(x, ldx, wb, K2, yb, N, M, left, bb, wn, nb_next); break;
        default: column<1>(x, ldx, wb, K2, yb, N, M, left, bb, wn, nb_next); break;
      }
      u = ahead ? next : take();
    }
  }
}
