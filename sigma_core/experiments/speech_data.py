"""Spoken digit strings: a speech-recognition corpus made here, from espeak-ng and numpy/scipy.

No speech corpus ships in a Python package and nothing may be downloaded, so the corpus of the
speech claim is synthesised: strings of 3 to 5 digits ("3 1 4 1"), spoken by espeak-ng (Debian's
``espeak-ng`` package) in several English voices and variants, at several speeds and pitches,
with a little white noise, leading and trailing silence trimmed, resampled to 16 kHz and turned into log-mel features by
:func:`log_mel` (numpy/scipy only).  The features are quantised to ``uint8`` and committed as
``corpus/spoken_digits.npz`` (a few MB); :func:`build` regenerates it::

    apt-get install -y espeak-ng        # 1.51 in Debian 12
    python -m sigma_core.experiments.speech_data build   # writes sigma_core/experiments/corpus/spoken_digits.npz

Every utterance draws its voice, speed, pitch and digits from one seeded generator
(:data:`BUILD_SEED`), so the same espeak-ng version rebuilds the same file.  The split into
train / validation / test is by utterance, fixed at build time (the ``split`` array).

Features (:func:`log_mel`): a Hann-windowed STFT of 32 ms frames every 20 ms (512-sample FFT at
16 kHz), power spectrum, :data:`N_MELS` triangular mel filters (HTK mel scale, 60 Hz to 7.6 kHz),
``10 log10(power + 1e-10)``; stored as ``uint8`` over the fixed range [:data:`DB_MIN`, :data:`DB_MAX`] dB.

Example
-------
>>> import numpy as np
>>> sr = 16000
>>> t = np.arange(sr) / sr
>>> feats = log_mel(np.sin(2 * np.pi * 1000.0 * t), sr)   # a 1 kHz tone, one second
>>> feats.shape                                          # 20 ms frames, N_MELS bins
(49, 32)
>>> centres = mel_centres_hz(sr)
>>> int(feats.mean(0).argmax()) == int(np.abs(centres - 1000.0).argmin())   # the nearest mel bin lights up
True
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
WIN_LENGTH = 512  # 32 ms
HOP_LENGTH = 320  # 20 ms
N_MELS = 32
F_MIN, F_MAX = 60.0, 7600.0
DB_MIN, DB_MAX = -60.0, 40.0
#: the seed of every random choice of :func:`build`
BUILD_SEED = 20230306
#: utterances per split
N_SPLIT = {"train": 1500, "val": 250, "test": 250}
MIN_DIGITS, MAX_DIGITS = 3, 5
#: espeak-ng voices (English accents) and variants (speakers) drawn from
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
          "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2")
SPEEDS_WPM = (120, 220)  # uniform integer range
PITCHES = (20, 80)  # espeak-ng -p, uniform integer range
NOISE_DB = (-35.0, -20.0)  # white noise power relative to the utterance's power
PATH = Path(__file__).with_name("corpus") / "spoken_digits.npz"
SPLITS = ("train", "val", "test")


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = WIN_LENGTH, n_mels: int = N_MELS,
                   f_min: float = F_MIN, f_max: float = F_MAX) -> np.ndarray:
    """Triangular mel filters ``(n_mels, n_fft // 2 + 1)`` on the HTK mel scale, peak 1 at each centre.

    Filter m rises linearly from centre m - 1 to centre m and falls to centre m + 1, with
    ``n_mels + 2`` points equally spaced in mel between ``f_min`` and ``f_max``.
    """
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"f_min and f_max must satisfy 0 <= f_min < f_max <= sample_rate / 2, "
                         f"got {f_min!r}, {f_max!r} at sample_rate {sample_rate!r}")
    if n_mels < 1:
        raise ValueError(f"n_mels must be >= 1, got {n_mels!r}")
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)  # (F,)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))  # (M + 2,)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (M, 1) each
    rise = (freqs[None] - lo) / (mid - lo)
    fall = (hi - freqs[None]) / (hi - mid)
    return np.clip(np.minimum(rise, fall), 0.0, None)  # (M, F)


def mel_centres_hz(sample_rate: int = SAMPLE_RATE, n_mels: int = N_MELS) -> np.ndarray:
    """Centre frequencies (Hz) of :func:`mel_filterbank`'s filters."""
    return _mel_to_hz(np.linspace(_hz_to_mel(F_MIN), _hz_to_mel(F_MAX), n_mels + 2))[1:-1]


def log_mel(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Log-mel power features ``(frames, N_MELS)`` in dB of a mono waveform (floats, any scale).

    ``frames = 1 + (len(wave) - WIN_LENGTH) // HOP_LENGTH`` (no padding); ``wave`` shorter than one
    frame raises ``ValueError``.
    """
    from scipy.signal import get_window  # noqa: PLC0415

    wave = np.asarray(wave, dtype=np.float64)
    if wave.ndim != 1:
        raise ValueError(f"wave must be one-dimensional (mono samples), got shape {wave.shape}")
    if len(wave) < WIN_LENGTH:
        raise ValueError(f"wave must hold at least {WIN_LENGTH} samples (one frame), got {len(wave)}")
    n = 1 + (len(wave) - WIN_LENGTH) // HOP_LENGTH
    idx = np.arange(WIN_LENGTH)[None] + HOP_LENGTH * np.arange(n)[:, None]  # (frames, WIN)
    frames = wave[idx] * get_window("hann", WIN_LENGTH)[None]  # (frames, WIN)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (frames, F)
    mel = power @ mel_filterbank(sample_rate).T  # (frames, M)
    return 10.0 * np.log10(mel + 1e-10)


def quantise(db: np.ndarray) -> np.ndarray:
    """dB values to ``uint8`` over [DB_MIN, DB_MAX] (clipped)."""
    return np.round((np.clip(db, DB_MIN, DB_MAX) - DB_MIN) * 255.0 / (DB_MAX - DB_MIN)).astype(np.uint8)


def dequantise(q: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantise` (to within half a step, (DB_MAX - DB_MIN) / 510 dB)."""
    return q.astype(np.float32) * np.float32((DB_MAX - DB_MIN) / 255.0) + np.float32(DB_MIN)


def espeak_version() -> str:
    """``espeak-ng --version`` (first line), or raise ``RuntimeError`` when it is not installed."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (Debian: apt-get install -y espeak-ng)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout.split(" Data at")[0]
    deb = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "espeak-ng"], capture_output=True, text=True) \
        if shutil.which("dpkg-query") else None
    return version.strip() + (f" (Debian package {deb.stdout.strip()})" if deb and deb.returncode == 0 else "")


def synthesise(digits: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """The waveform (float, 16 kHz) of espeak-ng speaking ``digits`` (a string of 0-9)."""
    from scipy.io import wavfile  # noqa: PLC0415
    from scipy.signal import resample_poly  # noqa: PLC0415

    if not digits or not digits.isdigit():
        raise ValueError(f"digits must be a non-empty string of 0-9, got {digits!r}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "u.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path),
                        " ".join(digits)], check=True, capture_output=True)
        sr, x = wavfile.read(path)
    x = x.astype(np.float64) / 32768.0
    if sr != SAMPLE_RATE:
        g = np.gcd(sr, SAMPLE_RATE)
        x = resample_poly(x, SAMPLE_RATE // g, sr // g)
    return trim_silence(x)


def trim_silence(wave: np.ndarray, rel: float = 0.02, margin_s: float = 0.05) -> np.ndarray:
    """``wave`` without the leading and trailing samples quieter than ``rel`` times its peak
    (keeping ``margin_s`` seconds of either side)."""
    loud = np.flatnonzero(np.abs(wave) > rel * np.abs(wave).max()) if len(wave) else []
    if len(loud) == 0:
        return wave
    m = int(margin_s * SAMPLE_RATE)
    return wave[max(0, loud[0] - m): loud[-1] + m + 1]


def build(path: str | Path = PATH, *, seed: int = BUILD_SEED, n_split: dict | None = None) -> dict:
    """Synthesise the corpus and write it to ``path`` (``.npz``); returns its manifest.

    Arrays: ``features`` (all frames, concatenated, ``uint8``), ``offsets`` (utterance u has
    frames ``offsets[u]:offsets[u + 1]``), ``labels`` (concatenated digits 0-9), ``label_offsets``,
    ``split`` (0 train, 1 val, 2 test), ``voice``/``speed``/``pitch`` per utterance and
    ``manifest`` (a JSON string: espeak-ng version, seed, feature settings, SHA-256 of the arrays).
    """
    n_split = dict(N_SPLIT if n_split is None else n_split)
    version = espeak_version()
    rng = np.random.default_rng(seed)
    feats, labels, split, voices, speeds, pitches = [], [], [], [], [], []
    for s, name in enumerate(SPLITS):
        for _ in range(n_split[name]):
            k = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
            digits = "".join(str(d) for d in rng.integers(0, 10, k))
            voice = f"{VOICES[rng.integers(len(VOICES))]}+{VARIANTS[rng.integers(len(VARIANTS))]}"
            speed = int(rng.integers(SPEEDS_WPM[0], SPEEDS_WPM[1] + 1))
            pitch = int(rng.integers(PITCHES[0], PITCHES[1] + 1))
            wave = synthesise(digits, voice, speed, pitch)
            noise_db = rng.uniform(*NOISE_DB)
            wave = wave + rng.standard_normal(len(wave)) * np.sqrt(np.mean(wave ** 2) * 10 ** (noise_db / 10))
            feats.append(quantise(log_mel(wave)))
            labels.append(np.array([int(c) for c in digits], dtype=np.uint8))
            split.append(s)
            voices.append(voice)
            speeds.append(speed)
            pitches.append(pitch)
    arrays = {"features": np.concatenate(feats), "offsets": np.cumsum([0] + [len(f) for f in feats]),
              "labels": np.concatenate(labels), "label_offsets": np.cumsum([0] + [len(x) for x in labels]),
              "split": np.array(split, dtype=np.uint8), "voice": np.array(voices), "speed": np.array(speeds),
              "pitch": np.array(pitches)}
    h = hashlib.sha256()
    for k in ("features", "offsets", "labels", "label_offsets", "split"):
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    manifest = {"espeak_ng": version, "seed": seed, "n_split": n_split, "sample_rate": SAMPLE_RATE,
                "win_length": WIN_LENGTH, "hop_length": HOP_LENGTH, "n_mels": N_MELS, "f_min": F_MIN,
                "f_max": F_MAX, "db_range": [DB_MIN, DB_MAX], "noise_db": list(NOISE_DB),
                "speeds_wpm": list(SPEEDS_WPM), "pitches": list(PITCHES), "voices": list(VOICES),
                "variants": list(VARIANTS), "digits": [MIN_DIGITS, MAX_DIGITS], "sha256": h.hexdigest(),
                "command": "python -m sigma_core.experiments.speech_data build"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, manifest=np.array(json.dumps(manifest)), **arrays)
    return manifest


def load(path: str | Path = PATH) -> dict:
    """The corpus as ``{"manifest": dict, split: (features, labels)}`` for split in train/val/test,
    where features[u] is ``(frames, N_MELS)`` float32 dB and labels[u] an int64 array of digits."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path {path} does not exist: build it with "
                                "python -m sigma_core.experiments.speech_data build")
    with np.load(path) as z:
        a = {k: z[k] for k in z.files}
    manifest = json.loads(str(a["manifest"]))
    h = hashlib.sha256()
    for k in ("features", "offsets", "labels", "label_offsets", "split"):
        h.update(np.ascontiguousarray(a[k]).tobytes())
    if h.hexdigest() != manifest["sha256"]:
        raise ValueError(f"path {path}: arrays do not match the manifest's SHA-256 (a corrupted corpus)")
    feats, off, lab, loff = dequantise(a["features"]), a["offsets"], a["labels"].astype(np.int64), a["label_offsets"]
    out = {"manifest": manifest}
    for s, name in enumerate(SPLITS):
        idx = np.flatnonzero(a["split"] == s)
        out[name] = ([feats[off[u]:off[u + 1]] for u in idx], [lab[loff[u]:loff[u + 1]] for u in idx])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sigma_core.experiments.speech_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="synthesise the corpus with espeak-ng and write the .npz")
    b.add_argument("--out", default=str(PATH))
    args = parser.parse_args(argv)
    manifest = build(args.out)
    print(json.dumps({k: manifest[k] for k in ("espeak_ng", "n_split", "sha256")}), f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
