"""Rehearse the GPU machine's package set on this machine: a folder of links to only what that machine has (torch,
transformers, peft, safetensors, httpx, prometheus-client, uvloop, tqdm, jinja2, pip and what they require), and a
`python` wrapper that sees nothing else. run.sh --wheels then has to bring the rest, as it will there.

    python benchmarks/gpu/bare_env.py DIR          # makes DIR/site and DIR/python
    PYTHON=DIR/python bash benchmarks/gpu/run.sh OUT --device cpu --wheels WHEELS   # WHEELS for this Python
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

ROOTS = ["torch", "transformers", "peft", "safetensors", "httpx", "prometheus-client", "uvloop", "tqdm", "jinja2",
         "pip"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> set[str]:
    """The installed distributions `roots` need, following requirements without extras or unmet markers."""
    seen: set[str] = set()
    todo = [_norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            from packaging.requirements import Requirement  # noqa: PLC0415 - pip's own vendored copy is not public

            r = Requirement(req)
            if r.marker is None or r.marker.evaluate():
                todo.append(_norm(r.name))
    return seen


def main(argv: list[str]) -> int:
    out = Path(argv[0]).resolve()
    site = out / "site"
    site.mkdir(parents=True, exist_ok=True)
    names = closure(ROOTS)
    for name in sorted(names):
        dist = md.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = Path(str(dist.locate_file(top)))
            if src.exists() and not (site / top).exists() and top != "__pycache__":
                (site / top).symlink_to(src)
    wrapper = out / "python"
    wrapper.write_text(f'#!/bin/sh\n# {len(names)} distributions: {" ".join(sorted(names))}\n'
                       f'PYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{site}" exec {sys.executable} -S "$@"\n')
    wrapper.chmod(0o755)
    print(f"{wrapper}: {len(names)} distributions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
