import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from automoe.errors import ConfigError
from automoe.space import FEATURE_NAMES, ArchConfig, load_space

SPACES = {name: load_space(name) for name in ("space0", "small")}
space_names = st.sampled_from(sorted(SPACES))
seeds = st.integers(0, 2**32 - 1)


@settings(max_examples=60, deadline=None)
@given(name=space_names, seed=seeds)
def test_encode_decode_round_trip(name, seed):
    space = SPACES[name]
    arch = space.sample(np.random.default_rng(seed))
    assert arch.validate(space) is arch
    gene = space.encode(arch)
    assert len(gene) == len(space.gene_choices())
    assert space.decode(gene) == arch
    assert ArchConfig.from_dict(arch.to_dict()) == arch


@settings(max_examples=60, deadline=None)
@given(name=space_names, seed=seeds, prob=st.floats(0.0, 1.0))
def test_mutate_and_crossover_are_always_valid(name, seed, prob):
    space = SPACES[name]
    rng = np.random.default_rng(seed)
    a, b = space.sample(rng), space.sample(rng)
    for child in (space.mutate(a, prob, rng), space.crossover(a, b, rng)):
        child.validate(space)
    assert space.mutate(a, 0.0, rng) == a
    assert space.crossover(a, a, rng) == a


def test_changing_an_expert_count_repairs_the_expert_list():
    space = SPACES["space0"]
    e_max = max(space.n_experts)
    rng = np.random.default_rng(0)
    for _ in range(50):
        arch = space.sample(rng)
        gene = space.encode(arch)
        layer = int(rng.integers(arch.encoder_layers))
        n_pos = 5 + layer * (2 + e_max) + 1  # this encoder layer's n_experts gene
        before = arch.encoder_ffn[layer]
        for new_n in space.n_experts:
            gene[n_pos] = space.n_experts.index(new_n)
            after = space.decode(gene).encoder_ffn[layer]
            assert len(after) == new_n
            shorter, longer = sorted((before, after), key=len)
            assert longer[: len(shorter)] == shorter  # kept experts keep their sizes
            assert set(after) <= set(space.ffn_dim)


def _added_by(space, make_child, trials: int, seed: int = 0):
    """The decoder layers and experts a child has beyond its first parent: (layer ffn lists,
    expert sizes)."""
    rng = np.random.default_rng(seed)
    layers, experts = [], []
    for _ in range(trials):
        parent = space.smallest()  # 1 decoder layer, 1 expert of the smallest size
        child = make_child(parent, rng)
        layers += list(child.decoder_ffn[parent.decoder_layers :])
        for old, new in zip(
            parent.encoder_ffn + parent.decoder_ffn, child.encoder_ffn + child.decoder_ffn, strict=False
        ):  # new layers: above
            experts += list(new[len(old) :])
    return layers, experts


@pytest.mark.parametrize("operator", ["mutate", "crossover"])
def test_layers_and_experts_switched_on_are_drawn_from_the_space(operator):
    """A layer or expert that mutation or crossover switches on takes random choices: no
    size, expert count or head choice dominates (choice index 0 filled them before)."""
    space = SPACES["space0"]  # ffn {3072, 2048, 1024}, experts 1..6

    def child(parent, rng):
        if operator == "mutate":
            return space.mutate(parent, 0.5, rng)
        return space.crossover(parent, space.sample(rng), rng)

    layers, experts = _added_by(space, child, trials=600)
    assert len(layers) > 300 and len(experts) > 1000
    sizes = np.array([space.ffn_dim.index(s) for s in experts])
    counts = np.bincount(sizes, minlength=len(space.ffn_dim)) / len(sizes)
    assert np.all(np.abs(counts - 1 / len(space.ffn_dim)) < 0.06), counts  # uniform over the sizes
    n_experts = np.array([len(f) for f in layers])
    share_dense = float(np.mean(n_experts == 1))
    assert abs(share_dense - 1 / len(space.n_experts)) < 0.07, share_dense  # was 0.77 dense
    assert {len(f) for f in layers} == set(space.n_experts)


def test_sample_covers_every_choice():
    for space in SPACES.values():
        rng = np.random.default_rng(1)
        archs = [space.sample(rng) for _ in range(400)]
        seen = {
            "encoder_embed_dim": {a.encoder_embed_dim for a in archs},
            "decoder_embed_dim": {a.decoder_embed_dim for a in archs},
            "encoder_layers": {a.encoder_layers for a in archs},
            "decoder_layers": {a.decoder_layers for a in archs},
            "ffn_dim": {h for a in archs for layer in a.encoder_ffn + a.decoder_ffn for h in layer},
            "n_experts": {len(layer) for a in archs for layer in a.encoder_ffn + a.decoder_ffn},
            "self_attn_heads": {h for a in archs for h in a.encoder_self_heads + a.decoder_self_heads},
            "ende_attn_heads": {h for a in archs for h in a.decoder_ende_heads},
            "ende_span": {s for a in archs for s in a.decoder_ende_span},
            "top_k": {a.top_k for a in archs},
        }
        for field, values in seen.items():
            assert values == set(getattr(space, field)), (space.name, field)
        assert any(len(set(layer)) > 1 for a in archs for layer in a.encoder_ffn)  # heterogeneous experts


def test_sampling_is_seeded():
    space = SPACES["space0"]
    one = [space.sample(np.random.default_rng(7)) for _ in range(3)]
    two = [space.sample(np.random.default_rng(7)) for _ in range(3)]
    assert one == two and space.sample(np.random.default_rng(8)) != one[0]


def test_sample_is_uniform_per_factor():
    """Depths uniform over their choices, each decoder layer's span uniform over those its
    encoder depth allows (redrawing whole genes until the spans fit gave the small space's
    encoder depth 2 a third of the samples and its decoder depth 3 less than depth 1)."""
    space, n = SPACES["small"], 6000
    archs = [space.sample(np.random.default_rng([5, i])) for i in range(n)]

    def share(values, value):
        return sum(v == value for v in values) / len(values)

    for depths, drawn in (
        (space.encoder_layers, [a.encoder_layers for a in archs]),
        (space.decoder_layers, [a.decoder_layers for a in archs]),
    ):
        assert all(abs(share(drawn, d) - 1 / len(depths)) < 0.03 for d in depths), depths
    for enc in space.encoder_layers:
        spans = [s for a in archs if a.encoder_layers == enc for s in a.decoder_ende_span]
        allowed = [s for s in space.ende_span if s <= enc]
        assert set(spans) == set(allowed)
        assert all(abs(share(spans, s) - 1 / len(allowed)) < 0.03 for s in allowed), (enc, allowed)


def test_extremes_are_real_archs():
    for space in SPACES.values():
        big, small, dense = space.largest(), space.smallest(), space.largest_dense()
        for arch in (big, small, dense):
            arch.validate(space)
        assert big.encoder_ffn[0] == (max(space.ffn_dim),) * max(space.n_experts)
        assert small.encoder_ffn[0] == (min(space.ffn_dim),)
        assert dense.is_dense and not big.is_dense
    big = SPACES["space0"].largest()
    f = dict(zip(FEATURE_NAMES, SPACES["space0"].features(big), strict=True))
    d, n, k = big.decoder_embed_dim, big.decoder_layers, big.top_k
    assert f["decoder_moe_layers"] == n and f["decoder_width_total"] == n * d
    assert f["encoder_moe_layers"] == big.encoder_layers
    dense = dict(zip(FEATURE_NAMES, SPACES["space0"].features(SPACES["space0"].largest_dense()), strict=True))
    assert dense["encoder_moe_layers"] == dense["decoder_moe_layers"] == 0
    assert f["decoder_ffn_total"] == n * d * k * max(SPACES["space0"].ffn_dim)  # top-k experts of the widest


def test_homogeneous_space_keeps_expert_sizes_equal(tmp_path):
    data = SPACES["small"].to_dict() | {"heterogeneous": False, "name": "homog"}
    path = tmp_path / "homog.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    space = load_space(path)
    rng = np.random.default_rng(0)
    for _ in range(50):
        arch = space.mutate(space.sample(rng), 0.5, rng)
        assert all(len(set(layer)) == 1 for layer in arch.encoder_ffn + arch.decoder_ffn)
    mixed = dataclasses.replace(space.largest(), encoder_ffn=((1024, 512),) * space.largest().encoder_layers)
    with pytest.raises(ConfigError, match=r"arch.encoder_ffn\[0\]: experts differ in size"):
        mixed.validate(space)


def test_yaml_round_trip(tmp_path):
    arch = SPACES["space0"].sample(np.random.default_rng(3))
    path = tmp_path / "arch.yaml"
    path.write_text(arch.to_yaml())
    assert ArchConfig.from_yaml(path) == arch


@pytest.mark.parametrize(
    "change, message",
    [
        ({"encoder_embed_dim": 300}, r"arch.encoder_embed_dim: 300 is not in the space's choices"),
        ({"top_k": 3}, r"arch.top_k: 3 is not in"),
        ({"decoder_ende_span": "short"}, r"decoder_ende_span"),
        ({"encoder_ffn": [[4096]] * 2}, r"arch.encoder_ffn\[0\]\[0\]: 4096 is not in"),
        ({"encoder_ffn": [[256] * 5] * 2}, r"arch.encoder_ffn\[0\] \(number of experts\): 5 is not in"),
        ({"decoder_self_heads": [4, 4, 4, 4]}, r"arch.decoder_self_heads: expected 3 entries"),
        ({"decoder_ende_span": [3, 3, 3]}, r"arch.decoder_ende_span\[0\]: 3 exceeds the 2 encoder layers"),
        ({"decoder_ende_heads": [4, 3, 4]}, r"arch.decoder_ende_heads\[1\]: 3 is not in"),
        ({"colour": "red"}, r"arch.colour: unknown key"),
        ({"encoder_ffn": [[]] * 2}, r"arch.encoder_ffn\[0\]: needs at least one expert"),
    ],
)
def test_invalid_arch_names_the_field(change, message):
    space = SPACES["small"]
    base = {
        "encoder_embed_dim": 256,
        "decoder_embed_dim": 192,
        "encoder_ffn": [[512, 256], [1024]],
        "decoder_ffn": [[256], [256, 256, 1024], [512]],
        "encoder_self_heads": [4, 2],
        "decoder_self_heads": [4, 4, 2],
        "decoder_ende_heads": [4, 2, 4],
        "decoder_ende_span": [1, 2, 2],
        "top_k": 1,
    }
    ArchConfig.from_dict(base).validate(space)
    with pytest.raises(ConfigError, match=message):
        ArchConfig.from_dict(base | change).validate(space)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"qkv_dim": 250}, "qkv_dim: 250 is not divisible by 4 heads"),
        ({"ffn_dim": []}, "ffn_dim: needs at least one choice"),
        ({"n_experts": [1, 1]}, "n_experts: choices must be distinct positive integers"),
        ({"top_k": [1, 5]}, "top_k: 5 exceeds the largest n_experts"),
        ({"ende_spann": [1]}, "ende_spann: unknown key"),
        ({"decoder_layers": "three"}, "decoder_layers: expected a list"),
    ],
)
def test_invalid_space_file_names_the_field(tmp_path, change, message):
    import yaml

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACES["small"].to_dict() | change))
    with pytest.raises(ConfigError, match=message):
        load_space(path)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="space 'nope': no such preset"):
        load_space("nope")


def test_space_digest_changes_with_content():
    small = SPACES["small"]
    assert small.digest() == load_space("small").digest()
    assert small.digest() != dataclasses.replace(small, top_k=(1,)).digest()
