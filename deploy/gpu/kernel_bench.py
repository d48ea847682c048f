"""Kernel microbenchmark on a GPU host without .NET: the engine's CUDA kernels against what LibTorch would run instead.

    python3 deploy/gpu/kernel_bench.py            # from a DslaMesh checkout; writes kernel-bench.json to $OUT or .
    SECTIONS=attention,sweep python3 deploy/gpu/kernel_bench.py    # pick sections (default: attention,gemv,norm,gemvnorm)

Compiles services/DslaMesh.Engine/Kernels/*.cu with the NVRTC that PyTorch ships (through ctypes, as the engine does
through P/Invoke), launches them on PyTorch tensors and times GPU work only (each case captured in a CUDA graph and
replayed), Llama-2-7B shapes in bf16:
  - decode attention (RoPE + KV append + attention, splits chosen as DecodeAttention.Splits does) against the engine's
    LibTorch path (roll + two RoPE ops, two cache copies, SDPA, a layout copy), batch 1/8/32 at 1k-16k and a GQA case;
  - the decode GEMV kernel against cuBLAS (torch.matmul / addmm_ / linear + silu * mul) per projection and row count;
  - the RMS norm kernel against LibTorch's (F.rms_norm) at decode and prefill row counts;
  - gemvnorm: the norm fused into the GEMV (its NORM variant) against the norm kernel then the GEMV (or cuBLAS);
  - sweep: decode attention per keys-per-split, UNROLL and PIPELINE (double-buffered loads), to choose
    DecodeAttention.Splits' bounds and the loop's form.
Correctness of both kernels is checked by `dslactl kernels check` (deploy/gpu/verify-and-bench.sh runs it).
"""
import ctypes, glob, json, math, os, subprocess, sys, time
import torch
import torch.nn.functional as F

OUT = os.environ.get("OUT", ".")
SECTIONS = set(os.environ.get("SECTIONS", "attention,gemv,norm,gemvnorm").split(","))
report = {}
def log(*a):
    print(*a, flush=True)

log(subprocess.run("nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc", shell=True, capture_output=True, text=True).stdout)
log("torch", torch.__version__, torch.version.cuda)
site = os.path.dirname(os.path.dirname(torch.__file__))
cands = glob.glob(os.path.join(site, "nvidia", "**", "libnvrtc.so*"), recursive=True) + glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libnvrtc*"))
log("nvrtc candidates", cands)
report["nvrtc"] = cands
nvrtc = ctypes.CDLL(sorted([c for c in cands if "builtins" not in c])[0])
cuda = ctypes.CDLL("libcuda.so.1")

def check_nvrtc(rc, prog=None):
    if rc != 0:
        msg = ctypes.c_char_p(nvrtc.nvrtcGetErrorString(rc)).value if False else rc
        if prog is not None:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, buf)
            log(buf.value.decode())
        raise RuntimeError(f"nvrtc error {msg}")

def check_cu(rc, what):
    if rc != 0:
        s = ctypes.c_char_p()
        cuda.cuGetErrorString(rc, ctypes.byref(s))
        raise RuntimeError(f"{what}: CUDA driver error {rc} {s.value}")

torch.zeros(1, device="cuda")  # init primary context
major, minor = torch.cuda.get_device_capability()
KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "services", "DslaMesh.Engine", "Kernels")
SHARED = open(os.path.join(KERNELS, "scalar.cuh"), "rb").read() + b"\n"   # prefixed to every source, as CudaKernels does
compiled = {}
def kernel(source, name, defines):
    """Compiles Kernels/<source> (scalar.cuh prefixed) with -D<defines> for this GPU and returns (function, compile s)."""
    key = (source, name, tuple(defines))
    if key in compiled:
        return compiled[key]
    text = SHARED + open(os.path.join(KERNELS, source), "rb").read()
    prog = ctypes.c_void_p()
    check_nvrtc(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), text, source.encode(), 0, None, None))
    opts = [f"--gpu-architecture=sm_{major}{minor}".encode(), b"--use_fast_math", b"-std=c++17"] + [f"-D{k}={v}".encode() for k, v in defines]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    t0 = time.time()
    check_nvrtc(nvrtc.nvrtcCompileProgram(prog, len(opts), arr), prog)
    size = ctypes.c_size_t(); check_nvrtc(nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)))
    cubin = ctypes.create_string_buffer(size.value); check_nvrtc(nvrtc.nvrtcGetCUBIN(prog, cubin))
    compile_s = time.time() - t0
    mod = ctypes.c_void_p(); check_cu(cuda.cuModuleLoadData(ctypes.byref(mod), cubin), "load")
    f = ctypes.c_void_p(); check_cu(cuda.cuModuleGetFunction(ctypes.byref(f), mod, name.encode()), "function")
    compiled[key] = (f, compile_s)
    log(f"compiled {source} {' '.join(f'{k}={v}' for k, v in defines)} in {compile_s:.2f}s, cubin {size.value} bytes")
    return compiled[key]

def module(head_dim, group, kind, unroll=None, pipeline=0):
    defines = [("HEAD_DIM", head_dim), ("GROUP", group), ("SCALAR_KIND", kind)] + ([("UNROLL", unroll)] if unroll else []) + ([("PIPELINE", 1)] if pipeline else [])
    return kernel("decode_attention.cu", "decode_attention", defines)

KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SMS = torch.cuda.get_device_properties(0).multi_processor_count

def choose_split(length, b, hkv):
    total = length + 1
    target = 2 * SMS    # as DecodeAttention.Splits
    per = math.ceil(total * b * hkv / target)
    per = max(32, min(1024, ((per + 31) // 32) * 32))
    return per, math.ceil(total / per)

ARRIVALS = torch.zeros(1 << 16, device="cuda", dtype=torch.int32)   # zero between launches, as the engine keeps it

def launch(q, k_new, v_new, kc, vc, length, out, cos, sin, keys_per_split=None, unroll=None, pipeline=0):
    # q [B,Hq,d] view (unrotated), k_new [B,Hkv,d], kc [B,Hkv,cap,d], out [B,Hq,d], cos/sin [B,d]
    b, hq, d = q.shape
    hkv = k_new.shape[1]
    group = hq // hkv
    f1, _ = module(d, group, KIND[q.dtype], unroll, pipeline)
    if keys_per_split is None:
        keys_per_split, splits = choose_split(length, b, hkv)
    else:
        splits = math.ceil((length + 1) / keys_per_split)
    ws_out = torch.empty(b * hq * splits * d if splits > 1 else 1, device="cuda", dtype=torch.float32)
    ws_stats = torch.empty(b * hq * splits * 2 if splits > 1 else 1, device="cuda", dtype=torch.float32)
    scale_log2 = (1.0 / math.sqrt(d)) * 1.4426950408889634
    ll = ctypes.c_longlong; ptr = ctypes.c_void_p
    args = [ptr(q.data_ptr()), ll(q.stride(0)), ll(q.stride(1)),
            ptr(k_new.data_ptr()), ll(k_new.stride(0)), ll(k_new.stride(1)), ptr(v_new.data_ptr()), ll(v_new.stride(0)), ll(v_new.stride(1)),
            ptr(kc.data_ptr()), ptr(vc.data_ptr()), ll(kc.stride(0)), ll(kc.stride(1)),
            ctypes.c_int(length), ctypes.c_int(keys_per_split), ctypes.c_float(scale_log2),
            ptr(cos.data_ptr()), ptr(sin.data_ptr()), ll(cos.stride(0)),
            ptr(ws_out.data_ptr()), ptr(ws_stats.data_ptr()), ptr(ARRIVALS.data_ptr()),
            ptr(out.data_ptr()), ll(out.stride(0)), ll(out.stride(1))]
    params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    check_cu(cuda.cuLaunchKernel(f1, splits, hkv, b, 128, 1, 1, 0, stream, params, None), "launch")
    return splits

# ---- our GEMV kernel vs cuBLAS
def gemv_fn(rows, epi, kind, tuning=()):
    return kernel("decode_gemv.cu", "decode_gemv", [("ROWS", rows), ("EPILOGUE", epi), ("SCALAR_KIND", kind)] + list(tuning))[0]
def gemv(x, w, y, epi, warps=8, outputs=2, unroll=4, norm=None):
    # norm: (weight [K], eps) to normalise x inside the launch (the NORM variant), else None
    rows, k = x.shape
    n = w.shape[0] // 2 if epi == 2 else w.shape[0]
    f = gemv_fn(rows, epi, KIND[x.dtype], (("WARPS", warps), ("OUTPUTS_PER_WARP", outputs), ("UNROLL", unroll), ("NORM", 1 if norm else 0)))
    ll = ctypes.c_longlong; ptr = ctypes.c_void_p
    args = [ptr(x.data_ptr()), ll(x.stride(0)), ptr(w.data_ptr()), ctypes.c_int(n), ctypes.c_int(k), ptr(y.data_ptr()), ll(y.stride(0)),
            ptr(norm[0].data_ptr() if norm else 0), ctypes.c_float(norm[1] if norm else 0.0)]
    params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
    blocks = (n + warps * outputs - 1) // (warps * outputs)
    check_cu(cuda.cuLaunchKernel(f, blocks, 1, 1, 32 * warps, 1, 1, 0, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), params, None), "gemv")


def graph_time(fn, iters=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3): g.replay()
    torch.cuda.synchronize()
    st = torch.cuda.Event(enable_timing=True); en = torch.cuda.Event(enable_timing=True)
    st.record()
    for _ in range(iters): g.replay()
    en.record(); torch.cuda.synchronize()
    return st.elapsed_time(en) / iters

def attention_case(b, hkv, group, length):
    d = 128; hq = hkv * group; dtype = torch.bfloat16; cap = length + 64
    qkv = torch.randn(b, 1, hq + 2 * hkv, d, device="cuda", dtype=dtype)
    q4 = qkv[:, :, :hq].transpose(1, 2); k4 = qkv[:, :, hq:hq + hkv].transpose(1, 2); v4 = qkv[:, :, hq + hkv:].transpose(1, 2)
    kc = torch.randn(b, hkv, cap, d, device="cuda", dtype=dtype); vc = torch.randn_like(kc)
    out = torch.empty(b, 1, hq * d, device="cuda", dtype=dtype)
    cos = torch.randn(b, d, device="cuda", dtype=dtype); sin = torch.randn(b, d, device="cuda", dtype=dtype)
    return d, hq, qkv, q4, k4, v4, kc, vc, out, cos, sin

# attention per layer, 20 layers' worth of launches per graph, GPU time only
att = []
for (b, hkv, group) in [(1, 32, 1), (8, 32, 1), (32, 32, 1), (1, 8, 4)] if "attention" in SECTIONS else []:
    for length in (1024, 4096, 16384):
        if b == 32 and length > 4096: continue
        d, hq, qkv, q4, k4, v4, kc, vc, out, cos, sin = attention_case(b, hkv, group, length)
        cos4 = cos.view(b, 1, 1, d); sin_signed4 = torch.cat([-sin[:, :d // 2], sin[:, d // 2:]], -1).view(b, 1, 1, d)
        def ours():
            for _ in range(20): launch(q4.squeeze(2), k4.squeeze(2), v4.squeeze(2), kc, vc, length, out.view(b, hq, d), cos, sin)
        def sdpa():
            for _ in range(20):
                # the engine's LibTorch path: RoPE on q and k as three kernels, then the cache copies, SDPA, the layout copy
                qk = qkv[:, :, :hq + hkv]
                rotated = torch.addcmul(qk * cos4, qkv.roll(d // 2, -1)[:, :, :hq + hkv], sin_signed4)
                q4r = rotated[:, :, :hq].transpose(1, 2); k4r = rotated[:, :, hq:].transpose(1, 2)
                kc[:, :, length:length + 1].copy_(k4r); vc[:, :, length:length + 1].copy_(v4)
                qg = q4r.reshape(b, hkv, group, d) if group > 1 else q4r
                o = F.scaled_dot_product_attention(qg, kc[:, :, :length + 1], vc[:, :, :length + 1])
                out.copy_(o.reshape(b, hq, 1, d).transpose(1, 2).reshape(b, 1, hq * d))
        t_o = graph_time(ours) / 20 * 1000; t_s = graph_time(sdpa) / 20 * 1000
        kv_bytes = 2 * b * hkv * (length + 1) * d * 2
        row = dict(b=b, hkv=hkv, group=group, length=length, ours_us=t_o, sdpa_us=t_s, ours_GBps=kv_bytes / t_o / 1e3, sdpa_GBps=kv_bytes / t_s / 1e3, split=choose_split(length, b, hkv))
        att.append(row)
        log(f"attention b={b} hkv={hkv} g={group} len={length}: ours {t_o:.1f} us ({row['ours_GBps']:.0f} GB/s) | sdpa+copies {t_s:.1f} us ({row['sdpa_GBps']:.0f} GB/s) split={row['split']}")
        del kc, vc
report["attention"] = att

# sweep: keys per split × UNROLL (the engine's rule clamps keys per split to [MinKeysPerSplit, MaxKeysPerSplit])
sweep = []
for (b, hkv, group, length) in [(1, 32, 1, 1024), (1, 32, 1, 4096), (1, 32, 1, 16384), (1, 8, 4, 4096), (1, 8, 4, 16384), (8, 32, 1, 4096), (4, 32, 1, 16384)] if "sweep" in SECTIONS else []:
    d, hq, qkv, q4, k4, v4, kc, vc, out, cos, sin = attention_case(b, hkv, group, length)
    rule = choose_split(length, b, hkv)
    # The double-buffered loop (PIPELINE=1) must give the plain loop's output bit for bit: same arithmetic, same order.
    outs = []
    for pipeline in (0, 1):
        o = torch.empty(b, hq, d, device="cuda", dtype=out.dtype)
        launch(q4.squeeze(2), k4.squeeze(2), v4.squeeze(2), kc, vc, length, o, cos, sin, pipeline=pipeline)
        outs.append(o)
    torch.cuda.synchronize()
    log(f"sweep b={b} hkv={hkv} g={group} len={length}: pipelined output {'equals' if torch.equal(outs[0], outs[1]) else 'DIFFERS FROM'} the plain loop's")
    for pipeline, unroll in [(p, u) for p in (0, 1) for u in (4, 8)]:
        for per in (64, 128, 256, 512, 1024, 2048, 4096):
            if per > 2 * (length + 1): continue
            def ours():
                for _ in range(20): launch(q4.squeeze(2), k4.squeeze(2), v4.squeeze(2), kc, vc, length, out.view(b, hq, d), cos, sin, keys_per_split=per, unroll=unroll, pipeline=pipeline)
            t = graph_time(ours) / 20 * 1000
            kv_bytes = 2 * b * hkv * (length + 1) * d * 2
            sweep.append(dict(b=b, hkv=hkv, group=group, length=length, pipeline=pipeline, unroll=unroll, keys_per_split=per, splits=math.ceil((length + 1) / per), us=t, GBps=kv_bytes / t / 1e3, rule=rule))
            log(f"sweep b={b} hkv={hkv} g={group} len={length} pipeline={pipeline} unroll={unroll} keys/split={per:5d} splits={math.ceil((length + 1) / per):4d}: {t:7.1f} us ({kv_bytes / t / 1e3:.0f} GB/s){'  <- rule' if per == rule[0] and unroll == 8 and not pipeline else ''}")
    del kc, vc
report["sweep"] = sweep

# GEMV vs cuBLAS per shape and rows, in graphs (8 distinct weights per graph so L2 cannot hold them)
shapes = {"qkv": (12288, 4096, 0), "o": (4096, 4096, 1), "gate_up": (22016, 4096, 2), "down": (4096, 11008, 1), "lm_head": (32000, 4096, 0)}
gem = []
for name, (o, i, epi) in shapes.items() if "gemv" in SECTIONS else []:
    ws = [torch.randn(o, i, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(8)]
    for rows in (1, 2, 4, 8):
        x = torch.randn(rows, i, device="cuda", dtype=torch.bfloat16)
        n = o // 2 if epi == 2 else o
        y = torch.zeros(rows, n, device="cuda", dtype=torch.bfloat16)
        def ours():
            for w in ws: gemv(x, w, y, epi)
        def cublas():
            for w in ws:
                if epi == 0: torch.matmul(x, w.t(), out=y)
                elif epi == 1: y.addmm_(x, w.t())
                else:
                    g = F.linear(x, w); y.copy_(F.silu(g[:, :n]) * g[:, n:])
        t_o = graph_time(ours) / 8; t_c = graph_time(cublas) / 8
        by = o * i * 2
        gem.append(dict(name=name, rows=rows, ours_ms=t_o, cublas_ms=t_c, ours_GBps=by / t_o / 1e6, cublas_GBps=by / t_c / 1e6))
        log(f"gemv {name:8s} rows={rows}: ours {t_o*1000:.1f} us ({by / t_o / 1e6:.0f} GB/s) | cublas {t_c*1000:.1f} us ({by / t_c / 1e6:.0f} GB/s)")
    del ws
report["gemv"] = gem

# GEMV tuning sweep at batch 1-2: warps per block × outputs per warp × loads in flight, per projection
gsweep = []
for name, (o, i, epi) in shapes.items() if "gemvsweep" in SECTIONS else []:
    ws = [torch.randn(o, i, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(8)]
    for rows in (1, 2):
        x = torch.randn(rows, i, device="cuda", dtype=torch.bfloat16)
        n = o // 2 if epi == 2 else o
        y = torch.zeros(rows, n, device="cuda", dtype=torch.bfloat16)
        for warps, outputs, unroll in [(8, 2, 4), (4, 2, 4), (8, 2, 8), (4, 4, 4), (8, 4, 4), (8, 1, 8), (16, 1, 4), (4, 2, 8)]:
            if epi == 2 and outputs == 1: continue
            def ours():
                for w in ws: gemv(x, w, y, epi, warps, outputs, unroll)
            t = graph_time(ours) / 8
            by = o * i * 2
            gsweep.append(dict(name=name, rows=rows, warps=warps, outputs=outputs, unroll=unroll, us=t * 1000, GBps=by / t / 1e6))
            log(f"gemv sweep {name:8s} rows={rows} warps={warps:2d} outputs/warp={outputs} unroll={unroll}: {t*1000:6.1f} us ({by / t / 1e6:.0f} GB/s)")
    del ws
report["gemv_sweep"] = gsweep

# RMS norm: ours (one block per row) against LibTorch's F.rms_norm, hidden 4096, bf16
def norm_fn(vecs, kind):
    return kernel("rms_norm.cu", "rms_norm", [("VECS_PER_THREAD", vecs), ("SCALAR_KIND", kind)])[0]
def rms_norm(x, w, y, eps):
    rows, dim = x.shape
    f = norm_fn(math.ceil(dim / (4 if x.dtype == torch.float32 else 8) / 256), KIND[x.dtype])
    ll = ctypes.c_longlong; ptr = ctypes.c_void_p
    args = [ptr(x.data_ptr()), ll(x.stride(0)), ptr(w.data_ptr()), ctypes.c_int(dim), ctypes.c_float(eps), ptr(y.data_ptr()), ll(y.stride(0))]
    params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
    check_cu(cuda.cuLaunchKernel(f, rows, 1, 1, 256, 1, 1, 0, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), params, None), "norm")

# gemvnorm: the RMS norm fused into the GEMV (NORM=1) against the norm kernel followed by the GEMV (or cuBLAS for Q/K/V,
# the engine's unfused path), per projection that follows a norm; outputs compared with the two-launch form
gnorm = []
for name, (o, i, epi) in [("qkv", shapes["qkv"]), ("gate_up", shapes["gate_up"]), ("lm_head", shapes["lm_head"])] if "gemvnorm" in SECTIONS else []:
    ws = [torch.randn(o, i, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(8)]
    gains = (1 + 0.1 * torch.randn(i, device="cuda")).to(torch.bfloat16)
    for rows in (1, 2, 4):
        x = 3 * torch.randn(rows, i, device="cuda", dtype=torch.bfloat16)
        xn = torch.empty_like(x)
        n = o // 2 if epi == 2 else o
        y = torch.zeros(rows, n, device="cuda", dtype=torch.bfloat16); y2 = torch.zeros_like(y)
        def fused():
            for w in ws: gemv(x, w, y, epi, norm=(gains, 1e-5))
        def separate():
            for w in ws: rms_norm(x, gains, xn, 1e-5); gemv(xn, w, y2, epi)
        def separate_cublas():
            for w in ws:
                rms_norm(x, gains, xn, 1e-5)
                if epi == 0: torch.matmul(xn, w.t(), out=y2)
                else: g = F.linear(xn, w); y2.copy_(F.silu(g[:, :n]) * g[:, n:])
        fused(); separate(); torch.cuda.synchronize()
        diff = (y.float() - y2.float()).abs().max().item()
        t_f = graph_time(fused) / 8 * 1000; t_s = graph_time(separate) / 8 * 1000; t_c = graph_time(separate_cublas) / 8 * 1000
        gnorm.append(dict(name=name, rows=rows, fused_us=t_f, norm_then_gemv_us=t_s, norm_then_cublas_us=t_c, max_abs_diff=diff))
        log(f"gemvnorm {name:8s} rows={rows}: fused {t_f:.1f} us | norm + gemv {t_s:.1f} us | norm + cublas {t_c:.1f} us | max |fused - separate| {diff:.3g}")
    del ws
report["gemv_norm"] = gnorm
norms = []
for rows in (1, 8, 32, 1024, 16384) if "norm" in SECTIONS else []:
    dim = 4096
    x = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16); w = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    def ours():
        for _ in range(20): rms_norm(x, w, y, 1e-5)
    def libtorch():
        for _ in range(20): F.rms_norm(x, (dim,), w, 1e-5)
    ours(); torch.cuda.synchronize()
    ref = (w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)).float()
    err = (y.float() - ref).abs().max().item()
    t_o = graph_time(ours) / 20 * 1000; t_l = graph_time(libtorch) / 20 * 1000
    norms.append(dict(rows=rows, ours_us=t_o, libtorch_us=t_l, max_abs_error=err))
    log(f"rms_norm rows={rows:6d} D={dim}: ours {t_o:.1f} us | F.rms_norm {t_l:.1f} us | max |ours - HF| {err:.3g}")
report["norm"] = norms
json.dump(report, open(os.path.join(OUT, "kernel-bench.json"), "w"), indent=1)
