#!/usr/bin/env python3
"""Graph census: the kernels one compiled step launches, in total, per layer and by component.

A kernel is a node of the compiled graph that runs code on the device: each fused region
(`Compiled...`) and each custom-kernel site counts once, as does every other primitive except
views (slices, reshapes of contiguous arrays, broadcasts, transposes, dtype views), which move
no data. On a GPU every kernel is a launch. A custom kernel is a `CustomKernel` node on its
backend; with `--as metal` or `--as cuda` on a machine without that backend it cannot be built,
and each launch site is a `kernels.stand_in` node (a `Depends`, which nothing else in the step
uses) instead, so the census counts the same sites either way.

The total comes from the step as the engine runs it (one `mx.compile`d graph). The breakdown
compiles each component of each layer on its own, with its inputs evaluated, so fusion across
a component boundary is not seen there; its sum is therefore an upper bound of the total.

    python speed-bench/census.py                          # embedded model, decode at position 600
    python speed-bench/census.py --model L4E16.gguf --position 200 --tokens 2
    python speed-bench/census.py --json census.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import os
import re
import sys
from pathlib import Path

VIEWS = {"Slice", "Reshape", "Squeeze", "ExpandDims", "Broadcast", "Transpose", "StopGradient", "AsStrided",
         "Split", "BroadcastAxes", "Unflatten", "Flatten"}
CUSTOM_KERNEL = {"CustomKernel", "Depends"}  # a kernel on its backend, its census stand-in elsewhere
COMPONENTS = ("hc_pre", "attention", "hc_post", "moe")


def kernel_counts(outputs) -> collections.Counter:
    """Primitive name -> count over the graph that computes `outputs` (views excluded)."""
    import mlx.core as mx

    buf = io.StringIO()
    mx.export_to_dot(buf, *outputs)
    names = re.findall(r'label ="([^"]+)", shape=rectangle', buf.getvalue())
    counts = collections.Counter()
    for name in names:
        if name in VIEWS or name.startswith("View "):
            continue
        if name in CUSTOM_KERNEL:
            name = "custom kernel"
        counts["fused region" if name.startswith("Compiled") else name] += 1
    return counts


def _flatten(obj, out: list):
    import mlx.core as mx

    if isinstance(obj, mx.array):
        out.append(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _flatten(getattr(obj, f.name), out)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _flatten(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _flatten(o, out)
    return out


def _unflatten(obj, it):
    import mlx.core as mx

    if isinstance(obj, mx.array):
        return next(it)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _unflatten(getattr(obj, f.name), it)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unflatten(o, it) for o in obj)
    if isinstance(obj, dict):
        return {k: _unflatten(v, it) for k, v in obj.items()}
    return obj


def component_census(model, tokens, state) -> list[tuple[str, int]]:
    """(component, kernels) in execution order for an uncompiled step whose components are
    each compiled alone."""
    import mlx.core as mx

    import ds4.model as M

    record = []

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            mx.eval(_flatten((args, kwargs), []))
            template = fn(*args, **kwargs)
            flat = mx.compile(lambda: _flatten(fn(*args, **kwargs), []))()
            record.append((name, sum(kernel_counts(flat).values())))
            return _unflatten(template, iter(flat))
        return wrapper

    saved = {name: getattr(M, name) for name in COMPONENTS}
    head = model.head
    try:
        for name in COMPONENTS:
            setattr(M, name, counting(name, saved[name]))
        model.head = counting("head", head)
        out = model.step(tokens, state, compiled=False)
        mx.eval(out.arrays())
    finally:
        for name, fn in saved.items():
            setattr(M, name, fn)
        model.head = head
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file (default: the embedded demo model)")
    ap.add_argument("--backend", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--position", type=int, default=600, help="tokens before the step")
    ap.add_argument("--tokens", type=int, default=1, help="rows in the step (1 = decode, 2..17 = verify)")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--as", dest="as_device", choices=["cpu", "metal", "cuda"],
                    help="pick kernel-table entries as on this backend (default: the one running)")
    ap.add_argument("--json", help="also write the figures as JSON")
    args = ap.parse_args()

    os.environ["DS4_COMPILE"] = "1"  # count the graph a compiled step launches, on any backend
    import ds4  # noqa: F401  (BLAS choice before mlx.core)
    import mlx.core as mx
    import numpy as np

    from ds4.loader import EMBEDDED_MODEL, open_model
    from ds4.model import Model

    mx.set_default_device(mx.gpu if args.backend == "gpu" else mx.cpu)
    path = args.model or str(EMBEDDED_MODEL)
    model = Model.load(open_model(path))
    c = model.config
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, c.n_vocab, args.position + args.tokens).tolist()
    state = model.empty_state(args.ctx, max(args.position, args.tokens))
    out = model.step(prompt[:args.position], state)
    mx.eval(out.arrays())
    state = out.state
    state.store.record(0, prompt[:args.position])
    step_tokens = prompt[args.position:]

    from contextlib import nullcontext

    from ds4 import kernels

    with kernels.as_device(args.as_device) if args.as_device else nullcontext(), kernels.stand_ins():
        model._compiled.clear()
        total = kernel_counts(model.step(step_tokens, state, all_logits=args.tokens > 1).arrays())
        parts = component_census(model, step_tokens, state)
    per_layer, i = [], 0
    for il in range(c.n_layer):
        layer = parts[i:i + 6]
        i += 6
        by = collections.Counter()
        for name, n in layer:
            by[name] += n
        per_layer.append({"layer": il, "kind": c.layer_kind(il).name.lower(), "kernels": sum(by.values()), **by})
    head = sum(n for name, n in parts[i:] if name == "head")

    n_total = sum(total.values())
    table = f" (kernel table as on {args.as_device})" if args.as_device else ""
    print(f"census: {Path(path).name}, {args.backend}{table}, {args.tokens}-row step at position {args.position}")
    print(f"kernels per step: {n_total} ({n_total / c.n_layer:.1f} per layer incl. head); "
          f"fused regions {total['fused region']}, custom kernels {total['custom kernel']}")
    print("by primitive: " + ", ".join(f"{k} {v}" for k, v in total.most_common()))
    print(f"{'layer':>5} {'kind':>10} {'total':>6} " + " ".join(f"{n:>9}" for n in COMPONENTS))
    for row in per_layer:
        print(f"{row['layer']:>5} {row['kind']:>10} {row['kernels']:>6} " +
              " ".join(f"{row.get(n, 0):>9}" for n in COMPONENTS))
    print(f"{'head':>5} {'':>10} {head:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": path, "backend": args.backend, "tokens": args.tokens,
                                               "position": args.position, "total": n_total,
                                               "by_primitive": dict(total), "layers": per_layer, "head": head},
                                              indent=1))


if __name__ == "__main__":
    sys.exit(main())
