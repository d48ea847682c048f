// Decode attention with KV-cache append and RoPE, split over the keys (flash-decoding), for one new token per sequence.
//
// Compiled at run time by NVRTC (Kernels/CudaKernels.cs) once per (HEAD_DIM, GROUP, SCALAR_KIND) and GPU architecture;
// scalar.cuh is prefixed at compile time; no CUDA headers are included.
//   HEAD_DIM     head dimension d (8, 16, 32, 64, 128 or 256 for 16-bit types; 4 … 128 for fp32)
//   GROUP        query heads per KV head (GQA group), 1 … 8
//   SCALAR_KIND  0 = fp32, 1 = bf16, 2 = fp16 (storage type; all arithmetic is fp32)
//
// Shapes (elements; the innermost dimension d is contiguous, other strides are arguments):
//   q        [B, Hq, d]            the new token's queries, Hq = Hkv·GROUP (query head h reads KV head h / GROUP)
//   k_new    [B, Hkv, d]           the new token's key and value
//   rope_cos [B, d], rope_sin      the new token's RoPE tables; when given (non-null), q and k_new arrive unrotated and
//                                  the kernel rotates them in registers (see rotate); when null, they arrive rotated
//   k_cache  [B, Hkv, capacity, d] each row's cache; positions [0, length) are valid; the kernel writes the (rotated)
//                                  new key and v_new at position `length` and attends over [0, length]
//   out      [B, Hq, d]            softmax(q·Kᵀ·scale)·V in the storage type
// Grid (splits, Hkv, B) × 128 threads: block (s, kvh, b) reads keys [s·keys_per_split, …) of one KV head once for all
// GROUP query heads of its group. With one split it writes `out`; otherwise it writes an unnormalised partial result
// (max, sum, Σ p·v in fp32), and the last of the (b, kvh) blocks to finish merges them all into `out`: one launch either
// way. `arrivals` [B·Hkv] counts finished splits; it must be zero before a launch and the merging block zeroes it again.

// scalar_t, VEC, unpack, to_float and from_float come from scalar.cuh.

#define LANES (HEAD_DIM / VEC)            // lanes that share one key row (16 bytes each)
#define KEYS_PER_WARP (32 / LANES)        // keys a warp reads at once
#define WARPS 4
#define THREADS (WARPS * 32)
#define STATES (WARPS * KEYS_PER_WARP)    // independent online-softmax states per block, merged at the end
#ifndef UNROLL
#define UNROLL 8                          // key rows each lane has in flight (4 was 2-22 % slower on an H200)
#endif
#ifndef PIPELINE
#define PIPELINE 0                        // 1: request the next step's rows before using this step's (kernel_bench sweeps it)
#endif
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ uint4 load16(const scalar_t* p) { return *reinterpret_cast<const uint4*>(p); }

__device__ __forceinline__ void store16(scalar_t* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

// RoPE on this lane's slice x[VEC] (elements part·VEC …) of a head vector: x·cos + rotate_half(x)·sin, where
// rotate_half(x)[i] = −x[i + d/2] in the first half and x[i − d/2] in the second. The partner element sits in the lane
// LANES/2 away in the same key-row group (or, with one lane per row, in the other half of the lane's own slice). Every
// lane of the warp must call it. Rounds to the storage type after x·cos and after the sum, as LibTorch's mul and
// addcmul do, and returns the rounded values as fp32.
__device__ __forceinline__ void rotate(float* x, const float* cos, const float* sin, int part)
{
    float partner[VEC];
#pragma unroll
    for (int i = 0; i < VEC; i++)
    {
#if LANES == 1
        partner[i] = i < VEC / 2 ? -x[i + VEC / 2] : x[i - VEC / 2];
#else
        const float other = __shfl_xor_sync(0xffffffffu, x[i], LANES / 2);
        partner[i] = part < LANES / 2 ? -other : other;
#endif
    }
#pragma unroll
    for (int i = 0; i < VEC; i++)
    {
        x[i] = to_float(from_float(fmaf(partner[i], sin[i], to_float(from_float(x[i] * cos[i])))));
    }
}

// One step of a warp's cache reads: key and value rows base + u·stride + sub (u < UNROLL) of this lane's slice, zero
// from `stop` on.
__device__ __forceinline__ void load_rows(const scalar_t* keys, const scalar_t* values, int base, int stride, int sub, int part,
                                          int stop, uint4* key_raw, uint4* value_raw)
{
#pragma unroll
    for (int u = 0; u < UNROLL; u++)
    {
        const int j = base + u * stride + sub;
        if (j < stop)
        {
            key_raw[u] = load16(keys + (long long)j * HEAD_DIM + part * VEC);
            value_raw[u] = load16(values + (long long)j * HEAD_DIM + part * VEC);
        }
        else
        {
            key_raw[u] = make_uint4(0u, 0u, 0u, 0u);
            value_raw[u] = key_raw[u];
        }
    }
}

// A load that skips the (incoherent) L1 cache: for partial results other blocks wrote during this launch.
__device__ __forceinline__ float load_global_cg(const float* p)
{
    float f;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(f) : "l"(p));
    return f;
}

extern "C" __global__ void __launch_bounds__(THREADS) decode_attention(
    const scalar_t* __restrict__ q, long long q_batch_stride, long long q_head_stride,
    const scalar_t* __restrict__ k_new, long long k_batch_stride, long long k_head_stride,
    const scalar_t* __restrict__ v_new, long long v_batch_stride, long long v_head_stride,
    scalar_t* __restrict__ k_cache, scalar_t* __restrict__ v_cache, long long cache_batch_stride, long long cache_head_stride,
    int length, int keys_per_split, float scale_log2,
    const scalar_t* __restrict__ rope_cos, const scalar_t* __restrict__ rope_sin, long long rope_batch_stride,
    float* __restrict__ partial_out, float* __restrict__ partial_stats, unsigned int* __restrict__ arrivals,
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

    // The first step's cache rows are requested before the new token's loads and RoPE below, so that the block's first
    // round trip to memory overlaps that work.
    const int stride = WARPS * KEYS_PER_WARP;     // keys the block reads per step
    const int first_base = begin + warp * KEYS_PER_WARP;
    const int cached_end = min(end, length);      // positions read from the cache; `length` itself is the new token
    uint4 key_raw[UNROLL], value_raw[UNROLL];
    load_rows(keys, values, first_base, stride, sub, part, cached_end, key_raw, value_raw);

    // This lane's slice of the new key and value (every lane holds its own; the key rotated when RoPE tables are
    // given, packed as the cache will hold it) and of the group's queries, pre-scaled so that exp2(s − m) is the
    // softmax weight. All loads are issued before any is used.
    float cos[VEC], sin[VEC], new_key_f[VEC];
    const uint4 new_key_raw = load16(key_new + part * VEC);
    const uint4 new_value = load16(value_new + part * VEC);
    uint4 query_raw[GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; g++)
    {
        query_raw[g] = load16(q + batch * q_batch_stride + (kv_head * GROUP + g) * q_head_stride + part * VEC);
    }
    const bool rope = rope_cos != nullptr;
    if (rope)
    {
        unpack(load16(rope_cos + batch * rope_batch_stride + part * VEC), cos);
        unpack(load16(rope_sin + batch * rope_batch_stride + part * VEC), sin);
    }
    unpack(new_key_raw, new_key_f);
    if (rope)
    {
        rotate(new_key_f, cos, sin, part);
    }
    const uint4 new_key = rope ? pack(new_key_f) : new_key_raw;

    // Append: the first split's block writes the new key/value at position `length`. Nobody reads that slot from the
    // cache in this launch (the block that attends to it uses its lanes' copies), so there is no race.
    if (split == 0 && warp == 0 && sub == 0)
    {
        store16(keys + (long long)length * HEAD_DIM + part * VEC, new_key);
        store16(values + (long long)length * HEAD_DIM + part * VEC, new_value);
    }

    float query[GROUP][VEC];
#pragma unroll
    for (int g = 0; g < GROUP; g++)
    {
        unpack(query_raw[g], query[g]);
        if (rope)
        {
            rotate(query[g], cos, sin, part);
        }
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

    // The loop bounds are uniform across a warp (the shuffles below need every lane); lanes past `end` mask out.
    for (int base = first_base; base < end; base += stride * UNROLL)
    {
#if PIPELINE
        // Double-buffered: the next step's rows are in flight while this step's are used (twice the registers).
        uint4 key_next[UNROLL], value_next[UNROLL];
        const int next_base = base + stride * UNROLL;
        if (next_base < end)
        {
            load_rows(keys, values, next_base, stride, sub, part, cached_end, key_next, value_next);
        }
#else
        if (base != first_base)
        {
            load_rows(keys, values, base, stride, sub, part, cached_end, key_raw, value_raw);
        }
#endif
#pragma unroll
        for (int u = 0; u < UNROLL; u++)
        {
            if (base + u * stride + sub == length && length < end)
            {
                key_raw[u] = new_key;   // the new token, from this lane's registers
                value_raw[u] = new_value;
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
#if PIPELINE
        if (next_base < end)
        {
#pragma unroll
            for (int u = 0; u < UNROLL; u++)
            {
                key_raw[u] = key_next[u];
                value_raw[u] = value_next[u];
            }
        }
#endif
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
    if (splits == 1)
    {
        return;
    }

    // The last block of this (row, KV head) to finish merges every split's partial result (threadfence reduction:
    // publish the partials, count the arrival, and only the block that sees the count complete reads them all).
    __shared__ bool merges;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0)
    {
        unsigned int* counter = arrivals + batch * gridDim.y + kv_head;
        merges = atomicAdd(counter, 1u) == (unsigned int)(splits - 1);
        if (merges)
        {
            *counter = 0u;   // ready for the next launch (no other block of this launch touches it again)
        }
    }
    __syncthreads();
    if (!merges)
    {
        return;
    }
    __threadfence();
    for (int index = threadIdx.x; index < GROUP * HEAD_DIM; index += THREADS)
    {
        const int head = kv_head * GROUP + index / HEAD_DIM;
        const int d = index % HEAD_DIM;
        const long long first = ((long long)batch * query_heads + head) * splits;
        // One pass with a running maximum: each split's three loads are independent of the running state, so they
        // pipeline across iterations.
        float global_max = NEG_INF, sum = 0.f, value = 0.f;
#pragma unroll 4
        for (int s = 0; s < splits; s++)
        {
            const float split_max = load_global_cg(&partial_stats[2 * (first + s)]);
            const float split_sum = load_global_cg(&partial_stats[2 * (first + s) + 1]);
            const float split_acc = load_global_cg(&partial_out[(first + s) * HEAD_DIM + d]);
            const float next_max = fmaxf(global_max, split_max);   // finite: every split holds at least one key
            const float correction = exp2f(global_max - next_max);
            const float weight = exp2f(split_max - next_max);
            sum = sum * correction + split_sum * weight;
            value = value * correction + split_acc * weight;
            global_max = next_max;
        }
        out[batch * out_batch_stride + head * out_head_stride + d] = from_float(value / sum);
    }
}
