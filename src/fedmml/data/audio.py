"""Audio decoding (soundfile), resampling (soxr) and the log-mel features of the audio encoders.

Two feature settings share one interface (:class:`FeatureSettings`), so the data code loads, pads and caches
either without knowing which: AST's Kaldi-style fbank at 16 kHz (:class:`FbankSettings`, "ast-fbank") and
aisfx's Essentia log-mel at 44.1 kHz (:class:`AisfxMelSettings`, "aisfx-mel").
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar

import numpy as np

SAMPLE_RATE = 16_000
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974
FRAME_LENGTH = 400  # 25 ms at 16 kHz, Kaldi's default window
HOP_LENGTH = 160  # 10 ms
FEATURE_VERSION = 1  # of the fbank; bump when the computation changes, so on-disk caches are rebuilt


class UnreadableAudio(ValueError):
    """An audio file that cannot be decoded (corrupt, truncated, empty or not audio)."""


class FeatureSettings(ABC):
    """How clips become features [frames, num_mel_bins]: what loading, padding and caching rely on.

    Implementations are frozen dataclasses with (among others) the fields sample_rate, num_mel_bins and
    max_frames. Every field goes into :meth:`key`; the two implementations have different fields, so their
    keys differ.
    """

    version: ClassVar[int]  # bump when the computation changes, so on-disk caches are rebuilt
    sample_rate: int  # Hz of the waveform compute() takes
    num_mel_bins: int
    max_frames: int  # frames per clip, padded or cut

    def key(self) -> str:
        """A short hash naming these settings, e.g. for cache folders."""
        blob = json.dumps({"version": self.version, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]

    @property
    @abstractmethod
    def pad_value(self) -> float:
        """The value of every bin of a padded frame."""

    @abstractmethod
    def compute(self, wave: np.ndarray) -> np.ndarray:
        """Features of a mono waveform at sample_rate: its real frames [n <= max_frames, num_mel_bins]."""


@dataclass(frozen=True)
class FbankSettings(FeatureSettings):
    """AST input features: Kaldi-style log-mel fbank, padded/truncated to max_frames, AudioSet-normalised."""

    version: ClassVar[int] = FEATURE_VERSION
    sample_rate: int = SAMPLE_RATE
    num_mel_bins: int = 128
    max_frames: int = 1024
    normalize: bool = True
    mean: float = AUDIOSET_MEAN
    std: float = AUDIOSET_STD

    @property
    def pad_value(self) -> float:
        """The value of a padded frame: HF pads the raw fbank with zeros before normalising."""
        return (0.0 - self.mean) / (2 * self.std) if self.normalize else 0.0

    def compute(self, wave: np.ndarray) -> np.ndarray:
        """The real fbank frames of ``wave``: :func:`fbank` without padding."""
        return fbank(wave, self, pad=False)


@dataclass(frozen=True)
class AisfxMelSettings(FeatureSettings):
    """aisfx's CNN input: the log-mel spectrogram of the package's Essentia pipeline, which it was trained on.

    That is ``aisfx.spectrogram.spectrogram_essentia`` as ``aisfx.inference.main`` calls it, then the
    package's "original" normalisation: the waveform as loaded (Essentia's EasyLoader scales it by
    db2amp(replayGain + 6) = 1 at its default gain: no normalisation); frames of frame_length centred on
    multiples of hop_length, zero-padded at both ends, up to the first centre at or past the end; a symmetric
    Hann window; the power spectrum; HTK-mel triangles that are linear in mel (weighting "warping"), each
    scaled to unit sum; ``log10(1 + log_scale * mel)``, divided by max_value (the minimum is 0). Matches
    essentia 2.1b6.dev1389 to 3e-6 (tests/data/fixtures). The package's librosa path is not what the model
    saw: it peak-normalises the waveform, builds its triangles in Hz and returns [bins, frames].
    """

    version: ClassVar[int] = 1
    sample_rate: int = 44_100
    num_mel_bins: int = 96
    max_frames: int = 128  # 2.97 s at 23.2 ms per frame
    frame_length: int = 2048
    hop_length: int = 1024
    min_frequency: float = 0.0
    max_frequency: float = 22_050.0
    log_scale: float = 1e4
    max_value: float = 9.457798957824707

    @property
    def pad_value(self) -> float:
        """Silence: the package pads its blocks of normalised frames with zeros."""
        return 0.0

    def compute(self, wave: np.ndarray) -> np.ndarray:
        """The real log-mel frames of ``wave`` (Essentia's framing, cut at max_frames)."""
        wave = np.asarray(wave, dtype=np.float64)
        if wave.ndim != 1:
            raise ValueError(f"aisfx features need a mono waveform, got shape {wave.shape}")
        size, hop = self.frame_length, self.hop_length
        # Essentia's FrameCutter (startFromZero=false): frame k starts at k*hop - (size+1)//2, and the last
        # frame is the first whose centre reaches the end. Only the first max_frames are computed.
        count = min(self.max_frames, 1 + -(-wave.size // hop))
        lead = (size + 1) // 2
        padded = np.zeros((count - 1) * hop + size)
        kept = wave[: padded.size - lead]
        padded[lead : lead + kept.size] = kept
        frames = np.lib.stride_tricks.sliding_window_view(padded, size)[::hop]
        power = np.abs(np.fft.rfft(frames * np.hanning(size), axis=1)) ** 2  # np.hanning is symmetric
        mel = power @ _aisfx_filters(self).T
        return (np.log10(1.0 + self.log_scale * mel) / self.max_value).astype(np.float32)


DEFAULT_FBANK = FbankSettings()
# data.audio_features -> its settings class.
FEATURES: dict[str, type[FeatureSettings]] = {"ast-fbank": FbankSettings, "aisfx-mel": AisfxMelSettings}


def feature_settings(name: str, max_frames: int) -> FeatureSettings:
    """The settings of the features called ``name`` (a key of FEATURES), with max_frames frames per clip."""
    return FEATURES[name](max_frames=max_frames)


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK's mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


@functools.lru_cache(maxsize=4)
def _aisfx_filters(settings: AisfxMelSettings) -> np.ndarray:
    """[num_mel_bins, frame_length // 2 + 1] weights: Essentia's MelBands with htkMel, warping, unit_sum."""
    mel = _hz_to_mel(np.fft.rfftfreq(settings.frame_length, 1.0 / settings.sample_rate))
    low, high = _hz_to_mel(settings.min_frequency), _hz_to_mel(settings.max_frequency)
    edges = np.linspace(low, high, settings.num_mel_bins + 2)[:, None]
    rising = (mel - edges[:-2]) / (edges[1:-1] - edges[:-2])
    falling = (edges[2:] - mel) / (edges[2:] - edges[1:-1])
    weights = np.clip(np.minimum(rising, falling), 0.0, None)
    sums = weights.sum(axis=1, keepdims=True)
    return weights / np.where(sums > 0, sums, 1.0)  # Essentia leaves a filter that covers no bin at zero


def resample(wave: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono float waveform with soxr (high quality); a no-op when the rates match."""
    if orig_sr == target_sr:
        return wave.astype(np.float32, copy=False)
    import soxr  # deferred: only needed when rates differ

    return np.asarray(soxr.resample(wave, orig_sr, target_sr), dtype=np.float32)


def load_audio(path: str | Path | BinaryIO, sample_rate: int = SAMPLE_RATE, name: str = "") -> np.ndarray:
    """Decode an audio file (wav, ogg, flac, ...; a path, or a file object named ``name`` in errors) to a
    mono float32 waveform in [-1, 1] at sample_rate."""
    import soundfile as sf  # deferred: loads libsndfile

    source = str(path) if isinstance(path, str | Path) else path
    path = name or path
    try:
        data, orig_sr = sf.read(source, dtype="float32", always_2d=True)
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


def pad_frames(features: np.ndarray, settings: FeatureSettings = DEFAULT_FBANK) -> np.ndarray:
    """Pad real frames (from settings.compute) to max_frames with the settings' padding value, or cut them."""
    missing = settings.max_frames - features.shape[0]
    if missing <= 0:
        return features[: settings.max_frames]
    pad = np.full((missing, features.shape[1]), settings.pad_value, dtype=np.float32)
    return np.concatenate([features.astype(np.float32, copy=False), pad])


def load_fbank(
    path: str | Path | BinaryIO, settings: FeatureSettings = DEFAULT_FBANK, pad: bool = True, name: str = ""
) -> np.ndarray:
    """Decode, resample and featurise one audio file (see :func:`load_audio`): [max_frames, bins], or only
    real frames if not pad."""
    features = settings.compute(load_audio(path, settings.sample_rate, name))
    return pad_frames(features, settings) if pad else features
