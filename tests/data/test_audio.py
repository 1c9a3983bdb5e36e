"""Audio decoding and AST fbank features, on synthetic clips and a real Tux Paint recording."""

from pathlib import Path

import numpy as np
import pytest

from fedmml.data.audio import (
    AUDIOSET_MEAN,
    AUDIOSET_STD,
    FbankSettings,
    UnreadableAudio,
    fbank,
    load_audio,
    load_fbank,
    num_frames,
    pad_frames,
)

CLIP = Path("/usr/share/tuxpaint/stamps/animals/mammals/badger_desc_fr.ogg")


def tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_load_audio_stereo_to_mono_and_resamples(tmp_path: Path) -> None:
    import soundfile as sf

    left, right = tone(1.0, 44_100), np.zeros(44_100, dtype=np.float32)
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 44_100)
    wave = load_audio(tmp_path / "stereo.wav")
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(wave.size - 16_000) <= 1
    assert 0.2 < np.abs(wave).max() < 0.3  # the mean of a 0.5 tone and silence


def test_unreadable_audio_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    with pytest.raises(UnreadableAudio, match="broken.wav"):
        load_audio(bad)
    assert issubclass(UnreadableAudio, ValueError)


@pytest.mark.filterwarnings("ignore:At least one mel filter")
def test_fbank_matches_ast_feature_extractor_and_pads() -> None:
    from transformers import ASTFeatureExtractor

    settings = FbankSettings(max_frames=256)
    wave = tone(0.8, 16_000, 1000.0)
    ours = fbank(wave, settings)
    ref = ASTFeatureExtractor(max_length=256)(wave, sampling_rate=16_000, return_tensors="np")[
        "input_values"
    ][0]
    assert ours.shape == (256, 128) and np.allclose(ours, ref)
    real = fbank(wave, settings, pad=False)
    assert real.shape == (num_frames(wave.size, settings), 128) == (78, 128)
    assert np.array_equal(pad_frames(real, settings), ours)
    assert np.allclose(ours[78:], -AUDIOSET_MEAN / (2 * AUDIOSET_STD))
    assert fbank(np.zeros(100, dtype=np.float32), settings, pad=False).shape == (1, 128)
    assert FbankSettings().key() != settings.key() == FbankSettings(max_frames=256).key()


@pytest.mark.skipif(not CLIP.is_file(), reason="tuxpaint-stamps-default not installed (make install adds it)")
def test_real_tuxpaint_clip() -> None:
    features = load_fbank(CLIP)
    assert features.shape == (1024, 128) and features.dtype == np.float32
    n = num_frames(load_audio(CLIP).size)
    speech = features[:n]
    # AudioSet normalisation puts real speech roughly around zero with unit-ish spread.
    assert 50 < n < 1024 and -2.0 < speech.mean() < 1.0 and 0.2 < speech.std() < 2.0
    assert np.isfinite(features).all()
