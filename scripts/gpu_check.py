"""GPU checks of the core: bf16 autocast, which SDPA kernels run our attention (flash, memory-efficient, cuDNN,
math) with and without a padding mask, torch.compile, training throughput, MFU from FLOPs counted by
torch.utils.flop_counter, and peak memory.

    python scripts/gpu_check.py [--device cuda] [--json PATH]

Each check prints one line; the figures go to --json. `--device cpu` runs the same code as a dry run (small shapes;
no SDPA kernel table, no MFU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from polyformer import MultiHeadAttention, TransformerConfig, TransformerEncoder


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over repeats, after two warm-up calls."""
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch.cuda.is_available() is False")
    figures: dict[str, object] = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        figures["device_name"] = torch.cuda.get_device_name(device)
    print(f"torch {torch.__version__} on {figures.get('device_name', device)}")
    torch.manual_seed(0)
    small = device.type == "cpu"
    config = TransformerConfig(dim=256 if small else 1024, depth=2 if small else 12, heads=4 if small else 16,
                               causal=True, position="rope")
    batch, length = (2, 128) if small else (16, 1024)
    encoder = TransformerEncoder(config).to(device)
    x = torch.randn(batch, length, config.dim, device=device)

    # bf16 autocast: same model, close outputs
    with torch.no_grad():
        reference = encoder(x)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = encoder(x).float()
    figures["bf16_max_rel_err"] = ((low - reference).abs().max() / reference.abs().max()).item()
    print(f"bf16 autocast: max |Δ| / max |y| = {figures['bf16_max_rel_err']:.4f}")

    # which SDPA kernels take our attention: each backend alone, causal and with a key-padding mask
    if device.type == "cuda":
        attention = MultiHeadAttention(config.dim, config.heads, causal=True).to(device, torch.bfloat16)
        xb = x.to(torch.bfloat16)
        padding = torch.zeros(batch, length, dtype=torch.bool, device=device)
        padding[:, length - length // 4:] = True
        kernels = {}
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH):
            for name, kwargs in (("causal", {}), ("padding", {"key_padding_mask": padding})):
                try:
                    with sdpa_kernel(backend), torch.no_grad():
                        attention(xb, **kwargs)
                    kernels[f"{backend.name.lower()}/{name}"] = True
                except RuntimeError:
                    kernels[f"{backend.name.lower()}/{name}"] = False
        figures["sdpa_kernels"] = kernels
        print("SDPA kernels that run our attention:", ", ".join(k for k, ok in kernels.items() if ok))

    # flash SDPA: our attention runs under the flash-only backend (causal fast path, bf16)
    if device.type == "cuda":
        attention = MultiHeadAttention(config.dim, config.heads, causal=True).to(device, torch.bfloat16)
        xb = x.to(torch.bfloat16)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
            flash = attention(xb)
        with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            math_out = attention(xb)
        figures["flash_sdpa_ok"] = True
        figures["flash_vs_math_max_abs"] = (flash.float() - math_out.float()).abs().max().item()
        figures["flash_seconds"] = timed(lambda: attention(xb), device, 10)
        with sdpa_kernel(SDPBackend.MATH):
            figures["math_seconds"] = timed(lambda: attention(xb), device, 10)
        print(f"flash SDPA: runs, max |flash − math| = {figures['flash_vs_math_max_abs']:.4f}, "
              f"speed-up over math x{figures['math_seconds'] / figures['flash_seconds']:.2f}")

    # training throughput, eager and torch.compile, bf16 autocast on the GPU
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-4)

    def train_step(model) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:  # FLOPs of one step: forward, backward (the optimizer's few)
        train_step(encoder)
    figures["train_step_flops"] = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    eager = timed(lambda: train_step(encoder), device, 5 if small else 20)
    if device.type == "cuda":
        figures["train_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    compiled_encoder = torch.compile(encoder)
    start = time.perf_counter()
    train_step(compiled_encoder)
    figures["compile_seconds"] = time.perf_counter() - start
    with torch.no_grad():
        figures["compile_max_abs_diff"] = (compiled_encoder(x) - encoder(x)).abs().max().item()
    compiled = timed(lambda: train_step(compiled_encoder), device, 5 if small else 20)
    tokens = batch * length
    figures["train_tokens_per_s_eager"] = tokens / eager
    figures["train_tokens_per_s_compiled"] = tokens / compiled
    print(f"train step: eager {tokens / eager:,.0f} tok/s, compiled {tokens / compiled:,.0f} tok/s "
          f"(x{eager / compiled:.2f}; compile {figures['compile_seconds']:.1f} s, "
          f"max |Δ| {figures['compile_max_abs_diff']:.2e})")
    if device.type == "cuda":
        peak = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 peak FLOP/s
        name = figures.get("device_name", "")
        peak_flops = next((v for k, v in peak.items() if k in str(name)), None)
        if peak_flops:
            figures["mfu_compiled_bf16"] = figures["train_step_flops"] / compiled / peak_flops
            figures["mfu_eager_bf16"] = figures["train_step_flops"] / eager / peak_flops
            print(f"MFU from counted FLOPs (bf16, dense peak {peak_flops / 1e12:.0f} TFLOPS): eager "
                  f"{figures['mfu_eager_bf16']:.1%}, compiled {figures['mfu_compiled_bf16']:.1%}; peak memory "
                  f"{figures['train_peak_memory_mb']:,.0f} MB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
