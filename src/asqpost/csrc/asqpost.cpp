// asqpost's C++ extension: the packed LUT kernels and, at the end, the fused fake-quant op of training.
//
// The LUT kernel: u8 activations x 4-bit weight codes decoded through two 16-entry int8 tables.
//
// acc_even[m, n] = sum_k x[m, k] * lut_even[code[n, k]]     (exact int32)
// acc_odd[m, n]  = sum_k x[m, k] * lut_odd[code[n, k]]      (POST's odd powers of sqrt 2)
//
// Weight layout (made by asqpost.kernels.native.kernel_weights): rows are grouped in tiles of 16 (N padded), K is
// padded to a multiple of 8. Tile t is Kp / 8 blocks of 64 bytes; in block b, byte 4 r + i holds
// code[16 t + r, 8 b + i] in its low nibble and code[16 t + r, 8 b + 4 + i] in its high nibble (r < 16, i < 4).
// So one decoded 64-byte vector is 16 rows x 4 k: VNNI's vpdpbusd against x[m, 8b .. 8b+3] broadcast to every
// lane adds each row's 4 products into that row's own int32 lane. No horizontal sums are needed, a tile's 16
// outputs are stored at once, and one decoded tile serves any number of activation rows (batched inputs).
//
// Direct int8 weights (8-bit codes whose levels are int8 integers, e.g. LSQ's 8-bit grid): no table, the weights
// themselves in the decoded form of a block (128 bytes per 8 k of a tile: byte 4 r + i holds w[16 t + r, 8 b + i],
// byte 64 + 4 r + i holds w[16 t + r, 8 b + 4 + i]); made by asqpost.kernels.native.direct_weights.
//
// Signed activation codes (LSQ / ASQ on a signed input, codes in [-2^(b-1), 2^(b-1) - 1]) enter the u8 operand
// offset by o = -qmin: sum_k (x_k + o) w_k = sum_k x_k w_k + o * sum_k w_k, so each output's o * sum_k w_k
// (precomputed per row of the weight, for each of the two tables) is subtracted from its int32 sum before it is
// stored or rescaled. Every step stays an exact integer: the result is the reference's, bit for bit.
//
// Activations are reached through row pointers, one per (row, tap): k = tap * Cp + c reads rows[m][tap][c]. A
// linear layer has one tap (the row itself); a convolution reads NHWC codes, one tap per kernel position, with
// padding taps pointing at a zero row (indirect convolution: no im2col copy).
// The path (AVX-512 VNNI, AVX2, scalar) is chosen at run time from the CPU, not at build time. The x86 paths are
// built only for x86 with GCC or Clang (target attributes, __builtin_cpu_supports); elsewhere (aarch64, ...) the
// scalar path is the whole kernel.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if (defined(__x86_64__) || defined(_M_X64) || defined(__i386__)) && defined(__GNUC__)
#define ASQPOST_X86 1
#include <immintrin.h>
#else
#define ASQPOST_X86 0
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace {

constexpr int64_t kTile = 16;   // weight rows per tile: one int32 lane each
constexpr int64_t kGroup = 8;   // k values per 64-byte block: 4 in the low nibbles, 4 in the high ones
constexpr int kMaxRows = 8;     // activation rows sharing one decoded block in registers
constexpr int64_t kRowBlock = 512;  // rows per parallel work unit of a batched product
constexpr int64_t kMinWork = int64_t{1} << 17;  // products per thread, at least

// Bytes per 8 k of a tile once decoded to int8: even lo / hi, plus odd lo / hi when the grid has odd levels. Direct
// int8 weights are stored in the even-only form.
constexpr int64_t decoded_bytes(bool odd) { return odd ? 256 : 128; }

constexpr double kSqrt1_2 = 0.70710678118654757;  // == math.sqrt(0.5)

// Optional fused rescale: y[m, n] = (acc_even + acc_odd * SQRT1_2) * col_scale[n] * step[m / rows_per_step] +
// bias[n], in float64 then float32, each operation rounded on its own (no FMA: built with -ffp-contract=off),
// exactly as the Python reference computes it.
struct Rescale {
  float* y = nullptr;  // (M, N); nullptr: store the int32 sums instead
  const double* col_scale = nullptr;
  const double* bias = nullptr;       // or nullptr
  const double* row_step = nullptr;   // (M,) step of each row, or nullptr: step0 for all
  double step0 = 1.0;

  double step(int64_t m) const { return row_step ? row_step[m] : step0; }
};

struct Args {
  const uint8_t* x;          // activation codes
  const int64_t* offsets;    // (M, taps) byte offsets into x of each row's Cp codes per tap; nullptr: row m at m * Kp
  int64_t M, taps, Cp, N;
  const uint8_t* w;
  const int8_t* lut_even;
  const int8_t* lut_odd;
  bool has_odd;
  bool direct;        // w holds int8 weights in decoded form (no tables, no odd levels)
  int32_t* out_even;  // (M, N) when not rescaling
  int32_t* out_odd;
  const int32_t* correction_even;  // (N,) offset * sum_k lut_even[code[n, k]] to subtract, or nullptr (no offset)
  const int32_t* correction_odd;   // the same for the odd table, or nullptr
  Rescale rescale;

  int64_t Kp() const { return taps * Cp; }
  int64_t blocks() const { return Kp() / kGroup; }
  const uint8_t* tile(int64_t t) const { return w + t * blocks() * (direct ? decoded_bytes(false) : 64); }
  const uint8_t* row(int64_t m, int64_t tap) const { return x + (offsets ? offsets[m * taps + tap] : m * Kp()); }
};

// The fields of asqpost.kernels.native.NativePlan, passed as typed arguments and checked once per call (make_plan).
struct Plan {
  torch::Tensor weights;    // uint8 (ceil(n / 16), Kp * 8): the tile layout above; direct: int8 (.., Kp * 16)
  torch::Tensor lut_even;   // int8 (16,)
  torch::Tensor lut_odd;    // int8 (16,)
  bool has_odd;
  int64_t n;                // output features
  torch::Tensor col_scale;  // float64 (n,): scale * unit
  torch::Tensor bias;       // float64 (n,) or empty
  std::string path;         // the path requested ("auto" or one of available_paths())
  int64_t offset;           // added to every activation code to make it unsigned (0: unsigned input)
  torch::Tensor correction_even;  // int32 (n,): offset * sum_k lut_even[code[n, k]]; empty when offset is 0
  torch::Tensor correction_odd;   // int32 (n,): the same for the odd table; empty when offset is 0 or no odd levels
  bool direct;                    // weights are int8 values in decoded form (the tables are unused)

  int64_t Kp() const { return direct ? weights.size(1) / kTile : weights.size(1) * 2 / kTile; }
};

// (even + odd * SQRT1_2) * scale * step + bias in float64, in the reference's order; odd / bias may be absent.
inline float rescale_value(double even, const double* odd, double scale, double step, const double* bias) {
  double acc = even;
  if (odd) acc = acc + *odd * kSqrt1_2;
  double v = acc * scale * step;
  if (bias) v = v + *bias;
  return static_cast<float>(v);
}

void rescale_row_scalar(const int32_t* ae, const int32_t* ao, const double* cs, const double* bias, double s,
                        int64_t N, float* y) {
  for (int64_t n = 0; n < N; ++n) {
    const double odd = ao ? static_cast<double>(ao[n]) : 0.0;
    y[n] = rescale_value(static_cast<double>(ae[n]), ao ? &odd : nullptr, cs[n], s, bias ? bias + n : nullptr);
  }
}

// count (<= kTile) sums of row m starting at column n, less the offset's correction: stored as int32, or
// rescaled into y.
void store_sums(const Args& a, int64_t m, int64_t n, const int32_t* even, const int32_t* odd, int64_t count) {
  int32_t even_corrected[kTile], odd_corrected[kTile];
  if (a.correction_even) {
    for (int64_t i = 0; i < count; ++i) even_corrected[i] = even[i] - a.correction_even[n + i];
    even = even_corrected;
  }
  if (a.correction_odd) {
    for (int64_t i = 0; i < count; ++i) odd_corrected[i] = odd[i] - a.correction_odd[n + i];
    odd = odd_corrected;
  }
  const Rescale& r = a.rescale;
  if (r.y) {
    rescale_row_scalar(even, a.has_odd ? odd : nullptr, r.col_scale + n, r.bias ? r.bias + n : nullptr,
                       r.step(m), count, r.y + m * a.N + n);
    return;
  }
  std::memcpy(a.out_even + m * a.N + n, even, count * sizeof(int32_t));
  if (a.has_odd) std::memcpy(a.out_odd + m * a.N + n, odd, count * sizeof(int32_t));
}

inline int32_t load_i32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The walk over K that every path makes for MR activation rows from m0: tap by tap, that tap's Cp codes of each
// row in blocks of 8 (k = tap * Cp + c). Calls block(b, xr, c) with b the index of the weight block (of a tile)
// holding those 8 k, xr[i] row m0 + i's codes at this tap, and c the block's first channel. The walk is always
// inlined; a path's block (a lambda with the path's target attribute) cannot be forced inline into it (GCC:
// target mismatch) but is inlined once the walk sits in the path's function (no calls remain in the loops).
template <int MR, typename Block>
__attribute__((always_inline)) inline void for_each_block(const Args& a, int64_t m0, Block&& block) {
  int64_t b = 0;
  for (int64_t tap = 0; tap < a.taps; ++tap) {
    const uint8_t* xr[MR];
    for (int i = 0; i < MR; ++i) xr[i] = a.row(m0 + i, tap);
    for (int64_t c = 0; c < a.Cp; c += kGroup, ++b) block(b, xr, c);
  }
}

// rows [m0, m1) x tiles [t0, t1)
void scalar_block(const Args& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = a.tile(t);
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t r = 0; r < kTile && t * kTile + r < a.N; ++r) {
        int64_t se = 0, so = 0;
        for_each_block<1>(a, m, [&](int64_t b, const uint8_t* const* xr, int64_t c) {
          if (a.direct) {
            const int8_t* block = reinterpret_cast<const int8_t*>(wt) + b * decoded_bytes(false);
            for (int i = 0; i < 4; ++i) se += xr[0][c + i] * block[4 * r + i] + xr[0][c + 4 + i] * block[64 + 4 * r + i];
            return;
          }
          for (int i = 0; i < 4; ++i) {
            const uint8_t byte = wt[b * 64 + 4 * r + i];
            const int lo = byte & 15, hi = byte >> 4;
            const int32_t xl = xr[0][c + i], xh = xr[0][c + 4 + i];
            se += xl * a.lut_even[lo] + xh * a.lut_even[hi];
            so += xl * a.lut_odd[lo] + xh * a.lut_odd[hi];
          }
        });
        const int32_t even = static_cast<int32_t>(se), odd = static_cast<int32_t>(so);
        store_sums(a, m, t * kTile + r, &even, &odd, 1);
      }
    }
  }
}

#if ASQPOST_X86
#define ASQPOST_AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define ASQPOST_AVX2 __attribute__((target("avx2,fma")))

ASQPOST_AVX512 inline __mmask16 tile_lanes(const Args& a, int64_t t) {
  const int64_t left = a.N - t * kTile;
  return left >= kTile ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
}

// 8 lanes (one half of a tile) rescaled into y: the float64 steps of rescale_row_scalar, 8 at a time.
ASQPOST_AVX512 inline void rescale_half(const Args& a, int64_t m, int64_t n, __m256i even, __m256i odd, bool with_odd,
                                        __mmask8 lanes, __m512d step) {
  if (!lanes) return;
  const Rescale& r = a.rescale;
  __m512d acc = _mm512_cvtepi32_pd(even);
  if (with_odd) acc = _mm512_add_pd(acc, _mm512_mul_pd(_mm512_cvtepi32_pd(odd), _mm512_set1_pd(kSqrt1_2)));
  __m512d v = _mm512_mul_pd(_mm512_mul_pd(acc, _mm512_maskz_loadu_pd(lanes, r.col_scale + n)), step);
  if (r.bias) v = _mm512_add_pd(v, _mm512_maskz_loadu_pd(lanes, r.bias + n));
  _mm512_mask_storeu_ps(r.y + m * a.N + n, lanes, _mm512_castps256_ps512(_mm512_cvtpd_ps(v)));
}

// The 16 sums of tile t for row m: int32 stores, or the fused rescale.
template <bool ODD>
ASQPOST_AVX512 inline void store_tile(const Args& a, int64_t m, int64_t t, __m512i even, __m512i odd) {
  const __mmask16 lanes = tile_lanes(a, t);
  const int64_t n = t * kTile;
  if (a.correction_even) even = _mm512_sub_epi32(even, _mm512_maskz_loadu_epi32(lanes, a.correction_even + n));
  if (ODD && a.correction_odd) odd = _mm512_sub_epi32(odd, _mm512_maskz_loadu_epi32(lanes, a.correction_odd + n));
  if (!a.rescale.y) {
    _mm512_mask_storeu_epi32(a.out_even + m * a.N + n, lanes, even);
    if (ODD) _mm512_mask_storeu_epi32(a.out_odd + m * a.N + n, lanes, odd);
    return;
  }
  const __m512d step = _mm512_set1_pd(a.rescale.step(m));
  rescale_half(a, m, n, _mm512_castsi512_si256(even), _mm512_castsi512_si256(odd), ODD,
               static_cast<__mmask8>(lanes & 0xFF), step);
  rescale_half(a, m, n + 8, _mm512_extracti64x4_epi64(even, 1), _mm512_extracti64x4_epi64(odd, 1), ODD,
               static_cast<__mmask8>(lanes >> 8), step);
}

ASQPOST_AVX512 inline __m512i load_table(const int8_t* lut) {  // 16 entries, repeated in each 128-bit lane
  return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut)));
}

struct Decoded {
  __m512i e_lo, e_hi, o_lo, o_hi;  // 16 rows x 4 k each: even / odd table values of the low / high nibbles
};

// One 64-byte block of a tile through the two tables (the odd lookups only when the grid has odd levels).
template <bool ODD>
ASQPOST_AVX512 inline Decoded decode_block(const uint8_t* block, __m512i table_even, __m512i table_odd) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i v = _mm512_loadu_si512(block);
  const __m512i lo = _mm512_and_si512(v, nibble);
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
  Decoded d;
  d.e_lo = _mm512_shuffle_epi8(table_even, lo);
  d.e_hi = _mm512_shuffle_epi8(table_even, hi);
  d.o_lo = ODD ? _mm512_shuffle_epi8(table_odd, lo) : d.e_lo;
  d.o_hi = ODD ? _mm512_shuffle_epi8(table_odd, hi) : d.e_hi;
  return d;
}

// MR activation rows x NT tiles over the whole K, decoding on the fly: MR * NT * (1 + ODD) zmm sums.
template <int MR, int NT, bool ODD>
ASQPOST_AVX512 void tile_avx512(const Args& a, int64_t m0, int64_t t0) {
  const __m512i table_even = load_table(a.lut_even), table_odd = load_table(a.lut_odd);
  __m512i acc_e[MR][NT], acc_o[MR][NT];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NT; ++j) acc_e[i][j] = acc_o[i][j] = _mm512_setzero_si512();
  const uint8_t* wt[NT];
  for (int j = 0; j < NT; ++j) wt[j] = a.tile(t0 + j);
  for_each_block<MR>(a, m0, [&](int64_t b, const uint8_t* const* xr, int64_t c) ASQPOST_AVX512 {
    Decoded d[NT];
    for (int j = 0; j < NT; ++j) d[j] = decode_block<ODD>(wt[j] + b * 64, table_even, table_odd);
    for (int i = 0; i < MR; ++i) {
      const __m512i x_lo = _mm512_set1_epi32(load_i32(xr[i] + c));
      const __m512i x_hi = _mm512_set1_epi32(load_i32(xr[i] + c + 4));
      for (int j = 0; j < NT; ++j) {
        acc_e[i][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc_e[i][j], x_lo, d[j].e_lo), x_hi, d[j].e_hi);
        if (ODD)
          acc_o[i][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc_o[i][j], x_lo, d[j].o_lo), x_hi, d[j].o_hi);
      }
    }
  });
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MR; ++i) store_tile<ODD>(a, m0 + i, t0 + j, acc_e[i][j], acc_o[i][j]);
}

// Batched inputs: a tile is decoded once into int8 (even lo / hi, odd lo / hi: 256 bytes per block, Kp * 32
// bytes per tile, in L1 / L2) and then serves groups of kMaxRows activation rows from there.
template <bool ODD>
ASQPOST_AVX512 void decode_tile_avx512(const Args& a, int64_t t, int8_t* decoded) {
  const __m512i table_even = load_table(a.lut_even), table_odd = load_table(a.lut_odd);
  const uint8_t* wt = a.tile(t);
  for (int64_t b = 0; b < a.blocks(); ++b) {
    const Decoded d = decode_block<ODD>(wt + b * 64, table_even, table_odd);
    int8_t* out = decoded + decoded_bytes(ODD) * b;
    _mm512_storeu_si512(out, d.e_lo);
    _mm512_storeu_si512(out + 64, d.e_hi);
    if (ODD) {
      _mm512_storeu_si512(out + 128, d.o_lo);
      _mm512_storeu_si512(out + 192, d.o_hi);
    }
  }
}

// MR activation rows x NT decoded tiles (decoded[j]: tile t + j): MR * NT * (1 + ODD) zmm sums. Two tiles (the
// even-only grids: 16 sums) share each activation broadcast, halving the broadcasts per VNNI product.
template <int MR, int NT, bool ODD>
ASQPOST_AVX512 void rows_decoded_avx512(const Args& a, int64_t m0, int64_t t, const int8_t* const* decoded) {
  __m512i acc_e[MR][NT], acc_o[MR][NT];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NT; ++j) acc_e[i][j] = acc_o[i][j] = _mm512_setzero_si512();
  for_each_block<MR>(a, m0, [&](int64_t b, const uint8_t* const* xr, int64_t c) ASQPOST_AVX512 {
    __m512i e_lo[NT], e_hi[NT], o_lo[NT], o_hi[NT];
    for (int j = 0; j < NT; ++j) {
      const int8_t* d = decoded[j] + decoded_bytes(ODD) * b;
      e_lo[j] = _mm512_loadu_si512(d);
      e_hi[j] = _mm512_loadu_si512(d + 64);
      o_lo[j] = ODD ? _mm512_loadu_si512(d + 128) : e_lo[j];
      o_hi[j] = ODD ? _mm512_loadu_si512(d + 192) : e_hi[j];
    }
    for (int i = 0; i < MR; ++i) {
      const __m512i x_lo = _mm512_set1_epi32(load_i32(xr[i] + c));
      const __m512i x_hi = _mm512_set1_epi32(load_i32(xr[i] + c + 4));
      for (int j = 0; j < NT; ++j) {
        acc_e[i][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc_e[i][j], x_lo, e_lo[j]), x_hi, e_hi[j]);
        if (ODD) acc_o[i][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc_o[i][j], x_lo, o_lo[j]), x_hi, o_hi[j]);
      }
    }
  });
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MR; ++i) store_tile<ODD>(a, m0 + i, t + j, acc_e[i][j], acc_o[i][j]);
}

template <template <int, bool> class Op, bool ODD, typename... Ts>
ASQPOST_AVX512 void with_rows(int rows, Ts... args) {  // Op<rows, ODD>::run(args...) for rows in 1 .. kMaxRows
  switch (rows) {
    case 1: Op<1, ODD>::run(args...); break;
    case 2: Op<2, ODD>::run(args...); break;
    case 3: Op<3, ODD>::run(args...); break;
    case 4: Op<4, ODD>::run(args...); break;
    case 5: Op<5, ODD>::run(args...); break;
    case 6: Op<6, ODD>::run(args...); break;
    case 7: Op<7, ODD>::run(args...); break;
    default: Op<8, ODD>::run(args...); break;
  }
}

template <int MR, bool ODD>
struct OnTheFly {
  ASQPOST_AVX512 static void run(const Args& a, int64_t m0, int64_t t) { tile_avx512<MR, 1, ODD>(a, m0, t); }
};

template <int MR, bool ODD>
struct FromDecoded {
  ASQPOST_AVX512 static void run(const Args& a, int64_t m0, int64_t t, const int8_t* d) {
    rows_decoded_avx512<MR, 1, ODD>(a, m0, t, &d);
  }
};

template <int MR, bool ODD>
struct FromDecodedPair {  // tiles t and t + 1 (even-only grids)
  ASQPOST_AVX512 static void run(const Args& a, int64_t m0, int64_t t, const int8_t* d0, const int8_t* d1) {
    const int8_t* const d[2] = {d0, d1};
    rows_decoded_avx512<MR, 2, false>(a, m0, t, d);
  }
};

// Rows [m0, m1) against decoded tile t (and t + 1 when `next` is given: even-only grids), kMaxRows at a time.
template <bool ODD>
ASQPOST_AVX512 void rows_of_tiles(const Args& a, int64_t m0, int64_t m1, int64_t t, const int8_t* d,
                                  const int8_t* next) {
  for (int64_t m = m0; m < m1; m += kMaxRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, m1 - m));
    if (next)
      with_rows<FromDecodedPair, false>(rows, a, m, t, d, next);
    else
      with_rows<FromDecoded, ODD>(rows, a, m, t, d);
  }
}

// Direct int8 weights are already decoded: every row group reads them in place, two tiles at a time.
ASQPOST_AVX512 void direct_block_avx512(const Args& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; t += 2) {
    const int8_t* decoded = reinterpret_cast<const int8_t*>(a.tile(t));
    const int8_t* next = t + 1 < t1 ? reinterpret_cast<const int8_t*>(a.tile(t + 1)) : nullptr;
    rows_of_tiles<false>(a, m0, m1, t, decoded, next);
  }
}

template <bool ODD>
ASQPOST_AVX512 void block_avx512(const Args& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  if (m1 - m0 < kMaxRows) {  // few rows: decode on the fly; one row: four tiles at once, four memory streams
    int64_t t = t0;
    if (m1 - m0 == 1)
      for (; t + 4 <= t1; t += 4) tile_avx512<1, 4, ODD>(a, m0, t);
    for (; t < t1; ++t) with_rows<OnTheFly, ODD>(static_cast<int>(m1 - m0), a, m0, t);
    return;
  }
  // even-only grids: two tiles decoded at once, served together; with odd levels one (its sums fill the registers)
  const int64_t pair = ODD ? 1 : 2, tile_bytes = decoded_bytes(ODD) * a.blocks();
  std::vector<int8_t> decoded(static_cast<size_t>(pair * tile_bytes));
  for (int64_t t = t0; t < t1; t += pair) {
    const bool two = pair == 2 && t + 1 < t1;
    decode_tile_avx512<ODD>(a, t, decoded.data());
    if (two) decode_tile_avx512<ODD>(a, t + 1, decoded.data() + tile_bytes);
    rows_of_tiles<ODD>(a, m0, m1, t, decoded.data(), two ? decoded.data() + tile_bytes : nullptr);
  }
}

void avx512_block(const Args& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  if (a.direct)
    direct_block_avx512(a, m0, m1, t0, t1);
  else if (a.has_odd)
    block_avx512<true>(a, m0, m1, t0, t1);
  else
    block_avx512<false>(a, m0, m1, t0, t1);
}

// AVX2 without VNNI: vpmaddubsw (u8 x s8 -> saturating int16 pairs) then vpmaddwd. The int16 pairs cannot
// saturate while 2 * 255 * max|lut| <= 32767 (|lut| <= 64); a wider table is split into two that are
// (clamp(lut, -64, 64) and the rest, each within [-64, 64]), whose products add up exactly in int32.
// A 64-byte block is two halves of 8 rows.
ASQPOST_AVX2 static inline __m256i dot_u8s8(__m256i acc, __m256i x, __m256i w) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), _mm256_set1_epi16(1)));
}

// A 16-entry table in both 128-bit lanes, as it is (SPLIT false) or as its two narrow parts.
struct Avx2Table {
  __m256i first, rest;
};

template <bool SPLIT>
ASQPOST_AVX2 static inline Avx2Table avx2_table(const int8_t* lut) {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lut));
  const __m256i table = _mm256_set_m128i(t, t);
  if constexpr (!SPLIT) return {table, _mm256_setzero_si256()};
  const __m256i first = _mm256_min_epi8(_mm256_max_epi8(table, _mm256_set1_epi8(-64)), _mm256_set1_epi8(64));
  return {first, _mm256_sub_epi8(table, first)};
}

// acc + x_lo . table[lo] + x_hi . table[hi], each product through the table's parts when SPLIT.
template <bool SPLIT>
ASQPOST_AVX2 static inline __m256i dot_codes(__m256i acc, const Avx2Table& table, __m256i lo, __m256i hi,
                                             __m256i x_lo, __m256i x_hi) {
  acc = dot_u8s8(dot_u8s8(acc, x_lo, _mm256_shuffle_epi8(table.first, lo)), x_hi,
                 _mm256_shuffle_epi8(table.first, hi));
  if constexpr (SPLIT)
    acc = dot_u8s8(dot_u8s8(acc, x_lo, _mm256_shuffle_epi8(table.rest, lo)), x_hi,
                   _mm256_shuffle_epi8(table.rest, hi));
  return acc;
}

template <int MR, bool SPLIT>
ASQPOST_AVX2 void half_tile_avx2(const Args& a, int64_t m0, int64_t t, int half) {
  const Avx2Table table_even = avx2_table<SPLIT>(a.lut_even), table_odd = avx2_table<SPLIT>(a.lut_odd);
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  __m256i acc_e[MR], acc_o[MR];
  for (int i = 0; i < MR; ++i) acc_e[i] = acc_o[i] = _mm256_setzero_si256();
  const uint8_t* wt = a.tile(t) + half * 32;
  for_each_block<MR>(a, m0, [&](int64_t b, const uint8_t* const* xr, int64_t c) ASQPOST_AVX2 {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + b * 64));
    const __m256i lo = _mm256_and_si256(v, nibble);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    for (int i = 0; i < MR; ++i) {
      const __m256i x_lo = _mm256_set1_epi32(load_i32(xr[i] + c));
      const __m256i x_hi = _mm256_set1_epi32(load_i32(xr[i] + c + 4));
      acc_e[i] = dot_codes<SPLIT>(acc_e[i], table_even, lo, hi, x_lo, x_hi);
      if (a.has_odd) acc_o[i] = dot_codes<SPLIT>(acc_o[i], table_odd, lo, hi, x_lo, x_hi);
    }
  });
  const int64_t n = t * kTile + half * 8;
  const int64_t count = std::min<int64_t>(8, a.N - n);
  for (int i = 0; i < MR; ++i) {
    int32_t even[8], odd[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(even), acc_e[i]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(odd), acc_o[i]);
    store_sums(a, m0 + i, n, even, odd, count);
  }
}

// Direct int8 weights, already in the decoded block layout (8 rows x 4 k per half and k group), each split into
// clamp(w, -64, 64) and the rest so that no int16 pair can saturate.
template <int MR>
ASQPOST_AVX2 void direct_half_tile_avx2(const Args& a, int64_t m0, int64_t t, int half) {
  const __m256i low = _mm256_set1_epi8(-64), high = _mm256_set1_epi8(64);
  __m256i acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_si256();
  const int8_t* wt = reinterpret_cast<const int8_t*>(a.tile(t)) + half * 32;
  for_each_block<MR>(a, m0, [&](int64_t b, const uint8_t* const* xr, int64_t c) ASQPOST_AVX2 {
    const int8_t* block = wt + b * decoded_bytes(false);
    const __m256i w_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block));
    const __m256i w_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 64));
    const __m256i lo_first = _mm256_min_epi8(_mm256_max_epi8(w_lo, low), high);
    const __m256i hi_first = _mm256_min_epi8(_mm256_max_epi8(w_hi, low), high);
    const __m256i lo_rest = _mm256_sub_epi8(w_lo, lo_first), hi_rest = _mm256_sub_epi8(w_hi, hi_first);
    for (int i = 0; i < MR; ++i) {
      const __m256i x_lo = _mm256_set1_epi32(load_i32(xr[i] + c));
      const __m256i x_hi = _mm256_set1_epi32(load_i32(xr[i] + c + 4));
      acc[i] = dot_u8s8(dot_u8s8(acc[i], x_lo, lo_first), x_lo, lo_rest);
      acc[i] = dot_u8s8(dot_u8s8(acc[i], x_hi, hi_first), x_hi, hi_rest);
    }
  });
  const int64_t n = t * kTile + half * 8;
  const int64_t count = std::min<int64_t>(8, a.N - n);
  const int32_t none[8] = {};
  for (int i = 0; i < MR; ++i) {
    int32_t even[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(even), acc[i]);
    store_sums(a, m0 + i, n, even, none, count);
  }
}

// The half tiles of rows [m0, m1) x tiles [t0, t1), two rows at a time: tables as they are (SPLIT false), tables
// split in two, or direct int8 weights.
enum class Avx2Weights { kTable, kSplitTable, kDirect };

template <Avx2Weights W, int MR>
ASQPOST_AVX2 void avx2_half_tile(const Args& a, int64_t m0, int64_t t, int half) {
  if constexpr (W == Avx2Weights::kDirect)
    direct_half_tile_avx2<MR>(a, m0, t, half);
  else
    half_tile_avx2<MR, W == Avx2Weights::kSplitTable>(a, m0, t, half);
}

template <Avx2Weights W>
void avx2_tiles(const Args& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int half = 0; half < 2 && t * kTile + half * 8 < a.N; ++half) {
      int64_t m = m0;
      for (; m + 2 <= m1; m += 2) avx2_half_tile<W, 2>(a, m, t, half);
      if (m < m1) avx2_half_tile<W, 1>(a, m, t, half);
    }
  }
}

bool avx2_exact(const int8_t* lut_even, const int8_t* lut_odd);

void avx2_block(const Args& a, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  if (a.direct) return avx2_tiles<Avx2Weights::kDirect>(a, m0, m1, t0, t1);
  if (avx2_exact(a.lut_even, a.lut_odd)) return avx2_tiles<Avx2Weights::kTable>(a, m0, m1, t0, t1);
  avx2_tiles<Avx2Weights::kSplitTable>(a, m0, m1, t0, t1);
}
#endif  // ASQPOST_X86

std::vector<std::string> detect_paths() {
  std::vector<std::string> paths;
#if ASQPOST_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    paths.push_back("avx512_vnni");
  if (__builtin_cpu_supports("avx2")) paths.push_back("avx2");
#endif
  paths.push_back("scalar");
  return paths;
}

// The kernel paths this CPU runs, fastest first (decided once, from the CPU).
const std::vector<std::string>& available_paths() {
  static const std::vector<std::string> paths = detect_paths();
  return paths;
}

// AVX2 adds u8 x s8 products in int16 pairs (vpmaddubsw), which saturate once 2 * 255 * max|lut| > 32767: such
// tables run split in two (avx2_block).
bool avx2_exact(const int8_t* lut_even, const int8_t* lut_odd) {
  int biggest = 0;
  for (int i = 0; i < 16; ++i) biggest = std::max({biggest, std::abs(int{lut_even[i]}), std::abs(int{lut_odd[i]})});
  return 2 * 255 * biggest <= std::numeric_limits<int16_t>::max();
}

// The path a plan runs: the one it asks for ("auto": this CPU's fastest). Every path is exact for every plan
// (AVX2 splits wide tables and direct int8 weights in two narrow parts).
std::string kernel_path(const Plan& plan) { return plan.path == "auto" ? available_paths().front() : plan.path; }

// The plan's fields as typed arguments (the order of asqpost.kernels.native.NativePlan.kernel_args), checked once.
#define ASQPOST_PLAN_PARAMS                                                                            \
  torch::Tensor weights, torch::Tensor lut_even, torch::Tensor lut_odd, bool has_odd, int64_t n,       \
      torch::Tensor col_scale, torch::Tensor bias, std::string requested_path, int64_t offset,         \
      torch::Tensor correction_even, torch::Tensor correction_odd, bool direct
#define ASQPOST_PLAN_ARGS \
  weights, lut_even, lut_odd, has_odd, n, col_scale, bias, requested_path, offset, correction_even, correction_odd, direct
#define ASQPOST_PLAN_PYARGS                                                                                           \
  arg("weights"), arg("lut_even"), arg("lut_odd"), arg("has_odd"), arg("n"), arg("col_scale"), arg("bias"),        \
      arg("path"), arg("offset"), arg("correction_even"), arg("correction_odd"), arg("direct")

Plan make_plan(ASQPOST_PLAN_PARAMS) {
  Plan plan{weights,        lut_even, lut_odd,         has_odd,        n,     col_scale,
            bias,           requested_path, offset, correction_even, correction_odd, direct};
  const torch::Tensor& w = plan.weights;
  TORCH_CHECK(w.dtype() == (plan.direct ? torch::kInt8 : torch::kUInt8) && w.dim() == 2 && w.is_contiguous(),
              "weights must be contiguous tiles: uint8 codes, or int8 values when direct");
  TORCH_CHECK(plan.n > 0 && w.size(0) == (plan.n + kTile - 1) / kTile, "weights must hold ceil(n / 16) tiles");
  TORCH_CHECK(w.size(1) % (plan.direct ? decoded_bytes(false) : kGroup * kTile / 2) == 0,
              "weights must hold whole blocks (64 bytes of codes, 128 of direct int8 weights)");
  TORCH_CHECK(!(plan.direct && plan.has_odd), "direct int8 weights have no odd levels");
  for (const torch::Tensor* lut : {&plan.lut_even, &plan.lut_odd})
    TORCH_CHECK(lut->dtype() == torch::kInt8 && lut->numel() == 16 && lut->is_contiguous(), "luts must be int8 (16,)");
  TORCH_CHECK(plan.col_scale.dtype() == torch::kFloat64 && plan.col_scale.dim() == 1 &&
                  plan.col_scale.is_contiguous() && plan.col_scale.numel() == plan.n,
              "col_scale must be float64 (n,)");
  TORCH_CHECK(plan.bias.dtype() == torch::kFloat64 && plan.bias.is_contiguous() &&
                  (plan.bias.numel() == 0 || plan.bias.numel() == plan.n),
              "bias must be float64 (n,) or empty");
  TORCH_CHECK(plan.offset >= 0 && plan.offset <= 255, "offset must be in [0, 255]");
  const auto is_correction = [&](const torch::Tensor& c) {
    return c.dtype() == torch::kInt32 && c.dim() == 1 && c.is_contiguous() && c.numel() == plan.n;
  };
  TORCH_CHECK(plan.offset == 0 || is_correction(plan.correction_even), "correction_even must be int32 (n,)");
  TORCH_CHECK(plan.offset == 0 || !plan.has_odd || is_correction(plan.correction_odd),
              "correction_odd must be int32 (n,)");
  const std::vector<std::string>& paths = available_paths();
  TORCH_CHECK(plan.path == "auto" || std::find(paths.begin(), paths.end(), plan.path) != paths.end(), "path ",
              plan.path, " is not one this CPU runs (", c10::Join(", ", paths), ")");
  return plan;
}

// Runs the kernel over all rows and tiles of a (filled-in) Args, in parallel.
void run_kernel(const Args& a, const Plan& plan, const std::string& chosen) {
  TORCH_CHECK(a.Cp % kGroup == 0 && a.Kp() == plan.Kp(), "K must be a multiple of 8 matching the weights");
  if (a.M == 0) return;
#if ASQPOST_X86
  auto run = chosen == "avx512_vnni" ? avx512_block : chosen == "avx2" ? avx2_block : scalar_block;
#else
  auto run = scalar_block;
#endif
  // work units: (pair of tiles, block of kRowBlock rows), pair-major, split over torch's intra-op threads
  // (at::get_num_threads(), torch.set_num_threads); each thread gets at least kMinWork products, enough to pay
  // for waking it (a 384 x 384 layer at one row: two threads). A pair: the batched paths serve two tiles at once.
  const int64_t tiles = plan.weights.size(0), pairs = (tiles + 1) / 2, row_blocks = (a.M + kRowBlock - 1) / kRowBlock;
  const int64_t unit_work = std::min(a.M, kRowBlock) * a.Kp() * kTile * 2;
  const int64_t grain = std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, unit_work));
  at::parallel_for(0, pairs * row_blocks, grain, [&](int64_t u0, int64_t u1) {
    if (row_blocks == 1)  // whole tiles: hand the run of them to the kernel at once
      return run(a, 0, a.M, 2 * u0, std::min(tiles, 2 * u1));
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t p = u / row_blocks, rb = u % row_blocks;
      run(a, rb * kRowBlock, std::min(a.M, (rb + 1) * kRowBlock), 2 * p, std::min(tiles, 2 * p + 2));
    }
  });
}

Args make_args(const uint8_t* x, const int64_t* offsets, int64_t M, int64_t taps, int64_t Cp, const Plan& plan) {
  return Args{x,
              offsets,
              M,
              taps,
              Cp,
              plan.n,
              static_cast<const uint8_t*>(plan.weights.data_ptr()),
              plan.lut_even.data_ptr<int8_t>(),
              plan.lut_odd.data_ptr<int8_t>(),
              plan.has_odd,
              plan.direct,
              nullptr,
              nullptr,
              plan.offset ? plan.correction_even.data_ptr<int32_t>() : nullptr,
              plan.offset && plan.has_odd ? plan.correction_odd.data_ptr<int32_t>() : nullptr,
              Rescale{}};
}

// The fused rescale into y (M, N); row m uses step[m / rows_per_step] (kept in row_steps, float64).
Rescale make_rescale(torch::Tensor& y, const Plan& plan, const torch::Tensor& step, int64_t rows_per_step,
                     std::vector<double>& row_steps) {
  Rescale r{y.data_ptr<float>(), plan.col_scale.data_ptr<double>(),
            plan.bias.numel() ? plan.bias.data_ptr<double>() : nullptr};
  const float* sp = step.data_ptr<float>();
  if (step.numel() == 1) {
    r.step0 = static_cast<double>(sp[0]);
    return r;
  }
  row_steps.resize(y.size(0));
  for (int64_t i = 0; i < step.numel(); ++i)
    std::fill_n(row_steps.begin() + i * rows_per_step, rows_per_step, static_cast<double>(sp[i]));
  r.row_step = row_steps.data();
  return r;
}

// Activation codes of rows [m0, m1) of K values: code = clamp(round_half_even(x / step), qmin, qmax) in float32,
// as the reference computes it, plus offset (unsigned bytes); step index m / rows_per_step. A NaN quotient flags
// its row in bad[m] (an infinite one clamps to qmin or qmax, as the reference's clamp does).
void quantize_rows_scalar(const float* x, const float* step, int64_t rows_per_step, int64_t K, int64_t Kp, int qmin,
                          int qmax, int offset, uint8_t* codes, char* bad, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float s = step[m / rows_per_step];
    for (int64_t k = 0; k < K; ++k) {
      const float v = std::nearbyint(x[m * K + k] / s);
      if (std::isnan(v)) bad[m] = 1;
      const float clamped = std::min<float>(std::max<float>(v, qmin), qmax);
      codes[m * Kp + k] = std::isnan(v) ? 0 : static_cast<uint8_t>(static_cast<int>(clamped) + offset);
    }
    std::memset(codes + m * Kp + K, 0, Kp - K);
  }
}

#if ASQPOST_X86
ASQPOST_AVX512 void quantize_rows_avx512(const float* x, const float* step, int64_t rows_per_step, int64_t K,
                                         int64_t Kp, int qmin, int qmax, int offset, uint8_t* codes, char* bad,
                                         int64_t m0, int64_t m1) {
  const __m512 lo = _mm512_set1_ps(static_cast<float>(qmin)), hi = _mm512_set1_ps(static_cast<float>(qmax));
  const __m512i shift = _mm512_set1_epi32(offset);
  for (int64_t m = m0; m < m1; ++m) {
    const __m512 s = _mm512_set1_ps(step[m / rows_per_step]);
    __mmask16 nan = 0;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 lanes = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
      const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(lanes, x + m * K + k), s),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      nan |= _mm512_mask_cmp_ps_mask(lanes, q, q, _CMP_UNORD_Q);
      const __m512i c = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(q, lo), hi)), shift);
      _mm512_mask_cvtepi32_storeu_epi8(codes + m * Kp + k, lanes, c);
    }
    std::memset(codes + m * Kp + K, 0, Kp - K);
    if (nan) bad[m] = 1;
  }
}
#endif  // ASQPOST_X86

// (M, K) float32 rows -> (M + zero_rows, Kp) uint8 codes + offset, the last zero_rows holding the code of 0
// (offset); bad[m] set for rows with a NaN quotient.
torch::Tensor quantize(const torch::Tensor& x, const torch::Tensor& step, int64_t rows_per_step, int64_t qmin,
                       int64_t qmax, int64_t offset, int64_t Kp, std::vector<char>& bad, const std::string& path,
                       int64_t zero_rows = 0) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous float32 rows");
  TORCH_CHECK(step.dtype() == torch::kFloat32 && step.is_contiguous(), "step must be contiguous float32");
  TORCH_CHECK(qmin <= qmax && qmin + offset >= 0 && qmax + offset <= 255,
              "activation codes [qmin, qmax] plus the plan's offset must fit uint8");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K <= Kp, "x has more features than the weight");
  TORCH_CHECK(step.numel() == 1 || step.numel() * rows_per_step == M, "step must hold one value or one per sample");
  if (step.numel() == 1) rows_per_step = std::max<int64_t>(M, 1);
  auto codes = torch::empty({M + zero_rows, Kp}, torch::dtype(torch::kUInt8));
  std::memset(codes.data_ptr<uint8_t>() + M * Kp, static_cast<int>(offset), zero_rows * Kp);
  bad.assign(M, 0);
#if ASQPOST_X86
  auto fn = path == "avx512_vnni" ? quantize_rows_avx512 : quantize_rows_scalar;
#else
  auto fn = quantize_rows_scalar;
#endif
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K)), [&](int64_t m0, int64_t m1) {
    fn(x.data_ptr<float>(), step.data_ptr<float>(), rows_per_step, K, Kp, static_cast<int>(qmin),
       static_cast<int>(qmax), static_cast<int>(offset), codes.data_ptr<uint8_t>(), bad.data(), m0, m1);
  });
  return codes;
}

}  // namespace

// Rows of a packed embedding whose rows are whole bytes (asqpost.export.embedding): out[i, P * r + p] =
// byte_levels[codes[ids[i], r], p] * scale[ids[i]], one float32 multiply per value as the Python lookup does (so
// its rows bit for bit). codes: uint8 (V, R); byte_levels: float32 (256, P), the levels of the P codes each byte
// holds; scale: float32 (V,); ids: int64. Returns (ids.numel(), R * P), or None when an id lies outside [0, V)
// (the caller raises its own error).
std::optional<torch::Tensor> embedding_rows(torch::Tensor codes, torch::Tensor byte_levels, torch::Tensor scale,
                                            torch::Tensor ids) {
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.dim() == 2 && codes.is_contiguous(), "codes: uint8 (V, R)");
  TORCH_CHECK(byte_levels.dtype() == torch::kFloat32 && byte_levels.dim() == 2 && byte_levels.size(0) == 256 &&
                  byte_levels.is_contiguous(),
              "byte_levels: float32 (256, P)");
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == codes.size(0),
              "scale: float32, one per row");
  TORCH_CHECK(ids.dtype() == torch::kInt64, "ids must be int64");
  ids = ids.reshape(-1).contiguous();
  const int64_t V = codes.size(0), R = codes.size(1), P = byte_levels.size(1), n = ids.numel();
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    if (id[i] < 0 || id[i] >= V) return std::nullopt;
  auto out = torch::empty({n, R * P}, torch::dtype(torch::kFloat32));
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float *levels = byte_levels.data_ptr<float>(), *sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, R * P)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* row = cp + id[i] * R;
      const float s = sp[id[i]];
      float* o = op + i * R * P;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t q = 0; q < P; ++q) o[r * P + q] = levels[row[r] * P + q] * s;
    }
  });
  return out;
}

// The fast Walsh-Hadamard stages of one block y[0..block): h = 1, 2, 4, ...: (a, b) -> (a + b, a - b) on
// channels h apart, then one multiply by s.
static void hadamard_block(float* y, int64_t block, float s) {
  for (int64_t h = 1; h < block; h *= 2)
    for (int64_t i = 0; i < block; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float p = y[j], q = y[j + h];
        y[j] = p + q;
        y[j + h] = p - q;
      }
  for (int64_t j = 0; j < block; ++j) y[j] *= s;
}

// hadamard_block on 16 consecutive blocks at once: transposed into buf (block x 16), so that each step is one
// 16-lane vector operation over the blocks (lane r does block r's scalar operations, so the same bits). Compiled
// for AVX-512, AVX2 and plain x86-64; the loader picks the clone this CPU runs.
__attribute__((target_clones("avx512f", "avx2", "default"))) static void hadamard_16_blocks(float* y, int64_t block,
                                                                                           float s, float* buf) {
  for (int64_t r = 0; r < 16; ++r)
    for (int64_t j = 0; j < block; ++j) buf[j * 16 + r] = y[r * block + j];
  for (int64_t h = 1; h < block; h *= 2)
    for (int64_t i = 0; i < block; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        float* __restrict a = buf + j * 16;
        float* __restrict b = buf + (j + h) * 16;
        for (int r = 0; r < 16; ++r) {
          const float p = a[r], q = b[r];
          a[r] = p + q;
          b[r] = p - q;
        }
      }
  for (int64_t r = 0; r < 16; ++r)
    for (int64_t j = 0; j < block; ++j) y[r * block + j] = buf[j * 16 + r] * s;
}

// The block Hadamard rotation of asqpost.rotation.walsh_hadamard on float32 x (..., C): per row and block of
// `block` channels (a power of two dividing C), the same float operations in the same order as the Python
// version (no contraction: -ffp-contract=off), so the same bits; 16 blocks at a time where it can.
torch::Tensor hadamard_rows(torch::Tensor x, int64_t block, double scale) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() >= 1, "x must be float32 (..., C)");
  TORCH_CHECK(block >= 2 && (block & (block - 1)) == 0 && x.size(-1) % block == 0,
              "block must be a power of two dividing the last dimension");
  auto out = x.contiguous().clone();
  const int64_t blocks = out.numel() / block, groups = (blocks + 15) / 16;
  const float s = static_cast<float>(scale);
  float* base = out.data_ptr<float>();
  at::parallel_for(0, groups, std::max<int64_t>(1, 2048 / block), [&](int64_t g0, int64_t g1) {
    std::vector<float> buf(block * 16);
    for (int64_t g = g0; g < g1; ++g) {
      float* y = base + g * 16 * block;
      if (16 * (g + 1) <= blocks) {
        hadamard_16_blocks(y, block, s, buf.data());
      } else {
        for (int64_t b = 16 * g; b < blocks; ++b) hadamard_block(base + b * block, block, s);
      }
    }
  });
  return out;
}

std::string capability() { return available_paths().front(); }

// The intra-op threads the kernel splits its work over: torch's setting (torch.set_num_threads), read by ATen.
int64_t threads() { return at::get_num_threads(); }

std::string plan_kernel_path(ASQPOST_PLAN_PARAMS) { return kernel_path(make_plan(ASQPOST_PLAN_ARGS)); }

// x: uint8 (M, Kp), Kp a multiple of 8 matching the plan's weights, holding codes + the plan's offset. Returns the
// int32 sums of the codes themselves (the offset's correction subtracted) (acc_even, acc_odd), each (M, n)
// (acc_odd empty without odd levels).
std::vector<torch::Tensor> lut_linear(torch::Tensor x, ASQPOST_PLAN_PARAMS) {
  TORCH_CHECK(x.dtype() == torch::kUInt8 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous uint8 (M, Kp)");
  const Plan plan = make_plan(ASQPOST_PLAN_ARGS);
  const int64_t M = x.size(0), Kp = x.size(1), N = plan.n;
  auto out_even = torch::empty({M, N}, torch::dtype(torch::kInt32));
  auto out_odd = plan.has_odd ? torch::empty({M, N}, torch::dtype(torch::kInt32)) : torch::zeros({0}, torch::kInt32);
  Args a = make_args(x.data_ptr<uint8_t>(), nullptr, M, 1, Kp, plan);
  a.out_even = out_even.data_ptr<int32_t>();
  a.out_odd = plan.has_odd ? out_odd.data_ptr<int32_t>() : nullptr;
  run_kernel(a, plan, kernel_path(plan));
  return {out_even, out_odd};
}

// The whole packed linear layer in one call, same maths and float64 operation order as the Python reference:
//   x_int = clamp(round(x / step[m]), qmin, qmax)              (float32 division, round half to even)
//   y[m, n] = (acc_even + acc_odd * SQRT1_2) * col_scale[n] * step[m] + bias[n]   (float64, then float32)
// x: (..., K), read in place when it is contiguous float32 (other float types are converted; y is returned in
// x's type); step: one value or one per row of x (any shape holding them); plan: a NativePlan (weights, tables,
// col_scale = scale * unit, bias). Returns (..., n). A row with a NaN quotient gives NaN outputs, as the
// reference. Shapes and types are handled here, not in Python: at batch 1 every Python step of a layer shows.
torch::Tensor lut_linear_forward(torch::Tensor x, torch::Tensor step, int64_t qmin, int64_t qmax, ASQPOST_PLAN_PARAMS) {
  const Plan plan = make_plan(ASQPOST_PLAN_ARGS);
  const std::string path = kernel_path(plan);
  TORCH_CHECK(x.dim() >= 1 && x.is_floating_point(), "x must be a float tensor (..., K)");
  const auto rows = x.reshape({-1, x.size(-1)}).to(torch::kFloat32).contiguous();  // a view of a float32 x
  step = step.reshape(-1).to(torch::kFloat32).contiguous();
  const int64_t Kp = plan.Kp(), M = rows.size(0), N = plan.n;
  std::vector<char> bad;
  auto codes = quantize(rows, step, 1, qmin, qmax, plan.offset, Kp, bad, path);
  auto y = torch::empty({M, N}, torch::dtype(torch::kFloat32));
  Args a = make_args(codes.data_ptr<uint8_t>(), nullptr, M, 1, Kp, plan);
  std::vector<double> row_steps;
  a.rescale = make_rescale(y, plan, step, 1, row_steps);
  run_kernel(a, plan, path);
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    if (bad[m]) std::fill(yp + m * N, yp + (m + 1) * N, std::numeric_limits<float>::quiet_NaN());
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape).to(x.scalar_type());
}

// Byte offsets (B, OH, OW, kh * kw) int64 of each output pixel's input codes per kernel tap in NHWC codes of
// (B * H * W + 1) rows of Cp bytes; taps in the zero padding point at the last row (zeros). Depends only on
// the shapes, so callers cache it per input size.
torch::Tensor conv_offsets(int64_t B, int64_t H, int64_t W, int64_t Cp, std::vector<int64_t> kernel,
                           std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation) {
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "kernel, stride, padding and dilation take two values");
  const int64_t OH = (H + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) / stride[0] + 1;
  const int64_t OW = (W + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(B >= 0 && OH > 0 && OW > 0, "input too small for the kernel");
  const int64_t taps = kernel[0] * kernel[1], zero_row = B * H * W * Cp;
  auto offsets = torch::empty({B, OH, OW, taps}, torch::dtype(torch::kInt64));
  int64_t* out = offsets.data_ptr<int64_t>();
  at::parallel_for(0, B * OH, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / OH, oh = r % OH;
      for (int64_t ow = 0; ow < OW; ++ow) {
        int64_t* o = out + (r * OW + ow) * taps;
        for (int64_t i = 0; i < kernel[0]; ++i) {
          const int64_t ih = oh * stride[0] - padding[0] + i * dilation[0];
          for (int64_t j = 0; j < kernel[1]; ++j) {
            const int64_t iw = ow * stride[1] - padding[1] + j * dilation[1];
            const bool inside = ih >= 0 && ih < H && iw >= 0 && iw < W;
            o[i * kernel[1] + j] = inside ? ((b * H + ih) * W + iw) * Cp : zero_row;
          }
        }
      }
    }
  });
  return offsets;
}

// A packed Conv2d (groups = 1) as an indirect LUT convolution over NHWC codes, same maths as lut_linear_forward.
// x: float32 (B, H, W, C) contiguous (NHWC); step: one value or one per sample; offsets: conv_offsets for this
// input; plan: a NativePlan whose weights are the codes reordered to (Cout, kh, kw, Cp), Cp = C padded to a
// multiple of 8.
// Returns y (B * OH * OW, Cout) float32 (NHWC rows); an output pixel whose taps read a pixel with a NaN quotient is NaN
// in every channel, as in the reference.
torch::Tensor lut_conv2d_forward(torch::Tensor x, torch::Tensor step, int64_t qmin, int64_t qmax, torch::Tensor offsets,
                                 ASQPOST_PLAN_PARAMS) {
  const Plan plan = make_plan(ASQPOST_PLAN_ARGS);
  const std::string path = kernel_path(plan);
  TORCH_CHECK(x.dim() == 4, "x must be NHWC (B, H, W, C)");
  TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.dim() == 4 && offsets.is_contiguous() &&
                  offsets.size(0) == x.size(0),
              "offsets must be conv_offsets for this input: int64 (B, OH, OW, taps)");
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const int64_t Cp = (C + kGroup - 1) / kGroup * kGroup, taps = offsets.size(3);
  const int64_t M = B * offsets.size(1) * offsets.size(2);
  TORCH_CHECK(M > 0, "empty input");
  std::vector<char> bad;
  // + the zero row (codes of 0)
  auto codes = quantize(x.reshape({B * H * W, C}), step, H * W, qmin, qmax, plan.offset, Cp, bad, path, 1);
  auto y = torch::empty({M, plan.n}, torch::dtype(torch::kFloat32));
  Args a = make_args(codes.data_ptr<uint8_t>(), offsets.data_ptr<int64_t>(), M, taps, Cp, plan);
  std::vector<double> row_steps;
  a.rescale = make_rescale(y, plan, step, M / std::max<int64_t>(B, 1), row_steps);
  run_kernel(a, plan, path);
  if (std::any_of(bad.begin(), bad.end(), [](char b) { return b != 0; })) {  // NaN where a tap reads a NaN pixel
    const int64_t* off = offsets.data_ptr<int64_t>();
    float* yp = y.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t pixel = off[m * taps + t] / Cp;
        if (pixel < B * H * W && bad[pixel]) {
          std::fill(yp + m * plan.n, yp + (m + 1) * plan.n, std::numeric_limits<float>::quiet_NaN());
          break;
        }
      }
  }
  return y;
}

// The rescale alone, for sums computed elsewhere (layers the kernel does not take: signed inputs, 8-bit codes,
// grouped convs; torch computes their exact sums). acc_even / acc_odd: float32 or float64 integer sums shaped
// (R, C, S), contiguous (conv: R = batch, S = H * W; linear: R = rows, S = 1); acc_odd may be empty; step: one
// value or one per R. Same operation order as the reference, so the result is the reference's, bit for bit.
template <typename T>
void rescale_sums_rows(const T* even, const T* odd, const double* col_scale, const double* bias, const float* step,
                       bool per_row, int64_t C, int64_t S, float* y, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {  // i = r * C + c
    const int64_t r = i / C, c = i % C;
    const double s = static_cast<double>(step[per_row ? r : 0]), scale = col_scale[c];
    for (int64_t j = i * S; j < (i + 1) * S; ++j) {
      const double odd_j = odd ? static_cast<double>(odd[j]) : 0.0;
      y[j] = rescale_value(static_cast<double>(even[j]), odd ? &odd_j : nullptr, scale, s, bias ? bias + c : nullptr);
    }
  }
}

torch::Tensor rescale_sums(torch::Tensor acc_even, torch::Tensor acc_odd, torch::Tensor col_scale, torch::Tensor bias,
                           torch::Tensor step) {
  TORCH_CHECK(acc_even.dim() == 3 && acc_even.is_contiguous(), "sums must be contiguous (R, C, S)");
  TORCH_CHECK(acc_even.dtype() == torch::kFloat32 || acc_even.dtype() == torch::kFloat64, "sums must be float");
  TORCH_CHECK(acc_odd.numel() == 0 || (acc_odd.sizes() == acc_even.sizes() && acc_odd.dtype() == acc_even.dtype() &&
                                       acc_odd.is_contiguous()),
              "odd sums must match the even ones");
  TORCH_CHECK(col_scale.dtype() == torch::kFloat64 && col_scale.is_contiguous() && col_scale.numel() == acc_even.size(1),
              "col_scale must be float64 (C,)");
  TORCH_CHECK(bias.dtype() == torch::kFloat64 && bias.is_contiguous() &&
                  (bias.numel() == 0 || bias.numel() == col_scale.numel()),
              "bias must be float64 (C,) or empty");
  TORCH_CHECK(step.dtype() == torch::kFloat32 && step.is_contiguous() &&
                  (step.numel() == 1 || step.numel() == acc_even.size(0)),
              "step must be float32, one value or one per row");
  const int64_t R = acc_even.size(0), C = acc_even.size(1), S = acc_even.size(2);
  auto y = torch::empty({R, C, S}, torch::dtype(torch::kFloat32));
  const double* bp = bias.numel() ? bias.data_ptr<double>() : nullptr;
  const bool per_row = step.numel() != 1;
  at::parallel_for(0, R * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S)), [&](int64_t i0, int64_t i1) {
    if (acc_even.dtype() == torch::kFloat32)
      rescale_sums_rows<float>(acc_even.data_ptr<float>(), acc_odd.numel() ? acc_odd.data_ptr<float>() : nullptr,
                               col_scale.data_ptr<double>(), bp, step.data_ptr<float>(), per_row, C, S,
                               y.data_ptr<float>(), i0, i1);
    else
      rescale_sums_rows<double>(acc_even.data_ptr<double>(), acc_odd.numel() ? acc_odd.data_ptr<double>() : nullptr,
                                col_scale.data_ptr<double>(), bp, step.data_ptr<float>(), per_row, C, S,
                                y.data_ptr<float>(), i0, i1);
  });
  return y;
}


// ------------------------------------------------------------------------------------------------------------------
// Fused fake quantization (asqpost.functional.fake_quantize), one pass forward and one pass backward:
//   y = Q(clamp(x / s, lo, hi)) * s,  Q = round half to even, or the nearest level of a table (bucketize on the
//   midpoints between its levels, as LevelSet.project); grad_x = g * inside;  grad_s = sum g * Q(clamp(v)) - grad_x * v
// x: float32 (R, L) rows (contiguous), one step per row or one for all. The float32 operations are those of the torch
// composite, one by one (no FMA contraction), so y and grad_x are its bits; grad_s sums each row in float64 over
// fixed pieces (the same result for any thread count).
namespace {

struct FakeQuant {
  const float* x;
  const float* step;
  int64_t row_len;
  bool per_row;
  float lo, hi;
  const float* table;  // nullptr: round half to even
  const float* mid;
  int64_t n_mid;
};

inline float fq_clamp(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }  // NaN stays NaN

inline float fq_level(const FakeQuant& q, float v) {
  if (std::isnan(v)) return q.table[q.n_mid];  // torch.bucketize puts NaN past every boundary
  return q.table[std::lower_bound(q.mid, q.mid + q.n_mid, v) - q.mid];
}

// Elements [b, e) of the forward: the inner loop over one row's run vectorises (vroundps) in the wider targets.
#define ASQPOST_FQ_FORWARD(NAME, TARGET)                                                        \
  TARGET void NAME(const FakeQuant& q, float* y, int64_t b, int64_t e) {                        \
    for (int64_t i = b; i < e;) {                                                               \
      const int64_t row = i / q.row_len, end = std::min(e, (row + 1) * q.row_len);              \
      const float s = q.step[q.per_row ? row : 0], lo = q.lo, hi = q.hi;                        \
      const float* x = q.x;                                                                     \
      if (q.table) {                                                                            \
        for (; i < end; ++i) y[i] = fq_level(q, fq_clamp(x[i] / s, lo, hi)) * s;                \
      } else {                                                                                  \
        for (; i < end; ++i) y[i] = std::nearbyint(fq_clamp(x[i] / s, lo, hi)) * s;             \
      }                                                                                         \
    }                                                                                           \
  }

// Elements [b, e) of one row of the backward; returns the piece's float64 sum of the step gradient terms, added in
// 16 lanes (element i to lane (i - b) % 16) so that the loop vectorises without reassociating any sum.
#define ASQPOST_FQ_BACKWARD(NAME, TARGET)                                                              \
  TARGET double NAME(const FakeQuant& q, const float* g, float* gx, int64_t b, int64_t e, bool step) { \
    const float s = q.step[q.per_row ? b / q.row_len : 0], lo = q.lo, hi = q.hi;                     \
    const float* x = q.x;                                                                              \
    double lanes[16] = {};                                                                             \
    const auto one = [&](int64_t i, int l) {                                                           \
      const float v = x[i] / s;                                                                        \
      const float grad_x = g[i] * ((v >= lo && v <= hi) ? 1.0f : 0.0f);                               \
      gx[i] = grad_x;                                                                                  \
      if (step) {                                                                                      \
        const float c = fq_clamp(v, lo, hi);                                                           \
        const float level = q.table ? fq_level(q, c) : std::nearbyint(c);                              \
        lanes[l] += static_cast<double>(g[i] * level - grad_x * v);                                    \
      }                                                                                                \
    };                                                                                                 \
    int64_t i = b;                                                                                     \
    for (; i + 16 <= e; i += 16)                                                                       \
      for (int l = 0; l < 16; ++l) one(i + l, l);                                                      \
    for (int l = 0; i < e; ++i, ++l) one(i, l);                                                        \
    double acc = 0.0;                                                                                  \
    for (double lane : lanes) acc += lane;                                                             \
    return acc;                                                                                        \
  }

ASQPOST_FQ_FORWARD(fq_forward_scalar, )
ASQPOST_FQ_BACKWARD(fq_backward_scalar, )
#if ASQPOST_X86
ASQPOST_FQ_FORWARD(fq_forward_avx512, __attribute__((target("avx512f"))))
ASQPOST_FQ_BACKWARD(fq_backward_avx512, __attribute__((target("avx512f"))))
ASQPOST_FQ_FORWARD(fq_forward_avx2, __attribute__((target("avx2"))))
ASQPOST_FQ_BACKWARD(fq_backward_avx2, __attribute__((target("avx2"))))
#endif

constexpr int64_t kFqPiece = 1 << 14;  // elements per parallel piece (and per float64 partial sum)

FakeQuant fake_quant_args(const torch::Tensor& x, const torch::Tensor& step, double lo, double hi,
                          const torch::Tensor& table, const torch::Tensor& midpoints) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(), "x must be contiguous float32");
  TORCH_CHECK(step.dtype() == torch::kFloat32 && step.is_contiguous() && step.numel() > 0, "step must be float32");
  TORCH_CHECK(x.numel() % step.numel() == 0, "x must hold whole rows, one per step");
  TORCH_CHECK(table.numel() == 0 || (table.dtype() == torch::kFloat32 && midpoints.dtype() == torch::kFloat32 &&
                                     midpoints.numel() == table.numel() - 1 && table.is_contiguous() &&
                                     midpoints.is_contiguous()),
              "table must be float32 (n,) with its n - 1 float32 midpoints");
  return FakeQuant{x.data_ptr<float>(),
                   step.data_ptr<float>(),
                   std::max<int64_t>(1, x.numel() / step.numel()),
                   step.numel() != 1,
                   static_cast<float>(lo),
                   static_cast<float>(hi),
                   table.numel() ? table.data_ptr<float>() : nullptr,
                   table.numel() ? midpoints.data_ptr<float>() : nullptr,
                   midpoints.numel()};
}

}  // namespace

torch::Tensor fake_quant_forward(torch::Tensor x, torch::Tensor step, double lo, double hi, torch::Tensor table,
                                 torch::Tensor midpoints) {
  const FakeQuant q = fake_quant_args(x, step, lo, hi, table, midpoints);
  auto y = torch::empty_like(x);
  const std::string& path = available_paths().front();
#if ASQPOST_X86
  auto run = path == "avx512_vnni" ? fq_forward_avx512 : path == "avx2" ? fq_forward_avx2 : fq_forward_scalar;
#else
  auto run = fq_forward_scalar;
#endif
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel(), kFqPiece, [&](int64_t b, int64_t e) { run(q, yp, b, e); });
  return y;
}

// Returns (grad_x, grad_step (R,) float32; empty unless step_grad).
std::vector<torch::Tensor> fake_quant_backward(torch::Tensor grad, torch::Tensor x, torch::Tensor step, double lo,
                                               double hi, torch::Tensor table, torch::Tensor midpoints,
                                               bool step_grad) {
  const FakeQuant q = fake_quant_args(x, step, lo, hi, table, midpoints);
  TORCH_CHECK(grad.dtype() == torch::kFloat32 && grad.is_contiguous() && grad.sizes() == x.sizes(),
              "grad must be contiguous float32 shaped like x");
  auto grad_x = torch::empty_like(x);
  const std::string& path = available_paths().front();
#if ASQPOST_X86
  auto run = path == "avx512_vnni" ? fq_backward_avx512 : path == "avx2" ? fq_backward_avx2 : fq_backward_scalar;
#else
  auto run = fq_backward_scalar;
#endif
  const int64_t rows = q.per_row ? step.numel() : 1, row_len = q.per_row ? q.row_len : x.numel();
  const int64_t pieces_per_row = std::max<int64_t>(1, (row_len + kFqPiece - 1) / kFqPiece);
  std::vector<double> partial(rows * pieces_per_row, 0.0);
  const float* gp = grad.data_ptr<float>();
  float* gxp = grad_x.data_ptr<float>();
  at::parallel_for(0, rows * pieces_per_row, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t row = p / pieces_per_row, piece = p % pieces_per_row;
      const int64_t b = row * row_len + piece * kFqPiece, e = std::min(row * row_len + row_len, b + kFqPiece);
      if (b < e) partial[p] = run(q, gp, gxp, b, e, step_grad);
    }
  });
  auto grad_step = torch::empty({step_grad ? step.numel() : 0}, torch::dtype(torch::kFloat32));
  if (step_grad) {
    float* sp = grad_step.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      double total = 0.0;
      for (int64_t piece = 0; piece < pieces_per_row; ++piece) total += partial[r * pieces_per_row + piece];
      sp[r] = static_cast<float>(total);
    }
  }
  return {grad_x, grad_step};
}

// The gradient of the ASQ adapter's per-channel means of x and |x| over the positions of NCHW x, in one pass:
//   grad_x = g_mean / HW + (g_abs / HW) * sign(x)
// (torch's mean and abs backward, operation by operation: the same bits). x: float32 (N, C, H, W) contiguous;
// g_mean, g_abs: float32 (N, C).
namespace {
#define ASQPOST_MEANS_BACKWARD(NAME, TARGET)                                                              \
  TARGET void NAME(const float* x, float a, float b, float* grad, int64_t n) {                           \
    for (int64_t i = 0; i < n; ++i) grad[i] = a + b * (x[i] > 0.0f ? 1.0f : (x[i] < 0.0f ? -1.0f : 0.0f)); \
  }
ASQPOST_MEANS_BACKWARD(means_backward_scalar, )
#if ASQPOST_X86
ASQPOST_MEANS_BACKWARD(means_backward_avx512, __attribute__((target("avx512f"))))
ASQPOST_MEANS_BACKWARD(means_backward_avx2, __attribute__((target("avx2"))))
#endif
}  // namespace

torch::Tensor plane_means_backward(torch::Tensor x, torch::Tensor g_mean, torch::Tensor g_abs) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 4 && x.is_contiguous(), "x must be contiguous float32 NCHW");
  const int64_t planes = x.size(0) * x.size(1), hw = x.size(2) * x.size(3);
  for (const torch::Tensor* g : {&g_mean, &g_abs})
    TORCH_CHECK(g->dtype() == torch::kFloat32 && g->is_contiguous() && g->numel() == planes, "grads must be (N, C)");
  auto grad = torch::empty_like(x);
  const std::string& path = available_paths().front();
#if ASQPOST_X86
  auto run = path == "avx512_vnni" ? means_backward_avx512 : path == "avx2" ? means_backward_avx2 : means_backward_scalar;
#else
  auto run = means_backward_scalar;
#endif
  const float *xp = x.data_ptr<float>(), *gm = g_mean.data_ptr<float>(), *ga = g_abs.data_ptr<float>();
  float* out = grad.data_ptr<float>();
  const float count = static_cast<float>(hw);
  at::parallel_for(0, planes, std::max<int64_t>(1, kFqPiece / std::max<int64_t>(1, hw)), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) run(xp + p * hw, gm[p] / count, ga[p] / count, out + p * hw, hw);
  });
  return grad;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using pybind11::arg;
  m.def("lut_linear", &lut_linear, "u8 x 4-bit LUT codes -> exact int32 even/odd accumulators", arg("x"),
        ASQPOST_PLAN_PYARGS);
  m.def("lut_linear_forward", &lut_linear_forward, "a packed linear layer: quantize, LUT accumulate, rescale",
        arg("x"), arg("step"), arg("qmin"), arg("qmax"), ASQPOST_PLAN_PYARGS);
  m.def("conv_offsets", &conv_offsets, "per output pixel and tap: offsets of the input codes (zero row for padding)",
        arg("batch"), arg("height"), arg("width"), arg("padded_channels"), arg("kernel_size"), arg("stride"),
        arg("padding"), arg("dilation"));
  m.def("lut_conv2d_forward", &lut_conv2d_forward, "a packed Conv2d: NHWC codes, indirect LUT convolution, rescale",
        arg("x"), arg("step"), arg("qmin"), arg("qmax"), arg("offsets"), ASQPOST_PLAN_PYARGS);
  m.def("rescale_sums", &rescale_sums, "the reference's rescale of exact sums computed elsewhere", arg("acc_even"),
        arg("acc_odd"), arg("col_scale"), arg("bias"), arg("step"));
  m.def("embedding_rows", &embedding_rows, "rows of a packed embedding (whole-byte rows) from their codes",
        arg("codes"), arg("byte_levels"), arg("scale"), arg("ids"));
  m.def("hadamard_rows", &hadamard_rows, "the block Hadamard rotation of each row (fast Walsh-Hadamard, scaled)",
        arg("x"), arg("block"), arg("scale"));
  m.def("fake_quant_forward", &fake_quant_forward, "fused fake quantization, forward", arg("x"), arg("step"),
        arg("lo"), arg("hi"), arg("table"), arg("midpoints"));
  m.def("fake_quant_backward", &fake_quant_backward, "fused fake quantization, backward: (grad_x, grad_step)",
        arg("grad"), arg("x"), arg("step"), arg("lo"), arg("hi"), arg("table"), arg("midpoints"), arg("step_grad"));
  m.def("plane_means_backward", &plane_means_backward, "the gradient of the per-channel means of x and |x| (NCHW)",
        arg("x"), arg("g_mean"), arg("g_abs"));
  m.def("available_paths", &available_paths, "the kernel paths this CPU runs, fastest first");
  m.def("capability", &capability, "the fastest kernel path this CPU runs");
  m.def("threads", &threads, "the intra-op threads the kernel splits its work over (torch's setting)");
  m.def("kernel_path", &plan_kernel_path, "the path a NativePlan runs on this CPU (exact for its tables)",
        ASQPOST_PLAN_PYARGS);
}
