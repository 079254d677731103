"""The TensorBoard sink (sigma_core.integrations.tensorboard) and ``entropy-collapse train --tensorboard``.

Read back with tensorboard's own ``EventAccumulator``: every scalar of every recorded forward is
``record_scalars`` of the monitor's records (to float32, TensorBoard's precision), at the step it
belongs to; the layer x head heatmap is there on the first record and every ``heatmap_every``-th
after it, decoded as the image ``heatmap_image`` draws.  The training command writes the same
per-head scalars as its metrics.jsonl, with the losses, at the logged steps.
"""
import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("tensorboard")
transformers = pytest.importorskip("transformers")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from sigma_core.integrations.tensorboard import HEATMAP_TAG, TensorBoardSink, heatmap_image  # noqa: E402
from sigma_core.monitor import EntropyMonitor  # noqa: E402
from sigma_core.sinks import MemorySink, record_scalars  # noqa: E402


def _events(log_dir):
    return EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0}).Reload()


def _png(event):
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def test_the_event_file_holds_the_monitors_records_and_heatmaps(tmp_path):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=3, n_head=4, n_embd=32, n_positions=32, vocab_size=64, bos_token_id=0, eos_token_id=0))
    mem = MemorySink()
    with EntropyMonitor(model, every=2, bound_every=2, sinks=[mem, TensorBoardSink(tmp_path, heatmap_every=2)]):
        for _ in range(7):  # records at forwards 0, 2, 4, 6; the bound checked at 0 and 4
            model(input_ids=torch.randint(0, 64, (2, 32)))
    ev = _events(tmp_path)
    steps = [recs[0]["step"] for recs in mem.history]
    assert steps == [0, 2, 4, 6]
    expected = {}  # tag -> [(step, value)]
    for recs in mem.history:
        for tag, value in record_scalars(recs).items():
            expected.setdefault(tag, []).append((recs[0]["step"], value))
    assert set(ev.Tags()["scalars"]) == set(expected)
    assert len(expected) > 3 * 4 * 2  # per-head entropy and sigma, per-layer minima and margins, violations
    for tag, want in expected.items():
        got = [(e.step, e.value) for e in ev.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        np.testing.assert_array_equal(np.float32([v for _, v in got]), np.float32([v for _, v in want]), err_msg=tag)
    assert [e.step for e in ev.Scalars("sigma/layer2/head3")] == [0, 4]
    images = ev.Images(HEATMAP_TAG)
    assert [e.step for e in images] == [0, 4]  # the first record and every 2nd after it
    for e, recs in zip(images, [mem.history[0], mem.history[2]]):
        drawn = heatmap_image(recs)
        assert (e.height, e.width) == drawn.shape[:2]
        assert np.abs(_png(e).astype(int) - drawn).max() <= 1  # the PNG is the image drawn from the records


def test_a_writer_of_the_callers_stays_open_and_bad_arguments_are_refused(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(tmp_path))
    layer = torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True, dropout=0.0)
    with EntropyMonitor(layer, sinks=[TensorBoardSink(writer, heatmap_every=None, step=lambda: 41, prefix="enc/")]):
        layer(torch.randn(1, 4, 8))
    writer.add_scalar("after", 1.0, 0)  # still usable: the sink only flushed it
    writer.close()
    ev = _events(tmp_path)
    assert [e.step for e in ev.Scalars("enc/entropy/layer0/head1")] == [41]
    assert not ev.Tags()["images"] and "after" in ev.Tags()["scalars"]
    with pytest.raises(TypeError, match="log_dir"):
        TensorBoardSink(3)
    with pytest.raises(ValueError, match="heatmap_every"):
        TensorBoardSink(tmp_path, heatmap_every=0)
    with pytest.raises(TypeError, match="step"):
        TensorBoardSink(tmp_path, step=5)


def test_train_tensorboard_writes_what_metrics_jsonl_logs(tmp_path):
    from sigma_core.cli import main
    run, board = tmp_path / "run", tmp_path / "tb"
    assert main(["train", "--out", str(run), "--preset", "cpu-smoke", "--steps", "4", "--log-every", "2",
                 "--threads", "1", "--checkpoint-every", "0", "--no-progress", "--tensorboard", str(board)]) == 0
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged]
    assert steps == [1, 2, 4]
    ev = _events(board)
    assert [e.step for e in ev.Scalars("train_loss")] == steps
    np.testing.assert_allclose([e.value for e in ev.Scalars("train_loss")], [r["train_loss"] for r in logged],
                               rtol=1e-6)
    n_layer, n_head = len(logged[0]["sigma"]), len(logged[0]["sigma"][0])
    for layer in range(n_layer):
        for head in range(n_head):
            got = ev.Scalars(f"sigma/layer{layer}/head{head}")
            assert [e.step for e in got] == steps
            np.testing.assert_allclose([e.value for e in got], [r["sigma"][layer][head] for r in logged], rtol=1e-6)
    low = ev.Scalars("entropy_min_head/all")
    assert [e.step for e in low] == steps
    assert [e.step for e in ev.Images(HEATMAP_TAG)] == [1]  # the first logged step (then every 10th)
    assert sum(e.value for e in ev.Scalars("violations_exact")) == 0 == sum(r["bound_violations"] for r in logged)
