// AVX2/FMA building blocks of the CPU kernels. The extension is compiled for baseline x86-64,
// so these carry a target attribute (LISA_AVX2) and callers pick them at run time (has_avx2()).
// Arithmetic is float32; bfloat16 and float16 elements are widened as they are loaded.
#pragma once

#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <string>
#include <type_traits>

#define LISA_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace lisa_rt {

// AVX-512 with bfloat16 dot products (vdpbf16ps: 32 products an instruction into float32 sums),
// for the bfloat16 kernels of CPUs that have it (has_avx512_bf16()).
#define LISA_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16,avx2,fma,f16c")))

// The kernels use what the CPU has, within the level ATen chose: ATEN_CPU_CAPABILITY=avx2 or
// =default holds lisa-rt's kernels back as it holds torch's (and lets the tests run the AVX2
// and portable paths on any x86 CPU).
inline bool aten_allows(const char* level) {
  static const std::string chosen = at::get_cpu_capability();
  return chosen == "AVX512" || chosen == level;
}

inline bool has_avx512_bf16() {
  // (GCC's avx512bf16 target implies AVX512BW: check all three.)
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16") && aten_allows("AVX512");
  return yes;
}

// AVX2 and FMA, and F16C for the float16 loads (every AVX2 CPU has it).
inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") && aten_allows("AVX2");
  return yes;
}

// Eight elements from memory, widened to float32.
template <typename T>
LISA_AVX2 inline __m256 load8(const T* p);

template <>
LISA_AVX2 inline __m256 load8<float>(const float* p) {
  return _mm256_loadu_ps(p);
}

template <>
LISA_AVX2 inline __m256 load8<c10::BFloat16>(const c10::BFloat16* p) {
  // A bfloat16 is the top half of the float32 with the same bits.
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

template <>
LISA_AVX2 inline __m256 load8<c10::Half>(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Eight float32 values stored as T, rounded to nearest even as c10's conversions round (a NaN
// stays a NaN: bfloat16 0x7FC0, as c10 gives).
template <typename T>
LISA_AVX2 inline void store8(T* p, __m256 v);

template <>
LISA_AVX2 inline void store8<float>(float* p, __m256 v) {
  _mm256_storeu_ps(p, v);
}

template <>
LISA_AVX2 inline void store8<c10::BFloat16>(c10::BFloat16* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  top = _mm256_blendv_epi8(top, _mm256_set1_epi32(0x7FC0), nan);
  // 32-bit lanes -> 16-bit: packus works per 128-bit half, so gather the two halves' results.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(top, top), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

template <>
LISA_AVX2 inline void store8<c10::Half>(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// The element types load8 widens.
template <typename T>
constexpr bool kWidenable =
    std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

LISA_AVX2 inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

LISA_AVX2 inline float hmax(__m256 v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// e^x for x <= 88 (softmax only feeds it x <= 0). x = n ln2 + r with |r| <= ln2/2, e^r by its
// Taylor polynomial to r^6 (relative error about 2e-7), 2^n through the exponent bits. Below
// -87 the result is flushed to 0, where float32 would go subnormal.
LISA_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 split in a part exact in float and the rest, so r keeps its low bits.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_and_ps(result, _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ));
}

// e^-x with -x capped at 88 (e^88 is still finite in float32), for sigmoid and SiLU: a very
// negative x, -inf included, gives a large finite e^-x where the plain one would be inf.
LISA_AVX2 inline __m256 exp_neg_capped8(__m256 x) {
  return exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), x), _mm256_set1_ps(88.0f)));
}

}  // namespace lisa_rt
