"""Model-level properties: presets, per-layer vision parity, KV-cache decoding, switches."""

from __future__ import annotations

import math

import hf_tiny
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_parity import assert_close

from llava_jax.config import PRESETS, LlavaConfig, RematPolicy
from llava_jax.conversion.hf_to_jax import convert_hf_to_jax
from llava_jax.conversion.source import load_model
from llava_jax.media.feature_plan import Media, build_feature_plan
from llava_jax.models.build import abstract_model, abstract_params
from llava_jax.models.llm import KVCache

# Parameter counts of the released llava-hf checkpoints (their model cards), which the
# presets must reproduce exactly (exact where the card gives the full number).
PRESET_PARAMS = {
    "llava-1.5-7b": 7_063_427_072,
    "llava-1.5-13b": 13.35e9,
    "llava-v1.6-vicuna-7b": 7.06e9,
    "llava-v1.6-vicuna-13b": 13.35e9,
    "llava-v1.6-mistral-7b": 7.57e9,
    "llava-onevision-qwen2-0.5b": 0.894e9,
    "llava-onevision-qwen2-7b": 8.03e9,
    "llava-onevision-qwen2-72b": 73.2e9,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_abstractly(name):
    params = abstract_params(LlavaConfig.preset(name))  # shapes only, nothing allocated
    count = sum(math.prod(p.shape) for p in params.values())
    assert count == pytest.approx(PRESET_PARAMS[name], rel=5e-3), f"{name}: {count:,}"
    stacked = params["language_model/layers/self_attn/q_proj/kernel"]
    assert stacked.shape[0] == LlavaConfig.preset(name).text.num_hidden_layers


def test_parameters_carry_logical_axes():
    model = abstract_model(LlavaConfig.preset("llava-onevision-qwen2-0.5b"))
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(specs)}
    assert tuple(flat["language_model/layers/mlp/gate_proj/kernel"].get_value()) == (
        "layers",
        "embed",
        "mlp",
    )
    assert tuple(flat["language_model/embed_tokens/embedding"].get_value()) == ("vocab", "embed")
    unnamed = [k for k, v in flat.items() if all(a is None for a in v.get_value())]
    assert not unnamed, f"parameters without logical axes: {unnamed}"


def _converted(tmp_path_factory, family):
    tmp = tmp_path_factory.mktemp(family)
    hf = hf_tiny.BUILDERS[family]()
    hf.save_pretrained(tmp / "hf")
    convert_hf_to_jax(tmp / "hf", tmp / "jax")
    return hf, tmp / "jax"


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return _converted(tmp_path_factory, "llava")


@pytest.fixture(scope="module")
def onevision_dir(tmp_path_factory):
    return _converted(tmp_path_factory, "llava_onevision")


@pytest.mark.parametrize("layer", [0, 1, 2, 3, -1, -2, -4])
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_vision_tower_every_layer(request, tower, layer):
    """The tower's hidden state at every depth equals HF's `hidden_states[layer]`."""
    hf, path = request.getfixturevalue({"clip": "llava_dir", "siglip": "onevision_dir"}[tower])
    model = load_model(path, vision_feature_layer=layer)
    pixels = np.random.RandomState(layer % 7).randn(2, 3, 42, 42).astype(np.float32)
    with torch.no_grad():
        want = hf.model.vision_tower(torch.tensor(pixels), output_hidden_states=True)
    got = model.vision_tower(jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    assert_close(f"vision hidden_states[{layer}]", got, want.hidden_states[layer].numpy())


def test_text_only_logits(llava_dir):
    hf, path = llava_dir
    model = load_model(path)
    ids = np.random.RandomState(0).randint(0, 140, size=(2, 11)).astype(np.int32)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids)).logits.numpy()
    assert_close("text-only logits", model(ids).logits, want)


@pytest.mark.parametrize("scan", [True, False])
def test_kv_cache_decoding_matches_full_forward(llava_dir, scan):
    """Prefill a left-padded batch into the cache, decode token by token: same logits."""
    _, path = llava_dir
    model = load_model(path, scan_layers=scan)
    rng = np.random.RandomState(1)
    ids = rng.randint(2, 140, size=(2, 12)).astype(np.int32)
    segment = np.ones_like(ids)
    segment[1, :4] = 0  # row 1 is left-padded
    positions = np.clip(np.cumsum(segment, axis=1) - 1, 0, None).astype(np.int32)
    full = model(ids, positions=positions, segment_ids=segment).logits

    prefill = 7
    cache = KVCache.init(model.cfg.text, batch=2, max_len=16, dtype=jnp.float32)
    out = model(
        ids[:, :prefill],
        positions=positions[:, :prefill],
        segment_ids=segment[:, :prefill],
        cache=cache,
    )
    steps = [out.logits]
    graph, state = nnx.split(model)
    step = jax.jit(
        lambda st, i, p, s, c: nnx.merge(graph, st)(i, positions=p, segment_ids=s, cache=c)
    )
    cache = out.cache
    for t in range(prefill, ids.shape[1]):
        out = step(state, ids[:, t : t + 1], positions[:, t : t + 1], segment[:, t : t + 1], cache)
        steps.append(out.logits)
        cache = out.cache
    decoded = jnp.concatenate(steps, axis=1)
    valid = segment.astype(bool)
    assert_close("decoded vs full logits", np.asarray(decoded)[valid], np.asarray(full)[valid])
    assert int(cache.index) == ids.shape[1]


@pytest.mark.parametrize("policy", [RematPolicy.FULL, RematPolicy.DOTS_NO_BATCH])
def test_remat_changes_nothing_numerically(llava_dir, policy):
    _, path = llava_dir
    ids = np.random.RandomState(2).randint(2, 140, size=(1, 9)).astype(np.int32)

    def loss_and_grad(model):
        def loss(m):
            return jnp.mean(m(ids).logits ** 2)

        return nnx.value_and_grad(loss)(model)

    base_loss, base_grad = loss_and_grad(load_model(path))
    loss, grad = loss_and_grad(load_model(path, remat_policy=policy))
    assert_close("loss", loss, base_loss, atol=1e-6)
    pairs = zip(nnx.to_flat_state(grad), nnx.to_flat_state(base_grad), strict=True)
    for (k, a), (_, b) in pairs:
        assert_close(f"grad {k}", a.get_value(), b.get_value(), atol=1e-6)


def test_forward_compiles_once_per_shape_bucket(tmp_path_factory):
    """Different image sizes padded to one (views, image tokens, text length) bucket share one
    compiled forward, and padding changes nothing at the real positions."""
    _, path = _converted(tmp_path_factory, "llava_next")
    model = load_model(path)
    graph, state = nnx.split(model)
    traces = []

    @jax.jit
    def forward(state, ids, pixels, taps, weights, segment):
        traces.append(1)
        m = nnx.merge(graph, state)
        return m(
            ids, pixel_values=pixels, taps=taps, tap_weights=weights, segment_ids=segment
        ).logits

    max_views, max_tokens, length = 4, 40, 48
    rng = np.random.RandomState(3)
    for hw in [(42, 42), (30, 50), (100, 40)]:
        media = [Media.image(*hw)]
        exact = build_feature_plan(model.cfg, [media], max_views=max_views)
        padded = build_feature_plan(model.cfg, [media], max_views=max_views, max_tokens=max_tokens)
        n = exact.num_image_tokens[0]
        row = np.array([1, 7, 8] + [hf_tiny.IMAGE_TOKEN] * n + [9, 10], np.int32)
        pixels = np.zeros((1, max_views, 42, 42, 3), np.float32)
        pixels[0, : exact.num_views[0]] = rng.randn(exact.num_views[0], 42, 42, 3)
        ids = np.zeros((1, length), np.int32)
        segment = np.zeros((1, length), np.int32)
        ids[0, : len(row)], segment[0, : len(row)] = row, 1
        got = forward(state, ids, pixels, padded.taps, padded.weights, segment)
        want = model(
            row[None],
            pixel_values=pixels[:, : exact.num_views[0]],
            taps=exact.taps,
            tap_weights=exact.weights,
        ).logits
        assert_close(f"bucketed logits {hw}", np.asarray(got)[0, : len(row)], want[0])
    assert len(traces) == 1, f"forward traced {len(traces)} times for one shape bucket"
