"""Automatic mixed precision: the bisected and the greedy choice on known scores, the 16-bit weight rule,
and the flag end to end."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxsnpe import OnnxSnpeError, quantize
from onnxsnpe.compare import compare
from onnxsnpe.encode.precision import sixteen_bit_tensors
from onnxsnpe.graph.deploy import prepare_deploy_model
from onnxsnpe.graph.load import load_model
from onnxsnpe.graph.runtime import make_session
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.optimize.mixed_precision import PRUNE_SCORINGS, choose_16bit, held_back_count
from onnxsnpe.precision import with_fp32_weights
from onnxsnpe.report.metrics import TensorComparison
from onnxsnpe.report.sensitivity import isolated_ranking
from onnxsnpe.simulate.fake_quant import build_simulation_model
from onnxsnpe.stages import Settings, apply_adaround, apply_bias_correction, encode, hold_back, prepare
from onnxsnpe.stats.collect import collect_statistics

from .conftest import minmax_encodings

GAINS = {"a": 6.0, "b": -1.0, "c": 3.0, "e": 0.05, "d": 0.5}


def _score(raised: list[str]) -> float:
    return 10.0 + sum(GAINS[name] for name in raised)


def test_bisection_finds_the_shortest_prefix_then_prunes_what_the_target_does_not_need():
    choice = choose_16bit(["a", "b", "c", "d"], _score, target_db=18.0, budget=None)
    assert choice.strategy == "bisection" and choice.raised == ["a", "c"] and choice.final_db == 19.0
    assert choice.target_met
    steps = [(t.step, t.count, t.tensor, t.kept) for t in choice.tried]
    assert steps == [("prefix", 4, None, True), ("prefix", 2, None, False), ("prefix", 3, None, True),
                     ("drop", 2, "c", False), ("drop", 2, "b", True), ("drop", 1, "a", False)]
    assert choice.to_dict()["evaluations"] == 7


def test_bisection_catches_gains_too_small_to_keep_one_at_a_time():
    names = [f"t{i:03d}" for i in range(100)]

    def spread(raised: list[str]) -> float:
        return 10.0 + 0.08 * len(raised)  # each raise under MIN_GAIN_DB: greedy keeps none

    assert choose_16bit(names, spread, target_db=None, budget=100).raised == []
    choice = choose_16bit(names, spread, target_db=15.0, budget=None)
    assert choice.raised == names[:63] and choice.target_met
    assert len(choice.tried) <= 1 + 7 + PRUNE_SCORINGS


def test_budget_limits_the_raises_and_a_missed_target_is_reported():
    choice = choose_16bit(["a", "b", "c", "d"], _score, target_db=40.0, budget=2)
    assert choice.strategy == "greedy" and choice.raised == ["a", "c"] and choice.target_met is False
    spent = choose_16bit(["a", "b", "c", "e", "d"], _score, target_db=None, budget=5)
    assert spent.raised == ["a", "c", "d"] and spent.target_met is None  # e's 0.05 dB is below the margin
    assert choose_16bit(["a"], _score, target_db=5.0, budget=None).raised == []  # met already
    with pytest.raises(ValueError):
        choose_16bit(["a"], _score, None, None)


def test_held_back_share():
    assert held_back_count(6) == 1 and held_back_count(64) == 8 and held_back_count(1000) == 16


def test_auto_precision_flag_raises_tensors_to_16_bits(tmp_path, tiny_model, npy_folder):
    result = quantize(tiny_model, npy_folder, tmp_path / "out", auto_precision=True, max_16bit=2, progress=False)
    record = result.report["optimizations"]["auto_precision"]
    assert record["held_back_samples"] == 1 and 1 <= record["count"] <= 2
    overrides = json.loads((result.out_dir / "snpe_clip_ranges.json").read_text())
    sixteen = {name for name, (entry,) in overrides["activation_encodings"].items() if entry["bitwidth"] == 16}
    params = {name: entry for name, (entry,) in overrides["param_encodings"].items()}
    for name in record["raised"]:
        if name in record["raised_weights"]:  # a 16-bit weight: symmetric, its layer's input at 16 bits too
            assert params[name]["bitwidth"] == 16 and params[name]["is_symmetric"] == "True"
        else:
            assert name in sixteen
    assert len(sixteen) >= record["activations_at_16_bits"] >= 1  # the overrides list aliases too
    assert len((result.out_dir / "data.txt").read_text().splitlines()) == 5  # one of six held back
    assert result.report["settings"]["max_16bit"] == 2


def test_auto_precision_needs_a_target_or_a_budget(tmp_path, tiny_model, npy_folder):
    with pytest.raises(OnnxSnpeError, match="--target-sqnr"):
        quantize(tiny_model, npy_folder, tmp_path / "out", auto_precision=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_16_bit_weight_raises_its_layer_input_and_output(tiny_model):
    deploy, _ = prepare_deploy_model(load_model(tiny_model), {"x": (1, 3, 8, 8)})
    targets = find_targets(deploy)
    activations, weights = sixteen_bit_tensors(targets, ["fc.w"])
    layer_input, layer_output = targets.weight_layers["fc.w"]
    assert weights == {"fc.w"} and activations == {targets.root(layer_input), layer_output}
    conv_input, conv_output = targets.weight_layers["conv.w"]
    activations, _ = sixteen_bit_tensors(targets, ["conv.w"])
    assert activations == {conv_input, targets.squashed.get(conv_output, conv_output)}  # after the fused Relu
    with pytest.raises(ValueError, match="nowhere"):
        sixteen_bit_tensors(targets, ["nowhere"])


def test_isolated_ranking_scores_each_weight_and_activation_alone(tiny_model):
    deploy, _ = prepare_deploy_model(load_model(tiny_model), {"x": (1, 3, 8, 8)})
    rng = np.random.default_rng(3)
    samples = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    targets, _, activations, params = minmax_encodings(deploy, samples)
    weights = {name: params[name] for name in targets.weights}
    ranking = dict(isolated_ranking(deploy, targets, activations, samples, weights))
    assert set(ranking) == set(targets.activations) | set(weights)

    def alone(quantized_activations: list[str], quantized_params: dict) -> float:
        model, names = build_simulation_model(deploy, targets, activations, quantized_params, quantized_activations)
        session, reference = make_session(model), make_session(deploy)
        comparison = TensorComparison("out")
        for sample in samples:
            (want,), (got,) = reference.run(None, sample), session.run([names[deploy.graph.output[0].name]], sample)
            comparison.update(want, got)
        return comparison.sqnr_db

    # weights behind a switch are no constants to onnxruntime: other kernels, other float rounding
    for name in weights:
        assert ranking[name] == pytest.approx(alone([], {name: weights[name]}), abs=1e-3)
    for name in targets.activations:
        assert ranking[name] == pytest.approx(alone([name], {}), abs=1e-3)


def test_a_raised_weight_takes_back_its_fp32_value_after_adaround_and_bias_correction(tiny_model, npy_folder):
    settings = Settings(adaround=True, adaround_iters=20, bias_correction=True)
    prepared = hold_back(prepare(tiny_model, npy_folder, None, None, None, None))
    original = prepared.deploy
    prepared, _ = apply_adaround(prepared, settings, False)
    prepared, _ = apply_bias_correction(prepared, settings, False)
    raised, kept = "fc.w", "conv.w"
    bias = next(ref.bias for ref in prepared.targets.biases if ref.weight == raised)
    assert not np.array_equal(_initializer(prepared.deploy, raised), _initializer(original, raised))

    released = with_fp32_weights(prepared, [raised])
    for name in (raised, bias):  # weight and bias back at the FP32 values the steps stand for
        np.testing.assert_array_equal(_initializer(released.deploy, name), _initializer(prepared.reference, name))
    np.testing.assert_array_equal(_initializer(released.deploy, kept), _initializer(prepared.deploy, kept))
    assert raised not in released.weight_encodings and released.weight_encodings[kept] == \
        prepared.weight_encodings[kept]
    assert with_fp32_weights(prepared, []) is prepared

    stats = collect_statistics(released.deploy, released.targets.activations, iter(released.calib_set))
    encodings = encode(released, stats, settings, [raised])
    assert encodings.weights[kept] == prepared.weight_encodings[kept]  # AdaRound's grid, 8 bits
    sixteen = encodings.weights[raised]
    assert sixteen.bitwidth == 16 and sixteen.offset == -2 ** 15  # symmetric, from the FP32 values
    # from the FP32 values, widened so that the largest code stays at the HTP's cap (32639 of 32767)
    assert sixteen.max == pytest.approx(np.abs(_initializer(prepared.reference, raised)).max() * 32767 / 32639,
                                        rel=1e-6)


def _initializer(model, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def test_compare_writes_a_configuration_its_own_deploy_model_when_raised_weights_take_fp32_values(
        tmp_path, tiny_model, npy_folder):
    base = Settings(adaround=True, adaround_iters=20, auto_precision=True, target_sqnr=200.0, max_16bit=6)
    result = compare(tiny_model, npy_folder, tmp_path / "out", methods=["minmax"], act_bitwidths=[8], base=base,
                     progress=False)
    (row,) = result.report["configurations"]
    raised_weights = row["auto_precision"]["raised_weights"]
    assert raised_weights and row["auto_precision"]["fp32_weights_restored"]
    assert row["deploy"] == "minmax_a8/snpe_deploy.onnx"
    own, shared = (onnx.load(tmp_path / "out" / path) for path in (row["deploy"], "snpe_deploy.onnx"))
    for name in raised_weights:
        assert not np.array_equal(_initializer(own, name), _initializer(shared, name))
