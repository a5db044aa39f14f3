"""Calibration on Ray (stats/distributed.py), on a local 2-CPU cluster started once for the module:
the same statistics and files as in-process for any number of shards, a worker killed mid-shard,
a bad sample in a shard."""

from __future__ import annotations

import filecmp
import io
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import pytest
from tqdm import tqdm

from onnxsnpe import export
from onnxsnpe.api import quantize
from onnxsnpe.cli import DEMO_IMAGES, main
from onnxsnpe.compare import compare
from onnxsnpe.data.datasets import open_dataset
from onnxsnpe.encode.ranges import weight_encodings
from onnxsnpe.errors import OnnxSnpeError
from onnxsnpe.graph.load import load_model, model_inputs
from onnxsnpe.graph.targets import find_targets
from onnxsnpe.optimize import adaround_on_ray
from onnxsnpe.optimize.adaround import adaround
from onnxsnpe.optimize.adaround_on_ray import ray_runner
from onnxsnpe.report import evaluation
from onnxsnpe.report.ranking_on_ray import isolated_ranking_on_ray
from onnxsnpe.report.sensitivity import isolated_ranking
from onnxsnpe.stages import Settings, encode, evaluate_encodings, prepare
from onnxsnpe.stats import distributed
from onnxsnpe.stats.collect import collect_statistics
from onnxsnpe.stats.distributed import check_reachable, collect_on_ray, connect, dataset_part
from onnxsnpe.stats.tensor_stats import TensorStats

from .conftest import CALIB_DATA, conv_model
from .test_adaround import _samples, branches
from .test_statistics import assert_same_histogram

pytestmark = pytest.mark.timeout(180)  # a hung cluster fails the test instead of the suite

METHODS = ("minmax", "percentile", "mse", "tf_enhanced")
DEMO_MODEL = CALIB_DATA / "ch_ppocr_mobile_v2.0_cls_infer.onnx"


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for this module's tests, shut down after them."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             logging_level="WARNING")  # "local": a new cluster, even if another runs on the machine
    # the killing sink below is defined here, a module Ray's workers cannot import by name
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def demo():
    """The bundled classifier, prepared, with its 16 calibration images, and the in-process statistics."""
    prepared = prepare(DEMO_MODEL, CALIB_DATA / "calib", None, None, None, DEMO_IMAGES)
    expected = collect_statistics(prepared.deploy, prepared.targets.activations, iter(prepared.calib_set),
                                  METHODS, floors=prepared.targets.floors())
    return prepared, expected


def assert_same_stats(got: dict[str, TensorStats], expected: dict[str, TensorStats]) -> None:
    assert list(got) == list(expected)
    for name, want in expected.items():
        have = got[name]
        assert (have.min, have.max, have.count) == (want.min, want.max, want.count), name
        assert (have.histogram is None) == (want.histogram is None)
        if want.histogram is not None:
            assert_same_histogram(have.histogram, want.histogram)
        assert (have.tf_enhanced is None) == (want.tf_enhanced is None)
        if want.tf_enhanced is not None:
            np.testing.assert_array_equal(have.tf_enhanced.x_left, want.tf_enhanced.x_left)
            np.testing.assert_array_equal(have.tf_enhanced.counts, want.tf_enhanced.counts)
            assert have.tf_enhanced.elements == want.tf_enhanced.elements


def overrides_bytes(prepared, stats: dict[str, TensorStats], method: str) -> bytes:
    """The overrides file the statistics give for ``method``, as written."""
    encodings = encode(prepared, stats, Settings(method=method))
    document = export.overrides_json(prepared.deploy, encodings.activations, encodings.written_params)
    return json.dumps(document, sort_keys=True).encode()


class ShownBar(tqdm):
    """A bar shown even where stderr is not a terminal (as under pytest), into a string; remembers its counts."""

    counts: ClassVar[list[int]] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})

    def update(self, n: int = 1) -> None:
        super().update(n)
        ShownBar.counts.append(self.n)


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_encodings_on_ray_are_the_in_process_ones_for_any_shard_count(cluster, demo, shards: int,
                                                                       monkeypatch) -> None:
    prepared, expected = demo
    monkeypatch.setattr(distributed, "tqdm", ShownBar)  # with the progress actor
    ShownBar.counts = []
    got = collect_on_ray(prepared.deploy, prepared.targets.activations, prepared.calib_set, METHODS,
                         prepared.targets.floors(), shards=shards, progress=True)
    assert ShownBar.counts and ShownBar.counts[-1] == len(prepared.calib_set)
    assert ShownBar.counts == sorted(ShownBar.counts)  # no task ran twice here
    assert_same_stats(got, expected)
    for method in METHODS:
        assert overrides_bytes(prepared, got, method) == overrides_bytes(prepared, expected, method), method


def test_pdf_grids_come_from_the_first_nonzero_sample_across_shards(cluster, tmp_path: Path) -> None:
    """Samples 0 and 1 are all zeros: the grid of the input's PDF comes from sample 2, which the first
    task runs alone; the shards take the rest on that grid."""
    model_path = conv_model(tmp_path / "tiny.onnx")
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(9):
        values = np.zeros((3, 8, 8)) if i < 2 else rng.normal(scale=i, size=(3, 8, 8))
        np.save(folder / f"s{i}.npy", values.astype(np.float32))
    model = load_model(model_path)
    dataset = open_dataset(folder, model_inputs(model))
    expected = collect_statistics(model, ["x", "relu_out"], iter(dataset), ["tf_enhanced"], workers=1)
    got = collect_on_ray(model, ["x", "relu_out"], dataset, ["tf_enhanced"], shards=3)
    assert_same_stats(got, expected)
    alone = collect_statistics(model, ["x"], [dataset.load(2)], ["tf_enhanced"])
    np.testing.assert_array_equal(got["x"].tf_enhanced.x_left, alone["x"].tf_enhanced.x_left)


def test_quantize_on_ray_writes_the_same_files(cluster, tmp_path: Path) -> None:
    options = dict(image_options=DEMO_IMAGES, method="tf_enhanced", analysis_samples=0, progress=False)
    local = quantize(DEMO_MODEL, CALIB_DATA / "calib", tmp_path / "local", **options)
    remote = quantize(DEMO_MODEL, CALIB_DATA / "calib", tmp_path / "ray", ray=True, **options)
    for name in (export.OVERRIDES_FILE, export.DEPLOY_FILE, export.QDQ_FILE):
        assert filecmp.cmp(local.out_dir / name, remote.out_dir / name, shallow=False), name
    lines = (remote.out_dir / export.INPUT_LIST_FILE).read_text().replace(str(remote.out_dir), str(local.out_dir))
    assert lines == (local.out_dir / export.INPUT_LIST_FILE).read_text()
    raws = sorted(p.name for p in (local.out_dir / export.RAW_DIR).iterdir())
    assert len(raws) == 16 and raws == sorted(p.name for p in (remote.out_dir / export.RAW_DIR).iterdir())
    for raw in raws:
        assert filecmp.cmp(local.out_dir / export.RAW_DIR / raw, remote.out_dir / export.RAW_DIR / raw,
                           shallow=False), raw


def test_compare_on_ray_writes_the_same_files(cluster, tmp_path: Path) -> None:
    options = dict(methods=["minmax", "tf_enhanced"], act_bitwidths=[8], image_options=DEMO_IMAGES,
                   analysis_samples=1, progress=False)
    local = compare(DEMO_MODEL, CALIB_DATA / "calib", tmp_path / "local", eval_data=CALIB_DATA / "eval", **options)
    remote = compare(DEMO_MODEL, CALIB_DATA / "calib", tmp_path / "ray", eval_data=CALIB_DATA / "eval", ray=True,
                     **options)
    # the encodings are byte-identical; the evaluation figures agree to float rounding (a task's sessions
    # run on one thread, the local evaluation's on the cores), and the timings differ
    untimed = [{key: value for key, value in result.report.items() if key not in ("timings", "configurations")}
               for result in (local, remote)]
    assert untimed[0] == untimed[1]
    for mine, theirs in zip(local.report["configurations"], remote.report["configurations"], strict=True):
        assert {k: v for k, v in mine.items() if k != "outputs"} == {k: v for k, v in theirs.items() if k != "outputs"}
        for a, b in zip(mine["outputs"], theirs["outputs"], strict=True):
            assert a.keys() == b.keys()
            assert all(a[k] == (pytest.approx(b[k], rel=1e-5) if isinstance(b[k], float) else b[k]) for k in a)
    for name in ("minmax_a8/snpe_clip_ranges.json", "tf_enhanced_a8/snpe_clip_ranges.json"):
        assert filecmp.cmp(local.out_dir / name, remote.out_dir / name, shallow=False), name


class KillOnce:
    """A sink that kills the worker process reading sample ``index``, the first time only (a marker file
    remembers it, with the killed process's id)."""

    def __init__(self, index: int, marker: Path) -> None:
        self.index, self.marker = index, marker

    def __call__(self, index: int, sample: dict) -> None:
        if index == self.index and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_worker_is_retried_and_the_result_is_exact(cluster, demo, tmp_path: Path) -> None:
    prepared, expected = demo
    marker = tmp_path / "killed"
    got = collect_on_ray(prepared.deploy, prepared.targets.activations, prepared.calib_set, METHODS,
                         prepared.targets.floors(), shards=2, sink=KillOnce(12, marker))
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker died mid-shard
    assert_same_stats(got, expected)


def test_a_bad_sample_in_a_shard_is_one_line_naming_the_file_and_nothing_is_written(
    cluster, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        np.save(folder / f"s{i}.npy", rng.normal(size=(3, 8, 8)).astype(np.float32))
    (folder / "s6.npy").write_bytes(b"not an array")
    model = conv_model(tmp_path / "tiny.onnx")
    out = tmp_path / "out"
    code = main(["quantize", str(model), "--calib", str(folder), "--out", str(out), "--quiet", "--ray"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("onnxsnpe: error: ") and str(folder / "s6.npy") in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["calib", "tiny.onnx"]


def test_without_ray_installed_the_option_says_how_to_get_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(OnnxSnpeError, match=r'pip install "onnxsnpe\[ray\]"'):
        connect()


def test_isolated_ranking_on_ray_is_the_in_process_one(cluster, demo) -> None:
    prepared, expected = demo
    encodings = encode(prepared, expected, Settings(method="minmax"))
    weights = dict(list(encodings.weights.items())[:5])
    samples = dataset_part(prepared.calib_set, 0, 2)
    want = isolated_ranking(prepared.deploy, prepared.targets, encodings.activations, list(samples), weights)
    got = isolated_ranking_on_ray(prepared.deploy, prepared.targets, encodings.activations, samples, weights,
                                  groups=3)
    assert got == want and len(got) == len(prepared.targets.activations) + 5


def test_the_reports_isolated_analysis_on_ray_is_the_in_process_one(cluster, demo, monkeypatch) -> None:
    prepared, expected = demo
    encodings = encode(prepared, expected, Settings(method="minmax"))
    local = evaluate_encodings(prepared, expected, encodings, "exact", 3, False)
    calls = []
    on_ray = evaluation.isolated_sums_on_ray
    monkeypatch.setattr(evaluation, "isolated_sums_on_ray", lambda *args, **kwargs: calls.append(1) or on_ray(
        *args, **kwargs, groups=3))
    remote = evaluate_encodings(prepared, expected, encodings, "exact", 3, False, ray=True)
    assert calls == [1]
    assert remote.isolated_samples == local.isolated_samples == 3
    figures = [[(f.name, f.isolated_signal, f.isolated_noise) for f in e.tensors] for e in (local, remote)]
    assert figures[0] == figures[1] and sum(noise > 0 for _, _, noise in figures[0]) > 10


@pytest.mark.parametrize("inputs", ["fp32", "rounded"])
def test_adaround_on_ray_gives_the_in_process_weights(cluster, inputs: str, monkeypatch) -> None:
    """fp32 inputs: the four layers in one wave of tasks; rounded inputs: the parallel branches' two
    layers side by side, the others here."""
    model = branches()
    weights = weight_encodings(model, find_targets(model), 4, per_channel=True)
    samples = _samples(8)
    local, local_results = adaround(model, weights, samples, iterations=100, inputs=inputs)
    tasks = []
    monkeypatch.setattr(adaround_on_ray, "gather",
                        lambda ray, refs: tasks.extend(refs) or distributed.gather(ray, refs))
    remote, remote_results = adaround(model, weights, samples, iterations=100, inputs=inputs, runner=ray_runner())
    assert len(tasks) == (4 if inputs == "fp32" else 2)
    assert [init.SerializeToString() for init in remote.graph.initializer] == [
        init.SerializeToString() for init in local.graph.initializer]
    assert [r.to_dict() for r in remote_results] == [r.to_dict() for r in local_results]
    assert any(r.flipped for r in local_results)


def test_quantize_with_adaround_on_ray_writes_the_same_files(cluster, tmp_path: Path) -> None:
    model = tmp_path / "branches.onnx"
    onnx.save(branches(), model)
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, sample in enumerate(_samples(8)):
        np.save(folder / f"s{i}.npy", sample["x"][0])
    options = dict(adaround=True, adaround_iters=50, adaround_inputs="fp32", analysis_samples=2, progress=False)
    local = quantize(model, folder, tmp_path / "local", **options)
    remote = quantize(model, folder, tmp_path / "ray", ray=True, **options)
    for name in (export.OVERRIDES_FILE, export.DEPLOY_FILE):
        assert filecmp.cmp(local.out_dir / name, remote.out_dir / name, shallow=False), name
    assert local.report["optimizations"] == {**remote.report["optimizations"], "adaround": {
        **remote.report["optimizations"]["adaround"], "seconds": local.report["optimizations"]["adaround"]["seconds"]}}
    assert local.report["tensors"] == remote.report["tensors"]


def test_workers_running_other_onnxsnpe_code_are_refused_in_one_line(cluster, demo, monkeypatch) -> None:
    """One line; and the other shard is not cancelled: Ray's cancellation racing with its reply aborted
    this process (distributed.gather)."""
    prepared, _ = demo
    monkeypatch.setattr(distributed, "code_fingerprint", lambda: "another version")  # in the driver only
    monkeypatch.setattr(cluster, "cancel", lambda *args, **kwargs: pytest.fail("a task was cancelled"))
    with pytest.raises(OnnxSnpeError) as caught:
        collect_on_ray(prepared.deploy, prepared.targets.activations, prepared.calib_set, ["minmax"], shards=2)
    message = str(caught.value)
    assert "\n" not in message and "runs the onnxsnpe in" in message and "whose code differs" in message


def test_progress_counts_a_task_run_again_from_its_start() -> None:
    progress = distributed._Progress()
    progress.report(1, 5)
    progress.report(2, 7)
    progress.report(1, 2)  # shard 1 again, after its worker died
    assert progress.total() == 9


def test_an_address_nobody_answers_at_is_refused_at_once() -> None:
    pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(OnnxSnpeError, match=f"nothing answers at 127.0.0.1:{port}.*ray start --head"):
        check_reachable(f"127.0.0.1:{port}")
