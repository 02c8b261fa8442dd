"""What each `anml-fast` subcommand does (argument parsing lives in `cli`)."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from .cli import _log, data_root, load_data, resolve_device
from .errors import AnmlFastError


def prepare_data(args) -> int:
    from .data.cache import cache_path, export_cache

    data = load_data(args)
    n_bg = data.num_background
    root = Path(data_root(args))
    where = root if root.is_file() else cache_path(root, args.cache_dir)
    print(f"Omniglot ready: {len(data.class_names)} classes ({n_bg} background, "
          f"{len(data.class_names) - n_bg} evaluation), {data.images.shape[1]} drawings each; cache {where}")
    if args.out:
        if root.is_file():
            raise AnmlFastError("--out: --data is already a cache file; copy it instead")
        print(f"cache written to {export_cache(root, args.cache_dir, args.out)}")
    return 0


def _train_config(args):
    from .training.trainer import CONFIG_FILE, MetaTrainConfig

    given = {f.name: getattr(args, f.name) for f in fields(MetaTrainConfig)
             if getattr(args, f.name, None) is not None}
    if isinstance(given.get("inner_layers"), str):
        given["inner_layers"] = [p.strip() for p in given["inner_layers"].split(",") if p.strip()]
    cfg_path = Path(args.out) / CONFIG_FILE
    if args.resume and cfg_path.exists():
        try:
            stored = json.loads(cfg_path.read_text())["train"]
        except (ValueError, KeyError) as e:
            raise AnmlFastError(f"{cfg_path}: cannot read the run's settings ({e})") from None
        run = MetaTrainConfig.from_dict(stored)  # missing keys read as the run saw them
        for k, v in given.items():
            if k != "steps" and getattr(run, k) != v:
                raise AnmlFastError(f"--{k.replace('_', '-')} {v} differs from this run's {getattr(run, k)} "
                                    f"({cfg_path}); resume with the same settings (only --steps may change)")
        if "steps" in given and given["steps"] != run.steps and run.meta_lr_schedule != "constant":
            raise AnmlFastError(f"--steps {given['steps']}: this run's {run.meta_lr_schedule} learning-rate "
                                f"schedule is laid out over its {run.steps} steps ({cfg_path}); only a "
                                f"constant-rate run may change --steps on resume")
        stored.update(given)
        return MetaTrainConfig.from_dict(stored)
    return MetaTrainConfig(**given)


def _distributed(args):
    """(Dist, device) of this process: torchrun's process group if launched by it (see
    anml_fast/distributed.py), else a single process on --device."""
    from .distributed import init_from_env

    return init_from_env(resolve_device(args.device))


def _load_data_once(args, dist):
    """The data, with the cache built by one process per machine while the others wait."""
    if dist.local_rank == 0:
        data = load_data(args)
    dist.barrier()
    if dist.local_rank != 0:
        data = load_data(args)
    return data


def meta_train(args) -> int:
    from .training.trainer import MetaTrainer

    dist, device = _distributed(args)
    cfg = dist.from_main(lambda: _train_config(args))  # on resume rank 0's folder decides
    cfg.validate()
    data = _load_data_once(args, dist)
    log = _log if dist.is_main else (lambda msg: None)
    trainer = MetaTrainer(cfg, data, args.out, device=device, resume=args.resume,
                          progress=not args.quiet, log=log, graph=False if args.no_graph else None, dist=dist)
    procs = f" x {dist.world} processes ({cfg.tasks // dist.world} tasks each)" if dist.enabled else ""
    log(f"meta-training {cfg.model} on {device}{procs}: {cfg.steps} steps, {cfg.tasks} task(s) per step, "
        f"{'second' if cfg.second_order else 'first'}-order, inner layers {','.join(trainer.inner_names[:1])}..., "
        f"out {args.out}")
    model = trainer.run()
    if dist.is_main:
        print(f"model written to {model}")
    return 0


def _model_file(path: str) -> Path:
    from .training.trainer import MODEL_FILE, RESUME_FILE

    p = Path(path)
    if p.is_dir():
        for name in (MODEL_FILE, RESUME_FILE):
            if (p / name).is_file():
                return p / name
        raise AnmlFastError(f"{p}: a folder without {MODEL_FILE} or {RESUME_FILE} (is the run finished?)")
    return p


def _load_model(spec: str, device):
    """(checkpoint, short name, what to record as its source) of a MODEL argument: a model or
    checkpoint file, a meta-train run folder, a shipped-model folder or `pretrained:NAME`."""
    from . import checkpoint, pretrained

    folder = pretrained.resolve(spec)
    if folder is not None:
        return pretrained.load(folder, device=device), folder.name, str(spec)
    path = _model_file(spec)
    name = path.parent.name if path.stem in ("model", "checkpoint") else path.stem
    return checkpoint.load(path, device=device, with_state=False), name, str(path)


def compare(args) -> int:
    from .atomic import write_json, write_text
    from .evaluation import compare as cmp
    from .evaluation.protocol import RESULTS_JSON, RESULTS_MD, RESULTS_PNG, report

    systems = [(i, s) for i, path in enumerate(args.results) for s in cmp.read_results(path)]
    names = [s["system"] for _, s in systems]
    if args.names is not None:
        given = [n.strip() for n in args.names.split(",")]
        if len(given) != len(args.results):
            raise AnmlFastError(f"--as gives {len(given)} names for {len(args.results)} inputs; give one per input")
        names = [given[i] for i, _ in systems]
    folded = cmp.fold([(n, s) for n, (_, s) in zip(names, systems)])
    out = Path(args.out)
    write_json(out / RESULTS_JSON, {"results": folded, "inputs": list(args.results)})
    text = report.table(folded) + cmp.note(folded)
    write_text(out / RESULTS_MD, text)
    report.write_plot(out / RESULTS_PNG, folded)
    print(text)
    print(f"written: {out / RESULTS_MD}, {out / RESULTS_PNG}, {out / RESULTS_JSON}")
    return 0


def export_model(args) -> int:
    import datetime

    from . import pretrained

    ck, _, spec = _load_model(args.model, "cpu")
    provenance = {"source": spec, "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  **ck.info}
    if args.note:
        provenance["note"] = args.note
    out = pretrained.export(ck, args.out, provenance)
    m = pretrained.manifest(out)
    print(f"{spec}: {ck.config.kind} model written to {out} as {len(m['shards'])} shard(s) "
          f"({', '.join(e['file'] for e in m['shards'])}) with {pretrained.MANIFEST}")
    return 0


def evaluate(args) -> int:
    import torch

    from . import checkpoint
    from .data.tasks import MetaTestSet
    from .evaluation.protocol import EvalConfig, Evaluator, report
    from .models import ModelConfig, build

    cfg = EvalConfig(class_counts=args.classes, lrs=args.lrs, search_draws=args.search_draws,
                     final_runs=args.runs, select_on=args.select_on, train_layers=args.train_layers,
                     optimizer=args.optimizer, iid=args.iid, seed=args.seed, max_batch=args.max_batch)
    cfg.validate()
    if args.scratch == (args.model is not None):
        raise AnmlFastError("give either a MODEL to evaluate or --scratch, not both or neither")
    dist, device = _distributed(args)
    if args.scratch:
        mcfg = ModelConfig(kind=args.scratch_model)
        net = build(mcfg)
        params = net.init_params(torch.Generator(device).manual_seed(args.seed), device)
        name, source = f"scratch-{mcfg.kind}", {"scratch": mcfg.to_dict(), "seed": args.seed}
    else:
        ck, name, spec = _load_model(args.model, device)
        net, params = build(ck.config), ck.params
        source = {"model": spec, "sha256": checkpoint.digest(ck.params)}
    if args.iid:
        name += "-iid"
    out = Path(args.out or f"runs/eval-{name}")
    data = _load_data_once(args, dist)
    test_set = MetaTestSet(data, device, input_norm=net.config.input_norm)  # as the model was trained
    ev = Evaluator(net, params, test_set, cfg, out, system=name, source=source,
                   progress=not args.quiet, log=_log, dist=dist)
    results = ev.run(resume=args.resume)
    if not dist.is_main:
        return 0
    print(report.table([results]))
    print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return 0


def import_reference(args) -> int:
    from . import checkpoint
    from .reference_import import import_reference as convert

    ck = convert(args.file, kind=args.kind)
    checkpoint.save(args.out, ck)
    print(f"{args.file}: {ck.config.kind} model ({sum(p.numel() for p in ck.params.values()):,} parameters) "
          f"written to {args.out}")
    return 0


def demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)
