"""The speech claim's pieces: log-mel features, the committed corpus, CTC, the error rate, the sweep."""
from __future__ import annotations

import itertools
import json
import math
import shutil

import numpy as np
import pytest
import torch

from sigma_core.experiments import speech, speech_data
from sigma_core.experiments.config import preset
from sigma_core.models.speech import SpeechConfig, SpeechCTC, ctc_loss, greedy_decode


# ---------------------------------------------------------------------------------- features
def test_log_mel_frames_match_scipy_stft_and_the_htk_mel_scale():
    from scipy.signal import stft

    rng = np.random.default_rng(0)
    wave = rng.standard_normal(8000)
    # the framing and FFT against scipy's STFT (same Hann window, no padding, hop 320)
    _, _, z = stft(wave, window="hann", nperseg=speech_data.WIN_LENGTH,
                   noverlap=speech_data.WIN_LENGTH - speech_data.HOP_LENGTH, boundary=None, padded=False)
    window_sum = np.hanning(speech_data.WIN_LENGTH + 1)[:-1].sum()  # scipy scales by 1/sum(window)
    power = (np.abs(z) * window_sum) ** 2  # (F, frames)
    fb = speech_data.mel_filterbank()
    ref = 10 * np.log10(fb @ power + 1e-10).T  # (frames, M)
    np.testing.assert_allclose(speech_data.log_mel(wave), ref, atol=1e-6)
    # HTK mel: 700 Hz is 2595 log10(2) mel; the filters' centres are equally spaced in mel
    assert speech_data._hz_to_mel(700.0) == pytest.approx(2595 * math.log10(2), rel=1e-12)
    c = speech_data._hz_to_mel(speech_data.mel_centres_hz())
    np.testing.assert_allclose(np.diff(c), np.diff(c)[0], rtol=1e-9)
    # triangles: peak 1 at each centre, adjacent filters sum to 1 between the first and last centre
    freqs = np.fft.rfftfreq(speech_data.WIN_LENGTH, 1 / speech_data.SAMPLE_RATE)
    inside = (freqs >= speech_data.mel_centres_hz()[0]) & (freqs <= speech_data.mel_centres_hz()[-1])
    np.testing.assert_allclose(fb[:, inside].sum(0), 1.0, atol=1e-9)
    assert fb.max() <= 1.0 + 1e-12
    with pytest.raises(ValueError, match="wave"):
        speech_data.log_mel(np.zeros(100))
    with pytest.raises(ValueError, match="wave"):
        speech_data.log_mel(np.zeros((2, 1000)))
    with pytest.raises(ValueError, match="f_min"):
        speech_data.mel_filterbank(f_min=9000.0, f_max=10000.0)


def test_tones_light_the_nearest_mel_bin_and_quantisation_round_trips():
    sr = speech_data.SAMPLE_RATE
    t = np.arange(sr // 2) / sr
    centres = speech_data.mel_centres_hz()
    for k in (3, 12, 25):
        feats = speech_data.log_mel(np.sin(2 * np.pi * centres[k] * t))
        assert int(feats.mean(0).argmax()) == k
    db = np.linspace(speech_data.DB_MIN - 5, speech_data.DB_MAX + 5, 1001)
    back = speech_data.dequantise(speech_data.quantise(db))
    step = (speech_data.DB_MAX - speech_data.DB_MIN) / 255
    np.testing.assert_array_less(np.abs(back - np.clip(db, speech_data.DB_MIN, speech_data.DB_MAX)), step / 2 + 1e-4)


# ---------------------------------------------------------------------------------- the corpus
def test_committed_corpus_matches_its_manifest_and_refuses_corruption(tmp_path):
    data = speech_data.load()
    m = data["manifest"]
    assert m["espeak_ng"].startswith("eSpeak NG text-to-speech: 1.51")
    assert m["n_split"] == speech_data.N_SPLIT and m["n_mels"] == speech_data.N_MELS
    for split in speech_data.SPLITS:
        feats, labels = data[split]
        assert len(feats) == len(labels) == m["n_split"][split]
        assert all(f.shape[1] == speech_data.N_MELS and f.dtype == np.float32 for f in feats)
        assert all(speech_data.MIN_DIGITS <= len(lab) <= speech_data.MAX_DIGITS for lab in labels)
        assert all(lab.min() >= 0 and lab.max() <= 9 for lab in labels)
    # every digit occurs in every split, and utterances are longer when they hold more digits
    for split in speech_data.SPLITS:
        assert set(np.concatenate(data[split][1]).tolist()) == set(range(10))
    n_frames = np.array([len(f) for f in data["train"][0]])
    n_digits = np.array([len(x) for x in data["train"][1]])
    assert n_frames[n_digits == 5].mean() > n_frames[n_digits == 3].mean() + 10
    # a changed byte is refused by the SHA-256 check, naming the path
    with np.load(speech_data.PATH) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["features"] = arrays["features"].copy()
    arrays["features"][123] ^= 1
    bad = tmp_path / "bad.npz"
    np.savez_compressed(bad, **arrays)
    with pytest.raises(ValueError, match="SHA-256"):
        speech_data.load(bad)
    with pytest.raises(FileNotFoundError, match="speech_data build"):
        speech_data.load(tmp_path / "missing.npz")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_build_regenerates_the_committed_utterances(tmp_path):
    """The first utterances of a rebuild with the same seed are the committed ones, byte for byte."""
    committed = speech_data.load()
    if not speech_data.espeak_version().startswith(committed["manifest"]["espeak_ng"].split(" (")[0]):
        pytest.skip("another espeak-ng version: the waveforms differ")
    speech_data.build(tmp_path / "few.npz", n_split={"train": 4, "val": 0, "test": 0})
    few = speech_data.load(tmp_path / "few.npz")
    for (f, lab), (g, lab2) in zip(zip(*few["train"]), zip(*committed["train"])):
        np.testing.assert_array_equal(lab, lab2)
        np.testing.assert_array_equal(f, g)


# ---------------------------------------------------------------------------------- CTC and errors
def _brute_force_ctc(log_probs: np.ndarray, label: list[int]) -> float:
    """-log of the summed probability of every path (class per token) whose collapse is ``label``."""
    T, C = log_probs.shape
    total = 0.0
    for path in itertools.product(range(C), repeat=T):
        if greedy_decode(torch.tensor([path]))[0] == label:
            total += math.exp(sum(log_probs[t, c] for t, c in enumerate(path)))
    return -math.log(total)


def test_ctc_loss_equals_the_sum_over_alignments():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 4, dtype=torch.float64)  # (B, T, 3 symbols + blank)
    labels = torch.tensor([[0, 2, -1], [1, 1, -1], [2, 0, 1]])
    lp = logits.log_softmax(-1).numpy()
    refs = [[0, 2], [1, 1], [2, 0, 1]]
    expected = np.mean([_brute_force_ctc(lp[b], refs[b]) / len(refs[b]) for b in range(3)])
    assert float(ctc_loss(logits, labels)) == pytest.approx(expected, rel=1e-5)


def test_edit_distance_matches_rapidfuzz_and_error_rate_checks_input():
    rapidfuzz = pytest.importorskip("rapidfuzz")
    rng = np.random.default_rng(1)
    for _ in range(300):
        a = rng.integers(0, 4, rng.integers(0, 7)).tolist()
        b = rng.integers(0, 4, rng.integers(0, 7)).tolist()
        assert speech.edit_distance(a, b) == rapidfuzz.distance.Levenshtein.distance(a, b)
    assert speech.error_rate([[1, 2], []], [[1, 2], [3, 4]]) == 0.5
    with pytest.raises(ValueError, match="hyps and refs"):
        speech.error_rate([[1]], [[1], [2]])
    with pytest.raises(ValueError, match="refs"):
        speech.error_rate([[1]], [[]])


def test_model_sees_the_whole_utterance_and_refuses_bad_shapes():
    torch.manual_seed(0)
    model = SpeechCTC(SpeechConfig(n_mels=8, d_model=16, n_layer=2, n_head=2, block_size=6, norm="post"))
    x = torch.randn(2, 24, 8)
    x2 = x.clone()
    x2[:, -4:] += 1.0  # change the last token's frames only
    # bidirectional: the first token's output depends on the last frames
    assert not torch.allclose(model(x)[0][:, 0], model(x2)[0][:, 0])
    with pytest.raises(ValueError, match="features"):
        model(torch.randn(2, 24, 7))
    with pytest.raises(ValueError, match="features"):
        model(torch.randn(2, 28, 8))  # 7 tokens > block_size 6
    with pytest.raises(ValueError, match="features"):
        model(torch.randn(2, 22, 8))  # not a multiple of 4 frames
    with pytest.raises(ValueError, match="n_mels"):
        SpeechConfig(n_mels=0)


# ---------------------------------------------------------------------------------- training
def test_trainer_val_accuracy_is_one_minus_the_validation_error_rate(tmp_path):
    from sigma_core.experiments.train import Trainer

    cfg = preset("speech-smoke", steps=6, reparam="sigma")
    trainer = Trainer(cfg, tmp_path / "run")
    summary = trainer.run()
    assert summary["model"] == "speech" and not summary["diverged"]
    ev = speech.evaluate(trainer.model, trainer.task, "val")
    assert summary["final_val_accuracy"] == pytest.approx(1 - ev["error_rate"], abs=1e-12)
    assert summary["final_val_loss"] == pytest.approx(ev["loss"], rel=1e-5)
    written = speech.evaluate_run(tmp_path / "run")  # from the checkpoint, on val and test
    assert written["val"]["error_rate"] == pytest.approx(ev["error_rate"])
    assert written["test"]["error_rate"] == pytest.approx(speech.evaluate(trainer.model, trainer.task, "test")["error_rate"])
    assert json.loads((tmp_path / "run" / "eval.json").read_text()) == written
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["sha256"] == speech_data.load()["manifest"]["sha256"]
    with pytest.raises(ValueError, match="block_size"):
        speech.SpokenDigitsTask(preset("speech-smoke", block_size=20))
    with pytest.raises(ValueError, match="split"):
        trainer.task.batches("dev")


def test_summary_chooses_the_learning_rate_on_validation_and_reports_test():
    rows = [{"method": "sigma", "lr": lr, "seed": s, "val_error": v + 0.01 * s, "test_error": t + 0.01 * s,
             "diverged": False} for lr, v, t in ((0.1, 0.20, 0.40), (0.3, 0.30, 0.10)) for s in range(3)]
    out = speech.summarise(rows)["sigma"]
    assert out["chosen_lr"] == 0.1  # best on validation, although 0.3 is better on test
    assert out["test_mean"] == pytest.approx(0.41) and out["test_sd"] == pytest.approx(0.01)
    assert out["n"] == 3


def _row(method, lr, seed, val_error, test_error, *, entropy=1.0, diverged=False):
    records = [{"step": s, "train_loss": 3.0 - 0.1 * s, "entropy_min_head": entropy, "val_loss": 2.0}
               for s in range(1, 6)]
    return {"method": method, "lr": lr, "seed": seed, "val_error": val_error, "test_error": test_error,
            "records": records, "block_size": 34, "diverged": diverged,
            "summary": {"diverged": diverged, "diverged_step": 5 if diverged else None}}


def test_claim5_verdict_follows_the_rules():
    base = [_row("baseline", 0.01, s, 0.30, 0.30 + 0.01 * s) for s in range(3)] + \
           [_row("baseline", 0.1, s, 1.0, 1.0, entropy=0.01, diverged=True) for s in range(3)]
    good = [_row("sigma", 0.1, s, 0.29, 0.30 + 0.01 * s) for s in range(3)]
    worse = [_row("sigma", 0.1, s, 0.50, 0.50 + 0.01 * s) for s in range(3)]
    blank = [_row("sigma", lr, s, 1.0, 1.0) for lr in (0.01, 0.1) for s in range(3)]  # never leaves the blank
    collapsed = [_row("sigma", 0.1, s, 0.29, 0.30, entropy=0.05) for s in range(3)]
    assert speech.claim_verdict(base + good)["verdict"] == "reproduced"
    assert speech.claim_verdict(base + worse)["verdict"] == "partly reproduced"
    assert speech.claim_verdict(base + blank)["verdict"] == "not reproduced at this scale"
    assert speech.claim_verdict(base + collapsed)["verdict"] == "not reproduced at this scale"
    assert speech.claim_verdict([])["verdict"] == "not attempted"
    # one collapsed seed of three: stable only when a majority of seeds must be stable
    mixed = good[:2] + collapsed[2:]
    sens = speech.claim_sensitivity(base + mixed)
    assert sens["default"] == "partly reproduced" or sens["default"] == "not reproduced at this scale"
    assert sens["stable_seeds=majority"] == "reproduced"
