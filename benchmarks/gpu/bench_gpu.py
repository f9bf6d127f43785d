"""The GPU check's benchmarks, each beside its reference in the same run, in bfloat16 (run by run.sh).

    switch      with a0 merged, LoraModel.merge of a1 (exact, from W0), against one device-to-device copy of the
                targeted weights and PEFT's merge_adapter + unmerge_adapter on the same device
    mixed       32 sequences x 128 tokens carrying 8 adapters (LoraModel.route), against the base forward and
                PEFT's adapter_names= forward
    generation  continuous-batched decoding through the Engine, 8 adapters + base against the base alone
    compiled    the mixed forward under torch.compile, then a CUDA graph capture of it: what each gives

On a Llama-shaped ~1B model (TinyLlama's shape) and GPT-2 small, adapters of rank 8 and 16 on every linear layer,
random init on the device. `--device cpu` rehearses the same code with tiny models and few iterations. Every
section is guarded (a failure is recorded, the rest still run) and a global budget keeps the run short.

    python benchmarks/gpu/bench_gpu.py --device cuda --out OUT [--budget-s 300]   # writes OUT/bench.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import adapters as A  # noqa: E402
from adapters.merge_kernel import kernel_name  # noqa: E402
from benchmarks.common import machine_info  # noqa: E402
from benchmarks.gpu.generation import bench_generation  # noqa: E402
from benchmarks.gpu.models import count_parameters, gpt2, llama, ours_from_peft, peft_with_adapters  # noqa: E402
from benchmarks.gpu.timing import Deadline, Recorder, median_ms, time_interleaved  # noqa: E402

N_ADAPTERS = 8


@dataclass
class Config:
    device: str
    llama: str  # size names in models.py
    gpt2: str
    ranks: tuple[int, ...]
    batch: int
    seq: int
    switch_runs: int
    peft_runs: int
    forward_runs: int
    gen_per_model: int
    gen_tokens: int
    gen_rounds: int
    compile: bool
    dtype: str = "bfloat16"


def config_for(device: str) -> Config:
    if device.startswith("cuda"):
        return Config(device, "1b", "small", (8, 16), 32, 128, switch_runs=21, peft_runs=7, forward_runs=11,
                      gen_per_model=4, gen_tokens=64, gen_rounds=2, compile=True)
    # The rehearsal: the same sections on tiny models, a few iterations each (2 shared cores).
    # float32, because bfloat16 matmuls are slow on most CPUs; tests/cuda rehearse bfloat16 on the CPU.
    return Config(device, "tiny", "tiny", (8, 16), 4, 16, switch_runs=3, peft_runs=2, forward_runs=3,
                  gen_per_model=1, gen_tokens=4, gen_rounds=1, compile=False, dtype="float32")


def build(cfg: Config, arch: str, rank: int) -> dict:
    """The bare base, our copy with 8 adapters resident, and PEFT's copy with the same 8 adapters."""
    dtype = getattr(torch, cfg.dtype)
    bare = llama(cfg.llama, cfg.device, dtype) if arch == "llama" else gpt2(cfg.gpt2, cfg.device, dtype)
    pm = peft_with_adapters(bare, N_ADAPTERS, rank)
    ours = copy.deepcopy(bare)
    lm = A.LoraModel(ours)
    for i in range(N_ADAPTERS):
        lm.add_adapter(f"a{i}", ours_from_peft(pm, f"a{i}"))
    return {"bare": bare, "ours": ours, "lm": lm, "pm": pm, "params": count_parameters(bare)}


@torch.inference_mode()
def bench_switch(rec: Recorder, deadline: Deadline, cfg: Config, ctx: dict, section: str) -> str:
    lm, pm = ctx["lm"], ctx["pm"]
    layers = list(lm.lora_layers().values())
    lm.merge("a0")  # the first merge takes the W0 snapshots
    w0 = [layer._pristine for layer in layers]
    scratch = [torch.empty_like(w) for w in w0]
    nbytes = sum(w.numel() * w.element_size() for w in w0)
    state = {"next": "a1"}

    def copy_all() -> None:  # the floor for any exact switch: read W0 and write every targeted weight once
        for dst, src in zip(scratch, w0, strict=True):
            dst.copy_(src)

    def switch() -> None:
        lm.merge(state["next"])
        state["next"] = "a0" if state["next"] == "a1" else "a1"

    pm.set_adapter("a0")

    def peft() -> None:
        pm.merge_adapter()
        pm.unmerge_adapter()

    t = time_interleaved({"copy": copy_all, "switch": switch, "peft": peft},
                         {"copy": cfg.switch_runs, "switch": cfg.switch_runs, "peft": cfg.peft_runs}, cfg.device,
                         deadline)
    copy_ms, switch_ms, peft_ms = median_ms(t["copy"]), median_ms(t["switch"]), median_ms(t["peft"])
    lm.unmerge()
    exact = all(torch.equal(layer.base_layer.weight, layer._pristine) for layer in layers)
    rec.figure(section, "copy of the targeted weights", copy_ms, "ms", bytes=nbytes, samples=t["copy"])
    rec.figure(section, "switch (merge a1 while a0 is merged)", switch_ms, "ms", samples=t["switch"])
    rec.figure(section, "switch / copy", switch_ms / copy_ms, "x", "<= 1.5", switch_ms / copy_ms <= 1.5)
    rec.figure(section, "PEFT merge_adapter + unmerge_adapter", peft_ms, "ms", samples=t["peft"])
    rec.figure(section, "PEFT / switch", peft_ms / switch_ms, "x", ">= 10", peft_ms / switch_ms >= 10)
    rec.figure(section, "unmerge bit-exact after the switches", float(exact), "bool", "== 1", exact)
    return (f"{ctx['params'] / 1e6:.0f}M parameters, {len(layers)} targeted layers, {nbytes / 2**20:.0f} MiB "
            f"of targeted weights; {cfg.dtype}, merge kernel {kernel_name(cfg.device, getattr(torch, cfg.dtype))}")


@torch.inference_mode()
def bench_mixed(rec: Recorder, deadline: Deadline, cfg: Config, ctx: dict, section: str) -> str:
    bare, ours, lm, pm = ctx["bare"], ctx["ours"], ctx["lm"], ctx["pm"]
    ids = torch.randint(3, 2000, (cfg.batch, cfg.seq), generator=torch.Generator().manual_seed(0)).to(cfg.device)
    names = [f"a{i % N_ADAPTERS}" for i in range(cfg.batch)]

    def ours_mixed():
        with lm.route(names):
            return ours(input_ids=ids, use_cache=False).logits

    def peft_mixed():
        return pm(input_ids=ids, use_cache=False, adapter_names=names).logits

    t = time_interleaved({"base": lambda: bare(input_ids=ids, use_cache=False), "ours": ours_mixed,
                          "peft": peft_mixed}, cfg.forward_runs, cfg.device, deadline)
    base_ms, ours_ms, peft_ms = median_ms(t["base"]), median_ms(t["ours"]), median_ms(t["peft"])
    a, b = ours_mixed().float(), peft_mixed().float()
    err = float((a - b).norm() / b.norm())
    rec.figure(section, "base forward", base_ms, "ms", samples=t["base"])
    rec.figure(section, "ours, 8 adapters mixed (route)", ours_ms, "ms", samples=t["ours"])
    rec.figure(section, "ours / base", ours_ms / base_ms, "x", "<= 1.3", ours_ms / base_ms <= 1.3)
    rec.figure(section, "PEFT adapter_names=", peft_ms, "ms", samples=t["peft"])
    rec.figure(section, "PEFT / ours", peft_ms / ours_ms, "x", "> 1", peft_ms / ours_ms > 1)
    rec.figure(section, f"ours vs PEFT logits, relative error ({cfg.dtype})", err, "", "< 0.04", err < 0.04)
    return f"{cfg.batch} x {cfg.seq} tokens, {N_ADAPTERS} adapters, {cfg.dtype}"


@torch.inference_mode()
def bench_compiled(rec: Recorder, deadline: Deadline, cfg: Config, ctx: dict, section: str) -> str:
    """torch.compile of the mixed forward, then a CUDA graph capture of it. Each attempt is reported as it went."""
    if not (cfg.compile and cfg.device.startswith("cuda")):
        return "not tried: compile and CUDA graphs run on the GPU only (too slow for the CPU rehearsal)"
    ours, lm = ctx["ours"], ctx["lm"]
    ids = torch.randint(3, 2000, (cfg.batch, cfg.seq), generator=torch.Generator().manual_seed(0)).to(cfg.device)
    names = [f"a{i % N_ADAPTERS}" for i in range(cfg.batch)]

    def eager():
        with lm.route(names):
            return ours(input_ids=ids, use_cache=False).logits

    compiled_model = torch.compile(ours, dynamic=False)

    def compiled():
        with lm.route(names):
            return compiled_model(input_ids=ids, use_cache=False).logits

    notes = []
    t0 = time.perf_counter()
    ref, out = eager().float(), compiled().float()  # the first call compiles
    rec.figure(section, "torch.compile: first call (compilation)", 1e3 * (time.perf_counter() - t0), "ms")
    rec.figure(section, "torch.compile vs eager logits, relative error", float((out - ref).norm() / ref.norm()), "")
    t = time_interleaved({"eager": eager, "compiled": compiled}, cfg.forward_runs, cfg.device, deadline)
    rec.figure(section, "eager mixed forward", median_ms(t["eager"]), "ms", samples=t["eager"])
    rec.figure(section, "torch.compile mixed forward", median_ms(t["compiled"]), "ms", samples=t["compiled"])
    rec.figure(section, "compiled / eager", median_ms(t["compiled"]) / median_ms(t["eager"]), "x")
    notes.append("torch.compile(dynamic=False) of the whole model, routed")
    # A CUDA graph needs a forward without host synchronisation; the mixed path reads `local.any()` on the host
    # (whether any row of the batch uses this layer's adapters), so the capture is expected to fail. Tried last:
    # a failed capture must not disturb the sections before it.
    graph = torch.cuda.CUDAGraph()
    try:
        eager()
        with torch.cuda.graph(graph):
            static_out = eager()
        graph.replay()
        torch.cuda.synchronize()
        tg = time_interleaved({"graph": graph.replay, "eager": eager}, cfg.forward_runs, cfg.device, deadline)
        err = float((static_out.float() - eager().float()).norm() / eager().float().norm())
        rec.figure(section, "CUDA graph replay of the mixed forward", median_ms(tg["graph"]), "ms", samples=tg["graph"])
        rec.figure(section, "CUDA graph / eager", median_ms(tg["graph"]) / median_ms(tg["eager"]), "x")
        rec.figure(section, "CUDA graph vs eager logits, relative error", err, "")
        notes.append("CUDA graph capture worked")
    except Exception as exc:  # noqa: BLE001 - the attempt's outcome is the result
        notes.append(f"CUDA graph capture failed: {type(exc).__name__}: {str(exc)[:200]}")
    return "; ".join(notes)


def bench_model(rec: Recorder, deadline: Deadline, cfg: Config, arch: str, rank: int) -> dict:
    """Set-up, switch and mixed forward for one model and rank; returns the set-up (empty if it failed)."""
    label = f"{arch}-{cfg.llama if arch == 'llama' else cfg.gpt2} r{rank}"
    ctx: dict = {}
    rec.run(f"setup {label}", lambda: ctx.update(build(cfg, arch, rank)), deadline, min_left_s=30)
    if ctx:
        rec.run(f"switch {label}", lambda: bench_switch(rec, deadline, cfg, ctx, f"switch {label}"), deadline,
                min_left_s=10)
        rec.run(f"mixed forward {label}", lambda: bench_mixed(rec, deadline, cfg, ctx, f"mixed forward {label}"),
                deadline, min_left_s=10)
    return ctx


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting sections after this long")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    cfg = config_for(args.device)
    deadline = Deadline(args.budget_s)
    rec = Recorder(args.out / "bench.json", {"machine": machine_info(args.device), "config": asdict(cfg),
                                             "budget_s": args.budget_s})
    keep: dict = {}  # the first Llama set-up, kept for the compile attempt at the end
    # Most telling first, should the budget run out: the ~1B model at rank 8, its generation, then the rest.
    for arch, rank in [("llama", r) for r in cfg.ranks] + [("gpt2", r) for r in cfg.ranks]:
        ctx = bench_model(rec, deadline, cfg, arch, rank)
        if arch == "llama" and rank == cfg.ranks[0]:
            keep = ctx
            rec.run(f"generation llama-{cfg.llama} r{rank}", lambda r=rank: bench_generation(rec, deadline, cfg, r),
                    deadline, min_left_s=30)
        del ctx
        gc.collect()
    if keep:
        section = f"compiled mixed forward llama-{cfg.llama} r{cfg.ranks[0]}"
        rec.run(section, lambda: bench_compiled(rec, deadline, cfg, keep, section), deadline, min_left_s=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
