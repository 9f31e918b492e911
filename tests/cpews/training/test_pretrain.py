"""The synthetic backbone pretraining (`model.weights=synthetic`): cache, content key, loading, data isolation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from cpews.config import ConfigError
from cpews.data import read_synthetic_meta
from cpews.model import build_model
from cpews.model.backbone import ViTBackbone
from cpews.training.data import resolve_data_root, synthetic_root
from cpews.training.pretrain import (
    backbone_state_dict,
    content_key,
    ensure_pretrained,
    pretrain_config,
    resolve_weights,
)

# A pretraining small enough for the default suite: 16 + 8 images, 4 steps (2 of classification alone, the
# prototype pool built after step 3).
TINY_PRETRAIN = ("model.weights=synthetic", "pretrain.images=16", "pretrain.val_images=8", "pretrain.iters=4",
                 "pretrain.cls_iters=2", "pretrain.pool_iter=3", "pretrain.batch_size=8", "pretrain.warmup_iters=1")


@pytest.fixture(scope="module")
def tiny(make_micro_config, tmp_path_factory):
    """`tiny(*overrides)`: the micro config with the tiny pretraining, cached in one module-wide folder."""
    cache = tmp_path_factory.mktemp("pretrained")

    def make(*overrides: str):
        return make_micro_config(*TINY_PRETRAIN, f"pretrain.cache_dir={cache}", *overrides)

    return make


@pytest.fixture(scope="module")
def first(tiny):
    return ensure_pretrained(tiny())


def test_second_run_with_the_same_settings_is_a_cache_hit(tiny, first):
    assert not first.cached and first.path.is_file()
    stamp = first.path.stat().st_mtime_ns
    lines: list[str] = []
    again = ensure_pretrained(tiny(), progress=lines.append)
    assert again.cached and again.path == first.path and again.key == first.key
    assert first.path.stat().st_mtime_ns == stamp  # not trained or written again
    assert any("cache hit" in line for line in lines)
    assert again.meta["key"] == first.key and "miou_cam" in again.meta["metrics"]


def test_a_changed_setting_misses(tiny, first):
    changed = ensure_pretrained(tiny("pretrain.iters=5"))
    assert not changed.cached and changed.key != first.key and changed.path != first.path


def test_the_key_follows_pretraining_settings_and_architecture_only(tiny):
    key = content_key(tiny())
    # what a sweep searches or a run merely changes at run time shares one pretrained backbone
    for same in ("cam.high_threshold=0.4", "loss.ism_weight=0.3", "model.ism_depth=2", "proto.num_prototypes=3",
                 "optim.lr=0.01", "train.log_every=1", "pretrain.cache_dir=/elsewhere", "data.synthetic_train=40"):
        assert content_key(tiny(same)) == key, same
    for other in ("pretrain.seed=7", "pretrain.images=20", "pretrain.lr=0.002", "pretrain.confounder_strength=0.5",
                  "pretrain.confounder_leak=0.3", "pretrain.pool_iter=2", "pretrain.pool_iter=0", "model.embed_dim=32", "model.depth=3", "model.patch_size=16"):
        assert content_key(tiny(other)) != key, other


def test_pretrained_weights_load_into_the_model_through_model_weights(tiny, first):
    cfg = tiny()
    model = build_model(cfg, num_classes=6, weights=resolve_weights(cfg))
    saved = torch.load(first.path, weights_only=True)
    assert set(saved) == set(model.backbone.vit.state_dict())  # a timm-layout file of the ViT alone
    for name, value in model.backbone.vit.state_dict().items():
        torch.testing.assert_close(value, saved[name], msg=name)
    with pytest.raises(ValueError, match="resolve it to a file first"):
        build_model(cfg, num_classes=6)


def test_weights_of_another_architecture_are_refused_naming_file_and_tensors(first):
    with pytest.raises(ValueError) as error:
        ViTBackbone("vit_base_patch16_224", ism_depth=1, img_size=64, patch_size=8, embed_dim=32, depth=2,
                    num_heads=2, weights=str(first.path))
    text = str(error.value)
    assert str(first.path) in text and "patch_embed.proj.weight: file (64, 3, 8, 8) vs model (32, 3, 8, 8)" in text
    with pytest.raises(ValueError, match="blocks.2.norm1.weight: missing from the file"):
        ViTBackbone("vit_base_patch16_224", ism_depth=1, img_size=64, patch_size=8, embed_dim=64, depth=3,
                    num_heads=2, weights=str(first.path))


def test_a_file_that_is_not_a_state_dict_is_refused_in_one_line(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError) as error:
        ViTBackbone("vit_base_patch16_224", ism_depth=1, img_size=64, patch_size=8, embed_dim=64, depth=2,
                    num_heads=2, weights=str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_backbone_state_dict_keeps_the_vit_alone():
    state = {"backbone.vit.blocks.0.mlp.fc1.weight": torch.ones(2), "decoder.conv.weight": torch.ones(1),
             "classifier.weight": torch.ones(1), "pool_pos": torch.ones(1)}
    assert list(backbone_state_dict(state)) == ["blocks.0.mlp.fc1.weight"]


def test_the_pretraining_set_shares_no_image_with_the_training_data(tiny, first, synthetic_data_dir):
    cfg = tiny()
    with pytest.raises(ConfigError, match="pretrain.seed"):
        pretrain_config(tiny(f"pretrain.seed={cfg.data.synthetic_seed}"))
    pretraining_root = resolve_data_root(pretrain_config(cfg))
    assert pretraining_root != synthetic_data_dir

    def digests(root: Path) -> set[str]:
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in (root / "JPEGImages").glob("*.png")}

    assert digests(pretraining_root) and not digests(pretraining_root) & digests(synthetic_data_dir)


def test_training_with_model_weights_synthetic_starts_from_the_pretrained_backbone(tiny, first, tmp_path, capsys):
    from cpews.training import TrainHooks, train

    cfg = tiny("optim.max_iters=0")  # no step: the trained weights stay the pretrained ones
    result = train(cfg, lambda metrics, checkpoint_dir: None, out_dir=tmp_path / "run", hooks=TrainHooks(),
                   progress=False)
    assert "pretrained backbone: cache hit" in capsys.readouterr().out
    trained = torch.load(result.checkpoint, weights_only=True)["model"]
    saved = torch.load(first.path, weights_only=True)
    torch.testing.assert_close(trained["backbone.vit.blocks.1.attn.proj.weight"], saved["blocks.1.attn.proj.weight"])


def test_pretraining_batches_carry_image_labels_and_no_pixel_label(tiny):
    from cpews.training.data import train_loader

    pcfg = pretrain_config(tiny())
    batch = next(iter(train_loader(pcfg, resolve_data_root(pcfg))))
    assert set(batch) == {"image", "labels", "box", "name"}  # no mask: the losses see image-level labels only
    assert batch["labels"].shape == (8, 6)


def test_the_pretraining_set_follows_its_own_confounder_settings(tiny):
    default, decoupled = pretrain_config(tiny()), pretrain_config(
        tiny("pretrain.confounder_strength=0.5", "pretrain.confounder_leak=0.3"))
    assert synthetic_root(default).name.endswith("-conf0.9")  # the default leak keeps the earlier folder name
    assert synthetic_root(decoupled).name.endswith("-conf0.5-leak0.3")
    params = read_synthetic_meta(resolve_data_root(decoupled))["params"]
    assert (params["confounder_strength"], params["confounder_leak"]) == (0.5, 0.3)


def test_a_run_that_pretrains_on_first_use_trains_as_one_that_finds_the_backbone_cached(
        make_micro_config, tmp_path):
    from cpews.training import TrainHooks, train

    cfg = make_micro_config(*TINY_PRETRAIN, f"pretrain.cache_dir={tmp_path / 'cache'}", "optim.max_iters=2")

    def trained(name: str) -> dict[str, torch.Tensor]:
        result = train(cfg, lambda metrics, checkpoint_dir: None, out_dir=tmp_path / name, hooks=TrainHooks(),
                       progress=False)
        return torch.load(result.checkpoint, weights_only=True)["model"]

    first, second = trained("pretrained_here"), trained("cache_hit")  # the pretraining draws random numbers
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=0, atol=0, msg=name)


def test_the_pretraining_builds_its_prototype_pool_after_pool_iter_and_uses_it(tiny, monkeypatch):
    from cpews.training import pretrain as pretrain_module
    from cpews.training.prototype_hooks import PrototypeModule

    built: list[int] = []
    terms: list[str] = []
    original_after_step, original_ssl = PrototypeModule.after_step, PrototypeModule.ssl_term

    def after_step(self, state):
        original_after_step(self, state)
        if state.model.pool_ready:
            built.append(state.iteration)

    def ssl_term(self, ctx):
        terms.append(f"ssl@{ctx.iteration}")
        return original_ssl(self, ctx)

    monkeypatch.setattr(PrototypeModule, "after_step", after_step)
    monkeypatch.setattr(PrototypeModule, "ssl_term", ssl_term)
    model, metrics = pretrain_module.run_pretraining(pretrain_config(tiny()), lambda line: None)
    assert bool(model.pool_ready) and built[0] == 3  # built after step 3 of 4 (pretrain.pool_iter=3)
    assert terms == ["ssl@3"]  # the SSL term acts on the last step only, once the pool exists
    without, _ = pretrain_module.run_pretraining(pretrain_config(tiny("pretrain.pool_iter=0")), lambda line: None)
    assert not bool(without.pool_ready)


def test_a_pool_iter_at_or_past_the_end_is_refused_naming_both_keys(tiny):
    with pytest.raises(ConfigError, match=r"pretrain.pool_iter=4 must be below pretrain.iters=4"):
        pretrain_config(tiny("pretrain.pool_iter=4"))
