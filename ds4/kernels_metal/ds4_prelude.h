// Portability prelude for ds4_kernels.h: the same kernel bodies compile as Metal (through
// mx.fast.metal_kernel), as CUDA (through mx.fast.cuda_kernel) and as plain C++ for the CPU
// (the test suite and speed-bench/bench_kernels.py build them with the system compiler).
//
//   DS4_DEV        address space of a kernel buffer pointer (Metal: device; else nothing)
//   DS4_FN         qualifiers of a per-thread helper (inline, __device__ on CUDA)
//   ds4_bits_f32   reinterpret uint32 bits as a float32
//   ds4_exp/ds4_rsqrt  float32 exp and 1/sqrt
#ifndef DS4_PRELUDE_H
#define DS4_PRELUDE_H

#if defined(__METAL_VERSION__)
#include <metal_stdlib>
using namespace metal;
#define DS4_DEV device
#define DS4_FN inline
inline float ds4_bits_f32(uint32_t u) { return as_type<float>(u); }
inline float ds4_exp(float v) { return metal::exp(v); }
inline float ds4_rsqrt(float v) { return metal::rsqrt(v); }
#elif defined(__CUDACC__)
// uint8_t/uint32_t come from MLX's generated preamble (NVRTC has no system headers)
#define DS4_DEV
#define DS4_FN __device__ __forceinline__
DS4_FN float ds4_bits_f32(uint32_t u) { return __uint_as_float(u); }
DS4_FN float ds4_exp(float v) { return expf(v); }
DS4_FN float ds4_rsqrt(float v) { return rsqrtf(v); }
#else
#include <math.h>
#include <stdint.h>
#include <string.h>
#define DS4_DEV
#define DS4_FN static inline
DS4_FN float ds4_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
DS4_FN float ds4_exp(float v) { return expf(v); }
DS4_FN float ds4_rsqrt(float v) { return 1.0f / sqrtf(v); }
#endif

#endif  // DS4_PRELUDE_H
