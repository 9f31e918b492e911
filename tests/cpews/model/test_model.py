from __future__ import annotations

import pytest
import torch

from cpews.config import TrainConfig, load_config
from cpews.model import POOL_KEYS, CpewsNet, ViTBackbone, build_model


def micro(**flat):
    return TrainConfig.from_flat_dict(flat, base=load_config("test_micro"))


def test_output_shapes_follow_the_token_grid():
    cfg = micro()
    model = build_model(cfg, num_classes=5)
    out = model(torch.randn(2, 3, 64, 48))
    d = model.backbone.embed_dim
    assert out.tokens.shape == (2, d, 8, 6) and out.ism_tokens.shape == (2, d, 8, 6)
    assert out.logits.shape == (2, 5) and out.aux_logits.shape == (2, 5)
    assert out.cams.shape == (2, 5, 8, 6) and out.seg_logits.shape == (2, 6, 8, 6)


def test_patch_conv_floors_a_remainder():
    model = build_model(micro(), num_classes=3)
    assert model(torch.randn(1, 3, 70, 65)).tokens.shape[-2:] == (8, 8)


def test_gmp_logits_equal_max_of_token_projection_and_cams_are_w_times_f():
    model = build_model(micro(), num_classes=4)
    out = model(torch.randn(2, 3, 64, 64))
    w = model.classifier.weight[:, :, 0, 0]
    pooled = out.tokens.amax(dim=(2, 3))
    torch.testing.assert_close(out.logits, pooled @ w.T)
    torch.testing.assert_close(out.cams, torch.einsum("cd,bdhw->bchw", w, out.tokens))


def test_ism_tokens_are_the_raw_block_output_and_equal_final_at_full_depth():
    model = build_model(micro(), num_classes=3)
    vit = model.backbone.vit
    x = torch.randn(1, 3, 64, 64)
    captured = {}
    vit.blocks[0].register_forward_hook(lambda m, i, o: captured.setdefault("g", o))
    out = model(x)
    expected = captured["g"][:, vit.num_prefix_tokens :].transpose(1, 2).reshape_as(out.ism_tokens)
    torch.testing.assert_close(out.ism_tokens, expected)
    full = build_model(micro(**{"model.ism_depth": 2}), num_classes=3)
    out = full(x)
    torch.testing.assert_close(out.ism_tokens, out.tokens)


def test_bad_ism_depth_and_backbone_are_clear_errors():
    with pytest.raises(ValueError, match="model.ism_depth=5"):
        build_model(micro(**{"model.ism_depth": 5}), num_classes=3)
    with pytest.raises(Exception, match="resnet18|VisionTransformer|timm"):
        build_model(micro(**{"model.backbone": "resnet18"}), num_classes=3)


def test_pos_embed_frozen_and_no_biases_in_heads():
    model = build_model(micro(), num_classes=3)
    assert not model.backbone.vit.pos_embed.requires_grad
    assert model.classifier.bias is None and model.aux_classifier.bias is None
    assert all(m.bias is None for m in model.decoder.layers if isinstance(m, torch.nn.Conv2d))


def test_pool_buffers_are_in_the_state_dict_not_in_parameters():
    model = build_model(micro(**{"proto.num_prototypes": 3}), num_classes=4)
    state = model.state_dict()
    for key in POOL_KEYS:
        assert f"pool_{key}" in state
    assert state["pool_pos"].shape == (4, 3, model.backbone.embed_dim)
    assert not any(n.startswith("pool_") for n, _ in model.named_parameters())
    pool = {k: torch.ones_like(v) for k, v in model.pool().items()}
    model.set_pool(pool)
    assert bool(model.pool_ready) and model.pool_pos.sum() == pool["pos"].numel()
    with pytest.raises(ValueError, match="pool\\['pos'\\]"):
        model.set_pool({**pool, "pos": torch.zeros(1)})


def test_local_weights_file_loads_and_drops_head(tmp_path):
    source = ViTBackbone("vit_base_patch16_224", ism_depth=1, img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    state = {**source.vit.state_dict(), "head.weight": torch.zeros(10, 64)}
    path = tmp_path / "w.pth"
    torch.save(state, path)
    loaded = ViTBackbone(
        "vit_base_patch16_224", ism_depth=1, img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2,
        weights=str(path),
    )
    torch.testing.assert_close(loaded.vit.blocks[0].attn.qkv.weight, source.vit.blocks[0].attn.qkv.weight)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ViTBackbone("vit_base_patch16_224", ism_depth=1, img_size=64, patch_size=8, embed_dim=64, depth=2,
                    num_heads=2, weights=str(tmp_path / "nope.pth"))


def test_model_is_a_cpewsnet():
    assert isinstance(build_model(micro(), num_classes=2), CpewsNet)
