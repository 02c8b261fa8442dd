"""The `anml-fast` command line (also `python -m anml_fast`)."""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import AnmlFastError

DATA_HELP = ("Omniglot root: the folder holding omniglot-py/images_background and images_evaluation, "
             "or a cache file written by `prepare-data --out` (default: $ANML_FAST_DATA, else ./data)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (plus a pointer to --help), not the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser, data: bool = True, device: bool = True) -> None:
    if data:
        p.add_argument("--data", metavar="ROOT", default=None, help=DATA_HELP)
        p.add_argument("--cache-dir", metavar="DIR", default=None,
                       help="where the prepared image cache lives (default: $ANML_FAST_CACHE, else ~/.cache/anml_fast)")
        p.add_argument("--download", action="store_true",
                       help="download Omniglot into ROOT with torchvision if it is not there")
    if device:
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
        p.add_argument("--backend", choices=["auto", "compiled", "torch"], default="auto",
                       help="which implementation of the ops runs: the compiled kernels on CUDA when they "
                            "work (auto), always the compiled ones (compiled), or the plain-PyTorch twins (torch)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _floats(s: str) -> list[float]:
    try:
        return [float(v) for v in s.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas or spaces, got {s!r}")


def _ints(s: str) -> list[int]:
    try:
        return [int(v) for v in s.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas or spaces, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    from .data.tasks import REMEMBER_SIZE
    from .evaluation.protocol import CLASS_COUNTS, LEARNING_RATES

    ap = _Parser(prog="anml-fast", description=(
        "ANML (A Neuromodulated Meta-Learning algorithm, Beaulieu et al. 2020) on Omniglot: "
        "meta-train a neuromodulated network, then measure how well it learns hundreds of "
        "classes one image at a time."), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--version", action="version", version=f"anml_fast {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("prepare-data", formatter_class=fmt, help="decode Omniglot once into the image cache",
                       description="Decode all 32,460 PNGs (grey, 28x28 LANCZOS) into one verified cache file.")
    _common(p, device=False)
    p.add_argument("--out", default=None, metavar="FILE",
                   help="also write the verified cache to FILE (a single file to pass as --data elsewhere)")

    p = sub.add_parser("meta-train", formatter_class=fmt, help="meta-train ANML or OML",
                       description=("Meta-train on the first 963 Omniglot background classes. Defaults are "
                                    "the reference README command: 20,000 first-order steps, inner lr 0.1, "
                                    "meta lr 0.001, seed 9. Writes config.json, metrics.jsonl, tb/ "
                                    "(TensorBoard), checkpoint.safetensors and, at the end, model.safetensors. Under "
                                    "torchrun (torchrun --nproc_per_node=N -m anml_fast meta-train --tasks N ...) "
                                    "the processes share each meta-step's tasks."))
    _common(p)
    p.add_argument("--out", default="runs/meta-train", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--model", choices=["anml", "oml"], default=None, help="model kind [anml]")
    p.add_argument("--steps", type=int, default=None, help="meta-training steps [20000]")
    p.add_argument("--inner-lr", type=float, default=None, help="inner-loop SGD learning rate [0.1]")
    p.add_argument("--meta-lr", type=float, default=None, help="outer Adam learning rate [0.001]")
    p.add_argument("--meta-lr-schedule", choices=["constant", "cosine"], default=None,
                   help="outer learning rate over the run: constant (the reference), or cosine decay "
                        "from --meta-lr to 0 at --steps [constant]")
    p.add_argument("--seed", type=int, default=None, help="random seed [9]")
    p.add_argument("--tasks", type=int, default=None, help="trajectories (classes) per meta-step, over all processes under torchrun [1]")
    p.add_argument("--traj-len", type=int, default=None, help="inner SGD steps per trajectory, at most 20 [20]")
    p.add_argument("--remember", type=int, default=None,
                   help=f"random remember-set images in the meta-loss batch [{REMEMBER_SIZE}]")
    p.add_argument("--inner-layers", default=None,
                   help="comma-separated parameter-name prefixes adapted in the inner loop [pln]; "
                        "e.g. pln.fc for the output layer only")
    p.add_argument("--second-order", action="store_true", default=None,
                   help="differentiate through the inner updates (the reference code is first-order)")
    p.add_argument("--input-norm", choices=["reference", "standard"], default=None,
                   help="image scaling: the reference code's constants, which leave images nearly "
                        "constant (only ANML's normalisation layers recover them), or the same "
                        "constants as meant (unit-scale images) [reference for anml, standard for oml]")
    p.add_argument("--nm-channels", type=int, default=None, help="ANML neuromodulatory channels [112]")
    p.add_argument("--pln-channels", type=int, default=None, help="prediction-network channels [256]")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints [1000]")
    p.add_argument("--log-every", type=int, default=None, help="steps between metric read-backs [50]")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between held-out continual-learning checks, 0 for none [1000]")
    p.add_argument("--eval-classes", type=int, default=None, help="classes in the held-out check [10]")
    p.add_argument("--eval-lr", type=float, default=None, help="Adam learning rate of the held-out check [0.001]")
    p.add_argument("--no-graph", action="store_true",
                   help="launch every kernel eagerly instead of replaying the meta-step from a CUDA graph "
                        "(for debuggers and profilers; same results; the graph is used on CUDA only)")

    p = sub.add_parser("evaluate", formatter_class=fmt, help="meta-test a model (the continual-learning protocol)",
                       description=("For each class count: reset the output layer, learn the classes' 15 "
                                    "training drawings in class order at batch size 1, and score on them and "
                                    "on the 5 held-out drawings; learning rate searched over --lrs x "
                                    "--search-draws, then --runs final runs. Writes results.json, results.md, "
                                    "results.png to --out, after every class count. Under torchrun the trajectories "
                                    "are shared out over the processes, with the same results."))
    _common(p)
    p.add_argument("model", nargs="?", default=None,
                   help="a model.safetensors / checkpoint file, a meta-train run folder, a shipped-model "
                        "folder, or pretrained:NAME for a model shipped with the package "
                        "(see `anml-fast export-model --help`); omit with --scratch")
    p.add_argument("--out", default=None, help="results folder [runs/eval-<name>]")
    p.add_argument("--resume", action="store_true", help="skip the class counts already in --out/results.json")
    p.add_argument("--classes", type=_ints, default=list(CLASS_COUNTS), help="class counts")
    p.add_argument("--lrs", type=_floats, default=list(LEARNING_RATES),
                   help="learning rates to search (one rate: no search)")
    p.add_argument("--search-draws", type=int, default=10, help="class draws per rate in the search")
    p.add_argument("--runs", type=int, default=10, help="final runs at the chosen rate")
    p.add_argument("--select-on", choices=["train", "test"], default="train",
                   help="pick the rate on meta-test train accuracy, or on test (the reference code; it leaks)")
    p.add_argument("--train-layers", default="output",
                   help="'output' (the output layer only, the replicated protocol), 'pln' (whole PLN), "
                        "or comma-separated parameter prefixes")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="meta-test optimizer")
    p.add_argument("--iid", action="store_true", help="shuffle the images across classes (the oracle)")
    p.add_argument("--scratch", action="store_true", help="evaluate a randomly initialised model instead")
    p.add_argument("--scratch-model", choices=["anml", "oml"], default="anml", help="kind of the --scratch model")
    p.add_argument("--seed", type=int, default=0, help="seed of the class draws and output-layer resets")
    p.add_argument("--max-batch", type=int, default=0,
                   help="trajectories trained side by side; 0 picks from free memory")

    p = sub.add_parser("import-reference", formatter_class=fmt,
                       help="convert a checkpoint of the authors' original code",
                       description=("Read a Learner pickled by the original ANML/OML code with a restricted "
                                    "unpickler (tensors and the Learner's own structure only) and write our "
                                    "safetensors checkpoint."))
    p.add_argument("file", help="the original .net / .model file")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--kind", choices=["anml", "oml"], default=None, help="model kind (default: from the tensors)")
    _common(p, data=False, device=False)

    p = sub.add_parser("compare", formatter_class=fmt, help="put several evaluations in one table and plot",
                       description=("Read results.json files (or the folders `evaluate` wrote) and write one "
                                    "table (results.md), plot (results.png) and results.json with every system. "
                                    "Evaluations given the same name with --as are folded into one system: "
                                    "mean and standard deviation over them, e.g. over meta-training seeds."))
    p.add_argument("results", nargs="+", help="results.json files or evaluation folders")
    p.add_argument("--as", dest="names", default=None,
                   help="comma-separated names, one per input (default: the names stored in them); "
                        "repeat a name to fold those inputs, e.g. anml,anml,anml,scratch")
    p.add_argument("--out", required=True, help="folder for results.md, results.png and results.json")
    _common(p, data=False, device=False)

    p = sub.add_parser("export-model", formatter_class=fmt,
                       help="write a model as a shippable folder of checksummed shards",
                       description=("Write a model's parameters (not its training state) as safetensors shards "
                                    "of at most 15 MiB plus manifest.json (config, provenance, SHA-256 of every "
                                    "shard). `evaluate` reads such a folder directly; the package ships its "
                                    "pretrained models this way (anml_fast/pretrained/<name>)."))
    p.add_argument("model", help="a model.safetensors / checkpoint file, a run folder or a shipped-model folder")
    p.add_argument("--out", required=True, help="the folder to write (its name prefixes the shard files)")
    p.add_argument("--note", default=None, help="free text stored in the manifest's provenance")
    _common(p, data=False, device=False)

    p = sub.add_parser("demo", formatter_class=fmt, help="ANML against scratch on Omniglot, in minutes",
                       description=("On a CPU: evaluates the meta-trained ANML shipped with the package "
                                    "(pretrained:anml) against a randomly initialised model (scratch) at a few "
                                    "class counts, in a few minutes (--meta-train instead runs a short "
                                    "meta-training first, too short to beat scratch, and says so). On a GPU: "
                                    "meta-trains ANML for 3,000 steps, then evaluates it against scratch. "
                                    "Full results: docs/results.md."))
    p.add_argument("--meta-train", action="store_true",
                   help="on a CPU too, meta-train a fresh model instead of evaluating the shipped one")
    p.add_argument("--out", default="runs/demo", help="demo folder (meta-train run and results)")
    p.add_argument("--steps", type=int, default=None, help="meta-training steps [CPU 300, GPU 3000]")
    p.add_argument("--classes", type=_ints, default=None,
                   help="class counts [shipped model on a CPU: 10 50 100; --meta-train on a CPU: 10 25; "
                        "GPU: 10 50 100 200]")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    _common(p)
    return ap


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AnmlFastError(f"--device {name}: no CUDA GPU is visible to PyTorch here (use --device cpu)")
    if not (name == "cpu" or name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise AnmlFastError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return name


def data_root(args) -> str:
    return args.data or os.environ.get("ANML_FAST_DATA") or "data"


def load_data(args):
    from .data.cache import load_omniglot

    return load_omniglot(data_root(args), args.cache_dir, download=args.download, progress=not args.quiet, log=_log)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import commands, ops

    if getattr(args, "backend", None):
        ops.set_backend(args.backend)
    from .distributed import shutdown

    try:
        return getattr(commands, args.command.replace("-", "_"))(args)
    except AnmlFastError as e:
        print(f"anml-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"anml-fast {args.command}: interrupted (rerun with --resume to continue)", file=sys.stderr)
        return 130
    finally:
        shutdown()  # leave torchrun's process group, if this process joined one


if __name__ == "__main__":
    sys.exit(main())
