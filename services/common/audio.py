"""Decoding an audio clip: any container FFmpeg reads (wav, flac, mp3, ogg, webm...), downmixed to
mono float32 and resampled to the rate the model's feature extractor wants.

The duration is checked from the header before decoding, and again while decoding (a header may
lie), so a clip over the limit costs at most the limit's worth of decoding.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np

from services.common.errors import InvalidArgument


@dataclass(frozen=True)
class AudioLimits:
    """What one audio clip may cost."""

    max_seconds: float
    min_samples: int = 2  # at the model's rate: fewer is no signal a feature extractor can frame


@dataclass(frozen=True)
class Audio:
    """One clip as the model's feature extractor takes it."""

    samples: np.ndarray  # [n] float32 in [-1, 1], mono
    sampling_rate: int  # Hz

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sampling_rate


def decode_audio(data: bytes, sampling_rate: int, limits: AudioLimits, where: str) -> Audio:
    """The clip's first audio stream, mono, at `sampling_rate` Hz."""
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError) as err:
        raise InvalidArgument(f"{where}: not an audio file FFmpeg can read ({err})",
                              reason="AUDIO_DECODE_FAILED") from None
    with container:
        if not container.streams.audio:
            raise InvalidArgument(f"{where}: the file has no audio stream", reason="AUDIO_DECODE_FAILED")
        stream = container.streams.audio[0]
        declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
        _check_duration(declared, limits, where)
        # Resampled per channel, then averaged: the downmix librosa and torchaudio users get (FFmpeg's own
        # mono layout would weight channels by 1/sqrt(2) instead).
        resampler = av.AudioResampler(format="fltp", layout=stream.layout, rate=sampling_rate)
        chunks: list[np.ndarray] = []
        count = 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().mean(axis=0))  # [channels, n] -> [n]
                    count += chunks[-1].size
                _check_duration(count / sampling_rate, limits, where)  # the header may understate it
            for out in resampler.resample(None):  # what the resampler still holds
                chunks.append(out.to_ndarray().mean(axis=0))
        except av.FFmpegError as err:
            raise InvalidArgument(f"{where}: the audio is corrupt ({err})", reason="AUDIO_DECODE_FAILED") from None
    samples = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    _check_duration(samples.size / sampling_rate, limits, where)
    if samples.size < limits.min_samples:
        raise InvalidArgument(f"{where}: the audio has {samples.size} samples at {sampling_rate} Hz; at least "
                              f"{limits.min_samples} are needed", reason="AUDIO_TOO_SHORT")
    if not np.isfinite(samples).all():
        raise InvalidArgument(f"{where}: the audio holds NaN or infinite samples", reason="AUDIO_DECODE_FAILED")
    return Audio(samples=samples, sampling_rate=sampling_rate)


def _check_duration(seconds: float, limits: AudioLimits, where: str) -> None:
    if seconds > limits.max_seconds:
        raise InvalidArgument(f"{where}: the audio lasts {seconds:.1f} s or more; the limit is "
                              f"{limits.max_seconds:g} s", reason="AUDIO_TOO_LONG",
                              metadata={"maxAudioSeconds": f"{limits.max_seconds:g}"})
