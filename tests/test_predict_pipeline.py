"""Prediction as a pipeline: windows of consecutive cases share forward batches without changing any
case's result, reading and export overlap with the network, one bad case fails alone, and the
device path (logits accumulated on the device, mixed precision) is chosen by `--device`."""

from __future__ import annotations

import os
import threading

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.cli import main as cli_main
from pipeline.inference.case_pipeline import StageSeconds, predict_cases
from pipeline.inference.predict import group_input_files, predict_folder
from pipeline.inference.predictor import ModelSpec, Predictor, resolve_device
from pipeline.inference.ray_backend import chunk_cases
from pipeline.inference.sliding_window import (
    auto_batch_size,
    auto_lanes,
    sliding_window_predict,
    sliding_window_stream,
)
from pipeline.precision import PRECISIONS, amp_for, auto_mixed_precision, native_bf16, precision_name

CONFIG = "3d_lean"


def _conv_net(seed: int = 0, classes: int = 3):
    """Two random 3d convolutions: near-tied classes, so the last bits of any sum show in the argmax."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(8, classes, 3, padding=1))


def _images(n, shape=(20, 24, 18), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(1, *shape)).astype(np.float32) for _ in range(n)]


def test_a_case_comes_out_the_same_alone_and_batched_with_other_cases():
    # every forward pass gets a full batch (zeros fill the last), so a window's logits never
    # depend on its neighbours: alone, in a folder and on a Ray actor a case is bit for bit equal
    net, patch = _conv_net(), (16, 16, 16)
    images = _images(3) + _images(1, shape=(12, 30, 16), seed=1)  # the last is smaller than the patch: padded
    for tta in (False, True):
        alone = [sliding_window_predict(net, im, patch, 3, tta_mirror=tta, batch_size=8) for im in images]
        streamed = list(sliding_window_stream(net, [(i, im) for i, im in enumerate(images)], patch, 3,
                                              tta_mirror=tta, batch_size=8))
        assert [k for k, _ in streamed] == [0, 1, 2, 3]  # in order
        for (_, got), want in zip(streamed, alone):
            np.testing.assert_array_equal(got, want)


def test_stream_pulls_an_image_only_when_the_batch_needs_it_and_yields_each_when_done():
    net, patch = _conv_net(), (16, 16, 16)
    pulled, order = [], []

    def images():
        for i, im in enumerate(_images(3, shape=(16, 16, 16))):  # one window each
            pulled.append(i)
            yield i, im

    for lanes, expected in ((1, [(0, [0]), (1, [0, 1]), (2, [0, 1, 2])]),
                            # two passes in flight: the next case's batch is read while one runs
                            (2, [(0, [0, 1]), (1, [0, 1, 2]), (2, [0, 1, 2])])):
        pulled.clear()
        order = [(key, list(pulled)) for key, _ in
                 sliding_window_stream(net, images(), patch, 3, tta_mirror=True, batch_size=8, lanes=lanes)]
        # a window's 8 mirrorings fill a batch: each case is done after at most `lanes` cases are read
        assert order == expected


class _Rendezvous(torch.nn.Module):
    """A network whose forward passes wait for each other in pairs: two lanes must really run at once."""

    def __init__(self, net):
        super().__init__()
        self.net, self.barrier, self.seen = net, threading.Barrier(2, timeout=20), []

    def forward(self, x):
        self.seen.append((threading.get_ident(), torch.get_num_threads()))
        self.barrier.wait()  # a single lane would wait here alone until the timeout
        return self.net(x)


def test_two_lanes_run_forward_passes_at_once_each_with_its_share_of_the_threads_and_change_no_bit():
    net, patch = _conv_net(), (16, 16, 16)
    images = _images(3, shape=(28, 20, 24)) + _images(1, shape=(12, 30, 16), seed=1)  # overlapping windows
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for tta in (False, True):
            one = list(sliding_window_stream(net, enumerate(images), patch, 3, tta_mirror=tta, batch_size=2, lanes=1))
            racing = _Rendezvous(net)
            two = list(sliding_window_stream(racing, enumerate(images), patch, 3, tta_mirror=tta, batch_size=2,
                                             lanes=2))
            assert [k for k, _ in two] == [0, 1, 2, 3]
            for (_, a), (_, b) in zip(one, two):  # accumulated in submission order: the same sums, bit for bit
                np.testing.assert_array_equal(a, b)
            assert len({ident for ident, _ in racing.seen}) == 2 and {n for _, n in racing.seen} == {1}
        assert torch.get_num_threads() == 2  # the caller's thread count is left alone
    finally:
        torch.set_num_threads(threads)


def test_two_lanes_only_for_windows_small_enough_that_a_second_batch_stays_within_the_memory_budget():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert auto_lanes("cpu", (40, 56, 40), auto_batch_size((40, 56, 40), "cpu")) == 2  # hippocampus: 2 x 2 windows
        assert auto_lanes("cpu", (32, 112, 128), auto_batch_size((32, 112, 128), "cpu")) == 1  # CT: one big window
        assert auto_lanes("cuda", (40, 56, 40), 2) == 1
        torch.set_num_threads(1)
        assert auto_lanes("cpu", (40, 56, 40), 2) == 1  # one core: nothing to run beside
    finally:
        torch.set_num_threads(threads)


def test_a_failing_forward_pass_in_a_lane_reaches_the_caller_and_no_lane_keeps_running():
    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.calls = torch.nn.Conv3d(1, 3, 1), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("out of memory in the second pass")
            return self.conv(x)

    before = {t.name for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="second pass"):
        list(sliding_window_stream(Failing(), enumerate(_images(4)), (16, 16, 16), 3, tta_mirror=False,
                                   batch_size=1, lanes=2))
    assert not [t for t in threading.enumerate() if t.name.startswith("segpipe-forward") and t.name not in before]


def test_device_accumulation_equals_memory_accumulation_on_cpu(tmp_path):
    net, patch = _conv_net(), (16, 16, 16)
    image = _images(1, shape=(30, 26, 20))[0]
    memory = sliding_window_predict(net, image, patch, 3, tta_mirror=True, accumulate="memory", device="cpu")
    device = sliding_window_predict(net, image, patch, 3, tta_mirror=True, accumulate="device", device="cpu")
    np.testing.assert_allclose(device, memory, rtol=1e-5, atol=1e-6)
    assert isinstance(device, np.ndarray) and device.shape == (3, 30, 26, 20)
    with pytest.raises(ValueError, match="accumulate must be"):
        sliding_window_predict(net, image, patch, 3, accumulate="gpu")


def test_mixed_precision_path_runs_on_cpu_and_agrees():
    # autocast is what a GPU runs; on a CPU it is bfloat16: close to float32, not equal
    net, patch = _conv_net(), (16, 16, 16)
    image = _images(1, shape=(24, 24, 24))[0]
    fp32 = sliding_window_predict(net, image, patch, 3, tta_mirror=False, amp=False)
    mixed = sliding_window_predict(net, image, patch, 3, tta_mirror=False, amp=True)
    assert np.abs(mixed - fp32).max() < 0.05 and np.mean(mixed.argmax(0) == fp32.argmax(0)) > 0.95


def test_mixed_precision_is_the_default_where_the_hardware_computes_it(monkeypatch):
    # CUDA always (nnU-Net's own default there); a CPU only with bfloat16 instructions, since
    # elsewhere PyTorch emulates bfloat16, slower than float32
    assert auto_mixed_precision("cuda")
    for avx512_bf16, amx, want in ((True, False, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert native_bf16() is want and auto_mixed_precision("cpu") is want
        assert precision_name(None, "cpu") == ("mixed (bfloat16)" if want else "float32")
    assert precision_name(False, "cuda") == "float32" and precision_name(None, "cuda") == "mixed (float16)"
    assert [amp_for(p) for p in PRECISIONS] == [None, True, False]
    with pytest.raises(ValueError, match="precision must be one of"):
        amp_for("fp16")
    from pipeline.cli import build_parser

    for command in ("predict", "train", "evaluate-cv", "run", "demo"):
        parser = build_parser()._subparsers._group_actions[0].choices[command]
        assert next(a for a in parser._actions if a.dest == "precision").choices == list(PRECISIONS), command


def test_run_trains_and_predicts_in_the_precision_it_is_given(monkeypatch, tmp_path, capsys):
    import pipeline.run

    given = []
    monkeypatch.setattr(pipeline.run, "run_all", lambda dataset, workdir, options: given.append(options) or {"report": "r"})
    for flags, want in ((["--precision", "fp32"], "fp32"), ([], "auto")):
        assert cli_main(["run", "data", "--workdir", str(tmp_path / "W"), *flags]) == 0
        assert given[-1].precision == given[-1].train["precision"] == want  # held-out prediction and training alike


def test_mixed_precision_on_a_cpu_keeps_norms_and_heads_in_float32_and_the_labels_of_float32():
    # the convolutions run bfloat16; every instance norm sees float32 (its sums over a window's
    # voxels would lose 3 digits in bfloat16) and the heads compute their logits in float32
    from pipeline.training.model import ConvBlock, PlainConvUNet

    torch.manual_seed(0)  # nnU-Net's 3d_fullres network for Task04_Hippocampus
    net = PlainConvUNet(3, 1, 3, [32, 64, 128, 256], [[3, 3, 3]] * 4, [[1, 1, 1]] + [[2, 2, 2]] * 3,
                        deep_supervision=False).eval()
    convs, blocks = [], []  # output dtypes under autocast
    for m in net.modules():
        if isinstance(m, ConvBlock):
            m.register_forward_hook(lambda mod, args, out: blocks.append(out.dtype))
        elif isinstance(m, torch.nn.Conv3d):
            m.register_forward_hook(lambda mod, args, out: convs.append(out.dtype))
    x = torch.randn(2, 1, 40, 56, 40)
    with torch.inference_mode():
        fp32 = net(x)
        convs.clear(), blocks.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = net(x)
    assert len(convs) == len(blocks) == 11  # the decoder's first blocks run inline (model.py)
    assert set(convs) == {torch.bfloat16} and set(blocks) == {torch.float32}  # conv -> norm, activation in float32
    assert mixed.dtype == torch.float32 and mixed.shape == fp32.shape == (2, 3, 40, 56, 40)
    # untrained weights: classes near ties, the hardest case for agreement
    assert (mixed.argmax(1) == fp32.argmax(1)).float().mean() > 0.98
    assert (mixed - fp32).abs().max() < 0.1 * fp32.abs().max()


def test_batch_size_follows_the_patch_and_device():
    assert auto_batch_size((40, 56, 40), "cpu") == 2  # hippocampus: small batches on a CPU (memory)
    assert auto_batch_size((40, 56, 40), "cuda") == 8  # a GPU's batches fill it: a window's 8 mirrorings
    assert auto_batch_size((32, 112, 128), "cpu") == 1
    assert auto_batch_size((32, 112, 128), "cpu", mirrored=True) == 2  # a window with its mirrored copy
    assert auto_batch_size((128, 128, 128), "cuda", mirrored=True) == 1  # a GPU keeps its budget
    assert auto_batch_size((128, 128, 128), "cuda") == 1


def test_device_flag():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        from pipeline.errors import BadInputError

        with pytest.raises(BadInputError, match="sees no CUDA device"):
            resolve_device("cuda")


def test_chunks_stream_about_three_per_worker():
    cases = list(range(60))
    chunks = chunk_cases(cases, 2)
    assert [c for chunk in chunks for c in chunk] == cases and max(map(len, chunks)) == 8
    assert len(chunk_cases(cases[:5], 2)) == 5  # few cases: one each, so both workers start at once


@pytest.fixture(scope="module")
def hippo_model(tmp_path_factory, hippocampus):
    from test_inference import make_model

    return make_model(tmp_path_factory.mktemp("hippo_model"), hippocampus, num_cases=2)


def _link(folder, paths):
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        os.symlink(p, folder / p.name)
    return folder


def test_folder_pipeline_equals_case_by_case_and_a_bad_case_fails_alone(hippo_model, hippocampus, tmp_path):
    wd, _ = hippo_model
    images = sorted((hippocampus / "imagesTr").iterdir())[:3]
    inputs = _link(tmp_path / "in", images)
    # a truncated file in the middle of the folder: bad input for that case only
    (inputs / "broken.nii.gz").write_bytes(images[0].read_bytes()[:2000])
    predictor = Predictor.load(wd, CONFIG, "0", tta=False, device="cpu")
    cases = group_input_files(inputs, 1)
    done, stages = [], StageSeconds()
    results = predict_cases(predictor, cases, tmp_path / "out", on_result=lambda r: done.append(r.case_id),
                            stages=stages)
    assert [r.case_id for r in results] == [c.case_id for c in cases] and sorted(done) == sorted(c.case_id for c in cases)
    failed = [r for r in results if not r.ok]
    assert [r.case_id for r in failed] == ["broken"] and failed[0].message
    assert stages.cases == 4 and stages.network > 0 and stages.read_preprocess > 0 and stages.export_write > 0
    for p in images:  # each case alone, through predict_case's one-case path: the same labels
        from pipeline.inference.predictor import predict_case

        label, _ = predict_case(predictor, cases[[c.case_id for c in cases].index(p.name[:-7])])
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "out" / p.name).dataobj), label)
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == sorted(p.name for p in images)  # nothing half-written


def test_predict_command_takes_device_and_reports_stages(hippo_model, hippocampus, tmp_path, capsys):
    import json

    wd, _ = hippo_model
    inputs = _link(tmp_path / "in", sorted((hippocampus / "imagesTr").iterdir())[:2])
    args = ["predict", "--workdir", str(wd.root), str(inputs), str(tmp_path / "out"), "--config", CONFIG, "--no-tta"]
    assert cli_main([*args, "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "cpu" and len(report["predicted"]) == 2
    assert report["stage_seconds"]["cases"] == 2 and report["stage_seconds"]["network"] > 0
    if not torch.cuda.is_available():
        assert cli_main([*args, "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert predict_folder(wd, inputs, tmp_path / "out", config=CONFIG, tta=False, progress=False,
                          device="cpu").skipped == sorted(p.name[:-7] for p in inputs.iterdir())
    assert ModelSpec(()).device is None  # auto, resolved where the model loads
    assert report["precision"] == precision_name(None, "cpu")  # auto: what this CPU computes itself


def test_precision_flag_chooses_what_the_convolutions_compute_in(hippo_model, hippocampus, tmp_path, capsys):
    import json

    from pipeline.inference.predictor import predict_case

    wd, _ = hippo_model
    inputs = _link(tmp_path / "in", sorted((hippocampus / "imagesTr").iterdir())[:1])
    case = group_input_files(inputs, 1)[0]
    for precision, amp in (("fp32", False), ("mixed", True)):
        out = tmp_path / precision
        assert cli_main(["predict", "--workdir", str(wd.root), str(inputs), str(out), "--config", CONFIG, "--no-tta",
                         "--device", "cpu", "--precision", precision, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["precision"] == ("float32" if precision == "fp32" else "mixed (bfloat16)")
        want, _ = predict_case(Predictor.load(wd, CONFIG, "0", tta=False, device="cpu", amp=amp), case)
        np.testing.assert_array_equal(np.asarray(nib.load(out / f"{case.case_id}.nii.gz").dataobj), want)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["predict", "--workdir", str(wd.root), str(inputs), str(tmp_path / "x"), "--precision", "fp16"])
    assert exit_.value.code == 2
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
