"""`modules_to_save`: whole modules (e.g. a classifier head) that an adapter replaces outright.

The wrapper keeps the original module untouched and, per adapter, only the replacement tensors. A
forward runs the original module's code with the adapter's tensors (`torch.func.functional_call`), so
no module is copied, and a mixed batch runs each row group with its own adapter's head.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from adapters.errors import AdapterMismatchError
from adapters.routing import Router

__all__ = ["SavedModuleWrapper"]


class SavedModuleWrapper(nn.Module):
    def __init__(self, original_module: nn.Module, router: Router) -> None:
        super().__init__()
        self.original_module = original_module
        self.replacements: dict[str, dict[str, torch.Tensor]] = {}  # adapter -> {param name -> tensor}
        self.active_adapter: str | None = None
        self._router = router

    def add_adapter(self, name: str, params: dict[str, torch.Tensor]) -> None:
        self.replacements[name] = params

    def remove_adapter(self, name: str) -> None:
        self.replacements.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None

    def _run(self, name: str | None, *args, **kwargs):
        params = self.replacements.get(name) if name is not None else None
        if not params:
            return self.original_module(*args, **kwargs)
        return functional_call(self.original_module, params, args, kwargs, strict=False)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        names = self._router.row_names
        if not names or x.dim() == 0 or x.shape[0] % len(names):
            return self._run(self.active_adapter, x, *args, **kwargs)
        # x's rows j·k … j·k+k-1 are routed row j's: k = 1, or k beams per row (see routing.rows_per_route)
        k = x.shape[0] // len(names)
        groups: dict[str | None, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n if n in self.replacements else None, []).extend(range(i * k, i * k + k))
        if len(groups) == 1:
            return self._run(next(iter(groups)), x, *args, **kwargs)
        outs = {n: (rows, self._run(n, x[rows], *args, **kwargs)) for n, rows in groups.items()}
        shapes = {tuple(o.shape[1:]) for _, o in outs.values()}
        if len(shapes) != 1:
            raise AdapterMismatchError(f"adapters in one batch replace {type(self.original_module).__name__} "
                                       f"with different output shapes {sorted(shapes)}")
        first = next(iter(outs.values()))[1]
        result = first.new_empty((x.shape[0], *first.shape[1:]))  # (B, …)
        for rows, out in outs.values():
            result[rows] = out
        return result
