"""`python -m adapters.pack DIR OUT.safetensors`: a PEFT adapter directory as one single-file safetensors.

The output holds the tensors, the config as JSON in `__metadata__["adapter_config"]` and any label names in
`__metadata__["labels"]`: the service's single-file upload form (`curl -F adapter=@OUT.safetensors`).
"""

from __future__ import annotations

import argparse
import sys

from adapters.errors import AdapterError
from adapters.serialization import pack_peft_dir

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adapters.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("src", metavar="DIR", help="adapter directory: adapter_config.json + adapter_model.safetensors")
    p.add_argument("out", metavar="OUT", help="the single .safetensors file to write")
    ns = p.parse_args(argv)
    try:
        path = pack_peft_dir(ns.src, ns.out)
    except (AdapterError, OSError) as exc:
        print(f"adapters.pack: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
