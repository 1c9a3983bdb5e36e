"""Audio decoding (soundfile), 16 kHz resampling (soxr) and AST log-mel filterbank features."""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974
FRAME_LENGTH = 400  # 25 ms at 16 kHz, Kaldi's default window
HOP_LENGTH = 160  # 10 ms
FEATURE_VERSION = 1  # bump when the computation changes, so on-disk caches are rebuilt


class UnreadableAudio(ValueError):
    """An audio file that cannot be decoded (corrupt, truncated, empty or not audio)."""


@dataclass(frozen=True)
class FbankSettings:
    """AST input features: Kaldi-style log-mel fbank, padded/truncated to max_frames, AudioSet-normalised."""

    sample_rate: int = SAMPLE_RATE
    num_mel_bins: int = 128
    max_frames: int = 1024
    normalize: bool = True
    mean: float = AUDIOSET_MEAN
    std: float = AUDIOSET_STD

    def key(self) -> str:
        """A short hash naming these settings, e.g. for cache folders."""
        blob = json.dumps({"version": FEATURE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]

    @property
    def pad_value(self) -> float:
        """The value of a padded frame: HF pads the raw fbank with zeros before normalising."""
        return (0.0 - self.mean) / (2 * self.std) if self.normalize else 0.0


DEFAULT_FBANK = FbankSettings()


def resample(wave: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono float waveform with soxr (high quality); a no-op when the rates match."""
    if orig_sr == target_sr:
        return wave.astype(np.float32, copy=False)
    import soxr  # deferred: only needed when rates differ

    return np.asarray(soxr.resample(wave, orig_sr, target_sr), dtype=np.float32)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode an audio file (wav, ogg, flac, ...) to a mono float32 waveform in [-1, 1] at sample_rate."""
    import soundfile as sf  # deferred: loads libsndfile

    try:
        data, orig_sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:
        # Broad on purpose: libsndfile reports corrupt, truncated or unknown files in several ways.
        raise UnreadableAudio(f"cannot read audio {path}: {err}") from err
    if data.size == 0:
        raise UnreadableAudio(f"cannot read audio {path}: no samples")
    if not np.isfinite(data).all():
        raise UnreadableAudio(f"cannot read audio {path}: non-finite samples")
    # Stereo to mono by averaging channels, as the reference AdvanceDataset does.
    return resample(data.mean(axis=1), int(orig_sr), sample_rate)


@functools.lru_cache(maxsize=4)
def _extractor(settings: FbankSettings):  # noqa: ANN202 - transformers type imported lazily
    from transformers import ASTFeatureExtractor  # deferred: transformers takes seconds to import

    with warnings.catch_warnings():
        # 128 Kaldi mel bins over 257 FFT bins leave one filter empty; HF warns, Kaldi does the same.
        warnings.simplefilter("ignore", UserWarning)
        return ASTFeatureExtractor(
            sampling_rate=settings.sample_rate,
            num_mel_bins=settings.num_mel_bins,
            max_length=settings.max_frames,
            do_normalize=settings.normalize,
            mean=settings.mean,
            std=settings.std,
        )


def num_frames(num_samples: int, settings: FbankSettings = DEFAULT_FBANK) -> int:
    """Real (unpadded) fbank frames for a clip: Kaldi's snip-edges framing, capped at max_frames."""
    return min(settings.max_frames, 1 + (max(num_samples, FRAME_LENGTH) - FRAME_LENGTH) // HOP_LENGTH)


def fbank(wave: np.ndarray, settings: FbankSettings = DEFAULT_FBANK, pad: bool = True) -> np.ndarray:
    """AST input features [max_frames, num_mel_bins] (or only the real frames with pad=False)."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"fbank needs a mono waveform, got shape {wave.shape}")
    if wave.size < FRAME_LENGTH:
        # Shorter than one window: zero-pad so that there is one frame rather than an error.
        wave = np.pad(wave, (0, FRAME_LENGTH - wave.size))
    # transformers' numpy path (torchaudio is unusable here): the ASTFeatureExtractor of the paper.
    out = _extractor(settings)(wave, sampling_rate=settings.sample_rate, return_tensors="np")
    features = np.asarray(out["input_values"][0], dtype=np.float32)
    return features if pad else features[: num_frames(wave.size, settings)].copy()


def pad_frames(features: np.ndarray, settings: FbankSettings = DEFAULT_FBANK) -> np.ndarray:
    """Pad unpadded fbank frames (from fbank(pad=False)) back to max_frames with the padding value."""
    missing = settings.max_frames - features.shape[0]
    if missing <= 0:
        return features[: settings.max_frames]
    pad = np.full((missing, features.shape[1]), settings.pad_value, dtype=np.float32)
    return np.concatenate([features.astype(np.float32, copy=False), pad])


def load_fbank(path: str | Path, settings: FbankSettings = DEFAULT_FBANK, pad: bool = True) -> np.ndarray:
    """Decode, resample and featurise one audio file."""
    return fbank(load_audio(path, settings.sample_rate), settings, pad=pad)
