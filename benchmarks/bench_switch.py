"""Adapter switch cost, side by side with PEFT in one run, on the same model and the same adapters.

For each base (the pretrained MiniLM encoder; a GPT-2-small-sized model built from `GPT2Config()`),
PEFT makes two random adapters X and Y (rank 8, `init_lora_weights=False`) and saves them; our
library loads the very same files into a copy of the same base. Then, interleaved round by round:

  copy      w.copy_(src) over every targeted weight: the floor any exact switch must pay
  switch    ours: with X merged, LoraModel.merge("y") (X restored and Y merged: one pass per layer from the
            pristine copy, all layers in one call of the fused kernel), then merge("x") and so on; one sample each
  addmm     the same switch with the fused kernel turned off (LoraModel.fused_merges = False): one torch.addmm per
            layer (copy + GEMM pass)
  peft      PEFT's merge_adapter() followed by unmerge_adapter() on adapter X (one sample per pair)

Targets: switch <= 2x copy, and PEFT >= 5x switch. Also reported: PEFT / copy, the ceiling of PEFT / switch for
any exact switch (an exact switch must read W0 and write every targeted weight, so it costs at least one copy).
Also checked, not timed: merged outputs agree with PEFT's, and after all switches unmerge gives the base weights
back bit for bit (PEFT's drift is shown).

With --after-forward, every sample follows an untimed forward pass (8 x 128 tokens) of the model it works on, as
a switch between serving batches would: the caches then hold activations, not the weights.

Usage: python benchmarks/bench_switch.py [--models minilm,gpt2] [--device cpu|cuda] [--after-forward] [--out F]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters import LoraModel, load_peft_dir  # noqa: E402
from adapters.merge_kernel import kernel_name  # noqa: E402
from benchmarks.common import (  # noqa: E402
    build_gpt2_small,
    interleaved_times,
    load_minilm,
    machine_info,
    markdown_table,
    summary,
    write_json,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SWITCH_VS_COPY_MAX, PEFT_VS_SWITCH_MIN = 2.0, 5.0


def _peft_pair(base: torch.nn.Module, rank: int, targets: str | list[str], folder: Path):
    from peft import LoraConfig, get_peft_model

    def config() -> LoraConfig:
        return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out auto-fix on GPT-2's Conv1D
        torch.manual_seed(1)
        pm = get_peft_model(base, config(), adapter_name="x")
        torch.manual_seed(2)
        pm.add_adapter("y", config())
        pm.save_pretrained(str(folder))  # non-default adapters go to folder/<name>/
    pm.set_adapter("x")
    return pm.eval()


def _inputs(model: torch.nn.Module, device: str) -> dict[str, torch.Tensor]:
    vocab = model.config.vocab_size
    return {"input_ids": torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)}


def _out(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def bench_model(name: str, build, args) -> dict:
    dtype = DTYPES[args.dtype]
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    base = build(args.device, dtype)
    ours_model = copy.deepcopy(base)
    inputs = _inputs(base, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        pm = _peft_pair(base, args.rank, targets, Path(tmp))
        lm = LoraModel(ours_model)
        lm.add_adapter("x", load_peft_dir(Path(tmp) / "x"))
        lm.add_adapter("y", load_peft_dir(Path(tmp) / "y"))

    original = {p: w.detach().clone() for p, w in lm.merge_target_weights().items()}
    peft_weights = {n.removeprefix("base_model.model.").removesuffix(".base_layer.weight"): p
                    for n, p in pm.named_parameters() if n.endswith(".base_layer.weight")}
    assert sorted(peft_weights) == sorted(original), "PEFT and we must target the same layers"
    targeted = list(lm.merge_target_weights().values())
    sources = [w.detach().clone() for w in targeted]
    n_params = sum(w.numel() for w in targeted)

    # Same adapter, same merged outputs (a sanity check that both sides time the same work).
    lm.merge("x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.merge_adapter()
        merged_diff = float((_out(ours_model, inputs) - _out(pm, inputs)).abs().max())
        pm.unmerge_adapter()

    state = {"merged": "x"}

    @torch.no_grad()
    def copy_all() -> None:
        for w, src in zip(targeted, sources, strict=True):
            w.copy_(src)

    def switch() -> None:
        state["merged"] = "y" if state["merged"] == "x" else "x"
        lm.merge(state["merged"])

    def switch_addmm() -> None:
        lm.fused_merges = False
        try:
            switch()
        finally:
            lm.fused_merges = True

    def peft_merge_unmerge() -> None:
        pm.merge_adapter()
        pm.unmerge_adapter()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fns = {"copy": copy_all, "switch": switch, "addmm": switch_addmm, "peft": peft_merge_unmerge}
        runs = {"copy": args.runs, "switch": args.runs, "addmm": args.runs, "peft": args.peft_runs}
        before = None
        if args.after_forward:  # a forward pass of the model each contender works on, untimed, before each sample
            batch = {"input_ids": torch.randint(0, base.config.vocab_size, (8, 128),
                                                generator=torch.Generator().manual_seed(1)).to(args.device)}
            models = {"copy": ours_model, "switch": ours_model, "addmm": ours_model, "peft": pm}

            def before(name: str) -> None:
                with torch.inference_mode():
                    models[name](**batch)

        times = interleaved_times(fns, runs, args.device, clock=args.clock, before=before)
    if state["merged"] != "x":
        lm.merge("x")
    lm.unmerge()
    ours_exact = all(torch.equal(w, original[p]) for p, w in lm.merge_target_weights().items())
    peft_drift = max(float((peft_weights[p].float() - w.float()).abs().max()) for p, w in original.items())

    copy_ms, switch_ms, addmm_ms, peft_ms = (summary(times[k]) for k in ("copy", "switch", "addmm", "peft"))
    return {
        "model": name, "targets": args.targets, "rank": args.rank, "dtype": args.dtype,
        "targeted_layers": len(targeted), "targeted_parameters": n_params,
        "targeted_bytes": sum(w.numel() * w.element_size() for w in targeted),
        "merge_kernel": kernel_name(args.device, dtype),
        "copy": copy_ms, "switch": switch_ms, "switch_addmm": addmm_ms, "peft_merge_unmerge": peft_ms,
        "switch_over_copy": switch_ms["median_ms"] / copy_ms["median_ms"],
        "addmm_switch_over_copy": addmm_ms["median_ms"] / copy_ms["median_ms"],
        "peft_over_switch": peft_ms["median_ms"] / switch_ms["median_ms"],
        "peft_over_copy": peft_ms["median_ms"] / copy_ms["median_ms"],
        "merged_output_max_diff_vs_peft": merged_diff,
        "restore_bit_exact_after_switches": ours_exact,
        "peft_max_weight_drift_after_its_cycles": peft_drift,
        "samples_s": times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,gpt2", help="comma-separated: minilm, gpt2")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (skipped if CUDA is unavailable)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="all-linear", help='"all-linear" or comma-separated module suffixes')
    parser.add_argument("--runs", type=int, default=21, help="samples of copy and switch (median reported)")
    parser.add_argument("--peft-runs", type=int, default=7, help="samples of PEFT merge+unmerge (slower)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall: elapsed time; cpu: process CPU time, robust on a busy machine (use --threads 1)")
    parser.add_argument("--after-forward", action="store_true",
                        help="run an untimed forward pass (8 x 128 tokens) before every sample, as between "
                             "serving batches: the switch then meets cold caches")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available on this machine; skipping the cuda benchmark.")
        if args.out:
            write_json(args.out, {"machine": machine_info(args.device), "skipped": "CUDA not available"})
        return 0

    builders = {"minilm": ("MiniLM-L6 (pretrained)", load_minilm), "gpt2": ("GPT-2 small (random init)",
                                                                              build_gpt2_small)}
    results = {"machine": machine_info(args.device), "args": vars(args), "models": []}
    for key in args.models.split(","):
        label, build = builders[key]
        print(f"... {label}", flush=True)
        results["models"].append(bench_model(label, build, args))
    results["machine"]["load_average_1m_end"] = machine_info(args.device)["load_average_1m"]

    rows = []
    for r in results["models"]:
        ok = r["switch_over_copy"] <= SWITCH_VS_COPY_MAX and r["peft_over_switch"] >= PEFT_VS_SWITCH_MIN
        rows.append([
            r["model"], f'{r["targeted_layers"]} layers / {r["targeted_parameters"] / 1e6:.1f}M',
            r["merge_kernel"], f'{r["copy"]["median_ms"]:.1f}', f'{r["switch"]["median_ms"]:.1f}',
            f'{r["switch_over_copy"]:.2f}x', f'{r["addmm_switch_over_copy"]:.2f}x',
            f'{r["peft_merge_unmerge"]["median_ms"]:.1f}', f'{r["peft_over_switch"]:.1f}x',
            f'{r["peft_over_copy"]:.1f}x',
            "yes" if r["restore_bit_exact_after_switches"] else "NO",
            f'{r["peft_max_weight_drift_after_its_cycles"]:.2g}',
            "met" if ok else "MISSED",
        ])
    m = results["machine"]
    print(f"\n{m['cpu']}, nproc {m['nproc']}, torch threads {m['torch_threads']}, device {args.device}, "
          f"{args.dtype}, targets {args.targets}, rank {args.rank}, load avg {m['load_average_1m']}"
          f"->{m['load_average_1m_end']}; {args.clock} clock, medians of {args.runs} (PEFT: {args.peft_runs}) "
          f"interleaved runs{', each after a forward pass' if args.after_forward else ''}\n")
    print(markdown_table(
        ["model", "targeted", "kernel", "copy ms", "switch ms", "switch/copy (<=2x)", "addmm switch/copy",
         "PEFT merge+unmerge ms",
         "PEFT/switch (>=5x)", "PEFT/copy (ceiling)", "exact restore", "PEFT drift", "targets"], rows))
    if args.out:
        write_json(args.out, results)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
