"""Host time of eager calls: each batch-1 op (the Triton ops, the C++ conv block through autograd,
the PLN's SGD step), the meta-loss's batch-84 head, and the whole PLN inner step, fused against
the twin.

At batch 1 an eager call is bound by the host (Python, the dispatcher, the launch), not the card.
For each call this times, on one GPU and in one run (the implementations taking turns, medians of
ROUNDS rounds: the host's times drift by 10-30% over seconds):
  host us    a call, over many calls without synchronising (the card keeps up: the host's cost)
  synced us  a call that ends with torch.cuda.synchronize() (what the eager benchmark rows time)
for these implementations (IMPLS), each a setting of the package's eager path:
  twin            the plain-PyTorch twin
  compiled        the compiled op as it runs by default: a plain eager call skips torch's custom-op
                  dispatch (kernels/_eager.py), is replayed from its recorded plan where C++ holds
                  one (kernels/_plan.py, csrc/triton_plan.cpp), and its Triton launches go from
                  C++ (csrc/triton_launch.cpp) once compiled
  no_plans        the same without plans: the op's Python runs every call
  python_launch   the same, with the launches through kernels/_launch.py's Python cache
  dispatched      the compiled op through torch's custom-op dispatch, C++ launches
  before          through the dispatch and the Python cache: the package before both
  triton_path     through the dispatch, every launch on Triton's own `kernel[grid](...)` path

    python3 bench/host_cost.py                # writes bench/results/host-cost-<card>.{json,md}
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import card_slug  # noqa: E402

from anml_fast import ops  # noqa: E402
from anml_fast.kernels import _eager, _launch, _plan  # noqa: E402

# implementation -> (the twin?, direct eager calls, C++ launch, cached launch, plans)
IMPLS = {"twin": (True, True, True, True, True), "compiled": (False, True, True, True, True),
         "no_plans": (False, True, True, True, False),
         "python_launch": (False, True, False, True, False), "dispatched": (False, False, True, True, False),
         "before": (False, False, False, True, False), "triton_path": (False, False, False, False, False)}


def _set(impl: str) -> None:
    _, direct, cxx, cached, plans = IMPLS[impl]
    _eager.ENABLED[0], _launch._CXX_ENABLED[0], _launch._ENABLED[0] = direct, cxx and CXX_BUILT, cached
    _plan.enable(plans)


ROUNDS = 5  # turns each implementation takes (interleaved); medians reported
CXX_BUILT = False  # whether the C++ launch works here (set in main)


def per_call_us(fn, calls: int, synced: bool) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
        if synced:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


@triton.jit
def _store_kernel(A, B, C, D, Out, n, m, k, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr, PDL: tl.constexpr):
    """Stores one value: a launch as wide as the package's (pointers, sizes, a float, constexprs)."""
    offs = tl.arange(0, BLOCK)
    tl.store(Out + offs, tl.load(A + offs, mask=offs < n) * scale, mask=offs < n)


def launch_only_us(calls: int) -> dict:
    """Host us a launch of _store_kernel (13 arguments): from C++, from the Python cache, on
    Triton's path; same run."""
    a = torch.zeros(16, device="cuda")
    args = (a, a, a, a, torch.empty(16, device="cuda"), 16, 3, 5, 0.5)
    kw = dict(BLOCK=16, FLAG=True, PDL=False, num_warps=1)
    # Triton's path as the ops take it: `kernel[grid](...)` (inside an op torch turns wrap_triton's
    # tracing off; outside one, wrap_triton would dispatch a higher-order op first)
    go = {"cxx": lambda: _launch.launch(_store_kernel, (1,), *args, **kw),
          "cached": lambda: _launch.launch(_store_kernel, (1,), *args, **kw),
          "triton_path": lambda: _store_kernel[(1,)](*args, **kw)}
    times = {name: [] for name in go}
    for _ in range(ROUNDS):
        for name, fn in go.items():
            _launch._CXX_ENABLED[0] = name == "cxx" and CXX_BUILT
            times[name].append(per_call_us(fn, max(1, calls // ROUNDS), False))
    _launch._CXX_ENABLED[0] = CXX_BUILT
    return {name: statistics.median(t) for name, t in times.items()}


def cases():
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    F, O = 2304, 1000
    h, z = torch.randn(1, F, device=dev, generator=g), torch.randn(1, F, device=dev, generator=g)
    W, b = torch.randn(O, F, device=dev, generator=g) * 0.02, torch.zeros(O, device=dev)
    y = torch.randint(0, O, (1,), device=dev, generator=g)
    x2 = torch.randn(1, 256, 13, 13, device=dev, generator=g)  # conv2's input at batch 1
    w2 = torch.randn(256, 256, 3, 3, device=dev, generator=g) * 0.02
    gy2 = torch.randn(1, 256, 11, 11, device=dev, generator=g)
    w2_step = w2.clone()

    def both(call):
        return {"twin": lambda: call("torch"), "compiled": lambda: call("compiled")}
    yield "gated_head (logits)", both(lambda be: ops.gated_head(h, z, W, b, backend=be))
    yield "gated_head_cross_entropy", both(lambda be: ops.gated_head_cross_entropy(h, z, W, b, y, backend=be))
    # lr 0: the head does not drift over thousands of calls
    yield "gated_head_ce_sgd_", both(lambda be: ops.gated_head_ce_sgd_(h, z, W, b, y, 0.0, backend=be))
    h_leaf, w_leaf = h.clone().requires_grad_(), W.clone().requires_grad_()
    yield "gated_head forward + backward", both(
        lambda be: ops.gated_head(h_leaf, z, w_leaf, b, backend=be).backward(torch.ones(1, O, device=dev)))
    yield "conv_valid (conv2)", both(lambda be: ops.conv_valid(x2, w2, backend=be))
    x2_leaf, w2_leaf = x2.clone().requires_grad_(), w2.clone().requires_grad_()
    yield "conv_valid forward + backward (conv2)", both(
        lambda be: ops.conv_valid(x2_leaf, w2_leaf, backend=be).backward(gy2))
    yield "conv_valid_backward (conv2)", both(lambda be: ops.conv_valid_backward(gy2, x2, w2, True, True, backend=be))
    yield "conv_valid_sgd (conv2)", both(lambda be: ops.conv_valid_sgd(gy2, x2, w2_step, 0.0, backend=be))
    # the C++ ops (csrc/): conv block 2 at batch 1 through autograd, the PLN's SGD step; then the
    # meta-loss's batch-84 head (cuBLAS inside the op: its plans replay the products as ATen steps)
    cb = [t.requires_grad_() for t in (x2.clone(), w2.clone(), torch.zeros(256, device=dev),
                                       torch.ones(256, device=dev), torch.zeros(256, device=dev))]
    yield "conv_block forward + backward (block 2)", both(
        lambda be: ops.conv_block(*cb, True, backend=be).square().sum().backward())
    from anml_fast.models import ModelConfig, build, select
    net = build(ModelConfig())
    shapes = {spec.name: spec.shape for spec in net.param_specs()}
    pln = [torch.randn(shapes[n], device=dev, generator=g) for n in select(net.init_params().keys(), ["pln"])]
    pln_grads = [torch.randn_like(t) for t in pln]
    yield "sgd_update (PLN, 14 tensors)", both(lambda be: ops.sgd_update(pln, pln_grads, 0.1, backend=be))
    h84, z84 = torch.randn(84, F, device=dev, generator=g), torch.randn(84, F, device=dev, generator=g)
    y84 = torch.randint(0, O, (84,), device=dev, generator=g)
    yield "gated_head_cross_entropy (batch 84)", both(
        lambda be: ops.gated_head_cross_entropy(h84, z84, W, b, y84, backend=be))
    h84_leaf, z84_leaf, w84_leaf = (t.clone().requires_grad_() for t in (h84, z84, W))
    yield "gated_head_cross_entropy forward + backward (batch 84)", both(
        lambda be: ops.gated_head_cross_entropy(h84_leaf, z84_leaf, w84_leaf, b, y84, backend=be).backward())
    yield "gated_head forward + backward (batch 84)", both(
        lambda be: ops.gated_head(h84_leaf, z84_leaf, w84_leaf, b, backend=be).backward(torch.ones(84, O, device=dev)))

    from bench_inner_step import _step  # the benchmark's own step builder
    twin, pln_t = _step("twin")
    fused, pln_f = _step("fused")
    donated = {k: v.clone() for k, v in pln_f.items()}
    yield "PLN inner step (fused: donate)", {"twin": lambda: twin(pln_t),
                                             "compiled": lambda: fused(donated, donate=True)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    help="folder for host-cost-<card>.json and .md (default: bench/results)")
    ap.add_argument("--calls", type=int, default=1000, help="calls a measurement (default 1000)")
    ap.add_argument("--impls", default="twin,compiled,no_plans,python_launch,before",
                    help="comma-separated implementations to time, twin and compiled among them "
                         f"(default: all but triton_path; any of {', '.join(IMPLS)})")
    ap.add_argument("--rows", default="",
                    help="comma-separated parts of row names: time only the rows whose name holds one, and "
                         "keep the card's other rows from its earlier table in --out, marked with their "
                         "run (default: every row, a new table)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("host_cost.py: needs a CUDA GPU")
    global CXX_BUILT
    ops.available()
    CXX_BUILT = _launch._CXX_ENABLED[0] and _launch._cxx() is not None
    impls = [i for i in args.impls.split(",") if i]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown or "twin" not in impls or "compiled" not in impls:
        sys.exit(f"host_cost.py: --impls takes twin, compiled and any of {sorted(IMPLS)}; got {args.impls!r}")
    card = torch.cuda.get_device_name()
    launch_only = launch_only_us(args.calls * 5)
    print("a launch alone: " + ", ".join(f"{k} {v:.1f} us" for k, v in launch_only.items()))
    rows = []
    wanted = [w for w in args.rows.split(",") if w]
    for name, fns in cases():
        if wanted and not any(w in name for w in wanted):
            continue
        row = {"call": name}
        calls = args.calls if "inner step" not in name else args.calls // 10
        # the host's times drift by 10-30% over seconds: the implementations take turns, in
        # ROUNDS rounds, and each keeps its median
        samples = {impl: ([], []) for impl in impls}
        for _ in range(ROUNDS):
            for impl in impls:
                _set(impl)
                fn = fns["twin" if IMPLS[impl][0] else "compiled"]
                samples[impl][0].append(per_call_us(fn, max(1, calls // ROUNDS), False))
                samples[impl][1].append(per_call_us(fn, max(1, calls // (4 * ROUNDS)), True))
        for impl, (host, synced) in samples.items():
            row[impl] = {"host_us": statistics.median(host), "synced_us": statistics.median(synced),
                         "host_us_rounds": host, "synced_us_rounds": synced}
        _set("compiled")
        rows.append(row)
        print(f"{name:34s} " + "  ".join(f"{k} {row[k]['host_us']:7.1f} / {row[k]['synced_us']:7.1f}"
                                        for k in impls), flush=True)
    meta = {"card": card, "torch": torch.__version__, "triton": triton.__version__, "cxx_launch_built": CXX_BUILT,
            "date": datetime.date.today().isoformat(), "commit": _commit(), "launch_only_us": launch_only,
            "impls": impls, "rows": rows}
    path = os.path.join(args.out, f"host-cost-{card_slug(card)}.json")
    if wanted and os.path.exists(path):
        with open(path) as f:
            meta = merge(meta, json.load(f))
    print(write(meta, args.out))


def _commit():
    """The package's git commit: ANML_FAST_COMMIT where set (the device's copy of the tree may carry
    a stale .git), else git's, where the tree is a checkout."""
    if os.environ.get("ANML_FAST_COMMIT"):
        return os.environ["ANML_FAST_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _run_of(meta: dict) -> str:
    return meta["date"] + (f" at {meta['commit']}" if meta.get("commit") else "")


def merge(new: dict, old: dict) -> dict:
    """A --rows run's table: its rows, then the rows of the card's earlier table (`old`) that it did
    not time, each row keeping the run it came from (every ratio is still within one run)."""
    if old.get("card") != new["card"] or old.get("impls") != new["impls"]:
        return new  # not comparable: this run's rows alone
    timed = {r["call"] for r in new["rows"]}
    for r in new["rows"]:
        r["run"] = _run_of(new)
    kept = [dict(r, run=r.get("run", _run_of(old))) for r in old["rows"] if r["call"] not in timed]
    return dict(new, rows=new["rows"] + kept)


def write(meta: dict, out: str) -> str:
    """Writes host-cost-<card>.json and .md into `out`; returns the markdown."""
    card, impls, launch_only = meta["card"], meta["impls"], meta["launch_only_us"]
    runs = sorted({r["run"] for r in meta["rows"] if "run" in r})
    lines = [f"# Host time of eager batch-1 calls, {card} ({_run_of(meta)}, torch {meta['torch']}, triton {meta['triton']})",
             "", "`python3 bench/host_cost.py`. us a call: host (no synchronise, many calls) / synced (each call "
             "ends with torch.cuda.synchronize()). Each figure is the median of "
             f"{ROUNDS} rounds in which the implementations take turns. Implementations (bench/host_cost.py says "
             "more): `compiled` is the package's default (direct eager calls, plans replayed from C++, C++ "
             "launches); `no_plans` the same without plans; `python_launch` neither plans nor C++ launches; "
             "`dispatched` through torch's custom-op dispatch; `before` both "
             "(the package at cd1ce7b); `triton_path` dispatched, every launch through Triton's "
             "`kernel[grid](...)`." + ("" if meta["cxx_launch_built"] else " **The extension here has no C++ launch: every "
                                        "launch went through Python.**"), "",
             "A launch alone (a 13-argument kernel that stores one value, host us a launch, no synchronise): " +
             ", ".join(f"{k} {v:.1f}" for k, v in launch_only.items()) + ".", ""]
    if len(runs) > 1:
        lines += ["Rows from more than one run (`--rows` times some rows and keeps the others): the run "
                  "column says which; each row's figures come from one run.", ""]
    run_col = len(runs) > 1
    lines += ["| call | " + " | ".join(impls) + " | compiled vs twin (synced) |" + (" run |" if run_col else ""),
              "| --- | " + " | ".join("---:" for _ in impls) + " | ---: |" + (" --- |" if run_col else "")]
    for r in meta["rows"]:
        cell = lambda k: f"{r[k]['host_us']:.1f} / {r[k]['synced_us']:.1f}"
        lines.append(f"| {r['call']} | " + " | ".join(cell(k) for k in impls) +
                     f" | {r['twin']['synced_us'] / r['compiled']['synced_us']:.2f}x |" +
                     (f" {r.get('run', '')} |" if run_col else ""))
    slug = card_slug(card)
    os.makedirs(out, exist_ok=True)
    for ext, text in (("json", json.dumps(meta, indent=1)), ("md", "\n".join(lines) + "\n")):
        target = os.path.join(out, f"host-cost-{slug}.{ext}")
        with open(target + ".tmp", "w") as f:  # atomically: a crash keeps the earlier table
            f.write(text)
        os.replace(target + ".tmp", target)
    return "\n".join(lines)

if __name__ == "__main__":
    main()
