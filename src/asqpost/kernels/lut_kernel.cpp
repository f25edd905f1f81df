// asqpost LUT kernel: u8 activations x 4-bit weight codes decoded through two 16-entry int8 tables.
//
// acc_even[m, n] = sum_k x[m, k] * lut_even[code[n, k]]     (exact int32)
// acc_odd[m, n]  = sum_k x[m, k] * lut_odd[code[n, k]]      (POST's odd powers of sqrt 2)
//
// Weight layout (made by asqpost.kernels.native.prepare): row n is Kp / 2 bytes, Kp a multiple of 128. In each
// 64-byte block b, byte j holds code[128 b + j] in its low nibble and code[128 b + 64 + j] in its high nibble,
// so the low nibbles of a 64-byte load line up with x[128 b .. 128 b + 63] and the high ones with the next 64.
// The tables sit in one register; vpshufb decodes 64 codes per instruction. The path (AVX-512 VNNI, AVX2,
// scalar) is chosen at run time from the CPU, not at build time.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

namespace {

constexpr int64_t kBlock = 128;  // codes per 64-byte block
constexpr int kRows = 4;         // activation rows sharing one decoded weight block

struct Args {
  const uint8_t* x;
  int64_t M, Kp, N;
  const uint8_t* w;
  const int8_t* lut_even;
  const int8_t* lut_odd;
  bool has_odd;
  int32_t* out_even;
  int32_t* out_odd;
};

void rows_scalar(const Args& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = a.w + n * (a.Kp / 2);
    for (int64_t m = 0; m < a.M; ++m) {
      const uint8_t* xr = a.x + m * a.Kp;
      int64_t se = 0, so = 0;
      for (int64_t b = 0; b < a.Kp / kBlock; ++b) {
        for (int j = 0; j < 64; ++j) {
          uint8_t byte = wr[b * 64 + j];
          int lo = byte & 15, hi = byte >> 4;
          int32_t xl = xr[b * kBlock + j], xh = xr[b * kBlock + 64 + j];
          se += xl * a.lut_even[lo] + xh * a.lut_even[hi];
          so += xl * a.lut_odd[lo] + xh * a.lut_odd[hi];
        }
      }
      a.out_even[m * a.N + n] = static_cast<int32_t>(se);
      if (a.has_odd) a.out_odd[m * a.N + n] = static_cast<int32_t>(so);
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) void rows_avx512_vnni(const Args& a, int64_t n0, int64_t n1) {
  const __m512i table_even = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.lut_even)));
  const __m512i table_odd = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.lut_odd)));
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const int64_t blocks = a.Kp / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = a.w + n * (a.Kp / 2);
    for (int64_t m0 = 0; m0 < a.M; m0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, a.M - m0));
      // two accumulators per sum (low / high nibbles) keep the dpbusd dependency chains short
      __m512i acc_e[kRows], acc_e2[kRows], acc_o[kRows], acc_o2[kRows];
      for (int i = 0; i < kRows; ++i) acc_e[i] = acc_e2[i] = acc_o[i] = acc_o2[i] = _mm512_setzero_si512();
      for (int64_t b = 0; b < blocks; ++b) {
        const __m512i v = _mm512_loadu_si512(wr + b * 64);
        const __m512i lo = _mm512_and_si512(v, nibble);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        const __m512i we_lo = _mm512_shuffle_epi8(table_even, lo);
        const __m512i we_hi = _mm512_shuffle_epi8(table_even, hi);
        for (int i = 0; i < rows; ++i) {
          const uint8_t* xr = a.x + (m0 + i) * a.Kp + b * kBlock;
          const __m512i x_lo = _mm512_loadu_si512(xr);
          const __m512i x_hi = _mm512_loadu_si512(xr + 64);
          acc_e[i] = _mm512_dpbusd_epi32(acc_e[i], x_lo, we_lo);
          acc_e2[i] = _mm512_dpbusd_epi32(acc_e2[i], x_hi, we_hi);
        }
        if (a.has_odd) {
          const __m512i wo_lo = _mm512_shuffle_epi8(table_odd, lo);
          const __m512i wo_hi = _mm512_shuffle_epi8(table_odd, hi);
          for (int i = 0; i < rows; ++i) {
            const uint8_t* xr = a.x + (m0 + i) * a.Kp + b * kBlock;
            const __m512i x_lo = _mm512_loadu_si512(xr);
            const __m512i x_hi = _mm512_loadu_si512(xr + 64);
            acc_o[i] = _mm512_dpbusd_epi32(acc_o[i], x_lo, wo_lo);
            acc_o2[i] = _mm512_dpbusd_epi32(acc_o2[i], x_hi, wo_hi);
          }
        }
      }
      for (int i = 0; i < rows; ++i) {
        a.out_even[(m0 + i) * a.N + n] = _mm512_reduce_add_epi32(_mm512_add_epi32(acc_e[i], acc_e2[i]));
        if (a.has_odd) a.out_odd[(m0 + i) * a.N + n] = _mm512_reduce_add_epi32(_mm512_add_epi32(acc_o[i], acc_o2[i]));
      }
    }
  }
}

// AVX2 without VNNI: vpmaddubsw (u8 x s8 -> saturating int16 pairs) then vpmaddwd. Python only picks this path
// when 2 * 255 * max|lut| <= 32767, so the int16 pairs cannot saturate.
__attribute__((target("avx2,fma"))) static inline __m256i dot_u8s8(__m256i acc, __m256i x, __m256i w) {
  const __m256i ones = _mm256_set1_epi16(1);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), ones));
}

__attribute__((target("avx2,fma"))) static inline int32_t hsum256(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

__attribute__((target("avx2,fma"))) void rows_avx2(const Args& a, int64_t n0, int64_t n1) {
  const __m128i te = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.lut_even));
  const __m128i to = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.lut_odd));
  const __m256i table_even = _mm256_set_m128i(te, te);
  const __m256i table_odd = _mm256_set_m128i(to, to);
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const int64_t blocks = a.Kp / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = a.w + n * (a.Kp / 2);
    for (int64_t m0 = 0; m0 < a.M; m0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, a.M - m0));
      __m256i acc_e[kRows], acc_o[kRows];
      for (int i = 0; i < kRows; ++i) acc_e[i] = acc_o[i] = _mm256_setzero_si256();
      for (int64_t b = 0; b < blocks; ++b) {
        for (int half = 0; half < 2; ++half) {  // bytes 0..31 then 32..63 of the 64-byte block
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * 64 + half * 32));
          const __m256i lo = _mm256_and_si256(v, nibble);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
          const __m256i we_lo = _mm256_shuffle_epi8(table_even, lo);
          const __m256i we_hi = _mm256_shuffle_epi8(table_even, hi);
          const __m256i wo_lo = _mm256_shuffle_epi8(table_odd, lo);
          const __m256i wo_hi = _mm256_shuffle_epi8(table_odd, hi);
          for (int i = 0; i < rows; ++i) {
            const uint8_t* xr = a.x + (m0 + i) * a.Kp + b * kBlock + half * 32;
            const __m256i x_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr));
            const __m256i x_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 64));
            acc_e[i] = dot_u8s8(dot_u8s8(acc_e[i], x_lo, we_lo), x_hi, we_hi);
            if (a.has_odd) acc_o[i] = dot_u8s8(dot_u8s8(acc_o[i], x_lo, wo_lo), x_hi, wo_hi);
          }
        }
      }
      for (int i = 0; i < rows; ++i) {
        a.out_even[(m0 + i) * a.N + n] = hsum256(acc_e[i]);
        if (a.has_odd) a.out_odd[(m0 + i) * a.N + n] = hsum256(acc_o[i]);
      }
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

// x: uint8 (M, Kp); w: uint8 (N, Kp / 2); luts: int8 (16,). Returns int32 (acc_even, acc_odd), each (M, N).
std::vector<torch::Tensor> lut_linear(torch::Tensor x, torch::Tensor w, torch::Tensor lut_even, torch::Tensor lut_odd,
                                      bool has_odd, std::string path) {
  TORCH_CHECK(x.dtype() == torch::kUInt8 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous uint8 (M, Kp)");
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "w must be contiguous uint8 (N, Kp/2)");
  TORCH_CHECK(x.size(1) % kBlock == 0 && w.size(1) * 2 == x.size(1), "Kp must be a multiple of 128 matching w");
  TORCH_CHECK(lut_even.dtype() == torch::kInt8 && lut_even.numel() == 16 && lut_odd.dtype() == torch::kInt8 &&
                  lut_odd.numel() == 16,
              "luts must be int8 (16,)");
  if (path == "auto") path = best_path();
  TORCH_CHECK(path == "scalar" || path == best_path() || (path == "avx2" && best_path() == "avx512_vnni"),
              "path ", path, " is not supported on this CPU");
  const int64_t M = x.size(0), Kp = x.size(1), N = w.size(0);
  auto out_even = torch::empty({M, N}, torch::dtype(torch::kInt32));
  auto out_odd = has_odd ? torch::empty({M, N}, torch::dtype(torch::kInt32)) : torch::zeros({0}, torch::kInt32);
  Args a{x.data_ptr<uint8_t>(), M, Kp, N, w.data_ptr<uint8_t>(), lut_even.data_ptr<int8_t>(),
         lut_odd.data_ptr<int8_t>(), has_odd, out_even.data_ptr<int32_t>(),
         has_odd ? out_odd.data_ptr<int32_t>() : nullptr};
  auto run = path == "avx512_vnni" ? rows_avx512_vnni : path == "avx2" ? rows_avx2 : rows_scalar;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, Kp / 8));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { run(a, n0, n1); });
  return {out_even, out_odd};
}

// The whole packed linear layer in one call, same maths and float64 operation order as the Python reference:
//   x_int = clamp(round(x / step[m]), qmin, qmax)              (float32 division, round half to even)
//   y[m, n] = (acc_even + acc_odd * SQRT1_2) * col_scale[n] * step[m] + bias[n]   (float64, then float32)
// x: float32 (M, K); step: float32 (M,); col_scale = scale * unit: float64 (N,); bias: float64 (N,) or empty.
// A row with a NaN or inf input gives NaN outputs, as the reference does.
torch::Tensor lut_linear_forward(torch::Tensor x, torch::Tensor step, int64_t qmin, int64_t qmax, torch::Tensor w,
                                 torch::Tensor lut_even, torch::Tensor lut_odd, bool has_odd, torch::Tensor col_scale,
                                 torch::Tensor bias, std::string path) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  TORCH_CHECK(step.dtype() == torch::kFloat32 && step.numel() == x.size(0), "step must be float32 (M,)");
  TORCH_CHECK(col_scale.dtype() == torch::kFloat64 && col_scale.numel() == w.size(0), "col_scale must be float64 (N,)");
  TORCH_CHECK(qmin >= 0 && qmax <= 255 && qmin <= qmax, "activation codes must fit uint8");
  const int64_t M = x.size(0), K = x.size(1), Kp = w.size(1) * 2, N = w.size(0);
  TORCH_CHECK(K <= Kp, "x has more features than the weight");
  auto x_u8 = torch::zeros({M, Kp}, torch::dtype(torch::kUInt8));
  std::vector<char> bad(M, 0);
  const float* xp = x.data_ptr<float>();
  const float* sp = step.data_ptr<float>();
  uint8_t* up = x_u8.data_ptr<uint8_t>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float s = sp[m];
      for (int64_t k = 0; k < K; ++k) {
        const float v = std::nearbyint(xp[m * K + k] / s);
        if (!std::isfinite(v)) {
          bad[m] = 1;
          continue;
        }
        up[m * Kp + k] = static_cast<uint8_t>(std::min<float>(std::max<float>(v, qmin), qmax));
      }
    }
  });
  auto accs = lut_linear(x_u8, w, lut_even, lut_odd, has_odd, path);
  const int32_t* ae = accs[0].data_ptr<int32_t>();
  const int32_t* ao = has_odd ? accs[1].data_ptr<int32_t>() : nullptr;
  const double* cs = col_scale.data_ptr<double>();
  const double* bp = bias.numel() ? bias.data_ptr<double>() : nullptr;
  auto y = torch::empty({M, N}, torch::dtype(torch::kFloat32));
  float* yp = y.data_ptr<float>();
  const double kSqrt1_2 = 0.70710678118654757;  // == math.sqrt(0.5)
  for (int64_t m = 0; m < M; ++m) {
    const double s = static_cast<double>(sp[m]);
    for (int64_t n = 0; n < N; ++n) {
      double acc = static_cast<double>(ae[m * N + n]);
      if (ao) acc = acc + static_cast<double>(ao[m * N + n]) * kSqrt1_2;
      double v = acc * cs[n] * s;
      if (bp) v = v + bp[n];
      yp[m * N + n] = bad[m] ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(v);
    }
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lut_linear", &lut_linear, "u8 x 4-bit LUT codes -> exact int32 even/odd accumulators");
  m.def("lut_linear_forward", &lut_linear_forward, "a packed linear layer: quantize, LUT accumulate, rescale");
  m.def("capability", &capability, "the fastest kernel path this CPU supports");
}
