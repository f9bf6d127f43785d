"""Mixed batches: which rows of a forward use which adapter, and the tables that serve them in one gather.

    LoraModel.route(["a", None, "b", "a"])  ──►  Router.row_ids = [1, 0, 2, 1]   (global ids, 0 = the base)
                                                      │ every LoraLinear of the model shares it
    stacked_tables(layer):  table[global id] = slot;  A (slots, R, in), B (slots, out, R), scaling folded in
    mixed forward (layer.py):  row i += x_i · A[table[id_i]]ᵀ · B[table[id_i]]ᵀ   (one gather, two bmm)

A layer may see more rows than were routed: OPT flattens (B, T, H) to (B·T, H) before its MLP, and beam search
repeats each row k times; `rows_per_route` follows the rows through any such order-keeping reshape. Training
under route() (gradients or dropout) takes `grouped_forward`, one branch per adapter over its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from adapters.errors import AdapterMismatchError

if TYPE_CHECKING:
    from adapters.layer import LoraLinear

__all__ = ["Router", "rows_per_route", "stacked_tables", "grouped_forward"]


@dataclass
class Router:
    """Per-forward routing shared by every layer of one model. `row_ids[i]` is the global id of row i's
    adapter (0 = base). Set by `LoraModel.route()`; None means "use the active adapter for every row"."""

    row_ids: torch.Tensor | None = None  # (B,) int64 on the model's device
    row_names: list[str | None] | None = None
    version: int = 0  # bumped when the set of resident adapters or the merged adapter changes


def rows_per_route(router: Router, rows: int) -> int:
    """How many consecutive rows of a forward's input belong to each routed row: 1 for (B, …); T when a model
    flattened (B, T, H) to (B·T, H) (OPT's MLP, Qwen2-MoE's shared expert); k for a batch that beam search
    expanded to k·B with repeat_interleave. Row j then belongs to routed row j // k, whichever it is. A layer
    that sees only some tokens (a per-expert Linear in Switch Transformers or NLLB-MoE) breaks that rule: it is
    refused when its row count is not a multiple of B, but cannot be caught when it is; do not route such
    layers."""
    bsz = router.row_ids.shape[0]
    if rows == bsz:
        return 1
    if not bsz or rows % bsz:
        raise AdapterMismatchError(f"route() named {bsz} rows, but this forward has {rows}, not a multiple of "
                                   f"{bsz}: which row uses which adapter cannot be told; give one adapter name per "
                                   "row of the batch")
    return rows // bsz


def stacked_tables(layer: LoraLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(table, A stack (slots, R, in), B stack (slots, out, R)) of the layer's resident adapters.

    Slot k>0 holds adapter k padded to the widest rank R. While M is merged every other slot carries
    M's negated branch concatenated along the rank axis, and M's own slot is empty, so one gather
    still gives each row exactly its own adapter."""
    names = layer.adapter_names()
    merged = layer.merged_adapter
    w = layer.lora_A[names[0]].weight
    pieces: dict[str | None, list[tuple[torch.Tensor, torch.Tensor]]] = {None: []}
    for name in names:
        own = (layer.lora_A[name].weight, layer.lora_B[name].weight * layer.scaling[name])  # (r, in), (out, r)
        pieces[name] = [] if name == merged else [own]
    if merged is not None:
        neg = (layer.lora_A[merged].weight, layer.lora_B[merged].weight * -layer.scaling[merged])
        for name in pieces:
            if name != merged:
                pieces[name].append(neg)
    rank = max([sum(a.shape[0] for a, _ in p) for p in pieces.values()] + [1])
    global_ids = layer._global_ids
    table = torch.zeros(max(global_ids.values(), default=0) + 1, dtype=torch.long, device=w.device)
    a_stack = torch.zeros(len(pieces), rank, layer.in_features, dtype=w.dtype, device=w.device)
    b_stack = torch.zeros(len(pieces), layer.out_features, rank, dtype=w.dtype, device=w.device)
    for slot, (name, parts) in enumerate(pieces.items()):
        if name is not None:
            table[global_ids[name]] = slot
        offset = 0
        for a, b in parts:
            a_stack[slot, offset:offset + a.shape[0]] = a.detach()
            b_stack[slot, :, offset:offset + a.shape[0]] = b.detach()
            offset += a.shape[0]
    return table, a_stack, b_stack


def grouped_forward(layer: LoraLinear, x: torch.Tensor, result: torch.Tensor, per_row: int = 1) -> torch.Tensor:
    """Training under route(): one branch per adapter over its own rows, with dropout and gradients.
    Routed row i owns x's rows i·per_row … i·per_row + per_row - 1 (see rows_per_route)."""
    groups: dict[str | None, list[int]] = {}
    for i, name in enumerate(layer._router.row_names or []):
        groups.setdefault(name if name in layer._ab else None, []).append(i)
    merged = layer.merged_adapter
    delta = torch.zeros_like(result)  # (N, …, out)
    offsets = torch.arange(per_row, device=x.device)  # (k,)
    for name, rows in groups.items():
        if name == merged:
            continue  # already in W
        # (n,) routed rows -> (n, 1) * k + (k,) -> (n·k,) rows of x, in order
        idx = (torch.tensor(rows, device=x.device).unsqueeze(1) * per_row + offsets).reshape(-1)
        d = layer._branch(x[idx], name) if name is not None else 0
        if merged is not None:
            d = d + layer._branch(x[idx], merged, sign=-1.0)
        delta = delta.index_add(0, idx, d.to(result.dtype))
    return result + delta

