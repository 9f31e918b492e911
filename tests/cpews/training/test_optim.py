from __future__ import annotations

import math

import pytest
import torch

from cpews.config import TrainConfig, load_config
from cpews.model import build_model
from cpews.training.optim import PolyWarmupAdamW, lr_factor, parameter_groups
from cpews.training.trainer import build_optimizer

VOC = dict(warmup_iters=1500, warmup_ratio=1e-6, max_iters=20000, power=0.9)


def test_lr_factor_hand_values():
    # s=0: 1 - (1 - 0)(1 - 1e-6) = 1e-6, so lr = 6e-5 * 1e-6 = 6e-11 (method.md §12 invariants)
    assert 6e-5 * lr_factor(0, **VOC) == pytest.approx(6e-11, rel=1e-9)
    # s=1499: 1 - (1/1500)(1 - 1e-6) ~= 0.999333
    assert 6e-5 * lr_factor(1499, **VOC) == pytest.approx(6e-5, rel=1e-3)
    # s=1500: poly, not shifted: (1 - 1500/20000)^0.9 = 0.925^0.9 ~= 0.93231
    assert lr_factor(1500, **VOC) == pytest.approx(0.925**0.9)
    assert lr_factor(20000, **VOC) == 0.0 and lr_factor(25000, **VOC) == 0.0


def test_four_groups_with_head_lr_and_frozen_pos_embed_skipped():
    cfg = load_config("test_micro")
    model = build_model(cfg, num_classes=5)
    groups = parameter_groups(model, lr=1.0, head_lr_mult=10.0)
    assert [g["name"] for g in groups] == ["backbone", "backbone_norm", "heads", "decoder"]
    assert [g["base_lr"] for g in groups] == [1.0, 1.0, 10.0, 10.0]
    ids = {id(p) for g in groups for p in g["params"]}
    assert id(model.backbone.vit.pos_embed) not in ids
    assert all(id(p) in ids for p in model.parameters() if p.requires_grad)
    norm_names = [n for n, p in model.named_parameters() if "norm" in n and n.startswith("backbone")]
    assert len(groups[1]["params"]) == len(norm_names) > 0


def test_optimizer_sets_lr_before_each_step_and_round_trips_its_position():
    cfg = TrainConfig.from_flat_dict({"optim.warmup_iters": 4, "optim.max_iters": 10}, base=load_config("test_micro"))
    model = build_model(cfg, num_classes=3)
    opt = build_optimizer(cfg, model)
    for _ in range(5):
        model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
        opt.step()
    assert opt.global_step == 5
    # the last step (s=4) used the poly factor (1 - 4/10)^0.9
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr * 0.6**0.9)
    other = build_optimizer(cfg, build_model(cfg, num_classes=3))
    other.load_state_dict(opt.state_dict())
    assert other.global_step == 5 and isinstance(other, PolyWarmupAdamW)
    assert all(g["weight_decay"] == cfg.optim.weight_decay for g in opt.param_groups)
    assert not math.isnan(opt.current_factor())
