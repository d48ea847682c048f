// Llama's RMS norm: y[r, :] = weight ⊙ round(x[r, :] · rsqrt(mean(x[r, :]²) + eps)), statistics in fp32 and the
// normalised value rounded to the storage type before the scale, then rounded again (Hugging Face's LlamaRMSNorm).
//
// Compiled at run time by NVRTC (Kernels/CudaKernels.cs) once per (VECS_PER_THREAD, SCALAR_KIND), scalar.cuh prefixed.
//   VECS_PER_THREAD  16-byte vectors of a row each thread holds (size ≤ THREADS · VECS_PER_THREAD · VEC)
// x and y rows are `x_stride` / `y_stride` elements apart, contiguous within, 16-byte aligned; size is a multiple of
// VEC. Grid: one block of THREADS threads per row. The row stays in registers between the reduction and the scale, so
// x is read once: a one-row decode step costs one short launch (LibTorch's layer-norm kernel runs one block of 128
// threads that reads the row twice).

// scalar_t, VEC, unpack, pack, to_float and from_float come from scalar.cuh.

#define THREADS 256
#define WARPS (THREADS / 32)

__device__ __forceinline__ uint4 load16(const scalar_t* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void store16(scalar_t* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

extern "C" __global__ void __launch_bounds__(THREADS) rms_norm(
    const scalar_t* __restrict__ x, long long x_stride,
    const scalar_t* __restrict__ weight, int size, float eps,
    scalar_t* __restrict__ y, long long y_stride)
{
    const scalar_t* row = x + blockIdx.x * x_stride;
    scalar_t* out = y + blockIdx.x * y_stride;
    const int vectors = size / VEC;

    float values[VECS_PER_THREAD][VEC];
    float squares = 0.f;
#pragma unroll
    for (int i = 0; i < VECS_PER_THREAD; i++)
    {
        const int v = threadIdx.x + i * THREADS;
        if (v < vectors)
        {
            unpack(load16(row + v * VEC), values[i]);
#pragma unroll
            for (int e = 0; e < VEC; e++)
            {
                squares += values[i][e] * values[i][e];
            }
        }
    }

    // Block sum of squares: warps, then the first warp over the warps' sums.
    __shared__ float warp_sums[WARPS];
    __shared__ float inverse_rms;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
    {
        squares += __shfl_xor_sync(0xffffffffu, squares, offset);
    }
    if (threadIdx.x % 32 == 0)
    {
        warp_sums[threadIdx.x / 32] = squares;
    }
    __syncthreads();
    if (threadIdx.x < 32)
    {
        float total = threadIdx.x < WARPS ? warp_sums[threadIdx.x] : 0.f;
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2)
        {
            total += __shfl_xor_sync(0xffffffffu, total, offset);
        }
        if (threadIdx.x == 0)
        {
            inverse_rms = rsqrtf(total / (float)size + eps);
        }
    }
    __syncthreads();
    const float scale = inverse_rms;

#pragma unroll
    for (int i = 0; i < VECS_PER_THREAD; i++)
    {
        const int v = threadIdx.x + i * THREADS;
        if (v < vectors)
        {
            float gains[VEC];
            unpack(load16(weight + v * VEC), gains);
#pragma unroll
            for (int e = 0; e < VEC; e++)
            {
                values[i][e] = gains[e] * to_float(from_float(values[i][e] * scale));
            }
            store16(out + v * VEC, pack(values[i]));
        }
    }
}
