"""Hugging Face ResNet / ViT backbones: shapes, blocks, checkpoints, local pretrained folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the hub
transformers = pytest.importorskip("transformers")

from immunekit.errors import ConfigError, DataError  # noqa: E402
from immunekit.models.base import ImmunizableModel  # noqa: E402
from immunekit.models.checkpoint import (  # noqa: E402
    MODELS,
    load_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
)
from immunekit.models.hf_vision import (  # noqa: E402
    HFResNet,
    HFViT,
    resnet_output_size,
    small_resnet_config,
    small_vit_config,
)

TINY_RESNET = {**small_resnet_config(), "num_channels": 3, "hidden_sizes": [8, 16], "depths": [1, 1]}
TINY_VIT = {
    **small_vit_config(),
    "num_channels": 3,
    "image_size": 16,
    "patch_size": 8,
    "num_hidden_layers": 2,
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(cls: type, **kwargs: object) -> ImmunizableModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(**kwargs)


@pytest.mark.parametrize(("cls", "dim"), [(HFResNet, 64), (HFViT, 64)])
def test_shapes_for_every_input_layout(cls: type, dim: int) -> None:
    m = _model(cls, num_classes=3).eval()
    x = torch.randn(5, 1, 28, 28, generator=_gen())
    feats = m.features(x)
    assert feats.shape == (5, dim) and m.feature_dim == dim
    assert m(x).shape == (5, 3)
    assert torch.equal(m.features(x.reshape(5, 784)), feats)
    assert torch.equal(m.features(x.reshape(5, 28, 28)), feats)
    assert isinstance(m, ImmunizableModel) and isinstance(m.head, nn.Linear)


def test_resnet_features_are_the_pooled_last_stage() -> None:
    m = _model(HFResNet).eval()
    x = torch.randn(4, 1, 28, 28, generator=_gen())
    out = m.extractor(pixel_values=x)
    side = resnet_output_size(small_resnet_config(), 28)
    assert side == 2 and out.last_hidden_state.shape == (4, 64, side, side)
    assert torch.allclose(m.features(x), out.last_hidden_state.mean(dim=(2, 3)), atol=1e-6)


def test_vit_features_are_the_final_layernorm_cls_token() -> None:
    m = _model(HFViT).eval()
    x = torch.randn(4, 1, 28, 28, generator=_gen())
    seen: list[torch.Tensor] = []
    handle = m.extractor.layernorm.register_forward_hook(lambda _m, _i, out: seen.append(out))
    feats = m.features(x)
    handle.remove()
    assert torch.equal(feats, seen[0][:, 0])
    assert seen[0].shape == (4, 1 + (28 // 7) ** 2, 64)


def test_resnet_blocks_and_last_stage_trainable() -> None:
    m = _model(HFResNet)
    names = [n for n, _ in m.blocks()]
    assert names == ["extractor.embedder", *(f"extractor.encoder.stages.{i}" for i in range(3))]
    chosen = list(m.trainable_blocks(1))
    assert chosen[-2:] == ["head.weight", "head.bias"]
    assert all(k.startswith(("extractor.encoder.stages.2.", "head.")) for k in chosen)
    every = {k for k, p in m.named_parameters()}
    assert set(m.trainable_blocks(len(names))) == every


def test_vit_blocks_fold_the_final_layernorm_into_the_last_block() -> None:
    m = _model(HFViT)
    prefix = "extractor.layers" if hasattr(m.extractor, "layers") else "extractor.encoder.layer"
    names = [n for n, _ in m.blocks()]
    assert names == [
        "extractor.embeddings",
        *(f"{prefix}.{i}" for i in range(3)),
        f"{prefix}.3+extractor.layernorm",
    ]
    chosen = list(m.trainable_blocks(1))
    assert {"extractor.layernorm.weight", "extractor.layernorm.bias", "head.weight"} <= set(chosen)
    assert all(k.startswith((f"{prefix}.3.", "extractor.layernorm.", "head.")) for k in chosen)
    assert any(k.startswith(f"{prefix}.3.") for k in chosen)
    # every parameter is in exactly one block (no pooler, nothing left out)
    every = {k for k, _ in m.named_parameters()}
    assert set(m.trainable_blocks(len(names))) == every
    assert not any("pooler" in k for k in every)


@pytest.mark.parametrize(("cls", "key"), [(HFResNet, "hf_resnet"), (HFViT, "hf_vit")])
def test_checkpoint_round_trip_gives_equal_outputs(cls: type, key: str, tmp_path: Path) -> None:
    m = _model(cls, num_classes=4)
    with torch.no_grad():  # make the head non-trivial and BN statistics non-default
        m.head.bias.add_(0.5)
        m.train()(torch.randn(8, 784, generator=_gen(1)))
    path = save_checkpoint(m, tmp_path / "m.safetensors", metadata={"seed": 0})
    info = read_checkpoint_info(path)
    assert info.model == key and info.config["num_classes"] == 4
    assert info.config["config"]["model_type"] == cls.MODEL_TYPE
    json.dumps(info.config)  # plain JSON
    back = load_checkpoint(path)
    assert type(back) is cls and MODELS.get(key) is cls
    x = torch.randn(6, 28, 28, generator=_gen(2))
    assert torch.equal(back.eval()(x), m.eval()(x))
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_custom_config_and_dtype_round_trip(tmp_path: Path) -> None:
    cfg = {**small_vit_config(), "patch_size": 4, "num_hidden_layers": 2}
    m = _model(HFViT, config=cfg, num_classes=2, head_bias=False, dtype=torch.float64)
    assert m.head.bias is None and m.head.weight.dtype == torch.float64
    assert m.features(torch.rand(2, 784, generator=_gen())).dtype == torch.float64
    back = load_checkpoint(save_checkpoint(m, tmp_path / "v.safetensors"))
    assert back.hf_config.patch_size == 4 and len(back.blocks()) == 3
    assert back.head.weight.dtype == torch.float64


def test_bad_inputs_and_configs() -> None:
    m = _model(HFResNet)
    with pytest.raises(DataError, match="not supported"):
        m(torch.zeros(2, 3, 28, 28))
    with pytest.raises(DataError, match="not square"):
        m(torch.zeros(2, 783))
    with pytest.raises(DataError, match="28x28"):
        _model(HFViT)(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ConfigError, match="model_type 'vit'"):
        HFResNet(config={"model_type": "vit"})
    with pytest.raises(ConfigError, match="num_classes"):
        HFViT(num_classes=0)
    with pytest.raises(ConfigError, match="mapping"):
        HFViT(config=[1, 2])  # type: ignore[arg-type]


# --- local pretrained folders ---------------------------------------------------------------------


def test_pretrained_dir_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist.*never downloads"):
        HFResNet.from_pretrained_dir(tmp_path / "resnet-18")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no config\.json"):
        HFViT.from_pretrained_dir(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        HFViT.from_pretrained_dir(tmp_path / "file")


def test_pretrained_dir_of_the_wrong_architecture_or_without_weights(tmp_path: Path) -> None:
    folder = tmp_path / "vit"
    transformers.ViTConfig(**TINY_VIT).save_pretrained(folder)
    with pytest.raises(ConfigError, match=r"'vit' model.*HFViT\.from_pretrained_dir"):
        HFResNet.from_pretrained_dir(folder)
    with pytest.raises(ConfigError, match="cannot load"):  # config.json but no weights
        HFViT.from_pretrained_dir(folder, num_classes=2)


def test_resnet_pretrained_dir_with_classifier_head(tmp_path: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = transformers.ResNetForImageClassification(
            transformers.ResNetConfig(**TINY_RESNET, num_labels=5)
        ).eval()
    hf.save_pretrained(tmp_path / "r")
    m = HFResNet.from_pretrained_dir(tmp_path / "r").eval()
    x = torch.rand(3, 3, 32, 32, generator=_gen())
    assert m.head.out_features == 5
    assert torch.allclose(m(x), hf(pixel_values=x).logits, atol=1e-5)
    gray = torch.rand(3, 32, 32, generator=_gen(1))  # one channel, repeated to three
    assert torch.equal(m.features(gray), m.features(gray.unsqueeze(1).expand(-1, 3, -1, -1)))
    # a new head of another width keeps the backbone
    m3 = HFResNet.from_pretrained_dir(tmp_path / "r", num_classes=3).eval()
    assert m3.head.out_features == 3 and torch.allclose(m3.features(x), m.features(x))
    assert next(iter(m3.trainable_blocks(1))).startswith("extractor.encoder.stages.1.")


def test_vit_pretrained_dir_base_model_needs_num_classes(tmp_path: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = transformers.ViTModel(transformers.ViTConfig(**TINY_VIT), add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path / "v")
    with pytest.raises(ConfigError, match="no image classifier"):
        HFViT.from_pretrained_dir(tmp_path / "v")
    m = HFViT.from_pretrained_dir(tmp_path / "v", num_classes=7).eval()
    x = torch.rand(2, 3, 16, 16, generator=_gen())
    assert torch.allclose(m.features(x), hf(pixel_values=x).last_hidden_state[:, 0], atol=1e-6)
    assert m(x).shape == (2, 7)
