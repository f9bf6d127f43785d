"""Continuous batching for causal LMs: requests join and leave a running decode between steps.

    join(items)   prefill the newcomers as a batch of their own (left-padded, routed per row), then splice
                  their KV cache into the running one, both left-padded to a common length
    step()        one token for every row; finished rows are answered and dropped from the cache; then one
                  forward for the rest, whatever their adapters

So a request never waits for a running batch to end, and a short one is answered while long ones go on.
Positions come from each row's own count of real tokens, and padding is masked, so a row's tokens do not
depend on who joins or leaves (each row also keeps its own seeded generator). The Scheduler's loop
thread calls join and step, under the WeightOwner's lock; between steps it runs other work (merges, deletes).

Splicing needs a plain DynamicCache whose layers hold nothing but (batch, heads, time, dim) key and value
tensors. For any other cache (sliding windows, hybrid layers, older transformers) `can_join` is False while
a decode runs, and newcomers wait for it to end, as in static batching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapters import LoraModel
from service.base_model import LoadedBase
from service.engine.errors import NonFiniteOutputError
from service.engine.generation import Row, advance, cache_argument, cache_of, complete, sample, top_logprobs
from service.engine.requests import WorkItem
from service.engine.runner import collate, routing

__all__ = ["Decoder"]


def _kv_layers(cache: object) -> list | None:
    """The layers of a plain DynamicCache, each holding just `keys` and `values` (B, H, T, D); else None. Exact
    types only: subclasses carry more per-row state (sliding windows, Mamba states, indexer keys) that a
    splice of keys and values alone would leave at the old batch size."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # an older transformers: static batches
        return None
    if type(cache) is not DynamicCache or not getattr(cache, "layers", None):
        return None
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or not all(
                isinstance(getattr(layer, attr, None), torch.Tensor) for attr in ("keys", "values")):
            return None
    return list(cache.layers)


def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """n zeros before the first entry of `dim` (masked out: they are padding)."""
    if n == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [n, 0]  # F.pad lists dims from the last one backwards
    return F.pad(t, pad)


class Decoder:
    def __init__(self, lm: LoraModel, base: LoadedBase) -> None:
        self.lm, self.base = lm, base
        self.rows: list[Row] = []  # in batch order: row i is row i of the cache, mask, positions and logits
        self._cache: object = None
        self._mask: torch.Tensor | None = None  # (B, T): 1 for real tokens
        self._pos: torch.Tensor | None = None  # (B, 1): each row's last position
        self._logits: torch.Tensor | None = None  # (B, V): the next token's logits, float32
        self._cache_arg = cache_argument(base.model)

    def running(self) -> int:
        return sum(row.finish is None for row in self.rows)

    @property
    def active(self) -> bool:
        return self.running() > 0

    def adapters(self) -> set[str]:
        """The keys (sha256) of the adapters running rows use: they must stay resident until those rows end."""
        return {row.item.key for row in self.rows if row.finish is None and row.item.key is not None}

    def names(self) -> set[str]:
        """The names of the adapters running rows use (engine.forget fails those rows)."""
        return {row.item.adapter for row in self.rows if row.finish is None and row.item.adapter is not None}

    def can_join(self) -> bool:
        return not self.active or _kv_layers(self._cache) is not None

    # ------------------------------------------------------------------ join
    @torch.inference_mode()
    def join(self, items: list[WorkItem]) -> None:
        """Prefill `items` and add them to the running batch (the caller checked `can_join`)."""
        enc = collate(self.base, [it.encoded[0] for it in items], side="left")  # prompts tokenized off the loop
        ids, mask = enc["input_ids"], enc["attention_mask"]  # (b, t)
        rows = [Row(it, len(it.encoded[0])) for it in items]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, t): left padding keeps real positions at 0..n-1
        with routing(self.lm, [it.key for it in items]):  # by content: the version each request resolved
            out = self.base.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache, logits = cache_of(out), out.logits[:, -1].float()  # (b, V)
        for row in rows:
            if row.finish is not None:  # max_tokens=0: answered now, never decoded
                complete(row)
        if not self.active:
            self.rows, self._cache, self._mask, self._pos, self._logits = rows, cache, mask, pos[:, -1:], logits
        else:
            self._splice(rows, cache, mask, pos[:, -1:], logits)
        self._drop_finished()
        if not self.active:
            self._clear()

    def _splice(self, rows: list[Row], cache: object, mask: torch.Tensor, pos: torch.Tensor,
                logits: torch.Tensor) -> None:
        old_layers, new_layers = _kv_layers(self._cache), _kv_layers(cache)
        if old_layers is None or new_layers is None or len(old_layers) != len(new_layers):
            raise RuntimeError("this model's KV cache cannot be spliced; the engine should have checked can_join")
        t_old, t_new = self._mask.shape[1], mask.shape[1]
        t = max(t_old, t_new)
        # Every new tensor first, then the assignments: a failure (out of memory) leaves the running batch whole.
        def joined(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:  # (B, H, T, D) ++ (b, H, T', D)
            return torch.cat([_left_pad(old, t - t_old, 2), _left_pad(new, t - t_new, 2)])  # -> (B+b, H, t, D)

        spliced = [(joined(old.keys, new.keys), joined(old.values, new.values))
                   for old, new in zip(old_layers, new_layers, strict=True)]
        for old, (keys, values) in zip(old_layers, spliced, strict=True):
            old.keys, old.values = keys, values
        self._mask = torch.cat([_left_pad(self._mask, t - t_old, 1), _left_pad(mask, t - t_new, 1)])  # (B+b, t)
        self._pos = torch.cat([self._pos, pos])  # (B+b, 1)
        self._logits = torch.cat([self._logits, logits])  # (B+b, V)
        self.rows = self.rows + rows

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def step(self) -> None:
        """One token for every running row, then one forward for those still running."""
        tok, stops = self.base.tokenizer, self.base.stop_ids
        rider = min(stops, default=0)  # the token a finished row is fed, when the cache cannot drop rows
        finite = torch.isfinite(self._logits).all(-1).tolist()  # (B,): an adapter may overflow its own rows
        all_logprobs = torch.log_softmax(self._logits, -1)  # (B, V): the model's own distribution, in one call
        next_ids = []
        for i, row in enumerate(self.rows):
            if row.finish is None and row.item.abandoned:
                row.finish = "abandoned"  # its client disconnected: stop spending steps on it
            if row.finish is None and not finite[i]:
                row.finish = "error"
                row.item.fail(NonFiniteOutputError(row.item.adapter))
            if row.finish is not None:
                next_ids.append(rider)
                continue
            try:
                token = sample(self._logits[i], row.req.temperature, row.req.top_p, row.gen)
                logprobs = all_logprobs[i]  # (V,)
                advance(row, token, logprobs[token].item(), top_logprobs(logprobs, row.req.logprobs, tok), tok, stops)
            except Exception as exc:  # noqa: BLE001 - this row's own settings or text failed: it fails alone
                row.finish = "error"
                row.item.fail(exc)
                next_ids.append(rider)
                continue
            next_ids.append(token)
            if row.finish is not None:  # answered now, not when the batch's longest request ends
                complete(row)
        step = torch.tensor(next_ids, device=self.base.device).unsqueeze(1)  # (B, 1)
        step = self._drop_finished(step)
        if not self.active:
            self._clear()
            return
        self._mask = torch.cat([self._mask, torch.ones_like(step)], dim=1)  # (B, T+1)
        # A rider must not run past the position table: a short prompt may decode far longer than a long one.
        self._pos = (self._pos + 1).clamp(max=self.base.max_length - 1)  # (B, 1)
        # Riders (rows the cache could not drop) run as base rows: their adapter may be gone by now.
        with routing(self.lm, [row.item.key if row.finish is None else None for row in self.rows]):
            out = self.base.model(input_ids=step, attention_mask=self._mask, position_ids=self._pos, use_cache=True,
                                  **{self._cache_arg: self._cache})
        self._cache, self._logits = cache_of(out), out.logits[:, -1].float()

    def _drop_finished(self, step: torch.Tensor | None = None) -> torch.Tensor | None:
        """Take finished rows out of the batch (when the cache allows it), then the padding columns that no
        row needs any more, so the cache never outgrows its longest running row however long the decode
        stays busy. Returns `step` for the rows kept."""
        keep = [i for i, row in enumerate(self.rows) if row.finish is None]
        layers = _kv_layers(self._cache)
        if len(keep) == len(self.rows) or not keep or layers is None:
            return step
        index = torch.tensor(keep, device=self.base.device)
        self._mask, self._pos, self._logits = self._mask[index], self._pos[index], self._logits[index]
        self.rows = [self.rows[i] for i in keep]
        first = int(self._mask.any(0).nonzero()[0])  # the first column holding a real token of any row
        self._mask = self._mask[:, first:]  # (B', T - first)
        for layer in layers:  # (B, H, T, D) -> (B', H, T - first, D)
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]
        return step[index] if step is not None else None

    def _clear(self) -> None:
        self.rows, self._cache, self._mask, self._pos, self._logits = [], None, None, None, None

    # ------------------------------------------------------------------ failures
    def fail(self, exc: Exception, adapter: str | None = None) -> None:
        """Fail the running rows (only those using `adapter`, when given); the others go on."""
        for row in self.rows:
            if row.finish is None and (adapter is None or row.item.adapter == adapter):
                row.finish = "error"
                row.item.fail(exc)
        if not self.active:
            self._clear()
        else:
            self._drop_finished()
