"""services/common/audio.py: every container we accept decodes to mono float32 at the model's rate;
durations are capped while decoding; bad or empty clips are clear errors."""

from __future__ import annotations

import io
import wave

import av
import numpy as np
import pytest

from services.common.audio import AudioLimits, decode_audio
from services.common.errors import InvalidArgument
from tests.media import audio_bytes, image_bytes, video_bytes

LIMITS = AudioLimits(max_seconds=60)


def _empty_wav() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as clip:
        clip.setnchannels(1), clip.setsampwidth(2), clip.setframerate(16000)
    return buf.getvalue()


@pytest.mark.parametrize(("fmt", "codec", "rate", "channels"), [
    ("wav", "pcm_s16le", 16000, 1), ("wav", "pcm_s16le", 44100, 2), ("flac", "flac", 22050, 1),
    ("mp3", "libmp3lame", 44100, 1), ("ogg", "libopus", 48000, 2), ("webm", "libopus", 48000, 1),
])
def test_formats_decode_to_mono_at_the_model_rate(fmt, codec, rate, channels):
    audio = decode_audio(audio_bytes(seconds=1.5, rate=rate, fmt=fmt, codec=codec, channels=channels), 16000, LIMITS, "a")
    assert audio.sampling_rate == 16000 and audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert abs(audio.seconds - 1.5) < 0.1  # codecs pad a frame or two
    assert 0.2 < np.abs(audio.samples).max() <= 1.0


def test_wav_at_the_model_rate_is_read_exactly():
    data = audio_bytes(seconds=0.5, rate=16000, seed=3)
    with wave.open(io.BytesIO(data)) as clip:
        expected = np.frombuffer(clip.readframes(clip.getnframes()), np.int16).astype(np.float32) / 32768
    assert np.array_equal(decode_audio(data, 16000, LIMITS, "a").samples, expected)


def test_channels_are_averaged():
    mono = decode_audio(audio_bytes(seconds=0.5, rate=16000, seed=4), 16000, LIMITS, "a").samples
    stereo = decode_audio(audio_bytes(seconds=0.5, rate=16000, seed=4, channels=2), 16000, LIMITS, "a").samples
    assert np.allclose(mono, stereo, atol=1e-4)  # the same signal in both channels: the mean is the signal


def test_silence_is_audio():
    """Digital silence of a normal length is valid input (a model may answer that it hears nothing)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as clip:
        clip.setnchannels(1), clip.setsampwidth(2), clip.setframerate(16000)
        clip.writeframes(bytes(16000 * 2))
    assert not decode_audio(buf.getvalue(), 16000, LIMITS, "a").samples.any()


@pytest.mark.parametrize(("data", "reason"), [
    (audio_bytes(seconds=1 / 16000), "AUDIO_TOO_SHORT"),  # one sample
    (audio_bytes(seconds=3), "AUDIO_TOO_LONG"),
    (b"this is not audio" * 10, "AUDIO_DECODE_FAILED"),
    (image_bytes(16, 16), "AUDIO_DECODE_FAILED"),
    (video_bytes(seconds=0.5), "AUDIO_DECODE_FAILED"),  # a video without an audio stream
    (audio_bytes(seconds=1)[:60], "AUDIO_DECODE_FAILED"),  # a wav header cut before its data
    (_empty_wav(), "AUDIO_TOO_SHORT"),  # a well-formed wav of zero samples
])
def test_bad_clips(data, reason):
    with pytest.raises(InvalidArgument) as caught:
        decode_audio(data, 16000, AudioLimits(max_seconds=2), "a")
    assert caught.value.reason == reason, caught.value.message


def test_a_clip_without_a_declared_duration_is_capped_while_decoding():
    data = audio_bytes(seconds=3, rate=48000, fmt="webm", codec="libopus")
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.audio[0].duration is None  # webm states none: only decoding can tell
    with pytest.raises(InvalidArgument) as caught:
        decode_audio(data, 16000, AudioLimits(max_seconds=2), "a")
    assert caught.value.reason == "AUDIO_TOO_LONG"
