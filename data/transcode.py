"""Re-encoding a video (and its first audio track) to H.264/AAC mp4 with PyAV.

``transcode`` is what ingest runs for inputs in non-ISO containers and under
``worldline-shards --reencode`` / ``--max-side``; ``_AudioReencoder`` keeps the first audio
track in step with the video.
"""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


# Sample rates FFmpeg's AAC encoder takes; other rates are resampled to the next one up
# (at most 48 kHz: the loader's audio rates are far below, and 96 kHz AAC is rarely decodable).
_AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


class _AudioReencoder:
    """The first audio stream of a transcoded file, re-encoded to AAC in step with the video:
    each decoded frame keeps its presentation time (so a late or early audio start stays
    where it was), at most 2 channels (more are averaged to mono, as the loader does) and an
    AAC sample rate."""

    def __init__(self, src_stream, dst):
        import av

        cc = src_stream.codec_context
        self.src_rate = int(cc.sample_rate or src_stream.rate or 0)
        if self.src_rate <= 0:
            raise ValueError(f"audio stream declares sample rate {self.src_rate}")
        self.channels = 1 if (cc.channels or 1) != 2 else 2
        self.rate = next((r for r in _AAC_RATES if r >= self.src_rate), 48000)
        self.layout = "mono" if self.channels == 1 else "stereo"
        self.out = dst.add_stream("aac", rate=self.rate)
        self.out.layout = self.layout
        self.dst, self.packer = dst, av.AudioResampler(format="flt")
        self.resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate)
        self.next_pts: int | None = None

    def encode(self, frame) -> None:
        import av

        from worldline.data.audio import packed_samples

        x = packed_samples(frame, self.packer)  # [n, C]: PyAV 18 cannot resample 8-ch planar
        if x.shape[1] != self.channels:
            x = x.mean(axis=1, keepdims=True)
        planar = av.AudioFrame.from_ndarray(np.ascontiguousarray(x.T), format="fltp", layout=self.layout)
        planar.sample_rate = frame.sample_rate or self.src_rate
        for out in self.resampler.resample(planar):
            self._write(out, frame)

    def _write(self, out, source) -> None:
        if self.next_pts is None:  # the stream's start: the first decoded frame's time
            known = source is not None and source.pts is not None and source.time_base is not None
            start = float(source.pts * source.time_base) if known else 0.0
            self.next_pts = int(round(start * self.rate))
        out.pts, out.time_base = self.next_pts, Fraction(1, self.rate)
        self.next_pts += out.samples
        self.dst.mux(self.out.encode(out))

    def close(self) -> None:
        for out in self.resampler.resample(None):
            self._write(out, None)
        self.dst.mux(self.out.encode())


def transcode(data: bytes, codec: str = "libx264", crf: int = 20, max_side: int | None = None) -> bytes:
    """Re-encode video bytes to mp4 with PyAV, downscaling so ``max(H, W) <= max_side``.

    Every decoded frame is kept with its presentation time (VFR stays VFR); sizes are rounded
    to even numbers for 4:2:0 chroma. The first audio stream, if any, is re-encoded to AAC
    with its timestamps (``_AudioReencoder``), so it stays in sync with the video.
    """
    import av

    from worldline.data.video import _codec_options

    out_buf = io.BytesIO()
    with av.open(io.BytesIO(data)) as src:
        stream = src.streams.video[0]
        src_audio = src.streams.audio[0] if src.streams.audio else None
        h, w = stream.codec_context.height, stream.codec_context.width
        scale = min(1.0, max_side / max(h, w)) if max_side else 1.0
        oh, ow = _even(h * scale), _even(w * scale)
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        tb = stream.time_base or Fraction(1, 1000)
        with av.open(out_buf, mode="w", format="mp4") as dst:
            out = dst.add_stream(codec, rate=Fraction(rate).limit_denominator(1001))
            out.width, out.height, out.pix_fmt = ow, oh, "yuv420p"
            options = _codec_options(codec, crf, "veryfast")
            if options:
                out.options = options
            else:
                out.bit_rate = max(200_000, int(oh * ow * float(rate)))
            out.codec_context.time_base = tb
            sound = _AudioReencoder(src_audio, dst) if src_audio is not None else None
            last, i = None, 0
            # Demux both streams in file order: audio and video are re-encoded interleaved.
            for packet in src.demux(*([stream, src_audio] if sound else [stream])):
                for frame in packet.decode():
                    if packet.stream.index != stream.index:
                        sound.encode(frame)
                        continue
                    pts = frame.pts if frame.pts is not None else i
                    if last is not None and pts <= last:
                        pts = last + 1  # broken timestamps: keep order, stay monotonic
                    last, i = pts, i + 1
                    img = frame.reformat(width=ow, height=oh, format="yuv420p")
                    img.pts, img.time_base = pts, tb
                    dst.mux(out.encode(img))
            dst.mux(out.encode())
            if sound is not None:
                sound.close()
    return out_buf.getvalue()
