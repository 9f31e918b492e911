"""Time each part of one CPEWS training step against a plain timm ViT classification step.

Usage: python benchmarks/step_breakdown.py [--config synthetic_demo] [--set k=v ...] [--repeats 30]
       [--torch-reductions]

Prints the median time of: multi-scale CAM (no grad), gradient forward, PAR + pseudo label, losses,
backward + optimizer step, the whole CPEWS step, and a plain classification step of the same backbone and batch
(forward, multilabel soft-margin loss, backward, AdamW step), with the ratio of the two. The parts are timed in
interleaved rounds (each round runs every part once), so that a change in the machine's load while it runs
shifts all of them alike.

--torch-reductions also times the whole step with PAR's std and the label argmax done by `torch.std` and
`argmax` over the middle dimension (what the project did before its two-pass std and `max(dim).indices`), in
the same interleaved rounds, and prints the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cpews.cam import CamPair, multiscale_cams
from cpews.config import load_config
from cpews.losses import classification_loss, segmentation_loss
from cpews.model import build_model
from cpews.training.step import StepContext, compute_losses, ism_term, seg_pseudo_labels
from cpews.training.trainer import build_optimizer


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function over `repeats` rounds that run every function once, after a warm-up."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def with_torch_reductions(step: Callable[[], object]) -> Callable[[], object]:
    """`step` run with PAR's std and the label argmax as `torch.std` / `argmax` over the middle dimension."""
    import cpews.cam as cam
    import cpews.refine as refine

    ours = (refine._unbiased_std, refine._argmax_present, cam._max_and_label)
    theirs = (lambda x, dim: x.std(dim=dim, keepdim=True),
              lambda scores, present: scores.masked_fill(~present[:, :, None, None], float("-inf")).argmax(dim=1),
              lambda cams: (cams.amax(dim=1), cams.argmax(dim=1) + 1))

    def run() -> object:
        refine._unbiased_std, refine._argmax_present, cam._max_and_label = theirs
        try:
            return step()
        finally:
            refine._unbiased_std, refine._argmax_present, cam._max_and_label = ours

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="synthetic_demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--torch-reductions", action="store_true",
                        help="also time the step with torch.std / argmax in PAR and the CAM labels")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(0)
    b, s, c = cfg.train.batch_size, cfg.data.crop_size, args.classes
    images = torch.randn(b, 3, s, s)
    labels = (torch.rand(b, c) < 0.3).float()
    labels[:, 0] = 1
    boxes = torch.tensor([[0, s, 0, s]] * b)
    batch = {"image": images, "labels": labels, "box": boxes}
    model = build_model(cfg, num_classes=c, weights="").train()  # random init: the timing does not depend on it
    optimizer = build_optimizer(cfg, model)
    it = max(cfg.loss.seg_warmup_iters, cfg.loss.ism_warmup_iters) + 1  # every term active

    def cams():
        with torch.no_grad():
            return multiscale_cams(model.cam_logits, images, labels, cfg.cam.scales)

    cam_pair = cams()

    def forward():
        return model(images)

    output = forward()
    ctx = StepContext(cfg, it, model, images, labels, boxes, output, CamPair(*cam_pair))

    def par():
        return seg_pseudo_labels(ctx)

    seg_labels = par()

    def losses():
        out = model(images)
        ctx_local = StepContext(cfg, it, model, images, labels, boxes, out, ctx.cams)
        logits = F.interpolate(out.seg_logits, size=seg_labels.shape[-2:], mode="bilinear", align_corners=False)
        return (classification_loss(out.logits, labels) + classification_loss(out.aux_logits, labels)
                + ism_term(ctx_local) + segmentation_loss(logits, seg_labels))

    def backward_step():
        loss = losses()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def full_step():
        result = compute_losses(model, batch, cfg, it)
        optimizer.zero_grad()
        result.total.backward()
        optimizer.step()

    import timm

    plain = timm.create_model(cfg.model.backbone, num_classes=c, img_size=cfg.model.img_size, dynamic_img_size=True,
                              **{k: v for k, v in dict(patch_size=cfg.model.patch_size, embed_dim=cfg.model.embed_dim,
                                                       depth=cfg.model.depth, num_heads=cfg.model.num_heads).items() if v})
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)

    def plain_step():
        loss = F.multilabel_soft_margin_loss(plain(images), labels)
        plain_opt.zero_grad()
        loss.backward()
        plain_opt.step()

    r = args.repeats
    parts = {"cam": cams, "forward": forward, "par": par, "losses": losses,
             "backward_step": backward_step, "full": full_step, "plain": plain_step}
    if args.torch_reductions:
        parts["full_torch_reductions"] = with_torch_reductions(full_step)
    t = interleaved_medians(parts, r)
    t_cam, t_fwd, t_par, t_fwd_loss, t_full, t_plain = (t[k] for k in ("cam", "forward", "par", "losses", "full", "plain"))
    t_bwd = t["backward_step"] - t_fwd_loss
    print(f"config={args.config} batch={b} crop={s} threads={torch.get_num_threads()} repeats={r} (medians)")
    rows = [
        ("multi-scale CAM (no grad)", t_cam),
        ("gradient forward", t_fwd),
        ("PAR + refined pseudo label", t_par),
        ("losses (forward incl.) - forward", t_fwd_loss - t_fwd),
        ("backward + optimizer step", t_bwd),
        ("whole CPEWS step", t_full),
        ("plain timm ViT cls step", t_plain),
    ]
    for name, value in rows:
        print(f"  {name:<34} {value * 1000:8.2f} ms")
    print(f"  ratio CPEWS step / plain step      {t_full / t_plain:8.2f}x")
    if args.torch_reductions:
        t_old = t["full_torch_reductions"]
        print(f"  whole step, torch.std + argmax     {t_old * 1000:8.2f} ms ({t_old / t_full:.2f}x the step above)")


if __name__ == "__main__":
    main()
