"""The `cpews` command line (also `python -m cpews`): parse arguments, load the config, make one call.

Heavy imports (torch, the trainer, Ray, MLflow) happen inside the command that needs them, so that
`cpews --help` and `cpews config show` answer quickly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_PRESET = "synthetic_demo"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help=f"YAML config file or preset name (default: {DEFAULT_PRESET}; presets live in cpews/presets)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set loss.ism_weight=0.3 (repeatable)",
    )


def _load(args: argparse.Namespace):
    from cpews.config import load_config

    return load_config(args.config or DEFAULT_PRESET, args.overrides)


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = _load(args)
    flat = cfg.to_flat_dict()
    if args.json:
        print(json.dumps(flat, indent=2))
    else:
        width = max(map(len, flat))
        for key, value in flat.items():
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_data_synthetic(args: argparse.Namespace) -> int:
    from cpews.data import generate_synthetic_dataset

    path = generate_synthetic_dataset(
        args.out,
        seed=args.seed,
        image_size=args.image_size,
        n_train=args.train,
        n_val=args.val,
        confounder_strength=args.confounder_strength,
    )
    print(f"synthetic dataset written to {path}")
    return 0


def cmd_data_validate(args: argparse.Namespace) -> int:
    from cpews.data import validate_dataset

    validate_dataset(args.root, args.dataset, args.splits, check_images=True if args.all else args.max_images)
    print(f"{args.root}: {args.dataset} layout OK for splits {', '.join(args.splits)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cpews.training import train

    cfg = _load(args)
    out = Path(args.out)
    print(f"training {cfg.model.backbone} on {cfg.data.dataset} for {cfg.optim.max_iters} iterations -> {out}")
    result = train(cfg, out_dir=out, resume=args.resume)
    print(f"done in {result.wall_time:.1f}s: checkpoint {result.checkpoint}")
    for key, value in sorted(result.metrics.items()):
        print(f"  {key} = {value:.4f}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    import shutil

    from cpews.config import SYNTHETIC_WEIGHTS
    from cpews.training.pretrain import content_key, ensure_pretrained

    cfg = _load(args)
    if cfg.model.weights != SYNTHETIC_WEIGHTS:
        print(f"note: this config's model.weights is {cfg.model.weights!r}; set model.weights=synthetic to train "
              "from the backbone made here", file=sys.stderr)
    p = cfg.pretrain
    print(f"pretraining {cfg.model.backbone} (dim {cfg.model.embed_dim or 'default'}, depth {cfg.model.depth or 'default'}"
          f", patch {cfg.model.patch_size or 'default'}) on {p.images} synthetic images (seed {p.seed}) for {p.iters} "
          f"iterations, image labels only; key {content_key(cfg)}", flush=True)
    made = ensure_pretrained(cfg, progress=lambda text: print(text, flush=True), force=args.force)
    metrics = made.meta.get("metrics", {})
    if metrics:
        print("held-out pretraining images: " + "  ".join(f"{k}={v}" for k, v in metrics.items()))
    print(f"backbone: {made.path}" + (" (cached)" if made.cached else ""))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(made.path, out)
        print(f"copied to {out}: use it with --set model.weights={out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from cpews.evaluation import evaluate, load_model
    from cpews.training.data import eval_dataset, resolve_data_root
    from cpews.training.trainer import select_device

    device = select_device(args.device)
    loaded = load_model(args.checkpoint, device)
    cfg = loaded.cfg
    if args.data_root:
        from cpews.config import TrainConfig

        cfg = TrainConfig.from_flat_dict({"data.root": args.data_root}, base=cfg)
    root = resolve_data_root(cfg)
    dataset = eval_dataset(cfg, root, split=args.split)
    with torch.no_grad():
        result = evaluate(
            loaded.model, dataset, cfg, class_names=loaded.class_names, device=device,
            max_images=args.max_images, final_protocol=True, crf=args.crf, data_root=root,
        )
    if args.json:
        print(json.dumps({**result.metrics, "split": args.split or cfg.data.val_split,
                          "checkpoint": str(args.checkpoint), "per_class": result.per_class}))
        return 0
    print(f"{args.checkpoint} on {cfg.data.dataset}/{args.split or cfg.data.val_split} ({int(result.metrics['images'])} images)")
    for key, value in result.metrics.items():
        if key != "images":
            print(f"  {key:<36} {value:.4f}")
    columns = [c for c in ("cam", "aux_cam", "pseudo", "seg", "seg_crf") if c in result.per_class[0]]
    print(f"  {'class':<16}" + "".join(f"{c:>10}" for c in columns))
    for row in result.per_class:
        cells = "".join(f"{'-' if row[c] is None else format(row[c], '.3f'):>10}" for c in columns)
        print(f"  {row['class']:<16}{cells}")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from cpews.evaluation import infer_files, load_model
    from cpews.training.trainer import select_device

    if args.model:
        loaded = _registry_model(args.model, select_device(args.device))
    else:
        loaded = load_model(args.checkpoint, select_device(args.device))
    written = infer_files(loaded, args.images, args.out, crf=args.crf)
    for label_path, overlay_path in written:
        print(f"{label_path}  {overlay_path}")
    return 0


def _registry_model(uri: str, device):
    """The cpews model behind an MLflow model URI (models:/cpews@champion), loaded through its pyfunc (which
    checks the weights' sha256), on `device`."""
    tracking_uri = _model_store(uri)
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(uri)
    except MlflowException as exc:
        raise ValueError(f"cannot load model {uri!r} from MLflow at {mlflow.get_tracking_uri()}: {exc.message}") from None
    loaded = model.unwrap_python_model().loaded
    return loaded._replace(model=loaded.model.to(device))


def _model_store(uri: str) -> str:
    """The MLflow tracking URI to load model `uri` from: MLFLOW_TRACKING_URI, else the local store that
    `make sweep` and `make promote` use (runs/mlflow/mlflow.db). Checked without creating anything: MLflow would
    create a missing local store (and its folder) before finding no model in it.

    Raises:
        ValueError: `uri` is a local path that does not exist, or the local store does not exist.
    """
    from urllib.parse import urlparse

    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    store = env_uri or f"sqlite:///{Path('runs').resolve() / 'mlflow' / 'mlflow.db'}"
    model_path = _local_path(uri)
    if model_path is not None:  # a model folder on disk: no store needed
        if not model_path.exists():
            raise ValueError(f"cannot load model {uri!r}: {model_path.resolve()} does not exist")
        return store
    store_path = _local_path(store) if urlparse(uri).scheme in ("models", "runs") else None
    if store_path is not None and not store_path.is_file() and not store_path.is_dir():
        source = "MLFLOW_TRACKING_URI" if env_uri else "the local store; MLFLOW_TRACKING_URI is not set"
        raise ValueError(f"cannot load model {uri!r}: there is no MLflow store at {store_path} ({source})")
    return store


def _local_path(uri: str) -> Path | None:
    """The file or folder a local URI names (a path, file:, sqlite:///); None for a server or another scheme."""
    from urllib.parse import unquote, urlparse

    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    scheme = urlparse(uri).scheme
    if scheme == "file":
        return Path(unquote(urlparse(uri).path))
    return Path(uri) if scheme == "" else None


def _run_dir(args: argparse.Namespace) -> Path:
    """`--run-dir` as a Path, refused (naming it) when it or a folder above it is an existing file."""
    path = Path(args.run_dir)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                which = "" if part == path else f"{part} "
                raise ValueError(f"--run-dir {args.run_dir}: {which}is a file, not a folder")
            break
    return path


def cmd_promote(args: argparse.Namespace) -> int:
    from orchestration.promote import PromotionRefused, promote

    context = _stdout_to_stderr() if args.json else contextlib.nullcontext()
    try:
        with context:  # with --json, stdout carries the JSON only (progress, Ray's and MLflow's lines go to stderr)
            decision = promote(
                args.sweep, run_dir=_run_dir(args), model_name=args.model_name, metric=args.metric,
                min_delta=args.min_delta, alpha=args.alpha, baseline_margin=args.baseline_margin,
                force=args.force, dry_run=args.dry_run, address=args.address,
            )
    except PromotionRefused as exc:  # below the all-background mIoU: the report, then exit 1
        if args.json:
            print(json.dumps(exc.decision, indent=1, default=str))
        print(f"cpews promote: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(decision, indent=1, default=str))
    return 0


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send file descriptor 1 (and sys.stdout) to stderr for the duration: for subprocesses and threads too."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _local_resources() -> dict[str, float]:
    import torch

    return {"cpu": float(os.cpu_count() or 1), "gpu": float(torch.cuda.device_count())}


def _stop_on_sigterm() -> None:
    """SIGTERM stops a sweep like Ctrl-C: Tune saves its state and `cpews sweep resume` continues it."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))


def _exit_code(outcome) -> int:
    if outcome.interrupted:
        return 130
    if outcome.pending:  # MLflow lacks some of it: `cpews sweep sync NAME` delivers it
        return 1
    return 0 if any(row["status"] == "completed" for row in outcome.rows) else 1


def cmd_sweep_run(args: argparse.Namespace) -> int:
    from orchestration.jobs import is_job_address
    from orchestration.search_space import load_sweep, smoke, validate_sweep
    from orchestration.sweep import next_free_name, renamed, run_sweep

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not is_job_address(address):  # a job's --run-dir is the cluster's: checked inside the job
        _run_dir(args)
    if args.spec_json:  # inside a Ray job: the sweep as the submitter validated it; paths are checked here
        # Ray may remove the job's uploaded working directory once the last trial worker using it ends: the
        # driver works from the (shared) run folder instead, and relative config paths resolve against it.
        Path(args.run_dir).mkdir(parents=True, exist_ok=True)
        os.chdir(args.run_dir)
        spec = validate_sweep(json.loads(args.spec_json), source="the submitted sweep")
    else:
        if not args.file:
            raise ValueError("sweep run needs a sweep FILE (a path, or a name in search_spaces/ such as demo)")
        # on a cluster, paths and resources are the cluster's: they are checked where the sweep runs
        spec = load_sweep(args.file, args.overrides, available=None if address else _local_resources(),
                          check_paths=not is_job_address(address))
        if args.smoke:
            spec = smoke(spec)
        if args.name:
            spec = renamed(spec, args.name)
    if is_job_address(address):
        job_args = ["sweep", "run", "--spec-json", json.dumps(spec.to_dict())] + (["--name", args.name] if args.name else [])
        job_args += ["--warm-start", args.warm_start] if args.warm_start else []  # checked inside the job
        return _submit(address, job_args, args, spec.name)
    if not args.name:  # `make sweep` again: a new sweep beside the old one, not an error
        spec = next_free_name(spec, Path(args.run_dir))
    _stop_on_sigterm()
    outcome = run_sweep(spec, run_dir=Path(args.run_dir), address=address, new_name_if_taken=not args.name,
                        warm_start=args.warm_start)
    return _exit_code(outcome)


def _submit(address: str, job_args: list[str], args: argparse.Namespace, name: str) -> int:
    """Run `cpews <job_args> --run-dir RUN_DIR` as a Ray Job at `address`; the job's exit code."""
    from orchestration.jobs import submit_and_follow

    if not Path(args.run_dir).is_absolute():
        raise ValueError(f"--run-dir {args.run_dir!r}: on a cluster give an absolute folder that every node "
                         "shares (trial folders and checkpoints live there)")
    _, code = submit_and_follow(address, [*job_args, "--run-dir", args.run_dir], follow=not args.no_follow, name=name)
    return code


def cmd_sweep_status(args: argparse.Namespace) -> int:
    from orchestration.jobs import list_sweep_jobs

    jobs = list_sweep_jobs(_job_address(args))
    if args.json:
        print(json.dumps(jobs, indent=1))
    elif not jobs:
        print("no sweep jobs on this cluster")
    for job in [] if args.json else jobs:
        print(f"{job['job_id']}  {job['status']:<9}  {job['name']}")
    return 0


def cmd_sweep_stop(args: argparse.Namespace) -> int:
    from orchestration.jobs import stop_job

    print(f"{args.job_id}: {stop_job(_job_address(args), args.job_id)}")
    return 0


def _job_address(args: argparse.Namespace) -> str:
    from orchestration.jobs import is_job_address

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not is_job_address(address):
        raise ValueError("give the cluster's job API address: --address http://HEAD:8265 (or RAY_ADDRESS)")
    return address


def cmd_sweep_resume(args: argparse.Namespace) -> int:
    from orchestration.jobs import is_job_address
    from orchestration.sweep import resume_sweep

    address = args.address or os.environ.get("RAY_ADDRESS")
    if is_job_address(address):
        return _submit(address, ["sweep", "resume", args.name, "--in-job"], args, args.name)
    _run_dir(args)
    if args.in_job:  # see cmd_sweep_run: work from the shared run folder, not the job's upload
        os.chdir(args.run_dir)
    _stop_on_sigterm()
    outcome = resume_sweep(args.name, run_dir=Path(args.run_dir), address=address)
    return _exit_code(outcome)


def cmd_sweep_leaderboard(args: argparse.Namespace) -> int:
    from orchestration.sweep import format_leaderboard, leaderboard_json, read_leaderboard

    board = read_leaderboard(args.name, run_dir=_run_dir(args))
    if args.json:  # the same object as leaderboard.json: sweep, objective, ranking, source, trials
        print(json.dumps(leaderboard_json(board), indent=1, sort_keys=True, default=str))  # as it is written
    else:
        print(format_leaderboard(board.rows, board.spec, source=board.source))
    return 0


def cmd_sweep_report(args: argparse.Namespace) -> int:
    """Make the report of a sweep (`orchestration.report`), print its summary and log it to the sweep's run; exit
    1 when MLflow did not take it (the files are written all the same)."""
    from orchestration.report import REPORT_DIR, log_report, write_report
    from orchestration.sweep import existing_sweep, read_leaderboard

    run_dir = _run_dir(args)
    board = read_leaderboard(args.name, run_dir=run_dir)
    paths = existing_sweep(run_dir, args.name)
    report = write_report(board.rows, board.spec, tune_dir=paths.tune, folder=paths.report, source=board.source)
    print(report.text)
    state = json.loads(paths.state.read_text())
    where = f"sweep run {state['parent_run_id']} of experiment {state['experiment_id']} ({state['tracking_uri']})"
    try:
        log_report(report, board.spec, state)
    except Exception as exc:
        print(f"cpews sweep report: error: not logged to MLflow, {where}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    print(f"MLflow: logged under {REPORT_DIR}/ of the {where}; the experiment's description says what was searched")
    return 0


def cmd_sweep_sync(args: argparse.Namespace) -> int:
    """Deliver what the MLflow spools of a sweep still hold; exit 1 when something is still pending."""
    from orchestration.sweep import existing_sweep
    from orchestration.tracking import spool_backlog, sync_spools

    paths = existing_sweep(_run_dir(args), args.name)
    before = spool_backlog(paths.root)
    left = sync_spools(paths.root, timeout_s=args.timeout)
    if left.records:
        reason = f": {left.last_error}" if left.last_error else " (MLflow unreachable?)"
        print(f"cpews sweep sync: error: {left.describe()} of sweep {args.name} still pending in {paths.root}"
              f"{reason}", file=sys.stderr)
        return 1
    print(f"sweep {args.name}: " + (f"{before.describe()} delivered to MLflow" if before.records else
                                    "nothing pending, MLflow has everything"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpews",
        description="CPEWS weakly supervised semantic segmentation: configs, data, training, evaluation, inference.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="inspect configs").add_subparsers(dest="config_command", required=True)
    show = config.add_parser("show", help="print the resolved flat config")
    _add_config_args(show)
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=cmd_config_show)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synthetic", help="generate the synthetic WSSS dataset (VOC layout)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--train", type=int, default=2000, help="number of train_aug images")
    synth.add_argument("--val", type=int, default=300, help="number of val images")
    synth.add_argument("--confounder-strength", type=float, default=0.9,
                       help="probability that a boat image has the water band")
    synth.set_defaults(func=cmd_data_synthetic)
    validate = data.add_parser("validate", help="check a dataset folder before training")
    validate.add_argument("--root", required=True)
    validate.add_argument("--dataset", choices=["voc", "coco", "synthetic"], required=True)
    validate.add_argument("--splits", nargs="+", default=["train_aug", "val"])
    validate.add_argument("--max-images", type=int, default=64, help="images opened per split")
    validate.add_argument("--all", action="store_true", help="open every image")
    validate.set_defaults(func=cmd_data_validate)

    tr = sub.add_parser("train", help="train one configuration")
    _add_config_args(tr)
    tr.add_argument("--out", default="runs/train", help="output folder (checkpoints, config copy)")
    tr.add_argument("--resume", default=None, help="checkpoint to resume from")
    tr.set_defaults(func=cmd_train)

    pt = sub.add_parser("pretrain", help="pretrain the backbone on the synthetic world (image labels only); cached")
    _add_config_args(pt)
    pt.add_argument("--out", default=None, help="also copy the backbone state dict to this file")
    pt.add_argument("--force", action="store_true", help="pretrain again even when the cache holds the backbone")
    pt.set_defaults(func=cmd_pretrain)

    ev = sub.add_parser("eval", help="evaluate a checkpoint (mIoU of CAM, aux CAM, pseudo label, segmentation)")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--split", default=None, help="split to score (default: the config's val split)")
    ev.add_argument("--data-root", default=None, help="dataset folder (default: the one in the checkpoint)")
    ev.add_argument("--crf", action="store_true", help="also score the segmentation after dense CRF")
    ev.add_argument("--max-images", type=int, default=0, help="score only the first N images")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_eval)

    inf = sub.add_parser("infer", help="segment images: label PNGs and colour overlays")
    source = inf.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a cpews checkpoint file")
    source.add_argument("--model", help="an MLflow model URI, e.g. models:/cpews@champion (MLFLOW_TRACKING_URI)")
    inf.add_argument("images", nargs="+")
    inf.add_argument("--out", required=True)
    inf.add_argument("--crf", action="store_true")
    inf.add_argument("--device", default="auto")
    inf.set_defaults(func=cmd_infer)

    sweep = sub.add_parser("sweep", help="hyperparameter sweeps: Ray Tune + Optuna over K-fold CV, tracked in MLflow")
    sweeps = sweep.add_subparsers(dest="sweep_command", required=True)
    run = sweeps.add_parser("run", help="start a sweep from a sweep file (see search_spaces/README.md)")
    run.add_argument("file", nargs="?", help="a sweep YAML file, or the name of one in search_spaces/ (demo)")
    run.add_argument("--spec-json", default=None, help=argparse.SUPPRESS)  # set by a submitted Ray job
    run.add_argument("--name", default=None, help="the sweep's name (default: the file's name key or file name)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a sweep-file key (search.num_trials=4) or, under fixed., a config key "
                          "(fixed.optim.max_iters=100); repeatable")
    run.add_argument("--smoke", action="store_true",
                     help="the same sweep shrunk to 2 trials x 2 folds x a few iterations (a quick check)")
    run.add_argument("--address", default=None,
                     help="a Ray cluster: http://HEAD:8265 submits the sweep as a Ray Job; HOST:6379 joins it "
                          "from here (default: RAY_ADDRESS, else a local Ray instance)")
    run.add_argument("--no-follow", action="store_true", help="with a job address: submit and return")
    run.add_argument("--run-dir", default="runs", help="where sweeps and the local MLflow store live")
    run.add_argument("--warm-start", default=None, metavar="SWEEP",
                     help="seed the search with the finished trials of an earlier sweep under --run-dir over a "
                          "compatible space (same keys and kinds of distribution, objective, config and folds)")
    run.set_defaults(func=cmd_sweep_run)
    resume = sweeps.add_parser("resume", help="continue an interrupted sweep")
    resume.add_argument("name")
    resume.add_argument("--address", default=None,
                        help="a Ray cluster: http://HEAD:8265 resumes it as a Ray Job (default: RAY_ADDRESS)")
    resume.add_argument("--no-follow", action="store_true", help="with a job address: submit and return")
    resume.add_argument("--in-job", action="store_true", help=argparse.SUPPRESS)
    resume.add_argument("--run-dir", default="runs")
    resume.set_defaults(func=cmd_sweep_resume)
    status = sweeps.add_parser("status", help="the sweep jobs of a Ray cluster (job API address)")
    status.add_argument("--address", default=None)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_sweep_status)
    stop = sweeps.add_parser("stop", help="stop a sweep job on a Ray cluster (the sweep can be resumed)")
    stop.add_argument("job_id")
    stop.add_argument("--address", default=None)
    stop.set_defaults(func=cmd_sweep_stop)
    board = sweeps.add_parser("leaderboard", help="the trials of a sweep, best first")
    board.add_argument("name")
    board.add_argument("--json", action="store_true", help="print a JSON list of trials")
    board.add_argument("--run-dir", default="runs")
    board.set_defaults(func=cmd_sweep_leaderboard)
    rep = sweeps.add_parser("report", help="what the search learned: parameter importance (fANOVA), parallel "
                                           "coordinates, history, fold scores, learning curves; PNGs and one "
                                           "HTML page, also logged to the sweep's MLflow run")
    rep.add_argument("name")
    rep.add_argument("--run-dir", default="runs")
    rep.set_defaults(func=cmd_sweep_report)
    sync = sweeps.add_parser("sync", help="deliver what MLflow did not take yet (failed artifact uploads, "
                                          "records of an outage); run it when the sweep is not running")
    sync.add_argument("name")
    sync.add_argument("--timeout", type=float, default=120.0, help="seconds to keep trying (default 120)")
    sync.add_argument("--run-dir", default="runs")
    sync.set_defaults(func=cmd_sweep_sync)

    pro = sub.add_parser("promote", help="refit a sweep's best configuration, score it, register it in MLflow")
    pro.add_argument("sweep", nargs="?", default=None, help="the sweep's name (default: the latest sweep)")
    pro.add_argument("--metric", default="seg_msf", choices=["seg", "seg_msf", "seg_crf"],
                     help="held-out protocol of the gate: single scale, multi-scale + flip (default), + CRF")
    pro.add_argument("--min-delta", type=float, default=0.0,
                     help="per-image mIoU margin the candidate must beat the champion by (default 0)")
    pro.add_argument("--alpha", type=float, default=0.05, help="level of the paired one-sided t test")
    pro.add_argument("--baseline-margin", type=float, default=0.0,
                     help="held-out mIoU margin the candidate must beat the all-background mIoU of the same "
                          "images by (default 0); a candidate that does not is refused")
    pro.add_argument("--force", action="store_true",
                     help="register a candidate that does not beat the all-background mIoU (tagged as forced)")
    pro.add_argument("--model-name", default="cpews", help="registered model name (default cpews)")
    pro.add_argument("--dry-run", action="store_true", help="say what would be promoted; train nothing")
    pro.add_argument("--json", action="store_true", help="print the decision as JSON (progress to stderr)")
    pro.add_argument("--address", default=None, help="a Ray cluster for the refit (default: local)")
    pro.add_argument("--run-dir", default="runs")
    pro.set_defaults(func=cmd_promote)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cpews.config import ConfigError

    expected: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError, ConnectionError)
    if args.command in ("sweep", "promote"):
        from orchestration.promote import PromotionError
        from orchestration.sweep import SweepError

        expected += (SweepError, PromotionError)
    try:
        return int(args.func(args) or 0)
    except expected as exc:
        if os.environ.get("CPEWS_TRACEBACK"):  # for bug reports: the whole story
            import traceback

            traceback.print_exc()
        print(f"cpews: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cpews: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
