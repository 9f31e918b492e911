"""Time the prototype pool build and compare `cpews.prototypes.kmeans` with scikit-learn's KMeans.

Usage: python benchmarks/kmeans_pool.py [--device cpu|cuda] [--threads 1] [--repeats 3] [--quick]
                                       [--config synthetic_demo] [--set k=v ...] [--skip-pool]

Prints
(a) the pool build time on the synthetic training split (`synthetic_demo` preset, a randomly initialised model;
    the dataset is generated on first use under $CPEWS_DATA_DIR, default runs/data), split into the forward
    pass and k-means, with the per-class counts;
(b) k-means with method.md §6.3's parameters (k=10, n_init=10, max_iter=10, seed 0; float64) against
    `sklearn.cluster.KMeans(n_clusters=10, random_state=0, n_init=10, max_iter=10)` on
    - one VOC-sized set: 10,582 x 768 features (one candidate per image of train_aug), and
    - a VOC-like pool: 20 classes with 500-3000 positive candidates each, 768-d,
    both clustered random data (seeded): median wall time over `--repeats`, the ratio, and the inertia side by
    side per class. Both libraries get the same number of CPU threads (`--threads`, via torch.set_num_threads
    and threadpoolctl); with `--device cuda` our k-means runs on the GPU (timed with synchronisation).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_seconds


def clustered_features(n: int, dim: int, clusters: int, seed: int) -> torch.Tensor:
    """n points around `clusters` random centres (unit-variance noise, centres spread 1.5 per dim), float32."""
    generator = torch.Generator().manual_seed(seed)
    centres = 1.5 * torch.randn(clusters, dim, generator=generator)
    assignment = torch.randint(clusters, (n,), generator=generator)
    return centres[assignment] + torch.randn(n, dim, generator=generator)


def pool_build_benchmark(config: str, overrides: list[str], device: torch.device) -> None:
    from cpews.config import load_config
    from cpews.data import class_table
    from cpews.model import build_model
    from cpews.training.data import resolve_data_root
    from cpews.training.prototype_hooks import build_model_pool

    cfg = load_config(config, overrides)
    started = time.perf_counter()
    root = resolve_data_root(cfg)
    print(f"(a) pool build: {config}, data at {root} (ready in {time.perf_counter() - started:.1f} s)")
    table = class_table(cfg.data.dataset)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=table.num_classes).to(device)
    p = cfg.proto
    pool = build_model_pool(cfg, model, data_root=root, train_ids=None, out_dir=None, iteration=0, progress=None)
    meta = pool.meta
    print(
        f"    {meta['num_images']} images at {p.resize}px, {len(p.scales)} scales x 2 flips, D={meta['dim']}, "
        f"K={p.num_prototypes}, device {device}, {torch.get_num_threads()} thread(s)"
    )
    print(
        f"    build {meta['build_seconds']:.2f} s = forward pass {meta['forward_seconds']:.2f} s "
        f"+ k-means/selection/meta {meta['build_seconds'] - meta['forward_seconds']:.2f} s"
    )
    print(f"    positive candidates {meta['positive_candidates']}")
    print(f"    pos_n {meta['pos_n']}  neg_n {meta['neg_n']}  neg_ss_n {meta['neg_ss_n']}")


def kmeans_benchmark(device: torch.device, threads: int, repeats: int, quick: bool) -> None:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    from cpews.prototypes import kmeans

    k, n_init, max_iter, seed, dim = 10, 10, 10, 0, 768
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def ours(x: torch.Tensor) -> float:
        return kmeans(x, k, n_init=n_init, max_iter=max_iter, seed=seed).inertia

    def sklearn(x) -> float:
        with threadpool_limits(limits=threads):
            return KMeans(n_clusters=k, random_state=seed, n_init=n_init, max_iter=max_iter).fit(x).inertia_

    print(
        f"(b) k-means, k={k} n_init={n_init} max_iter={max_iter} seed={seed}, float64; device {device}; "
        f"{threads} CPU thread(s) each; median of {repeats}"
    )
    # One VOC-sized set.
    n_big = 3000 if quick else 10582
    x = clustered_features(n_big, dim, 20, seed=1)
    x_device, x_numpy = x.double().to(device), x.double().numpy()
    ours(x_device)  # warm-up (allocator, CUDA context)
    t_ours, inertia_ours = median_seconds(lambda: ours(x_device), repeats, sync=sync)
    t_sk, inertia_sk = median_seconds(lambda: sklearn(x_numpy), repeats)
    print(
        f"    {n_big} x {dim}: ours {t_ours:.3f} s, sklearn {t_sk:.3f} s, speed-up {t_sk / t_ours:.1f}x; "
        f"inertia ours {inertia_ours:.6g} sklearn {inertia_sk:.6g} (ratio {inertia_ours / inertia_sk:.5f})"
    )
    # A VOC-like pool: 20 classes of 500-3000 candidates.
    classes = 6 if quick else 20
    generator = torch.Generator().manual_seed(2)
    sizes = torch.randint(500, 3001, (classes,), generator=generator).tolist()
    sets = [clustered_features(n, dim, 8, seed=100 + c) for c, n in enumerate(sizes)]
    sets_device = [s.double().to(device) for s in sets]
    sets_numpy = [s.double().numpy() for s in sets]
    t_ours, inertias_ours = median_seconds(lambda: [ours(s) for s in sets_device], repeats, sync=sync)
    t_sk, inertias_sk = median_seconds(lambda: [sklearn(s) for s in sets_numpy], repeats)
    print(
        f"    {classes} classes, {sum(sizes)} candidates in all: ours {t_ours:.3f} s, sklearn {t_sk:.3f} s, "
        f"speed-up {t_sk / t_ours:.1f}x"
    )
    print("    class      N   inertia ours   inertia sklearn   ours/sklearn")
    ratios = []
    for c, (n, a, b) in enumerate(zip(sizes, inertias_ours, inertias_sk)):
        ratios.append(a / b)
        print(f"    {c:5d} {n:6d}   {a:12.6g}   {b:15.6g}   {a / b:12.6f}")
    print(
        f"    ratio ours/sklearn: mean {statistics.mean(ratios):.6f}, min {min(ratios):.6f}, max {max(ratios):.6f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and for sklearn")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller k-means sets and a 300-image pool")
    parser.add_argument("--config", default="synthetic_demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--skip-pool", action="store_true", help="only the k-means comparison")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not args.skip_pool:
        overrides = list(args.overrides)
        if args.quick:
            overrides = ["data.synthetic_train=300", "data.synthetic_val=30", *overrides]
        pool_build_benchmark(args.config, overrides, device)
    kmeans_benchmark(device, args.threads, args.repeats, args.quick)


if __name__ == "__main__":
    main()
