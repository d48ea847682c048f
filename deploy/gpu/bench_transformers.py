#!/usr/bin/env python3
"""Baseline for `dslactl bench engine`: the same shapes through Hugging Face transformers.

Builds LlamaForCausalLM with random bf16 weights directly on the GPU (Llama-2-7B shape by default) and times, for
each attention implementation asked for (eager, sdpa):

* prefill at each prompt length (batch 1, a fresh DynamicCache, logits of the last position only);
* decode at each (batch, context): a DynamicCache filled with random keys/values to the context, then one token per
  sequence per step (forward + argmax, synchronised every step, median per-step time);
* the device-to-device copy bandwidth (bytes read + written), and the weight-read bound.

Writes one JSON file per implementation with the schema `dslactl bench engine --json` writes
(engine = transformers-eager / transformers-sdpa). Measurements that cannot fit are recorded as "oom" with the memory
they need. Usage:

    python3 deploy/gpu/bench_transformers.py --out results/          # full Llama-2-7B shape
    python3 deploy/gpu/bench_transformers.py --device cpu --layers 2 --hidden 256 --heads 4 --vocab 1000 \
        --prefill 64 --contexts 128 --batches 1,4 --out /tmp/hf       # quick check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

GIB = 1024**3


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy of an nbytes buffer: (read + written bytes) / s, in GB/s."""
    src = torch.rand(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        sync(device)
        rounds.append((time.perf_counter() - start) / 10)
    del src, dst
    return 2 * (nbytes // 4) * 4 / statistics.median(rounds) / 1e9


def new_cache(cfg: LlamaConfig) -> DynamicCache:
    try:
        return DynamicCache(config=cfg)
    except TypeError:  # transformers before the config-aware cache
        return DynamicCache()


def set_attention(model: LlamaForCausalLM, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers
        model.config._attn_implementation = impl


def prefill_needs(cfg: LlamaConfig, tokens: int, impl: str, element: int) -> int:
    hd = cfg.hidden_size // cfg.num_attention_heads
    kv = tokens * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * hd * element
    acts = tokens * element * (6 * cfg.hidden_size + 3 * cfg.intermediate_size)
    if impl == "eager":  # scores (bf16), mask add (bf16), softmax in fp32, cast back
        acts += cfg.num_attention_heads * tokens * tokens * (element * 3 + 4)
    return kv + acts


def measure_prefill(model, cfg, tokens, impl, args, device, element, log):
    needs = prefill_needs(cfg, tokens, impl, element)
    free = free_bytes(device)
    if free is not None and needs > free - args.reserve_gib * GIB:
        log(f"[{impl}] prefill {tokens:6}: OOM (needs {needs / GIB:.1f} GiB)")
        return {"tokens": tokens, "ms": None, "status": "oom", "needs_gib": round(needs / GIB, 2)}
    times = []
    try:
        torch.manual_seed(args.seed + tokens)
        for run in range(args.warmup + args.repeats):
            ids = torch.randint(0, cfg.vocab_size, (1, tokens), device=device)
            cache = new_cache(cfg)
            sync(device)
            start = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            sync(device)
            if run >= args.warmup:
                times.append((time.perf_counter() - start) * 1000)
            del cache, ids
    except Exception as error:  # noqa: BLE001 - OOM surfaces as several types
        if not is_oom(error):
            raise
        log(f"[{impl}] prefill {tokens:6}: OOM (needs {needs / GIB:.1f} GiB by estimate)")
        return {"tokens": tokens, "ms": None, "status": "oom", "needs_gib": round(needs / GIB, 2)}
    ms = statistics.median(times)
    log(f"[{impl}] prefill {tokens:6}: {ms:9.2f} ms")
    return {"tokens": tokens, "ms": round(ms, 3), "status": "ok", "needs_gib": round(needs / GIB, 2)}


def measure_decode(model, cfg, batch, context, impl, args, device, dtype, element, log):
    hd = cfg.hidden_size // cfg.num_attention_heads
    steps = args.warmup + args.steps
    # DynamicCache grows by torch.cat every step: one layer's old and new tensors are alive together.
    per_layer = batch * (context + steps) * 2 * cfg.num_key_value_heads * hd * element
    needs = per_layer * (cfg.num_hidden_layers + 1) + batch * (cfg.vocab_size + 8 * cfg.hidden_size + 3 * cfg.intermediate_size) * 4
    if impl == "eager":
        needs += batch * cfg.num_attention_heads * (context + steps) * (element * 3 + 4)
    free = free_bytes(device)
    if free is not None and needs > free - args.reserve_gib * GIB:
        log(f"[{impl}] decode batch {batch:2} context {context:6}: OOM (needs {needs / GIB:.1f} GiB)")
        return {"batch": batch, "context": context, "ms_per_step": None, "status": "oom", "needs_gib": round(needs / GIB, 2), "tokens_per_second": None}
    times = []
    try:
        cache = new_cache(cfg)
        shape = (batch, cfg.num_key_value_heads, context, hd)
        for layer in range(cfg.num_hidden_layers):
            cache.update(torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype), layer)
        ids = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)
        with torch.inference_mode():
            for step in range(steps):
                sync(device)
                start = time.perf_counter()
                out = model(input_ids=ids, past_key_values=cache, use_cache=True)
                ids = out.logits[:, -1:].argmax(-1)
                sync(device)
                if step >= args.warmup:
                    times.append((time.perf_counter() - start) * 1000)
                del out
        del cache, ids
    except Exception as error:  # noqa: BLE001
        if not is_oom(error):
            raise
        log(f"[{impl}] decode batch {batch:2} context {context:6}: OOM (needs {needs / GIB:.1f} GiB by estimate)")
        return {"batch": batch, "context": context, "ms_per_step": None, "status": "oom", "needs_gib": round(needs / GIB, 2), "tokens_per_second": None}
    ms = statistics.median(times)
    log(f"[{impl}] decode batch {batch:2} context {context:6}: {ms:8.2f} ms/step")
    return {"batch": batch, "context": context, "ms_per_step": round(ms, 3), "status": "ok", "needs_gib": round(needs / GIB, 2),
            "tokens_per_second": batch * 1000 / ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prefill", default="1024,4096,8192,16384")
    parser.add_argument("--contexts", default="1024,4096,8192,16384")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--attention", default="eager,sdpa", help="comma-separated attn implementations")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--copy-mib", type=int, default=1024)
    parser.add_argument("--reserve-gib", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-cudnn-sdp", action="store_true",
                        help="turn off PyTorch's cuDNN SDPA backend (it re-plans for every new KV length); reports are named transformers-<impl>-nocudnn")
    parser.add_argument("--out", default=".", help="folder for transformers-<impl>.json")
    args = parser.parse_args()

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    device = torch.device(args.device)
    suffix = ""
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
        suffix = "-nocudnn"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    element = torch.tensor([], dtype=dtype).element_size()
    hidden = args.hidden
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=hidden,
        intermediate_size=args.intermediate or (11008 if hidden == 4096 else max(256, round(hidden * 8 / 3 / 256) * 256)),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
    )
    bandwidth = copy_bandwidth(device, args.copy_mib * 1024 * 1024) if args.copy_mib > 0 else None
    if bandwidth:
        log(f"copy bandwidth: {bandwidth:.0f} GB/s")

    started = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    read_bytes = weight_bytes - (0 if cfg.tie_word_embeddings else embed.numel() * embed.element_size())
    sync(device)
    log(f"model: {params / 1e9:.2f}B parameters, {weight_bytes / 1e9:.2f} GB, built on {device} in {time.perf_counter() - started:.1f} s")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} logical cores)"
    os.makedirs(args.out, exist_ok=True)
    for impl in [a.strip() for a in args.attention.split(",") if a.strip()]:
        set_attention(model, impl)
        prefill = [measure_prefill(model, cfg, t, impl, args, device, element, log) for t in ints(args.prefill)]
        decode = [measure_decode(model, cfg, b, c, impl, args, device, dtype, element, log)
                  for b in ints(args.batches) for c in ints(args.contexts)]
        report = {
            "engine": f"transformers-{impl}{suffix}",
            "device": name,
            "dtype": str(dtype).removeprefix("torch."),
            "model": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
                      "kv_heads": cfg.num_key_value_heads, "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size,
                      "parameters": params, "weight_bytes": weight_bytes, "weight_read_bytes": read_bytes},
            "copy_bandwidth_gbps": bandwidth,
            "weight_read_bound_ms": read_bytes / (bandwidth * 1e9) * 1000 if bandwidth else None,
            "prefill": prefill,
            "decode": decode,
            "plain_kernels": None,
            "notes": {"transformers": transformers.__version__, "torch": torch.__version__, "attn_implementation": impl, "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled() if device.type == "cuda" else None,
                      "cache": "DynamicCache", "decode_timing": "median of per-step wall times, each step synchronised (forward + argmax)"},
            "timestamp": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        path = os.path.join(args.out, f"transformers-{impl}{suffix}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
