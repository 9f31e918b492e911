"""Multi-worker trials: one fold trained data parallel by a Ray Train `TorchTrainer` launched from the Tune trial.

A sweep whose `resources` ask for more than one worker (`gpu: N` with N > 1, one process per GPU with NCCL; or
`workers: N` on CPUs, gloo) trains each fold with `train_with_workers` instead of a call to `cpews.training.train`
in the trial's own process (Ray Train V2's pattern for Tune: the trial function launches the trainer and waits
for it). Every worker runs `cpews.training.train` under the process group Ray Train sets up, which makes it data
parallel (`cpews.training.distributed`: the global batch `train.batch_size` split over the workers, the pool
built on rank 0 and broadcast, only rank 0 validates and writes the fold's files).

Reports travel back to the trial: rank 0's reporter puts each `(metrics, checkpoint folder)` on a Ray queue and
waits until the trial has handled it (its MLflow calls and `tune.report`, with a copy of the fold's `last.pt` in
the Tune checkpoint), exactly as when the trainer calls the trial's reporter in the trial's own process. So the
metrics, the fold checkpoints, the trial's state and its resume are those of a one-process trial; the Tune
trial itself reserves nothing (`trial_resources`) and the workers reserve the trial's CPUs and GPUs.

The workers write into the trial's folder (the fold's `out_dir`, `trial.log`): on a multi-node cluster the
trials folder must be on storage that every node sees, as it must be anyway for a trial retried on another
node (docs/orchestration-notes.md).
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from orchestration.search_space import ResourceSettings

REPORT, DONE = "report", "done"
GROUPS_FILE = "placement_groups.txt"  # in the trial's Ray Train folder: the workers' placement group of each run
POLL_S = 1.0  # how often the trial looks whether the trainer ended without a word (a failed worker)
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"  # Ray Train's print patch: off, so prints reach trial.log


class WorkerLayout(NamedTuple):
    """How a trial's resources become Ray Train workers."""

    workers: int
    use_gpu: bool
    cpus_per_worker: float

    @property
    def backend(self) -> str:
        return "nccl" if self.use_gpu else "gloo"


def worker_layout(resources: ResourceSettings) -> WorkerLayout:
    """The workers of a trial: `gpu: N` (N >= 1 whole GPUs) gives N workers with one GPU each; otherwise
    `workers` (default 1) CPU workers, or one process on a fraction of a GPU. The trial's CPUs are split evenly."""
    workers = resources.num_workers
    return WorkerLayout(workers, resources.gpu >= 1, resources.cpu / workers)


def trial_resources(resources: ResourceSettings) -> dict[str, float]:
    """What the Tune trial itself reserves: everything for a one-process trial; for a multi-worker trial only a
    token (1 byte of memory: Tune refuses an empty request), as its workers reserve the CPUs and GPUs."""
    if resources.num_workers > 1:
        return {"cpu": 0, "gpu": 0, "memory": 1}
    return {"cpu": resources.cpu, "gpu": resources.gpu}


class WorkerOutcome(NamedTuple):
    """What rank 0 sends back when its fold ends."""

    result: Any  # cpews.training.TrainResult
    pool_cache: str  # hit | miss | none: where the fold's last pool came from


class _QueueReporter:
    """Rank 0's reporter: each report goes to the trial through `reports` and waits for its `acks`."""

    def __init__(self, reports: Any, acks: Any) -> None:
        self.reports, self.acks = reports, acks

    def __call__(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self.reports.put((REPORT, dict(metrics), None if checkpoint_dir is None else str(checkpoint_dir)))
        self.acks.get()  # the trial has logged and reported it (and copied the checkpoint)


def _worker_loop(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`: one process of the fold's data-parallel training."""
    import ray.train
    import torch

    from orchestration.trial import output_to, train_fold

    rank = ray.train.get_context().get_world_rank()
    group = ray.util.get_current_placement_group()
    if rank == 0 and group is not None:  # for `remove_left_over_groups`, should this trial's process die
        with open(config["groups_file"], "a") as handle:
            handle.write(f"{group.id.hex()}\n")
    if os.path.isdir(config["workdir"]):  # the config's relative paths are the driver's
        os.chdir(config["workdir"])
    torch.set_num_threads(config["threads"])
    with output_to(Path(config["log_path"])):
        cfg, label = config["cfg"], config["label"]

        def say(text: str) -> None:
            print(f"{label} {text}", flush=True)

        if rank == 0:
            say(f"training on {ray.train.get_context().get_world_size()} workers ({config['backend']})")
        reporter = _QueueReporter(config["reports"], config["acks"]) if rank == 0 else None
        result, cache = train_fold(
            cfg, reporter, class_names=config["class_names"], progress=say, out_dir=config["out_dir"],
            resume=config["resume"], train_ids=config["train_ids"], val_ids=config["val_ids"],
            val_split=config["val_split"],
        )
        if rank == 0:
            config["reports"].put((DONE, WorkerOutcome(result, cache)))


def remove_left_over_groups(path: Path) -> list[str]:
    """Remove the workers' placement groups listed in `path` that still exist; returns their ids.

    A trial runs one Ray Train run at a time, so a group listed there when the next run starts belongs to an
    earlier attempt whose process died (killed, or its node lost) without stopping its run. Ray removes such a
    group only through Ray Train's clean-up actor, which needs the dashboard's state API (a sweep's local Ray
    instance has no dashboard): left alone, the group would hold the CPUs and GPUs the retry needs, forever.
    """
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        ids = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []
    removed = []
    for group_id in ids:
        group = PlacementGroup(PlacementGroupID.from_hex(group_id))
        if ray.util.placement_group_table(group).get("state") not in (None, "REMOVED"):
            remove_placement_group(group)
            removed.append(group_id)
    Path(path).unlink(missing_ok=True)
    return removed


def train_with_workers(
    cfg: Any,
    reporter: Callable[[dict[str, float], Path | None], None],
    *,
    layout: WorkerLayout,
    out_dir: Path,
    resume: Path | None,
    train_ids: Sequence[str] | None,
    val_ids: Sequence[str] | None,
    val_split: str | None,
    class_names: Sequence[str],
    log_path: Path,
    label: str,
    storage_path: Path,
) -> WorkerOutcome:
    """Train one fold on `layout.workers` Ray Train workers; `reporter` is called in this process (the trial's)
    for each report of rank 0, in order, while rank 0 waits. Returns rank 0's `TrainResult` and pool source.

    Raises:
        RuntimeError: the training ended without rank 0's result (a worker failed: its error is in the message,
            its traceback in `log_path`).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    os.environ.setdefault(PRINT_PATCH_ENV, "0")  # propagated to the workers by Ray Train
    Path(storage_path).mkdir(parents=True, exist_ok=True)
    groups_file = Path(storage_path).resolve() / GROUPS_FILE
    for group_id in remove_left_over_groups(groups_file):
        print(f"{label} removed the workers' placement group {group_id} of an earlier attempt", flush=True)
    reports, acks = Queue(actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})
    resources = {"CPU": layout.cpus_per_worker, **({"GPU": 1} if layout.use_gpu else {})}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "cfg": cfg, "out_dir": str(out_dir), "resume": None if resume is None else str(resume),
            "train_ids": None if train_ids is None else list(train_ids),
            "val_ids": None if val_ids is None else list(val_ids), "val_split": val_split,
            "class_names": list(class_names), "log_path": str(Path(log_path).resolve()), "label": label,
            "workdir": os.getcwd(), "threads": max(1, round(layout.cpus_per_worker)), "backend": layout.backend,
            "reports": reports, "acks": acks, "groups_file": str(groups_file),
        },
        scaling_config=ScalingConfig(num_workers=layout.workers, use_gpu=layout.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend=layout.backend),
        run_config=RunConfig(name=f"{Path(out_dir).name}-{uuid.uuid4().hex[:8]}",
                             storage_path=str(Path(storage_path).resolve()),
                             failure_config=FailureConfig(max_failures=0)),  # the Tune trial retries
    )
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    outcome: WorkerOutcome | None = None
    try:
        while outcome is None:
            try:
                item = reports.get(timeout=POLL_S)
            except Empty:
                if not thread.is_alive():
                    break
                continue
            if item[0] == REPORT:
                reporter(item[1], None if item[2] is None else Path(item[2]))
                acks.put(True)
            else:
                outcome = item[1]
        thread.join()
    finally:
        with contextlib.suppress(Exception):
            reports.shutdown()
            acks.shutdown()
    if failure:
        raise RuntimeError(f"{label} the {layout.workers}-worker training failed: {failure[0]}") from failure[0]
    if outcome is None:
        raise RuntimeError(f"{label} the {layout.workers}-worker training ended without rank 0's result")
    return outcome


__all__ = ["WorkerLayout", "WorkerOutcome", "train_with_workers", "trial_resources", "worker_layout"]
