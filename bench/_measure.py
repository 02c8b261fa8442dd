"""What the benchmarks record beside pytest-benchmark's wall times (CUDA only), and what the
benchmark scripts share."""
import contextlib
import re
import statistics
import time
from pathlib import Path

import torch


def graphed(fn, calls: int = 1):
    """`calls` calls of fn captured in one CUDA graph (after warm-up on a side stream: kernels
    compiled, the allocator settled); the returned callable replays them."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def replayed_us(fn, calls: int = 20, reps: int = 30) -> float:
    """Median microseconds a call of fn, `calls` calls replayed from one CUDA graph (launch
    overhead out, as in the meta-step's graph), over `reps` replays."""
    return replay_us(graphed(fn, calls), calls, reps)


def replay_us(replay, calls: int, reps: int = 30) -> float:
    """Median microseconds a call over `reps` runs of `replay`, a captured graph of `calls` calls."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def card_slug(card: str) -> str:
    """A card's name as the results files are named: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-").lower()


def output_layer_stack(w: torch.Tensor, T: int, S: int, generator: torch.Generator | None = None):
    """T meta-test output layers started from w [O, F] with zero bias and Adam moments, a random
    sequence of S images (features X [T, S, F], labels Y [T, S]) and lr 1e-3 each:
    (state [W, b, mW, vW, mb, vb, logits], X, Y, lr), the arguments of output_layer_adam_step_
    (logits primed for step 1)."""
    from anml_fast.ops.reference import output_layer_logits

    (O, F), dev = w.shape, w.device
    W = w.expand(T, O, F).clone()
    b = torch.zeros(T, O, device=dev)
    state = [W, b, torch.zeros_like(W), torch.zeros_like(W), torch.zeros_like(b), torch.zeros_like(b)]
    X = torch.rand(T, S, F, device=dev, generator=generator)
    Y = torch.randint(O, (T, S), device=dev, generator=generator)
    state.append(output_layer_logits(W, b, X, torch.ones((), dtype=torch.int64, device=dev)))
    return state, X, Y, torch.full((T,), 1e-3, device=dev)


def record_kernel_time(benchmark, fn, *args):
    """The GPU's busy time for one call (sum of its kernels and copies, from the profiler): at
    these sizes the wall time is mostly the CPU launching work, so both are worth reading."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    benchmark.extra_info["kernel_us"] = sum(e.self_device_time_total for e in prof.key_averages())


def record_peak(benchmark, fn):
    """Peak GPU memory of one call above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    benchmark.extra_info["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def own_benchmarks(path: str, module_file: str) -> list[dict]:
    """The entries of a pytest-benchmark JSON that came from one bench file (run_all.py writes one
    JSON for all of them)."""
    import json
    from pathlib import Path

    stem = Path(module_file).stem
    return [b for b in json.load(open(path))["benchmarks"] if stem in b["fullname"]]


def timings(path: str, module_file: str, key, per_call: str | None = None) -> dict:
    """One bench file's results grouped for a table: {key(bench): {impl: (median us, IQR us,
    GPU kernel us or None, peak MB or None)}}, where key(bench) picks the row from its name and
    params. `per_call` names an extra_info entry counting the units a timed call did: times are
    then per unit."""
    rows: dict = {}
    for b in own_benchmarks(path, module_file):
        s, info = b["stats"], b["extra_info"]
        n = info.get(per_call, 1) if per_call else 1
        gpu = info.get("kernel_us")
        rows.setdefault(key(b), {})[b["params"]["impl"]] = (
            s["median"] * 1e6 / n, s["iqr"] * 1e6 / n, gpu if gpu is None else gpu / n, info.get("peak_mb"))
    return rows


def kind_of(bench: dict) -> str:
    """forward, backward, ... from a benchmark named test_<kind>[params]."""
    return bench["name"].split("[")[0].removeprefix("test_")


def time_backward(benchmark, forward, leaves, rounds: int, kernel_time: bool = True) -> None:
    """Times the gradient of forward() (a scalar) w.r.t. leaves, the forward redone untimed before
    each round; no peak memory (the forward's saved tensors would blur it)."""
    def setup():
        out = forward()
        torch.cuda.synchronize()
        return (out,), {}

    def run(out):
        grads = torch.autograd.grad(out, leaves)
        torch.cuda.synchronize()
        return grads

    run(*setup()[0])
    benchmark.extra_info["peak_mb"] = None
    if kernel_time:
        record_kernel_time(benchmark, run, *setup()[0])
    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=10)


def eager_us(forward, timed, reps: int) -> float:
    """Median microseconds of `timed(forward())` over `reps` calls, forward() untimed (it builds
    what the timed part needs, e.g. a graph to differentiate) and each call synchronised."""
    times = []
    for _ in range(reps):
        out = forward()
        torch.cuda.synchronize()
        start = time.perf_counter()
        timed(out)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def ints(text: str, flag: str, ok, expected: str) -> list[int]:
    """A flag's comma-separated integers, each passing ok(); else an error naming the flag."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or not all(ok(v) for v in values):
        raise SystemExit(f"{flag}: expected {expected}, got {text!r}")
    return values


def turn_args(ap, stem: str, reps_help: str) -> None:
    """The turn-taking scripts' shared flags: --rounds, --reps (`reps_help`: what a rep is) and
    --out, the folder for OUT/<stem>-<card>.json and .md."""
    ap.add_argument("--rounds", type=int, default=15, help="rounds of turns [15]")
    ap.add_argument("--reps", type=int, default=30, help=f"{reps_help} [30]")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                    help=f"folder for {stem}-<card>.json and .md [bench/results]")


def check_turn_args(args, script: str) -> None:
    """turn_args' flags checked, then the GPU the timings need (after the flags: a bad flag is
    named even where there is none)."""
    if args.rounds < 1 or args.reps < 1:
        raise SystemExit(f"--rounds and --reps must be at least 1, got {args.rounds} and {args.reps}")
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU")


def take_turns(turns: dict, rounds: int, around=lambda key: contextlib.nullcontext()) -> dict:
    """{key: [one figure per round]}: each turn (a callable returning a figure) called once a round,
    in order, the order reversed every other round so that no turn always comes first or right
    after the same one; `around(key)` is entered for each call. Timed one after another, rows
    drift with the card's state by as much as the differences these scripts look for."""
    keys = list(turns)
    per_round = {k: [] for k in keys}
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            with around(k):
                per_round[k].append(turns[k]())
    return per_round


def summary(figures: list) -> dict:
    """The median of per-round figures and their range, as the turn-taking tables report them, and
    the figures themselves (paired_cell compares two turns round by round)."""
    return {"us_per_call": statistics.median(figures), "round_min": min(figures), "round_max": max(figures),
            "per_round": list(figures)}


def turns_result(rounds: int, reps: int, **extra) -> dict:
    """A turn-taking script's result before its figures: the card, versions, date and commit
    (ANML_FAST_COMMIT: the device's copy of the tree may carry a stale .git)."""
    import datetime
    import os

    return {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "commit": os.environ.get("ANML_FAST_COMMIT"),
            **extra, "rounds": rounds, "reps": reps, "results": []}


def add_figures(result: dict, names: tuple, per_round: dict) -> None:
    """take_turns' figures into result["results"], one row per turn: its key's parts under `names`
    and the summary of its rounds."""
    for key, figures in per_round.items():
        result["results"].append({**dict(zip(names, key)), **summary(figures)})


def turn_cell(row: dict) -> str:
    """A table cell of one turn: its median, then its round range in brackets."""
    return f"{row['us_per_call']:.1f} ({row['round_min']:.1f}-{row['round_max']:.1f})"


def paired_cell(ours: dict, twin: dict) -> str:
    """Two turns compared round by round: the median of the per-round ratios twin / ours and the
    rounds ours won. The two turns of one case run back to back in every round (take_turns keeps
    the turns' order, and the scripts build theirs with the implementation as the last key part,
    two of them), so a drift of the card or the host between rounds cancels in each ratio where it
    moves both medians alike; "-" for a result written before the per-round figures were kept."""
    if "per_round" not in ours or "per_round" not in twin:
        return "-"
    ratios = [t / o for o, t in zip(ours["per_round"], twin["per_round"], strict=True)]
    return f"{statistics.median(ratios):.2f}x ({sum(r > 1 for r in ratios)}/{len(ratios)})"


def pair_cells(ours: dict, twin: dict) -> str:
    """The table cells of an op's turn against its twin's: each one's turn_cell, the ratio of their
    medians, and paired_cell."""
    return (f"{turn_cell(ours)} | {turn_cell(twin)} | {twin['us_per_call'] / ours['us_per_call']:.2f}x | "
            f"{paired_cell(ours, twin)}")


def paired_note(name: str) -> str:
    """The turn-taking tables' words on their last two columns, `name` the op's side ("fused")."""
    return (f"`{name} vs twin`: the ratio of the two medians; `paired`: the median of the per-round "
            f"ratios (the two turns run back to back each round), and the rounds the {name} op won.")


def run_label(result: dict) -> str:
    """"card, date at commit, torch version", as the turn-taking tables' titles name their run."""
    at = f" at {result['commit']}" if result.get("commit") else ""
    return f"{result['card']}, {result['date']}{at}, torch {result['torch']}"


def write_result(out, name: str, result: dict, lines: list) -> None:
    """OUT/<name>.json (the result) and OUT/<name>.md (its table's lines), each atomically: a crash
    keeps the earlier files."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=1) + "\n"), (".md", "\n".join(lines) + "\n")):
        tmp = out / f"{name}{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(out / f"{name}{suffix}")


def save_table(out, stem: str, result: dict, lines: list) -> None:
    """A turn-taking script's result and table written (write_result, as OUT/<stem>-<card>) and the
    table printed."""
    write_result(out, f"{stem}-{card_slug(result['card'])}", result, lines)
    print("\n".join(lines))
