"""How an embedding checkpoint says it is used: its sentence-transformers files, read once when the base loads.

    modules.json                       Transformer -> Pooling -> [Normalize]   (the pipeline; Dropout is a no-op)
    sentence_bert_config.json          max_seq_length, do_lower_case            (of the Transformer module)
    1_Pooling/config.json              pooling_mode (or the legacy pooling_mode_*_tokens booleans), include_prompt
    config_sentence_transformers.json  prompts, default_prompt_name, similarity_fn_name

Where a file is absent the defaults are what this service always did: mean pooling, L2 normalisation, and the
longest input the model takes (the tokenizer's model_max_length capped at the position embeddings, which is
also what sentence-transformers falls back to). A module we cannot reproduce (Dense, LayerNorm, ...) is refused
at load, never skipped: skipping it would serve vectors that look right and are not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EmbeddingSpec", "EmbeddingSpecError", "POOLING_MODES", "read_embedding_spec"]

# sentence-transformers' order: a legacy config with several booleans set concatenates them in this order.
_LEGACY_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
POOLING_MODES = tuple(_LEGACY_MODES.values())
_NO_OPS = {"Dropout"}  # identity at inference


class EmbeddingSpecError(ValueError):
    """The checkpoint's sentence-transformers files ask for something this service cannot reproduce."""


@dataclass(frozen=True)
class EmbeddingSpec:
    max_length: int  # tokens per input, special tokens included; longer inputs are truncated
    dimensions: int  # hidden size times the number of pooling modes (they are concatenated)
    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = True  # L2, after pooling
    lower_case: bool = False  # do_lower_case: applied by the tokenizer's normalizer, as sentence-transformers does
    include_prompt: bool = True  # False: prompt tokens take part in the forward but not in the pooling
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity_fn_name: str = "cosine"
    source: str = "defaults"  # "sentence-transformers" when the checkpoint carries modules.json
    prompt_length: int = 0  # tokens of the default prompt that pooling skips (include_prompt=False only)

    @property
    def default_prompt(self) -> str:
        return self.prompts.get(self.default_prompt_name or "", "") if self.default_prompt_name else ""

    def resolve_prompt(self, prompt: str | None = None, prompt_name: str | None = None) -> str:
        """The text prepended to every input, as SentenceTransformer.encode picks it: an explicit prompt, else the
        named one, else the default prompt."""
        if prompt is None and prompt_name is not None:
            if prompt_name not in self.prompts:
                raise EmbeddingSpecError(f"prompt_name {prompt_name!r} is not one of this model's prompts "
                                         f"{sorted(self.prompts)}")
            prompt = self.prompts[prompt_name]
        resolved = self.default_prompt if prompt is None else prompt
        if not self.include_prompt and resolved != self.default_prompt:
            # pooling skips a fixed number of leading tokens, measured on the default prompt at load
            raise EmbeddingSpecError("this model excludes its prompt from pooling (include_prompt=false); only its "
                                     "default prompt is supported")
        return resolved

    def as_dict(self) -> dict[str, Any]:
        return {"pooling": list(self.pooling), "max_length": self.max_length, "normalize": self.normalize,
                "dimensions": self.dimensions, "lower_case": self.lower_case, "include_prompt": self.include_prompt,
                "prompts": dict(self.prompts), "default_prompt_name": self.default_prompt_name,
                "similarity_fn_name": self.similarity_fn_name, "source": self.source}


def _json(path: Path) -> dict | list | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EmbeddingSpecError(f"{path.name} is not valid JSON: {exc}") from exc


def _pooling(config: dict) -> tuple[tuple[str, ...], bool]:
    """(modes, include_prompt) from 1_Pooling/config.json, either format sentence-transformers writes."""
    mode = config.get("pooling_mode")
    if mode is None:  # legacy booleans; none set means mean, as sentence-transformers reads it
        modes = tuple(m for key, m in _LEGACY_MODES.items() if config.get(key)) or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
        raise EmbeddingSpecError(f"pooling mode {unknown[0]!r} is not one of {POOLING_MODES}")
    return modes, bool(config.get("include_prompt", True))


def _modules(root: Path) -> tuple[dict | None, bool]:
    """(the Pooling module's config, whether a Normalize follows it) from modules.json."""
    modules = _json(root / "modules.json")
    pooling, normalize = None, False
    for entry in modules or []:
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1]
        where = root / entry.get("path", "")
        if kind == "Transformer":
            if entry.get("path", "") not in ("", "."):
                raise EmbeddingSpecError(f"the Transformer module lives in {entry['path']!r}; serve that directory")
        elif kind == "Pooling":
            pooling = _json(where / "config.json") or {}
        elif kind == "Normalize":
            target = (_json(where / "config.json") or {}).get("module_input_name", "sentence_embedding")
            if pooling is None or target != "sentence_embedding":
                raise EmbeddingSpecError("modules.json normalizes something other than the pooled embedding")
            normalize = True
        elif kind not in _NO_OPS:
            raise EmbeddingSpecError(f"modules.json has a {kind} module, which this service does not apply; "
                                     "its embeddings would differ from sentence-transformers'")
    return pooling, normalize


def read_embedding_spec(root: Path, tokenizer: Any, positions: int, hidden: int) -> EmbeddingSpec:
    """The spec of the checkpoint in `root`, whose tokenizer and config are already loaded."""
    has_modules = (root / "modules.json").is_file()
    pooling_config, normalize = _modules(root) if has_modules else (None, True)
    modes, include_prompt = _pooling(pooling_config if pooling_config is not None else {})
    bert = _json(root / "sentence_bert_config.json") or {}
    # sentence-transformers' order: an explicit max_seq_length wins; else the tokenizer's, capped at the positions
    # (a tokenizer may say 1e30, or 512 where the table holds 514 rows for RoBERTa's offset). A max_seq_length
    # beyond the positions is capped too: there sentence-transformers would fail on long inputs.
    max_length = min(bert.get("max_seq_length") or int(getattr(tokenizer, "model_max_length", positions)), positions)
    st_config = _json(root / "config_sentence_transformers.json") or {}
    prompts = {str(k): str(v or "") for k, v in (st_config.get("prompts") or {}).items()}
    default_prompt_name = st_config.get("default_prompt_name") or None
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise EmbeddingSpecError(f"default_prompt_name {default_prompt_name!r} is not one of the prompts "
                                 f"{sorted(prompts)}")
    spec = EmbeddingSpec(max_length=int(max_length), dimensions=hidden * len(modes), pooling=modes,
                         normalize=normalize, lower_case=bool(bert.get("do_lower_case", False)),
                         include_prompt=include_prompt, prompts=prompts, default_prompt_name=default_prompt_name,
                         similarity_fn_name=st_config.get("similarity_fn_name") or "cosine",
                         source="sentence-transformers" if has_modules else "defaults")
    if spec.lower_case:
        _lower_case(tokenizer)
    if not include_prompt and spec.default_prompt:
        spec = _with_prompt_length(spec, tokenizer)
    return spec


def _lower_case(tokenizer: Any) -> None:
    """Lower-case in the tokenizer's own normalizer, exactly as sentence-transformers' Transformer does."""
    from tokenizers.normalizers import Lowercase
    from tokenizers.normalizers import Sequence as NormalizerSequence

    backend = tokenizer.backend_tokenizer
    normalizer = backend.normalizer
    inner = list(normalizer) if isinstance(normalizer, NormalizerSequence) else [normalizer] if normalizer else []
    if any(isinstance(n, Lowercase) for n in inner):
        return
    backend.normalizer = NormalizerSequence([Lowercase(), *inner])


def _with_prompt_length(spec: EmbeddingSpec, tokenizer: Any) -> EmbeddingSpec:
    """The default prompt's tokens, less a trailing special token (SEP, EOS), as sentence-transformers counts."""
    from dataclasses import replace

    ids = tokenizer([spec.default_prompt], truncation=True, max_length=spec.max_length)["input_ids"][0]
    length = len(ids) - (1 if ids and ids[-1] in set(tokenizer.all_special_ids) else 0)
    return replace(spec, prompt_length=length)
