"""aisfx's log-mel features: Essentia's numbers, an independent computation, padding, caching, config, and the
pretrained aisfx encoder on a real Tux Paint clip."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedmml.config import ConfigError, load_config
from fedmml.data.advance import AdvanceDataset
from fedmml.data.audio import (
    AisfxMelSettings,
    FbankSettings,
    feature_settings,
    load_fbank,
    pad_frames,
)

CLIP = Path("/usr/share/tuxpaint/stamps/animals/mammals/badger_desc_fr.ogg")
# Essentia's output for essentia_signal(): aisfx.spectrogram.spectrogram_essentia.compute_spectrogram with the
# constants of aisfx.inference (44.1 kHz, 2048/1024, 96 bins, 0-22050 Hz), divided by 9.457798957824707, as
# computed by essentia 2.1b6.dev1389 from the signal written as a 32-bit float wav.
ESSENTIA_MEL = Path(__file__).parent / "fixtures" / "aisfx_essentia_mel.npy"
RATE = 44_100


def essentia_signal() -> np.ndarray:
    """0.6 s of a 440 Hz tone and a rising chirp."""
    t = np.arange(int(0.6 * RATE)) / RATE
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3000 * t * (1 + t))
    return wave.astype(np.float32)


def tone(seconds: float, rate: int = RATE, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def reference_features(wave: np.ndarray, s: AisfxMelSettings) -> np.ndarray:
    """Essentia's steps written out frame by frame and bin by bin, as its C++ does them."""

    def mel(hz: float) -> float:
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def hz(m: float) -> float:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    n_bins = s.frame_length // 2 + 1
    step = mel(s.max_frequency) / (s.num_mel_bins + 1)
    edges = [hz(i * step) for i in range(s.num_mel_bins + 2)]
    filters = np.zeros((s.num_mel_bins, n_bins))
    for i in range(s.num_mel_bins):
        lo, mid, hi = edges[i : i + 3]
        for j in range(n_bins):
            f = j * (s.sample_rate / 2) / (n_bins - 1)
            if lo <= f < mid:
                filters[i, j] = (mel(f) - mel(lo)) / (mel(mid) - mel(lo))
            elif mid <= f < hi:
                filters[i, j] = (mel(hi) - mel(f)) / (mel(hi) - mel(mid))
        filters[i] /= filters[i].sum()
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(s.frame_length) / (s.frame_length - 1))
    rows = []
    start = -((s.frame_length + 1) // 2)  # C++ division truncates
    while len(rows) < s.max_frames:
        frame = np.zeros(s.frame_length)
        for k in range(s.frame_length):
            if 0 <= start + k < wave.size:
                frame[k] = wave[start + k]
        power = np.abs(np.fft.rfft(frame * window)) ** 2
        rows.append(np.log10(1 + s.log_scale * (filters @ power)) / s.max_value)
        if start + s.frame_length // 2 >= wave.size:  # this frame's centre reached the end: the last one
            break
        start += s.hop_length
    return np.array(rows)


def test_matches_essentia() -> None:
    want = np.load(ESSENTIA_MEL)
    got = AisfxMelSettings().compute(essentia_signal())
    assert got.shape == want.shape == (27, 96) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# A length between hops, one of whole hops (its last frame is centred on the end), one cut at max_frames.
@pytest.mark.parametrize(
    ("samples", "max_frames", "frames"), [(22_050, 128, 23), (20_480, 128, 21), (RATE, 16, 16)]
)
def test_tone_matches_independent_computation(samples: int, max_frames: int, frames: int) -> None:
    settings = AisfxMelSettings(max_frames=max_frames)
    wave = tone(samples / RATE)
    assert wave.size == samples
    got = settings.compute(wave)
    want = reference_features(wave.astype(np.float64), settings)
    assert got.shape == want.shape == (frames, 96)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_load_pads_to_max_frames_at_44k(tmp_path: Path) -> None:
    import soundfile as sf

    sf.write(tmp_path / "tone.wav", tone(0.5, rate=22_050), 22_050)  # resampled to 44.1 kHz on load
    settings = AisfxMelSettings(max_frames=64)
    real = load_fbank(tmp_path / "tone.wav", settings, pad=False)
    padded = load_fbank(tmp_path / "tone.wav", settings)
    assert real.shape == (23, 96) and padded.shape == (64, 96) and padded.dtype == np.float32
    assert np.array_equal(padded[:23], real) and not padded[23:].any()  # padded with silence, 0
    assert np.array_equal(pad_frames(padded, AisfxMelSettings(max_frames=10)), real[:10])
    # The 440 Hz tone peaks in the mel bin around 440 Hz, well above the silence floor.
    assert int(real[5:15].mean(axis=0).argmax()) in (12, 13) and real[5:15].max() > 0.5


def test_settings_by_name_and_cache_keys() -> None:
    aisfx, fbank = feature_settings("aisfx-mel", 128), feature_settings("ast-fbank", 128)
    assert aisfx == AisfxMelSettings(max_frames=128) and fbank == FbankSettings(max_frames=128)
    assert aisfx.key() != fbank.key()
    assert aisfx.key() == AisfxMelSettings(max_frames=128).key() != AisfxMelSettings(max_frames=64).key()


def test_advance_dataset_caches_aisfx_features(tmp_path: Path) -> None:
    import soundfile as sf

    for folder in ("vision", "sound"):
        (tmp_path / "train" / folder / "beach").mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "train" / "vision" / "beach" / "a.png")
    sf.write(tmp_path / "train" / "sound" / "beach" / "a.wav", tone(0.3), RATE)
    settings = AisfxMelSettings(max_frames=32)
    ds = AdvanceDataset(tmp_path, "train", image_size=8, settings=settings)
    assert ds[0][1].shape == (32, 96) and ds.cache.misses == 1
    assert len(list((tmp_path / ".cache" / f"fbank-{settings.key()}").glob("*.npy"))) == 1
    again = AdvanceDataset(tmp_path, "train", image_size=8, settings=settings)
    assert again.cache.hits == 1 and torch.equal(again[0][1], ds[0][1])


def test_config_audio_features() -> None:
    cfg = load_config("tuxpaint-av-aisfx")
    assert (cfg.data.audio_features, cfg.data.audio_frames) == ("aisfx-mel", 128)
    audio = cfg.model.audio
    assert (audio.backend, audio.pretrained, audio.neck_dim) == ("aisfx", "package", 256)
    aisfx = ['data.audio_features="aisfx-mel"', 'model.audio.backend="aisfx"']
    assert load_config("tiny-av", aisfx).data.audio_features == "aisfx-mel"
    assert load_config("tiny-av").data.audio_features == "ast-fbank"
    with pytest.raises(ConfigError, match="data.audio_features 'mfcc'; valid choices: ast-fbank, aisfx-mel"):
        load_config("tiny-av", ['data.audio_features="mfcc"'])


@pytest.mark.skipif(not CLIP.is_file(), reason="tuxpaint-stamps-default not installed (make install adds it)")
def test_pretrained_aisfx_encoder_on_a_tuxpaint_clip() -> None:
    pytest.importorskip("aisfx", reason="aisfx is installed separately: pip install --no-deps aisfx")
    from fedmml.models.backends import build_encoder

    cfg = load_config("tuxpaint-av-aisfx")
    enc = build_encoder(cfg.model.audio)
    # The inherited schedules must grow the audio encoder to exactly its depth.
    assert all(sum(s.blocks["audio"]) == enc.total_blocks == 6 for s in cfg.schedules.values())
    enc.grow_to(enc.total_blocks)
    enc.eval()
    settings = feature_settings(cfg.data.audio_features, cfg.data.audio_frames)
    features = torch.from_numpy(load_fbank(CLIP, settings)).unsqueeze(0)
    assert features.shape == (1, 128, 96)
    with torch.no_grad():
        out = enc(enc.prepare(features))
    assert out.shape == (1, 256) and torch.isfinite(out).all()
