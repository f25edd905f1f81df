// asqpost LUT kernel: u8 activations x 4-bit weight codes decoded through two 16-entry int8 tables.
//
// acc_even[m, n] = sum_k x[m, k] * lut_even[code[n, k]]     (exact int32)
// acc_odd[m, n]  = sum_k x[m, k] * lut_odd[code[n, k]]      (POST's odd powers of sqrt 2)
//
// Weight layout (made by asqpost.kernels.native.kernel_weights): rows are grouped in tiles of 16 (N padded), K is
// padded to a multiple of 8. Tile t is Kp / 8 blocks of 64 bytes; in block b, byte 4 r + i holds
// code[16 t + r, 8 b + i] in its low nibble and code[16 t + r, 8 b + 4 + i] in its high nibble (r < 16, i < 4).
// So one decoded 64-byte vector is 16 rows x 4 k: VNNI's vpdpbusd against x[m, 8b .. 8b+3] broadcast to every
// lane adds each row's 4 products into that row's own int32 lane. No horizontal sums are needed, a tile's 16
// outputs are stored at once, and one decoded block serves up to 8 activation rows (batched inputs).
// The path (AVX-512 VNNI, AVX2, scalar) is chosen at run time from the CPU, not at build time.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

namespace {

constexpr int64_t kTile = 16;   // weight rows per tile: one int32 lane each
constexpr int64_t kGroup = 8;   // k values per 64-byte block: 4 in the low nibbles, 4 in the high ones
constexpr int kMaxRows = 8;     // activation rows sharing one decoded block

struct Args {
  const uint8_t* x;
  int64_t M, Kp, N;
  const uint8_t* w;
  const int8_t* lut_even;
  const int8_t* lut_odd;
  bool has_odd;
  int32_t* out_even;
  int32_t* out_odd;

  int64_t blocks() const { return Kp / kGroup; }
  const uint8_t* tile(int64_t t) const { return w + t * blocks() * 64; }
};

inline int32_t load_i32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

void tiles_scalar(const Args& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = a.tile(t);
    for (int64_t m = 0; m < a.M; ++m) {
      const uint8_t* xr = a.x + m * a.Kp;
      for (int64_t r = 0; r < kTile && t * kTile + r < a.N; ++r) {
        int64_t se = 0, so = 0;
        for (int64_t b = 0; b < a.blocks(); ++b) {
          for (int i = 0; i < 4; ++i) {
            const uint8_t byte = wt[b * 64 + 4 * r + i];
            const int lo = byte & 15, hi = byte >> 4;
            const int32_t xl = xr[b * kGroup + i], xh = xr[b * kGroup + 4 + i];
            se += xl * a.lut_even[lo] + xh * a.lut_even[hi];
            so += xl * a.lut_odd[lo] + xh * a.lut_odd[hi];
          }
        }
        a.out_even[m * a.N + t * kTile + r] = static_cast<int32_t>(se);
        if (a.has_odd) a.out_odd[m * a.N + t * kTile + r] = static_cast<int32_t>(so);
      }
    }
  }
}

#define ASQPOST_AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define ASQPOST_AVX2 __attribute__((target("avx2,fma")))

// MR activation rows x NT tiles (16 weight rows each) over the whole K: MR * NT * (1 + ODD) zmm sums.
template <int MR, int NT, bool ODD>
ASQPOST_AVX512 void tile_avx512(const Args& a, int64_t m0, int64_t t0) {
  const __m512i table_even = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.lut_even)));
  const __m512i table_odd = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.lut_odd)));
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512i acc_e[MR][NT], acc_o[MR][NT];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NT; ++j) acc_e[i][j] = acc_o[i][j] = _mm512_setzero_si512();
  const uint8_t* wt[NT];
  for (int j = 0; j < NT; ++j) wt[j] = a.tile(t0 + j);
  const uint8_t* xr = a.x + m0 * a.Kp;
  const int64_t blocks = a.blocks();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i e_lo[NT], e_hi[NT], o_lo[NT], o_hi[NT];
    for (int j = 0; j < NT; ++j) {
      const __m512i v = _mm512_loadu_si512(wt[j] + b * 64);
      const __m512i lo = _mm512_and_si512(v, nibble);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      e_lo[j] = _mm512_shuffle_epi8(table_even, lo);
      e_hi[j] = _mm512_shuffle_epi8(table_even, hi);
      if (ODD) {
        o_lo[j] = _mm512_shuffle_epi8(table_odd, lo);
        o_hi[j] = _mm512_shuffle_epi8(table_odd, hi);
      }
    }
    for (int i = 0; i < MR; ++i) {
      const __m512i x_lo = _mm512_set1_epi32(load_i32(xr + i * a.Kp + b * kGroup));
      const __m512i x_hi = _mm512_set1_epi32(load_i32(xr + i * a.Kp + b * kGroup + 4));
      for (int j = 0; j < NT; ++j) {
        acc_e[i][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc_e[i][j], x_lo, e_lo[j]), x_hi, e_hi[j]);
        if (ODD) acc_o[i][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc_o[i][j], x_lo, o_lo[j]), x_hi, o_hi[j]);
      }
    }
  }
  for (int j = 0; j < NT; ++j) {
    const int64_t n = (t0 + j) * kTile;
    const __mmask16 lanes = a.N - n >= kTile ? 0xFFFF : static_cast<__mmask16>((1u << (a.N - n)) - 1);
    for (int i = 0; i < MR; ++i) {
      _mm512_mask_storeu_epi32(a.out_even + (m0 + i) * a.N + n, lanes, acc_e[i][j]);
      if (ODD) _mm512_mask_storeu_epi32(a.out_odd + (m0 + i) * a.N + n, lanes, acc_o[i][j]);
    }
  }
}

// Batched inputs: a tile's weights are decoded once into int8 (even lo / hi, odd lo / hi per block, 256 bytes,
// Kp * 32 bytes per tile: in L2) and then serve every group of kMaxRows activation rows from there.
template <bool ODD>
ASQPOST_AVX512 void decode_tile_avx512(const Args& a, int64_t t, int8_t* decoded) {
  const __m512i table_even = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.lut_even)));
  const __m512i table_odd = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.lut_odd)));
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const uint8_t* wt = a.tile(t);
  for (int64_t b = 0; b < a.blocks(); ++b) {
    const __m512i v = _mm512_loadu_si512(wt + b * 64);
    const __m512i lo = _mm512_and_si512(v, nibble);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
    _mm512_storeu_si512(decoded + 256 * b, _mm512_shuffle_epi8(table_even, lo));
    _mm512_storeu_si512(decoded + 256 * b + 64, _mm512_shuffle_epi8(table_even, hi));
    if (ODD) {
      _mm512_storeu_si512(decoded + 256 * b + 128, _mm512_shuffle_epi8(table_odd, lo));
      _mm512_storeu_si512(decoded + 256 * b + 192, _mm512_shuffle_epi8(table_odd, hi));
    }
  }
}

template <int MR, bool ODD>
ASQPOST_AVX512 void rows_decoded_avx512(const Args& a, int64_t m0, int64_t t, const int8_t* decoded) {
  __m512i acc_e[MR], acc_o[MR];
  for (int i = 0; i < MR; ++i) acc_e[i] = acc_o[i] = _mm512_setzero_si512();
  const uint8_t* xr = a.x + m0 * a.Kp;
  for (int64_t b = 0; b < a.blocks(); ++b) {
    const int8_t* d = decoded + 256 * b;
    const __m512i e_lo = _mm512_loadu_si512(d), e_hi = _mm512_loadu_si512(d + 64);
    const __m512i o_lo = ODD ? _mm512_loadu_si512(d + 128) : e_lo, o_hi = ODD ? _mm512_loadu_si512(d + 192) : e_hi;
    for (int i = 0; i < MR; ++i) {
      const __m512i x_lo = _mm512_set1_epi32(load_i32(xr + i * a.Kp + b * kGroup));
      const __m512i x_hi = _mm512_set1_epi32(load_i32(xr + i * a.Kp + b * kGroup + 4));
      acc_e[i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc_e[i], x_lo, e_lo), x_hi, e_hi);
      if (ODD) acc_o[i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc_o[i], x_lo, o_lo), x_hi, o_hi);
    }
  }
  const int64_t n = t * kTile;
  const __mmask16 lanes = a.N - n >= kTile ? 0xFFFF : static_cast<__mmask16>((1u << (a.N - n)) - 1);
  for (int i = 0; i < MR; ++i) {
    _mm512_mask_storeu_epi32(a.out_even + (m0 + i) * a.N + n, lanes, acc_e[i]);
    if (ODD) _mm512_mask_storeu_epi32(a.out_odd + (m0 + i) * a.N + n, lanes, acc_o[i]);
  }
}

template <bool ODD>
ASQPOST_AVX512 void tiles_avx512_rows(const Args& a, int64_t t0, int64_t t1) {
  if (a.M < kMaxRows) {  // few rows: decode on the fly; for one row four tiles at once (four memory streams)
    int64_t t = t0;
    if (a.M == 1)
      for (; t + 4 <= t1; t += 4) tile_avx512<1, 4, ODD>(a, 0, t);
    for (; t < t1; ++t) {
      switch (a.M) {
        case 1: tile_avx512<1, 1, ODD>(a, 0, t); break;
        case 2: tile_avx512<2, 1, ODD>(a, 0, t); break;
        case 3: tile_avx512<3, 1, ODD>(a, 0, t); break;
        case 4: tile_avx512<4, 1, ODD>(a, 0, t); break;
        case 5: tile_avx512<5, 1, ODD>(a, 0, t); break;
        case 6: tile_avx512<6, 1, ODD>(a, 0, t); break;
        default: tile_avx512<7, 1, ODD>(a, 0, t); break;
      }
    }
    return;
  }
  std::vector<int8_t> decoded(static_cast<size_t>(256 * a.blocks()));
  for (int64_t t = t0; t < t1; ++t) {
    decode_tile_avx512<ODD>(a, t, decoded.data());
    int64_t m = 0;
    for (; m + kMaxRows <= a.M; m += kMaxRows) rows_decoded_avx512<kMaxRows, ODD>(a, m, t, decoded.data());
    switch (a.M - m) {
      case 1: rows_decoded_avx512<1, ODD>(a, m, t, decoded.data()); break;
      case 2: rows_decoded_avx512<2, ODD>(a, m, t, decoded.data()); break;
      case 3: rows_decoded_avx512<3, ODD>(a, m, t, decoded.data()); break;
      case 4: rows_decoded_avx512<4, ODD>(a, m, t, decoded.data()); break;
      case 5: rows_decoded_avx512<5, ODD>(a, m, t, decoded.data()); break;
      case 6: rows_decoded_avx512<6, ODD>(a, m, t, decoded.data()); break;
      case 7: rows_decoded_avx512<7, ODD>(a, m, t, decoded.data()); break;
      default: break;
    }
  }
}

void tiles_avx512_vnni(const Args& a, int64_t t0, int64_t t1) {
  if (a.has_odd)
    tiles_avx512_rows<true>(a, t0, t1);
  else
    tiles_avx512_rows<false>(a, t0, t1);
}

// AVX2 without VNNI: vpmaddubsw (u8 x s8 -> saturating int16 pairs) then vpmaddwd. Python only picks this path
// when 2 * 255 * max|lut| <= 32767, so the int16 pairs cannot saturate. A 64-byte block is two halves of 8 rows.
ASQPOST_AVX2 static inline __m256i dot_u8s8(__m256i acc, __m256i x, __m256i w) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), _mm256_set1_epi16(1)));
}

template <int MR>
ASQPOST_AVX2 void half_tile_avx2(const Args& a, int64_t m0, int64_t t, int half) {
  const __m128i te = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.lut_even));
  const __m128i to = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.lut_odd));
  const __m256i table_even = _mm256_set_m128i(te, te);
  const __m256i table_odd = _mm256_set_m128i(to, to);
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  __m256i acc_e[MR], acc_o[MR];
  for (int i = 0; i < MR; ++i) acc_e[i] = acc_o[i] = _mm256_setzero_si256();
  const uint8_t* wt = a.tile(t) + half * 32;
  const uint8_t* xr = a.x + m0 * a.Kp;
  for (int64_t b = 0; b < a.blocks(); ++b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + b * 64));
    const __m256i lo = _mm256_and_si256(v, nibble);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    const __m256i e_lo = _mm256_shuffle_epi8(table_even, lo), e_hi = _mm256_shuffle_epi8(table_even, hi);
    const __m256i o_lo = _mm256_shuffle_epi8(table_odd, lo), o_hi = _mm256_shuffle_epi8(table_odd, hi);
    for (int i = 0; i < MR; ++i) {
      const __m256i x_lo = _mm256_set1_epi32(load_i32(xr + i * a.Kp + b * kGroup));
      const __m256i x_hi = _mm256_set1_epi32(load_i32(xr + i * a.Kp + b * kGroup + 4));
      acc_e[i] = dot_u8s8(dot_u8s8(acc_e[i], x_lo, e_lo), x_hi, e_hi);
      if (a.has_odd) acc_o[i] = dot_u8s8(dot_u8s8(acc_o[i], x_lo, o_lo), x_hi, o_hi);
    }
  }
  const int64_t n = t * kTile + half * 8;
  const int64_t count = std::min<int64_t>(8, a.N - n);
  for (int i = 0; i < MR; ++i) {
    int32_t sums[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums), acc_e[i]);
    std::memcpy(a.out_even + (m0 + i) * a.N + n, sums, count * sizeof(int32_t));
    if (a.has_odd) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums), acc_o[i]);
      std::memcpy(a.out_odd + (m0 + i) * a.N + n, sums, count * sizeof(int32_t));
    }
  }
}

void tiles_avx2(const Args& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int half = 0; half < 2 && t * kTile + half * 8 < a.N; ++half) {
      int64_t m = 0;
      for (; m + 2 <= a.M; m += 2) half_tile_avx2<2>(a, m, t, half);
      if (m < a.M) half_tile_avx2<1>(a, m, t, half);
    }
  }
}

std::string best_path() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    return "avx512_vnni";
  if (__builtin_cpu_supports("avx2")) return "avx2";
  return "scalar";
}

}  // namespace

std::string capability() { return best_path(); }

// x: uint8 (M, Kp), Kp a multiple of 8; w: uint8 (ceil(N / 16), Kp * 8) in the tile layout; luts: int8 (16,).
// Returns int32 (acc_even, acc_odd), each (M, N).
std::vector<torch::Tensor> lut_linear(torch::Tensor x, torch::Tensor w, int64_t N, torch::Tensor lut_even,
                                      torch::Tensor lut_odd, bool has_odd, std::string path) {
  TORCH_CHECK(x.dtype() == torch::kUInt8 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous uint8 (M, Kp)");
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "w must be contiguous uint8 tiles");
  TORCH_CHECK(x.size(1) % kGroup == 0 && w.size(1) == x.size(1) * kTile / 2, "Kp must be a multiple of 8 matching w");
  TORCH_CHECK(N > 0 && w.size(0) == (N + kTile - 1) / kTile, "w must hold ceil(N / 16) tiles");
  TORCH_CHECK(lut_even.dtype() == torch::kInt8 && lut_even.numel() == 16 && lut_odd.dtype() == torch::kInt8 &&
                  lut_odd.numel() == 16,
              "luts must be int8 (16,)");
  if (path == "auto") path = best_path();
  TORCH_CHECK(path == "scalar" || path == best_path() || (path == "avx2" && best_path() == "avx512_vnni"),
              "path ", path, " is not supported on this CPU");
  const int64_t M = x.size(0), Kp = x.size(1);
  auto out_even = torch::empty({M, N}, torch::dtype(torch::kInt32));
  auto out_odd = has_odd ? torch::empty({M, N}, torch::dtype(torch::kInt32)) : torch::zeros({0}, torch::kInt32);
  if (M == 0) return {out_even, out_odd};
  Args a{x.data_ptr<uint8_t>(), M, Kp, N, w.data_ptr<uint8_t>(), lut_even.data_ptr<int8_t>(),
         lut_odd.data_ptr<int8_t>(), has_odd, out_even.data_ptr<int32_t>(),
         has_odd ? out_odd.data_ptr<int32_t>() : nullptr};
  auto run = path == "avx512_vnni" ? tiles_avx512_vnni : path == "avx2" ? tiles_avx2 : tiles_scalar;
  const int64_t tile_work = Kp * kTile * M;  // multiply-adds per tile
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, tile_work));
  at::parallel_for(0, w.size(0), grain, [&](int64_t t0, int64_t t1) { run(a, t0, t1); });
  return {out_even, out_odd};
}

// Activation codes of rows [m0, m1): code = clamp(round_half_even(x / step), qmin, qmax) in float32, as the
// reference computes it. A row holding a NaN or inf (after division) is flagged in bad[m].
void quantize_rows_scalar(const float* x, const float* step, bool per_row, int64_t K, int64_t Kp, int qmin, int qmax,
                          uint8_t* codes, char* bad, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float s = step[per_row ? m : 0];
    for (int64_t k = 0; k < K; ++k) {
      const float v = std::nearbyint(x[m * K + k] / s);
      if (!std::isfinite(v)) bad[m] = 1;
      codes[m * Kp + k] = std::isfinite(v) ? static_cast<uint8_t>(std::min<float>(std::max<float>(v, qmin), qmax)) : 0;
    }
  }
}

ASQPOST_AVX512 void quantize_rows_avx512(const float* x, const float* step, bool per_row, int64_t K, int64_t Kp,
                                         int qmin, int qmax, uint8_t* codes, char* bad, int64_t m0, int64_t m1) {
  const __m512 lo = _mm512_set1_ps(static_cast<float>(qmin)), hi = _mm512_set1_ps(static_cast<float>(qmax));
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t m = m0; m < m1; ++m) {
    const __m512 s = _mm512_set1_ps(step[per_row ? m : 0]);
    __mmask16 finite = 0xFFFF;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 lanes = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
      const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(lanes, x + m * K + k), s),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      finite &= _mm512_cmp_ps_mask(_mm512_sub_ps(q, q), zero, _CMP_EQ_OQ) | static_cast<__mmask16>(~lanes);
      const __m512i c = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(q, lo), hi));
      _mm512_mask_cvtepi32_storeu_epi8(codes + m * Kp + k, lanes, c);
    }
    if (finite != 0xFFFF) bad[m] = 1;
  }
}

// y[m, n] = (acc_even + acc_odd * SQRT1_2) * col_scale[n] * step[m] + bias[n], in float64 then float32, each
// operation rounded on its own (the extension is built with -ffp-contract=off), as the reference does it.
void rescale_rows(const int32_t* ae, const int32_t* ao, const double* col_scale, const double* bias,
                  const float* step, bool per_row, const char* bad, int64_t N, float* y, int64_t m0, int64_t m1) {
  const double kSqrt1_2 = 0.70710678118654757;  // == math.sqrt(0.5)
  for (int64_t m = m0; m < m1; ++m) {
    float* yr = y + m * N;
    if (bad[m]) {
      std::fill(yr, yr + N, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    const double s = static_cast<double>(step[per_row ? m : 0]);
    const int32_t* er = ae + m * N;
    const int32_t* odd = ao ? ao + m * N : nullptr;
    for (int64_t n = 0; n < N; ++n) {
      double acc = static_cast<double>(er[n]);
      if (odd) acc = acc + static_cast<double>(odd[n]) * kSqrt1_2;
      double v = acc * col_scale[n] * s;
      if (bias) v = v + bias[n];
      yr[n] = static_cast<float>(v);
    }
  }
}

// The whole packed linear layer in one call, same maths and float64 operation order as the Python reference:
//   x_int = clamp(round(x / step[m]), qmin, qmax)              (float32 division, round half to even)
//   y[m, n] = (acc_even + acc_odd * SQRT1_2) * col_scale[n] * step[m] + bias[n]   (float64, then float32)
// x: float32 (M, K); w: as lut_linear's; step: float32, one value or one per row; col_scale = scale * unit:
// float64 (N,); bias: float64 (N,) or empty. A row with a NaN or inf input gives NaN outputs, as the reference.
torch::Tensor lut_linear_forward(torch::Tensor x, torch::Tensor step, int64_t qmin, int64_t qmax, torch::Tensor w,
                                 torch::Tensor lut_even, torch::Tensor lut_odd, bool has_odd, torch::Tensor col_scale,
                                 torch::Tensor bias, std::string path) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  TORCH_CHECK(step.dtype() == torch::kFloat32 && step.is_contiguous() && (step.numel() == 1 || step.numel() == x.size(0)),
              "step must be float32 with one value or one per row");
  TORCH_CHECK(col_scale.dtype() == torch::kFloat64 && col_scale.dim() == 1, "col_scale must be float64 (N,)");
  TORCH_CHECK(bias.dtype() == torch::kFloat64 && (bias.numel() == 0 || bias.numel() == col_scale.numel()),
              "bias must be float64 (N,) or empty");
  TORCH_CHECK(qmin >= 0 && qmax <= 255 && qmin <= qmax, "activation codes must fit uint8");
  const int64_t M = x.size(0), K = x.size(1), Kp = w.size(1) / (kTile / 2), N = col_scale.numel();
  TORCH_CHECK(K <= Kp, "x has more features than the weight");
  const bool per_row = step.numel() != 1;
  auto x_u8 = torch::empty({M, Kp}, torch::dtype(torch::kUInt8));
  if (Kp > K) x_u8.narrow(1, K, Kp - K).zero_();
  std::vector<char> bad(M, 0);
  const float* sp = step.data_ptr<float>();
  auto quantize = best_path() == "avx512_vnni" ? quantize_rows_avx512 : quantize_rows_scalar;
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K)), [&](int64_t m0, int64_t m1) {
    quantize(x.data_ptr<float>(), sp, per_row, K, Kp, static_cast<int>(qmin), static_cast<int>(qmax),
             x_u8.data_ptr<uint8_t>(), bad.data(), m0, m1);
  });
  auto accs = lut_linear(x_u8, w, N, lut_even, lut_odd, has_odd, path);
  auto y = torch::empty({M, N}, torch::dtype(torch::kFloat32));
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N)), [&](int64_t m0, int64_t m1) {
    rescale_rows(accs[0].data_ptr<int32_t>(), has_odd ? accs[1].data_ptr<int32_t>() : nullptr,
                 col_scale.data_ptr<double>(), bias.numel() ? bias.data_ptr<double>() : nullptr, sp, per_row,
                 bad.data(), N, y.data_ptr<float>(), m0, m1);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lut_linear", &lut_linear, "u8 x 4-bit LUT codes -> exact int32 even/odd accumulators");
  m.def("lut_linear_forward", &lut_linear_forward, "a packed linear layer: quantize, LUT accumulate, rescale");
  m.def("capability", &capability, "the fastest kernel path this CPU supports");
}
