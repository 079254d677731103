"""The post-LN encoder-decoder on sequence reversal: teacher forcing, cross-attention seen by
the monitor with its own key tokens, the task, and smoke-size runs through the training loop."""
import json

import numpy as np
import pytest
import torch

from sigma_core.experiments.config import preset
from sigma_core.experiments.tasks import SequenceTask, make_task
from sigma_core.experiments.train import METRICS_NAME, Trainer, build_model, row_samples
from sigma_core.models.seq2seq import CrossAttention, Seq2Seq, Seq2SeqConfig
from sigma_core.monitor import EntropyMonitor
from theory import entropy_lower_bound


def test_decoder_is_causal_and_reads_the_source():
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(vocab_size=8, d_model=16, n_layer=2, n_head=2, block_size=6)).eval()
    src = torch.randint(0, 8, (2, 6))
    tgt = src.flip(1)
    logits, _ = model(src, tgt)
    tgt2 = tgt.clone()
    tgt2[:, 3] = (tgt2[:, 3] + 1) % 8
    out2 = model(src, tgt2)[0]
    assert torch.allclose(out2[:, :4], logits[:, :4], atol=1e-6)  # positions <= 3 see only earlier targets
    assert not torch.allclose(out2[:, 4:], logits[:, 4:])
    src2 = src.clone()
    src2[:, -1] = (src2[:, -1] + 1) % 8
    assert not torch.allclose(model(src2, tgt)[0][:, 0], logits[:, 0])  # the first output reads the source
    with pytest.raises(ValueError, match="src and tgt"):
        model(src, tgt[:, :3])


def test_sequence_task_is_reversal_with_a_fixed_held_out_set():
    a, b = SequenceTask("reverse", vocab_size=5, block_size=7), SequenceTask("reverse", vocab_size=5, block_size=7)
    assert a.sha256 == b.sha256 and all(torch.equal(x, y) for (x, _), (y, _) in zip(a.held_out, b.held_out))
    x, y = a.train_batch(16, torch.Generator().manual_seed(1))
    assert torch.equal(y, x.flip(1)) and int(x.max()) < 5
    c = SequenceTask("copy", vocab_size=5, block_size=7)
    x, y = c.train_batch(4, torch.Generator().manual_seed(1))
    assert torch.equal(x, y) and c.sha256 != a.sha256
    with pytest.raises(ValueError, match="kind"):
        SequenceTask("sort")
    with pytest.raises(ValueError, match="corpus"):
        make_task(preset("seq2seq-smoke"), corpus=object())


def test_monitor_bounds_cross_attention_with_the_key_side_tokens():
    torch.manual_seed(0)
    model = build_model(preset("seq2seq-smoke", n_layer=3))
    src = torch.randint(0, 8, (2, 6))
    with EntropyMonitor(model) as mon:
        model(src, src.flip(1))
    cross = [r for r in mon.last if ".cross" in r["name"]]
    assert len(cross) == 3 * 2 and all(r["sigma"] is not None and r["sigma"] > 0 for r in cross)
    assert all(r["violations_theorem"] == 0 and r["violations_exact"] == 0 for r in mon.last)
    samples = row_samples(model, src, src.flip(1))
    assert samples["violations"] == 0
    assert np.all(samples["entropy"] >= entropy_lower_bound(samples["theorem"], samples["n_keys"]) - 1e-9)
    n_attn = len(model.attention_modules())
    assert n_attn == 3 * 3 and sum(isinstance(a, CrossAttention) for a in model.attention_modules()) == 3


def test_cross_attention_bound_uses_key_tokens_not_query_tokens():
    """The theorem variant of a cross-attention row is sigma_h ||X_q||_2 ||X_k||_2 with the encoder
    tokens as X_k: tiny decoder tokens and large encoder tokens tell the two apart."""
    from sigma_core.entropy import head_sigma

    torch.manual_seed(0)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = CrossAttention(8, 2)

        def attention_modules(self):
            return [self.attn]

        def forward(self, x, mem):
            return self.attn(x, mem)

    model = Wrap()
    x, mem = 1e-2 * torch.randn(1, 4, 8), 10 * torch.randn(1, 5, 8)
    samples = row_samples(model, x, mem)
    sigma = head_sigma(*model.attn.head_weights(), scale=model.attn.scale).double()
    expected = sigma * torch.linalg.matrix_norm(x[0].double(), 2) * torch.linalg.matrix_norm(mem[0].double(), 2)
    got = samples["theorem"].reshape(2, 4)[:, 0]  # (head, query row): one value per head
    assert np.allclose(got, expected.numpy(), rtol=1e-6)
    assert samples["violations"] == 0 and set(samples["n_keys"].tolist()) == {5}
    with EntropyMonitor(model) as mon:
        model(x, mem)
    assert all(r["violations_theorem"] == 0 for r in mon.last)


@pytest.mark.parametrize("reparam", ["none", "sigma"])
def test_seq2seq_smoke_run_and_exact_resume(tmp_path, reparam):
    cfg = preset("seq2seq-smoke", reparam=reparam, threads=1, checkpoint_every=6)
    full = Trainer(cfg, tmp_path / "full").run()
    assert full["model"] == "seq2seq" and full["optimizer"] == "sgd" and full["norm"] == "post"
    assert full["bound_violations"] == 0 and 0.0 <= full["final_val_accuracy"] <= 1.0
    # six steps, a checkpoint, then resume and finish: the weights equal an uninterrupted run's
    (tmp_path / "part").mkdir()
    part = Trainer(cfg, tmp_path / "part")
    while part.step < 6:
        part.train_step()
    part.save_checkpoint()
    resumed = Trainer.resume(tmp_path / "part")
    assert resumed.step == 6
    while resumed.step < 12:
        resumed.train_step()
    ref = Trainer(cfg, None)
    while ref.step < 12:
        ref.train_step()
    for a, b in zip(ref.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    recs = [json.loads(line) for line in (tmp_path / "full" / METRICS_NAME).read_text().splitlines()]
    assert recs[-1]["step"] == 12 and "val_accuracy" in recs[-1]
