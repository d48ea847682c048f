// Storage types shared by the engine's kernels: scalar_t, 16-byte vectors of it (VEC elements) unpacked to fp32 and
// packed back, and the scalar conversions. CudaKernels prefixes every kernel source with this file before NVRTC
// compiles it (no CUDA headers are used, so NVRTC's built-ins suffice). SCALAR_KIND: 0 = fp32, 1 = bf16, 2 = fp16.

#if SCALAR_KIND == 0
typedef float scalar_t;
#define VEC 4
__device__ __forceinline__ float to_float(scalar_t x) { return x; }
__device__ __forceinline__ scalar_t from_float(float f) { return f; }
__device__ __forceinline__ void unpack(const uint4 raw, float* f)
{
    f[0] = __uint_as_float(raw.x); f[1] = __uint_as_float(raw.y); f[2] = __uint_as_float(raw.z); f[3] = __uint_as_float(raw.w);
}
__device__ __forceinline__ uint4 pack(const float* f)
{
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
}
#else
typedef unsigned short scalar_t;
#define VEC 8
#if SCALAR_KIND == 1
__device__ __forceinline__ float half_to_float(unsigned int bits) { return __uint_as_float(bits << 16); }
__device__ __forceinline__ scalar_t from_float(float f)
{
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u)
    {
        return (scalar_t)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (scalar_t)(u >> 16);
}
#else
__device__ __forceinline__ float half_to_float(unsigned int bits)
{
    float f;
    unsigned short h = (unsigned short)bits;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ scalar_t from_float(float f)
{
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif
__device__ __forceinline__ float to_float(scalar_t x) { return half_to_float((unsigned int)x); }
__device__ __forceinline__ void unpack(const uint4 raw, float* f)
{
    const unsigned int words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; i++)
    {
        f[2 * i] = half_to_float(words[i] & 0xffffu);
        f[2 * i + 1] = half_to_float(words[i] >> 16);
    }
}
__device__ __forceinline__ uint4 pack(const float* f)
{
    unsigned int words[4];
#pragma unroll
    for (int i = 0; i < 4; i++)
    {
        words[i] = (unsigned int)from_float(f[2 * i]) | ((unsigned int)from_float(f[2 * i + 1]) << 16);
    }
    return make_uint4(words[0], words[1], words[2], words[3]);
}
#endif
