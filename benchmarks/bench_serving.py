"""In-process serving benchmarks, side by side with PEFT in one run, on the pretrained MiniLM.

  1. mixed batch: 32 sequences x 32 tokens carrying 8 distinct rank-8 adapters, against the base forward
     alone and PEFT's `adapter_names=` mixed-batch forward;
  2. one adapter: unmerged and merged, against the base;
  3. cold load of a rank-8 adapter, store on disk -> resident and ready, against PEFT's `load_adapter`.

Variants are timed round-robin (one run of each in turn) so that drift on a shared machine hits all of
them alike; the figure is the median. Usage: python benchmarks/bench_serving.py [--device cuda] [--out f.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import adapters as A  # noqa: E402
from benchmarks.common import machine_info, write_json  # noqa: E402
from service.engine import Engine, load_base_model  # noqa: E402
from service.engine.config import EngineConfig  # noqa: E402
from service.engine.identity import AdapterRef  # noqa: E402
from service.storage import canonicalize, local_store  # noqa: E402

RANK, N_ADAPTERS, BATCH, SEQ = 8, 8, 32, 32


def round_robin(fns: dict[str, callable], runs: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds of each fn, interleaved."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def peft_adapters(base: torch.nn.Module, targets: list[str]):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets, init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    for i in range(1, N_ADAPTERS):
        pm.add_adapter(f"a{i}", cfg)
    pm.eval()
    return pm


def our_weights(pm, name: str, targets: list[str]) -> A.LoraWeights:
    """The very same A and B matrices PEFT holds, as our LoraWeights."""
    lora = {}
    for path, m in pm.named_modules():
        if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and name in m.lora_A:
            lora[path.removeprefix("base_model.model.")] = (m.lora_A[name].weight.detach().clone(),
                                                            m.lora_B[name].weight.detach().clone())
    return A.LoraWeights(A.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets), lora)


def bench_forward(base, device: str, targets: list[str], runs: int) -> dict:
    ids = torch.randint(1000, 20000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    pm = peft_adapters(base, targets).to(device)
    ours = copy.deepcopy(base)
    lm = A.LoraModel(ours)
    for i in range(N_ADAPTERS):
        lm.add_adapter(f"a{i}", our_weights(pm, f"a{i}", targets))
    names = [f"a{i % N_ADAPTERS}" for i in range(BATCH)]

    def ours_mixed():
        with lm.route(names):
            return ours(input_ids=ids, attention_mask=mask)

    def ours_single():
        lm.set_adapter("a0")
        return ours(input_ids=ids, attention_mask=mask)

    with torch.inference_mode():
        t = round_robin({
            "base": lambda: base(input_ids=ids, attention_mask=mask),
            "ours_mixed": ours_mixed,
            "peft_mixed": lambda: pm(input_ids=ids, attention_mask=mask, adapter_names=names),
            "ours_one_unmerged": ours_single,
        }, runs)
        lm.merge("a0")
        t.update({k: v for k, v in round_robin({
            "base_again": lambda: base(input_ids=ids, attention_mask=mask),
            "ours_one_merged": lambda: ours(input_ids=ids, attention_mask=mask),
        }, runs).items()})
        lm.unmerge()
    return {"targets": targets, **{k: v * 1e3 for k, v in t.items()},
            "ratio_ours_mixed": t["ours_mixed"] / t["base"], "ratio_peft_mixed": t["peft_mixed"] / t["base"],
            "ratio_one_unmerged": t["ours_one_unmerged"] / t["base"],
            "ratio_one_merged": t["ours_one_merged"] / t["base_again"]}


def bench_cold_load(base_dir: str | None, device: str, runs: int) -> dict:
    from peft import LoraConfig, PeftModel, get_peft_model

    loaded = load_base_model(base_dir, device, "float32")
    work = Path(tempfile.mkdtemp())
    torch.manual_seed(1)
    peft_config = LoraConfig(r=RANK, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(loaded.model), peft_config)
    pm.save_pretrained(work / "peft")
    store = local_store(work / "store")
    store.put("cold", canonicalize(A.load_peft_dir(work / "peft")))
    settings = EngineConfig(max_rank=64, host_cache_bytes=1 << 28, merge_policy="never", merge_kernel="auto",
                               device_cache_adapters=8, device_cache_bytes=1 << 28, max_batch_size=32, max_wait_ms=5)
    engine = Engine(loaded, settings, store)
    ref = AdapterRef.of(store.resolve("cold"))
    peft_host = PeftModel.from_pretrained(copy.deepcopy(loaded.model), work / "peft", adapter_name="warm")

    def ours():  # store (disk) -> validated -> resident: the engine's own path, host cache emptied first
        engine.weights.host.pop("cold")
        engine.weights.tiers.add_resident(ref)
        engine.weights.evict("cold")

    def peft():
        peft_host.load_adapter(str(work / "peft"), adapter_name="cold")
        peft_host.delete_adapter("cold")

    t = round_robin({"ours_cold_load": ours, "peft_load_adapter": peft}, runs)
    store.close()
    return {k: v * 1e3 for k, v in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("CUDA is not available on this machine")
    base = load_base_model(None, args.device, "float32").model
    results = {"machine": machine_info(args.device), "forward": [], "cold_load": None}
    for targets in (["query", "value"], ["query", "key", "value", "dense"]):
        r = bench_forward(base, args.device, targets, args.runs)
        results["forward"].append(r)
    results["cold_load"] = bench_cold_load(None, args.device, max(args.runs, 30))
    print(f"machine: {results['machine']}")
    print("| targets | base ms | ours mixed (8 adapters) | PEFT mixed | ours 1 unmerged | ours 1 merged |")
    print("|---|---|---|---|---|---|")
    for r in results["forward"]:
        print(f"| {','.join(r['targets'])} | {r['base']:.1f} | "
              f"{r['ours_mixed']:.1f} ms ({r['ratio_ours_mixed']:.2f}x) | "
              f"{r['peft_mixed']:.1f} ms ({r['ratio_peft_mixed']:.2f}x) | {r['ratio_one_unmerged']:.2f}x | "
              f"{r['ratio_one_merged']:.2f}x |")
    c = results["cold_load"]
    print(f"cold load p50: ours {c['ours_cold_load']:.2f} ms, PEFT load_adapter {c['peft_load_adapter']:.2f} ms")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
