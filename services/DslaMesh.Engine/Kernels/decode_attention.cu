// Decode attention with KV-cache append, split over the keys (flash-decoding), for one new token per sequence.
//
// Compiled at run time by NVRTC (Kernels/CudaKernels.cs) once per (HEAD_DIM, GROUP, SCALAR_KIND) and GPU architecture;
// scalar.cuh is prefixed at compile time; no CUDA headers are included.
//   HEAD_DIM     head dimension d (8, 16, 32, 64, 128 or 256 for 16-bit types; 4 … 128 for fp32)
//   GROUP        query heads per KV head (GQA group), 1 … 8
//   SCALAR_KIND  0 = fp32, 1 = bf16, 2 = fp16 (storage type; all arithmetic is fp32)
//
// Shapes (elements; the innermost dimension d is contiguous, other strides are arguments):
//   q        [B, Hq, d]            the new token's queries after RoPE, Hq = Hkv·GROUP (query head h reads KV head h / GROUP)
//   k_new    [B, Hkv, d]           the new token's key (after RoPE) and value
//   k_cache  [B, Hkv, capacity, d] each row's cache; positions [0, length) are valid; the kernel writes k_new/v_new at
//                                  position `length` and attends over [0, length] (the new token read from k_new/v_new)
//   out      [B, Hq, d]            softmax(q·Kᵀ·scale)·V in the storage type
// Grid (splits, Hkv, B) × 128 threads: block (s, kvh, b) reads keys [s·keys_per_split, …) of one KV head once for all
// GROUP query heads of its group. With one split it writes `out`; otherwise it writes an unnormalised partial result
// (max, sum, Σ p·v in fp32) that combine_splits merges.

// scalar_t, VEC, unpack, to_float and from_float come from scalar.cuh.

#define LANES (HEAD_DIM / VEC)            // lanes that share one key row (16 bytes each)
#define KEYS_PER_WARP (32 / LANES)        // keys a warp reads at once
#define WARPS 4
#define THREADS (WARPS * 32)
#define STATES (WARPS * KEYS_PER_WARP)    // independent online-softmax states per block, merged at the end
#define UNROLL 4                          // key rows each lane has in flight
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ uint4 load16(const scalar_t* p) { return *reinterpret_cast<const uint4*>(p); }

extern "C" __global__ void __launch_bounds__(THREADS) decode_attention(
    const scalar_t* __restrict__ q, long long q_batch_stride, long long q_head_stride,
    const scalar_t* __restrict__ k_new, long long k_batch_stride, long long k_head_stride,
    const scalar_t* __restrict__ v_new, long long v_batch_stride, long long v_head_stride,
    scalar_t* __restrict__ k_cache, scalar_t* __restrict__ v_cache, long long cache_batch_stride, long long cache_head_stride,
    int length, int keys_per_split, float scale_log2,
    float* __restrict__ partial_out, float* __restrict__ partial_stats,
    scalar_t* __restrict__ out, long long out_batch_stride, long long out_head_stride)
{
    const int split = blockIdx.x;
    const int kv_head = blockIdx.y;
    const int batch = blockIdx.z;
    const int splits = gridDim.x;
    const int query_heads = gridDim.y * GROUP;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int sub = lane / LANES;         // which of the warp's KEYS_PER_WARP keys this lane reads
    const int part = lane % LANES;        // which 16-byte slice of the row
    const int total = length + 1;
    const int begin = split * keys_per_split;
    const int end = min(begin + keys_per_split, total);

    const scalar_t* key_new = k_new + batch * k_batch_stride + kv_head * k_head_stride;
    const scalar_t* value_new = v_new + batch * v_batch_stride + kv_head * v_head_stride;
    scalar_t* keys = k_cache + batch * cache_batch_stride + kv_head * cache_head_stride;
    scalar_t* values = v_cache + batch * cache_batch_stride + kv_head * cache_head_stride;

    // Append: the first split's block writes the new key/value at position `length`. Nobody reads that slot from the
    // cache in this launch (the block that attends to it reads k_new/v_new), so there is no race.
    if (split == 0)
    {
        for (int i = threadIdx.x; i < HEAD_DIM; i += THREADS)
        {
            keys[(long long)length * HEAD_DIM + i] = key_new[i];
            values[(long long)length * HEAD_DIM + i] = value_new[i];
        }
    }

    // Queries of the group, this lane's slice, pre-scaled so that exp2(s − m) is the softmax weight.
    float query[GROUP][VEC];
#pragma unroll
    for (int g = 0; g < GROUP; g++)
    {
        const scalar_t* qp = q + batch * q_batch_stride + (kv_head * GROUP + g) * q_head_stride + part * VEC;
        unpack(load16(qp), query[g]);
#pragma unroll
        for (int i = 0; i < VEC; i++)
        {
            query[g][i] *= scale_log2;
        }
    }

    float running_max[GROUP], running_sum[GROUP], acc[GROUP][VEC];
#pragma unroll
    for (int g = 0; g < GROUP; g++)
    {
        running_max[g] = NEG_INF;
        running_sum[g] = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; i++)
        {
            acc[g][i] = 0.f;
        }
    }

    const int stride = WARPS * KEYS_PER_WARP;     // keys the block reads per step
    // The loop bounds are uniform across a warp (the shuffles below need every lane); lanes past `end` mask out.
    for (int base = begin + warp * KEYS_PER_WARP; base < end; base += stride * UNROLL)
    {
        uint4 key_raw[UNROLL], value_raw[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++)
        {
            const int j = base + u * stride + sub;
            if (j < end)
            {
                const scalar_t* kp = j < length ? keys + (long long)j * HEAD_DIM : key_new;
                const scalar_t* vp = j < length ? values + (long long)j * HEAD_DIM : value_new;
                key_raw[u] = load16(kp + part * VEC);
                value_raw[u] = load16(vp + part * VEC);
            }
            else
            {
                key_raw[u] = make_uint4(0u, 0u, 0u, 0u);
                value_raw[u] = key_raw[u];
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++)
        {
            const int j = base + u * stride + sub;
            float key[VEC], value[VEC];
            unpack(key_raw[u], key);
            unpack(value_raw[u], value);
#pragma unroll
            for (int g = 0; g < GROUP; g++)
            {
                float score = 0.f;
#pragma unroll
                for (int i = 0; i < VEC; i++)
                {
                    score += query[g][i] * key[i];
                }
#pragma unroll
                for (int offset = LANES / 2; offset > 0; offset /= 2)
                {
                    score += __shfl_xor_sync(0xffffffffu, score, offset);
                }
                if (j < end)
                {
                    const float next_max = fmaxf(running_max[g], score);
                    const float correction = exp2f(running_max[g] - next_max);   // exp2(−inf) = 0 on the first key
                    const float weight = exp2f(score - next_max);
                    running_sum[g] = running_sum[g] * correction + weight;
#pragma unroll
                    for (int i = 0; i < VEC; i++)
                    {
                        acc[g][i] = acc[g][i] * correction + weight * value[i];
                    }
                    running_max[g] = next_max;
                }
            }
        }
    }

    // Merge the block's STATES partial softmax states. [GROUP][STATES] maxima and sums, [GROUP][STATES][HEAD_DIM] sums.
    __shared__ float shared_max[GROUP][STATES];
    __shared__ float shared_sum[GROUP][STATES];
    __shared__ float shared_acc[GROUP][STATES][HEAD_DIM];
    const int state = warp * KEYS_PER_WARP + sub;
#pragma unroll
    for (int g = 0; g < GROUP; g++)
    {
        if (part == 0)
        {
            shared_max[g][state] = running_max[g];
            shared_sum[g][state] = running_sum[g];
        }
#pragma unroll
        for (int i = 0; i < VEC; i++)
        {
            shared_acc[g][state][part * VEC + i] = acc[g][i];
        }
    }
    __syncthreads();

    for (int index = threadIdx.x; index < GROUP * HEAD_DIM; index += THREADS)
    {
        const int g = index / HEAD_DIM;
        const int d = index % HEAD_DIM;
        float block_max = NEG_INF;
#pragma unroll
        for (int s = 0; s < STATES; s++)
        {
            block_max = fmaxf(block_max, shared_max[g][s]);
        }
        float block_sum = 0.f, block_acc = 0.f;
#pragma unroll
        for (int s = 0; s < STATES; s++)
        {
            const float w = shared_max[g][s] == NEG_INF ? 0.f : exp2f(shared_max[g][s] - block_max);
            block_sum += shared_sum[g][s] * w;
            block_acc += shared_acc[g][s][d] * w;
        }
        const int head = kv_head * GROUP + g;
        if (splits == 1)
        {
            out[batch * out_batch_stride + head * out_head_stride + d] = from_float(block_acc / block_sum);
        }
        else
        {
            const long long slot = ((long long)batch * query_heads + head) * splits + split;
            partial_out[slot * HEAD_DIM + d] = block_acc;
            if (d == 0)
            {
                partial_stats[2 * slot] = block_max;
                partial_stats[2 * slot + 1] = block_sum;
            }
        }
    }
}

// Merges the splits' partial results: grid (Hq, B) × HEAD_DIM threads.
extern "C" __global__ void combine_splits(
    const float* __restrict__ partial_out, const float* __restrict__ partial_stats, int splits,
    scalar_t* __restrict__ out, long long out_batch_stride, long long out_head_stride)
{
    const int head = blockIdx.x;
    const int batch = blockIdx.y;
    const int d = threadIdx.x;
    const long long first = ((long long)batch * gridDim.x + head) * splits;
    float global_max = NEG_INF;
    for (int s = 0; s < splits; s++)
    {
        global_max = fmaxf(global_max, partial_stats[2 * (first + s)]);
    }
    float sum = 0.f, value = 0.f;
    for (int s = 0; s < splits; s++)
    {
        const float w = exp2f(partial_stats[2 * (first + s)] - global_max);
        sum += partial_stats[2 * (first + s) + 1] * w;
        value += partial_out[(first + s) * HEAD_DIM + d] * w;
    }
    out[batch * out_batch_stride + head * out_head_stride + d] = from_float(value / sum);
}
