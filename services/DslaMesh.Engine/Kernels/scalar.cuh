// What the engine's kernels share: the storage type scalar_t, 16-byte vectors of it (VEC elements) unpacked to fp32 and
// packed back, the scalar conversions, and the programmatic-dependent-launch controls. CudaKernels prefixes every kernel source with this file before NVRTC
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

// Programmatic dependent launch (compute capability 9.0+; CudaKernels.Launch sets the launch attribute, and both are
// no-ops on older GPUs or in a kernel launched the ordinary way). allow_next_kernel lets the next kernel in the stream
// start launching once every block of this one has called it or exited; wait_for_previous_kernel blocks until the
// previous kernel has finished and its writes are visible. A kernel reads only data no kernel in flight writes (weights,
// older KV-cache rows) before waiting, and writes nothing before waiting; every thread waits.
__device__ __forceinline__ void allow_next_kernel()
{
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_previous_kernel()
{
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
