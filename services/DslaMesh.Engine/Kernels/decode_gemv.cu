// Decode-time matrix-vector products: y[m, n] = Σ_k x[m, k] · W[n, k] for a few rows m (decode steps of small batches),
// reading W once. Weight-bandwidth bound, so the kernel's job is to keep enough 16-byte loads of W in flight.
//
// Compiled at run time by NVRTC (Kernels/CudaKernels.cs) once per (ROWS, EPILOGUE, SCALAR_KIND), scalar.cuh prefixed.
//   ROWS         rows of x (1 … 8)
//   EPILOGUE     0: y = x·Wᵀ          W [N, K], y [ROWS, N]
//                1: y += x·Wᵀ         (the residual add of o_proj and down_proj, in place)
//                2: y = silu(x·W_gᵀ) ⊙ (x·W_uᵀ) with W = [W_g; W_u] [2N, K] (Llama's gate/up pair), y [ROWS, N]
//   SCALAR_KIND  0 = fp32, 1 = bf16, 2 = fp16 (x, W and y share it; arithmetic is fp32)
//   NORM         0: x as given; 1: x is first normalised as Llama's RMS norm does (norm_weight [K], norm_eps), so the
//                norm before a projection costs no launch of its own: each warp reduces its rows' sums of squares
//                itself (x is a few KiB, read from L1/L2), and rounds as rms_norm.cu does (Hugging Face's LlamaRMSNorm)
// x and y rows are `x_stride` / `y_stride` elements apart; W rows are contiguous (K elements), 16-byte aligned, and
// K is a multiple of 16 bytes' worth of elements; norm_weight (NORM 1 only; else null) is [K] contiguous, 16-byte
// aligned. Grid: ceil(N / (WARPS · OUTPUTS_PER_WARP)) blocks of WARPS warps.

// scalar_t, VEC, unpack, to_float and from_float come from scalar.cuh.

// Tuning (DecodeGemv.cs launches WARPS · OUTPUTS_PER_WARP outputs per block; deploy/gpu/kernel_bench.py sweeps them).
#ifndef WARPS
#define WARPS 8
#endif
#ifndef OUTPUTS_PER_WARP
#define OUTPUTS_PER_WARP 2                 // output columns n per warp (gate/up: pairs)
#endif
#ifndef UNROLL
#define UNROLL 4                           // 16-byte loads of each W row in flight per lane
#endif
#ifndef NORM
#define NORM 0
#endif
#define THREADS (WARPS * 32)
#define WEIGHT_ROWS (EPILOGUE == 2 ? 2 * OUTPUTS_PER_WARP : OUTPUTS_PER_WARP)

__device__ __forceinline__ uint4 load_streaming(const scalar_t* p)
{
    // W is read once per step: don't let it evict x (which every warp re-reads) from L1.
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

extern "C" __global__ void __launch_bounds__(THREADS) decode_gemv(
    const scalar_t* __restrict__ x, long long x_stride,
    const scalar_t* __restrict__ weight, int n, int k,
    scalar_t* __restrict__ y, long long y_stride,
    const scalar_t* __restrict__ norm_weight, float norm_eps)
{
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int first = (blockIdx.x * WARPS + warp) * OUTPUTS_PER_WARP;
    if (first >= n)
    {
        return;
    }
    // Weight rows this warp reads: its outputs' rows, and for gate/up the matching up rows N further on.
    const scalar_t* rows[WEIGHT_ROWS];
    bool live[WEIGHT_ROWS];
#pragma unroll
    for (int r = 0; r < WEIGHT_ROWS; r++)
    {
        const int output = first + (r % OUTPUTS_PER_WARP);
        live[r] = output < n;
        const int row = (EPILOGUE == 2 && r >= OUTPUTS_PER_WARP) ? output + n : output;
        rows[r] = weight + (long long)(live[r] ? row : first) * k;
    }

    float acc[WEIGHT_ROWS][ROWS];
#pragma unroll
    for (int r = 0; r < WEIGHT_ROWS; r++)
    {
#pragma unroll
        for (int m = 0; m < ROWS; m++)
        {
            acc[r][m] = 0.f;
        }
    }

    const int step = 32 * VEC;              // elements of K a warp covers per load
#if NORM
    // 1 / rms of each row of x, reduced by this warp alone (no block barrier). The first loads of W are asked into L2
    // first, so the reduction overlaps their round trip.
#pragma unroll
    for (int u = 0; u < UNROLL; u++)
    {
        const int offset = lane * VEC + u * step;
#pragma unroll
        for (int r = 0; r < WEIGHT_ROWS; r++)
        {
            if (offset < k)
            {
                asm volatile("prefetch.global.L2 [%0];" :: "l"(rows[r] + offset));
            }
        }
    }
    float inverse_rms[ROWS];
#pragma unroll
    for (int m = 0; m < ROWS; m++)
    {
        float squares = 0.f;
        for (int offset = lane * VEC; offset < k; offset += step)
        {
            float values[VEC];
            unpack(*reinterpret_cast<const uint4*>(x + m * x_stride + offset), values);
#pragma unroll
            for (int i = 0; i < VEC; i++)
            {
                squares += values[i] * values[i];
            }
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2)
        {
            squares += __shfl_xor_sync(0xffffffffu, squares, offset);
        }
        inverse_rms[m] = rsqrtf(squares / (float)k + norm_eps);
    }
#endif
    for (int base = lane * VEC; base < k; base += step * UNROLL)
    {
        uint4 raw[UNROLL][WEIGHT_ROWS];
#pragma unroll
        for (int u = 0; u < UNROLL; u++)
        {
            const int offset = base + u * step;
#pragma unroll
            for (int r = 0; r < WEIGHT_ROWS; r++)
            {
                raw[u][r] = offset < k ? load_streaming(rows[r] + offset) : make_uint4(0u, 0u, 0u, 0u);
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++)
        {
            const int offset = base + u * step;
            if (offset >= k)
            {
                break;
            }
            float input[ROWS][VEC];
#if NORM
            float gains[VEC];
            unpack(*reinterpret_cast<const uint4*>(norm_weight + offset), gains);
#endif
#pragma unroll
            for (int m = 0; m < ROWS; m++)
            {
                unpack(*reinterpret_cast<const uint4*>(x + m * x_stride + offset), input[m]);
#if NORM
#pragma unroll
                for (int i = 0; i < VEC; i++)
                {
                    // weight ⊙ round(x · rsqrt(mean(x²) + eps)), rounded: what the separate norm would have stored
                    input[m][i] = to_float(from_float(gains[i] * to_float(from_float(input[m][i] * inverse_rms[m]))));
                }
#endif
            }
#pragma unroll
            for (int r = 0; r < WEIGHT_ROWS; r++)
            {
                float w[VEC];
                unpack(raw[u][r], w);
#pragma unroll
                for (int m = 0; m < ROWS; m++)
                {
#pragma unroll
                    for (int i = 0; i < VEC; i++)
                    {
                        acc[r][m] += w[i] * input[m][i];
                    }
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < WEIGHT_ROWS; r++)
    {
#pragma unroll
        for (int m = 0; m < ROWS; m++)
        {
#pragma unroll
            for (int offset = 16; offset > 0; offset /= 2)
            {
                acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], offset);
            }
        }
    }

    // Lane m·OUTPUTS_PER_WARP + o writes output (m, first + o).
    if (lane < ROWS * OUTPUTS_PER_WARP)
    {
        const int m = lane / OUTPUTS_PER_WARP;
        const int o = lane % OUTPUTS_PER_WARP;
        float value = 0.f;
#pragma unroll
        for (int mm = 0; mm < ROWS; mm++)
        {
#pragma unroll
            for (int oo = 0; oo < OUTPUTS_PER_WARP; oo++)
            {
                if (mm == m && oo == o)
                {
#if EPILOGUE == 2
                    const float gate = acc[oo][mm];
                    value = gate / (1.f + __expf(-gate)) * acc[OUTPUTS_PER_WARP + oo][mm];
#else
                    value = acc[oo][mm];
#endif
                }
            }
        }
        const int output = first + o;
        if (output < n)
        {
            scalar_t* target = y + m * y_stride + output;
#if EPILOGUE == 1
            *target = from_float(to_float(*target) + value);
#else
            *target = from_float(value);
#endif
        }
    }
}
