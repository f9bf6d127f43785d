"""Adapter switch over HTTP: what `POST /v1/adapters/{name}/merge` costs a client beyond a no-op request, in
copies of the targeted weights, beside PEFT's merge_adapter() + unmerge_adapter(), in one run.

For each base (the packaged MiniLM, the server's default; a GPT-2-small-sized model built from `GPT2Config()`,
random init, saved to a temporary folder with a small local tokenizer), PEFT makes two random adapters A and B
(rank 8, `all-linear`, `init_lora_weights=False`) and saves them; the real server (`python -m service`, a
subprocess on 127.0.0.1, `--device cpu`) stores both and merges A. Then, interleaved round by round:

  copy      w.copy_(src) over every targeted weight, in this process: the floor any exact switch must pay
  switch    LoraModel.merge() alternately of B and A on a copy of the base in this process: the switch itself
  http      POST /v1/adapters/{B, A, ...}/merge, alternately: a switch as a client sees it
  no-op     POST /v1/adapters/{the merged one}/merge: the same route, auth, queue trip and answer, no weight written
  peft      PEFT's merge_adapter() followed by unmerge_adapter() on adapter A (one sample per pair)

and, fewer times, GET /v1/state?fingerprints=true (what each merge answer cost before fingerprints were made
optional). The in-process contenders and the requests are timed in alternating blocks, each group interleaved
within itself, not in the same rounds (see _time). Targets: median(http) - median(no-op) <= 2 copies, and
PEFT >= 5x that on GPT-2 small. Checked, not timed: after all the switches, an unmerge gives
fingerprint == pristine_fingerprint.

Usage: python benchmarks/bench_switch_http.py [--models minilm,gpt2] [--runs 42] [--peft-runs 9] [--threads 1]
                                              [--out F]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters import LoraModel, load_peft_dir  # noqa: E402
from benchmarks.bench_http import free_port, start_server  # noqa: E402
from benchmarks.bench_switch import _peft_pair  # noqa: E402
from benchmarks.common import (  # noqa: E402
    build_gpt2_small,
    interleaved_times,
    load_minilm,
    machine_info,
    markdown_table,
    summary,
    write_json,
)

HTTP_OVER_COPY_MAX, PEFT_OVER_HTTP_MIN = 2.0, 5.0


def _save_gpt2(model: torch.nn.Module, folder: Path) -> Path:
    """The model and a small byte-level BPE tokenizer trained here (the server needs one to start; nothing
    here tokenizes), so that the server loads the very weights this process times PEFT on."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["adapters switch over http in a few milliseconds"] * 8, vocab_size=300,
                            special_tokens=["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def _upload(client: httpx.Client, name: str, folder: Path) -> None:
    files = {f: (f, (folder / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}
    client.put(f"/v1/adapters/{name}", files=files).raise_for_status()


def bench_model(key: str, label: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = load_minilm() if key == "minilm" else build_gpt2_small()
        extra = ["--base-model", str(_save_gpt2(base, tmp / "base"))] if key == "gpt2" else []
        ours_model = copy.deepcopy(base)
        pm = _peft_pair(base, args.rank, "all-linear", tmp / "adapters")  # adapters x and y, as bench_switch
        lm = LoraModel(ours_model)
        lm.add_adapter("x", load_peft_dir(tmp / "adapters" / "x"))
        lm.add_adapter("y", load_peft_dir(tmp / "adapters" / "y"))
        lm.merge("x")
        targeted = list(lm.merge_target_weights().values())
        sources = [w.detach().clone() for w in targeted]

        port = free_port()
        proc = start_server(tmp / "store", port, "--device", "cpu", "--max-rank", "64", *extra)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                _upload(client, "x", tmp / "adapters" / "x")
                _upload(client, "y", tmp / "adapters" / "y")
                client.post("/v1/adapters/x/merge").raise_for_status()
                result = _time(client, lm, pm, targeted, sources, args)
                client.post("/v1/unmerge").raise_for_status()
                state = client.get("/v1/state", params={"fingerprints": "true"}).json()
                result["restored_exactly_over_http"] = state["fingerprint"] == state["pristine_fingerprint"]
        finally:
            proc.terminate()
            proc.wait(30)
    result.update(model=label, rank=args.rank, targeted_layers=len(targeted),
                  targeted_parameters=sum(w.numel() for w in targeted),
                  targeted_bytes=sum(w.numel() * w.element_size() for w in targeted))
    return result


def _time(client: httpx.Client, lm: LoraModel, pm, targeted: list[torch.Tensor], sources: list[torch.Tensor],
          args) -> dict:
    served = {"merged": "x"}  # what the server has merged
    local = {"merged": "x"}

    @torch.no_grad()
    def copy_all() -> None:
        for w, src in zip(targeted, sources, strict=True):
            w.copy_(src)

    def switch() -> None:
        local["merged"] = "y" if local["merged"] == "x" else "x"
        lm.merge(local["merged"])

    def http_switch() -> None:
        served["merged"] = "y" if served["merged"] == "x" else "x"
        r = client.post(f"/v1/adapters/{served['merged']}/merge")
        r.raise_for_status()
        assert r.json()["merged_adapter"] == served["merged"] and r.json()["fingerprint"] is None

    def http_noop() -> None:
        client.post(f"/v1/adapters/{served['merged']}/merge").raise_for_status()

    def http_fingerprints() -> None:
        client.get("/v1/state", params={"fingerprints": "true"}).raise_for_status()

    def peft_merge_unmerge() -> None:
        pm.merge_adapter()
        pm.unmerge_adapter()

    # Two groups, timed in alternating blocks, each interleaved within itself: in-process work and requests
    # to the server never share a round, because after its work either process's OpenMP threads spin for a
    # while on the same cores, which would bill one side's spinning to the other's timing (PEFT's many small
    # ops suffered 10-50x from the server's spinning when they were interleaved).
    groups = [({"copy": copy_all, "switch": switch, "peft": peft_merge_unmerge}, ("peft",)),
              ({"http": http_switch, "noop": http_noop, "fingerprints": http_fingerprints}, ("fingerprints",))]
    times: dict[str, list[float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's, on every merge of GPT-2's Conv1D
        for _ in range(args.blocks):
            for fns, few in groups:
                runs = {k: -(-(args.peft_runs if k in few else args.runs) // args.blocks) for k in fns}
                for k, v in interleaved_times(fns, runs, "cpu", warmup=1).items():
                    times.setdefault(k, []).extend(v)
                time.sleep(0.2)  # the spinning threads settle
    s = {k: summary(v) for k, v in times.items()}
    copy_ms, net_ms = s["copy"]["median_ms"], s["http"]["median_ms"] - s["noop"]["median_ms"]
    return {
        **{k: s[k] for k in ("copy", "switch", "http", "noop", "fingerprints")}, "peft_merge_unmerge": s["peft"],
        "http_minus_noop_ms": net_ms, "http_minus_noop_over_copy": net_ms / copy_ms,
        "switch_over_copy": s["switch"]["median_ms"] / copy_ms,
        "http_minus_noop_over_switch": net_ms / s["switch"]["median_ms"],
        "peft_over_http_minus_noop": s["peft"]["median_ms"] / net_ms,
        "samples_s": times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,gpt2", help="comma-separated: minilm, gpt2")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--runs", type=int, default=41, help="samples of copy, switch, http and no-op")
    parser.add_argument("--peft-runs", type=int, default=9, help="samples of PEFT and of the fingerprinted state")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads here and in the server (OMP_NUM_THREADS); default: torch's")
    parser.add_argument("--blocks", type=int, default=3, help="alternating blocks of in-process and HTTP timings")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    if args.threads:  # both processes alike: the server inherits the variable
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    labels = {"minilm": "MiniLM-L6 (pretrained)", "gpt2": "GPT-2 small (random init)"}
    results = {"machine": machine_info("cpu"), "args": vars(args), "models": []}
    started = time.perf_counter()
    for key in args.models.split(","):
        print(f"... {labels[key]}", flush=True)
        results["models"].append(bench_model(key, labels[key], args))
    results["machine"]["load_average_1m_end"] = machine_info("cpu")["load_average_1m"]

    rows = []
    for r in results["models"]:
        ok = r["http_minus_noop_over_copy"] <= HTTP_OVER_COPY_MAX and (
            "GPT-2" not in r["model"] or r["peft_over_http_minus_noop"] >= PEFT_OVER_HTTP_MIN)
        rows.append([
            r["model"], f'{r["targeted_layers"]} layers / {r["targeted_parameters"] / 1e6:.1f}M',
            f'{r["copy"]["median_ms"]:.1f}', f'{r["switch"]["median_ms"]:.1f}', f'{r["http"]["median_ms"]:.1f}',
            f'{r["noop"]["median_ms"]:.1f}', f'{r["http_minus_noop_ms"]:.1f}',
            f'{r["http_minus_noop_over_copy"]:.2f}x', f'{r["switch_over_copy"]:.2f}x',
            f'{r["http_minus_noop_over_switch"]:.2f}x', f'{r["peft_merge_unmerge"]["median_ms"]:.1f}',
            f'{r["peft_over_http_minus_noop"]:.1f}x', f'{r["fingerprints"]["median_ms"]:.1f}',
            "yes" if r["restored_exactly_over_http"] else "NO", "met" if ok else "MISSED",
        ])
    m = results["machine"]
    print(f"\n{m['cpu']}, nproc {m['nproc']}, torch {m['torch']} ({m['torch_threads']} threads), fp32, all-linear, "
          f"rank {args.rank}, load avg {m['load_average_1m']}->{m['load_average_1m_end']}; medians of {args.runs} "
          f"(PEFT, fingerprints: {args.peft_runs}) runs in {args.blocks} alternating blocks; "
          f"{time.perf_counter() - started:.0f} s\n")
    print(markdown_table(
        ["model", "targeted", "copy ms", "switch ms (in-process)", "HTTP switch ms", "HTTP no-op ms",
         "HTTP - no-op ms", "(HTTP - no-op) / copy (<=2x)", "switch / copy", "(HTTP - no-op) / switch",
         "PEFT merge+unmerge ms",
         "PEFT / (HTTP - no-op) (>=5x on GPT-2)", "state?fingerprints=true ms", "exact restore", "targets"], rows))
    if args.out:
        write_json(args.out, results)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
