"""Re-encoding a video (and its first audio track) to H.264/AAC mp4 with PyAV.

``transcode`` is what ingest runs for inputs the loader could not read correctly as they are
(non-ISO containers, codecs decord cannot decode such as AV1, rotated or non-square-pixel
video: ``reencode_reason``) and under ``worldline-shards --reencode`` / ``--max-side``.

What it keeps. Colour: pixels go through FFmpeg's ``scale`` filter, which reads each decoded
frame's own range and matrix (full-range MJPEG, BT.709 full range, gray, RGB), and come out as
limited-range ``yuv420p`` in the source's BT.601/BT.709 matrix (BT.709 for RGB, gray and
other matrices), *tagged* (range, matrix; primaries and transfer copied from the source,
BT.709 / sRGB when it has none), so every decoder converts them back the same way. Geometry: the display matrix's rotation is applied (the file is stored the way
it is shown) and non-square pixels are resampled to square ones (the stored frame has the
displayed shape, enlarged along one axis, never shrunk). Time: every frame keeps its
presentation time (VFR stays VFR); the first audio track is re-encoded to AAC in step
(``_AudioReencoder``).

Tiny CPU example::

    mp4 = transcode(Path("phone.mov").read_bytes(), max_side=512)   # upright, square pixels
"""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np

from worldline.data.probe import VideoInfo, VideoLimits

# Sample-entry codes (mp4 ``stsd``) of codecs the loader's decord (FFmpeg 4.1) cannot decode:
# AV1 and VVC. Such inputs are re-encoded at ingest like non-ISO containers.
DECORD_UNDECODABLE = {"av01": "AV1", "vvc1": "VVC", "vvi1": "VVC"}


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


def reencode_reason(info: VideoInfo | None) -> str | None:
    """Why a video must be re-encoded before the loader can use it as stored, or ``None``.

    ``info`` is the header probe of an ISO-BMFF file (``None``: another container, always
    re-encoded). Reasons: ``container``, ``codec`` (decord cannot decode it, e.g. AV1),
    ``rotation`` (decord ignores the display matrix: frames would be sideways and bucketed by
    the wrong shape) and ``aspect`` (non-square pixels would train squeezed).
    """
    if info is None:
        return "container"
    if info.codec in DECORD_UNDECODABLE:
        return "codec"
    if info.rotation % 360:
        return "rotation"
    if info.sar != 1:
        return "aspect"
    return None


def check_encoder(name: str) -> str:
    """``name`` if it is a video encoder this PyAV/FFmpeg build has that writes mp4 files the
    loader (decord) can decode, else ``ValueError`` saying why. Checked by a 2-frame trial
    encode, so an unknown name (``h265``), a GPU encoder without a GPU, or AV1 (decord cannot
    read it) fail before any input is touched."""
    import av
    import decord

    try:
        codec = av.codec.Codec(name, "w")
    except Exception:
        raise ValueError(f"unknown encoder {name!r} (e.g. libx264, libx265, libvpx-vp9)") from None
    if codec.type != "video":
        raise ValueError(f"{name!r} is a {codec.type} encoder, not a video encoder")
    frames = np.zeros((2, 64, 64, 3), np.uint8)
    try:
        from worldline.data.video import encode_mp4

        trial = encode_mp4(frames, fps=8.0, codec=name)
    except Exception as exc:
        raise ValueError(f"encoder {name!r} cannot write mp4 here: {type(exc).__name__}: {exc}") from None
    try:
        if len(decord.VideoReader(io.BytesIO(trial), num_threads=1)) != 2:
            raise ValueError("wrong frame count")
    except Exception as exc:
        why = str(exc).strip().splitlines()[-1][-100:]  # decord's message ends with the cause
        raise ValueError(f"the loader (decord) cannot decode {name!r} output ({why}); "
                         f"use libx264, libx265 or libvpx-vp9") from None
    return name


def _display_size(h: int, w: int, sar: Fraction, rotation: int, max_side: int | None) -> tuple[int, int]:
    """Stored (height, width) of a frame coded ``h x w`` with sample aspect ratio ``sar``, shown
    rotated by ``rotation`` degrees, with the longer side at most ``max_side``: even numbers."""
    if sar > 1:  # wide pixels: widen (never throw coded rows or columns away)
        w = w * sar
    elif sar < 1:
        h = h / sar
    if rotation % 180:
        h, w = w, h
    scale = min(1.0, max_side / max(h, w)) if max_side else 1.0
    return _even(float(h) * scale), _even(float(w) * scale)


def _rotation(frame) -> int:
    """Clockwise degrees (0, 90, 180, 270) to turn ``frame`` upright, from its display matrix."""
    try:
        ccw = frame.rotation  # PyAV: counterclockwise degrees of the display matrix
    except Exception:  # no display matrix side data
        return 0
    return int(round(-float(ccw or 0) / 90.0)) % 4 * 90


# Colour tags of the output: FFmpeg enum values (AVColorRange / AVColorSpace / primaries / trc).
_TV_RANGE, _BT709, _SRGB_TRC, _UNSPECIFIED = 1, 1, 13, 2
# YUV matrices kept as they are (``scale``'s name, tag): converting the matrix re-mixes 4:2:0
# chroma and costs ~8 dB on saturated edges, a range change ~1 dB. Unspecified YUV is read as
# BT.601, like every FFmpeg decoder does, and tagged so. Anything else (RGB, gray, BT.2020,
# SMPTE 240M ...) becomes BT.709.
_KEPT_MATRICES = {1: ("bt709", 1), 5: ("bt470", 5), 6: ("smpte170m", 6), _UNSPECIFIED: ("bt601", 6)}


def _output_matrix(frame) -> tuple[str, int]:
    """(``scale`` filter name, AVColorSpace tag) of the output matrix for ``frame``."""
    desc = frame.format
    yuv = not desc.name.startswith(("gray", "ya", "pal8", "monow", "monob")) and not any(
        c in desc.name for c in ("rgb", "bgr", "gbr", "xyz"))
    if yuv and int(frame.colorspace or _UNSPECIFIED) in _KEPT_MATRICES:
        return _KEPT_MATRICES[int(frame.colorspace or _UNSPECIFIED)]
    return "bt709", _BT709


class _Converter:
    """FFmpeg filter graph per input format: rotate, resample to square pixels and the output
    size, convert to limited-range ``yuv420p`` (the source's BT.601/BT.709 matrix, else
    BT.709). ``scale``'s input matrix and range come from the frames themselves (``buffer``
    declares them), which is what ``ffmpeg`` itself does; PyAV's ``reformat`` treats every
    frame as limited range (full-range sources came out +4 to +12 too bright). The output
    geometry and tags are fixed by the first frame; a stream whose frame size or format
    changes midway gets a new graph to the same output (``ffmpeg`` reconfigures the same way)."""

    def __init__(self, frame, sar: Fraction, time_base: Fraction, max_side: int | None,
                 limits: VideoLimits | None):
        self.sar, self.time_base = sar, time_base
        self.rotation = _rotation(frame)
        self.height, self.width = _display_size(frame.height, frame.width, sar, self.rotation, max_side)
        if limits is not None:  # an absurd SAR must not make the encoder allocate a giant frame
            limits.check(VideoInfo(self.height, self.width, 1, 1.0, 1.0, 0.0))
        self.matrix, self.colorspace = _output_matrix(frame)
        self.primaries = frame.color_primaries if frame.color_primaries not in (None, _UNSPECIFIED) else _BT709
        rgb_like = frame.format.name.startswith(("gray", "rgb", "bgr", "gbr", "argb", "abgr", "rgba", "bgra", "pal8"))
        default_trc = _SRGB_TRC if rgb_like else _BT709
        self.trc = frame.color_trc if frame.color_trc not in (None, _UNSPECIFIED) else default_trc
        self.graph, self.source = None, None

    @staticmethod
    def _signature(frame) -> tuple:
        return (frame.width, frame.height, frame.format.name, int(frame.colorspace or 0), int(frame.color_range or 0))

    def _build(self, frame) -> None:
        import av

        self.graph = graph = av.filter.Graph()
        tb, sar = self.time_base, self.sar
        args = (f"video_size={frame.width}x{frame.height}:pix_fmt={frame.format.name}"
                f":time_base={tb.numerator}/{tb.denominator}:pixel_aspect={sar.numerator}/{sar.denominator}")
        if frame.colorspace not in (None, _UNSPECIFIED):
            args += f":colorspace={int(frame.colorspace)}"
        if frame.color_range:
            args += f":range={int(frame.color_range)}"
        chain = [graph.add("buffer", args)]
        turn = {90: ["transpose=clock"], 180: ["hflip", "vflip"], 270: ["transpose=cclock"]}
        for spec in turn.get(self.rotation, []):
            name, _, opts = spec.partition("=")
            chain.append(graph.add(name, opts or None))
        chain.append(graph.add("scale", f"w={self.width}:h={self.height}:out_color_matrix={self.matrix}"
                               ":out_range=tv:flags=bicubic+accurate_rnd"))
        chain.append(graph.add("format", "pix_fmts=yuv420p"))
        chain.append(graph.add("setsar", "1"))
        chain.append(graph.add("buffersink"))
        for a, b in zip(chain, chain[1:]):
            a.link_to(b)
        graph.configure()
        self.source = self._signature(frame)

    def tag(self, stream) -> None:
        """Colour tags of the output stream (written into the H.264 VUI and mp4 ``colr``)."""
        cc = stream.codec_context
        cc.color_range, cc.colorspace = _TV_RANGE, self.colorspace
        cc.color_primaries, cc.color_trc = self.primaries, self.trc

    def __call__(self, frame) -> list:
        """Converted frames for ``frame`` (``None``: flush), tagged like the stream."""
        out = []
        if frame is not None and self.source != self._signature(frame):
            if self.graph is not None:  # drain the old graph before switching
                out = self._push(None)
            self._build(frame)
        return out + self._push(frame)

    def _push(self, frame) -> list:
        import av

        self.graph.vpush(frame)
        out = []
        while True:
            try:
                img = self.graph.vpull()
            except (av.error.BlockingIOError, av.error.EOFError):
                return out
            img.color_range, img.colorspace = _TV_RANGE, self.colorspace
            img.color_primaries, img.color_trc = self.primaries, self.trc
            out.append(img)


def transcode(data: bytes, codec: str = "libx264", crf: int = 20, max_side: int | None = None,
              limits: VideoLimits | None = None) -> bytes:
    """Re-encode video bytes to mp4 with PyAV: upright, square pixels, limited-range BT.709
    ``yuv420p`` (module docstring), the longer side at most ``max_side``.

    Every decoded frame is kept with its presentation time (VFR stays VFR); sizes are rounded
    to even numbers for 4:2:0 chroma. The first audio stream, if any, is re-encoded to AAC
    with its timestamps (``_AudioReencoder``), so it stays in sync with the video. ``limits``
    bounds the stored size (``ProbeError("absurd_dimensions")``, e.g. for an absurd SAR).
    """
    import av

    from worldline.data.scheduling import keep_scheduling
    from worldline.data.video import _codec_options

    out_buf = io.BytesIO()
    with av.open(io.BytesIO(data)) as src:
        stream = src.streams.video[0]
        src_audio = src.streams.audio[0] if src.streams.audio else None
        sar = Fraction(stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio or 1)
        sar = sar if sar > 0 else Fraction(1)
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        tb = stream.time_base or Fraction(1, 1000)
        with keep_scheduling(), av.open(out_buf, mode="w", format="mp4") as dst:
            out = dst.add_stream(codec, rate=Fraction(rate).limit_denominator(1001))
            options = _codec_options(codec, crf, "veryfast")
            if options:
                out.options = options
            out.codec_context.time_base = tb
            sound = _AudioReencoder(src_audio, dst) if src_audio is not None else None
            convert, last, i = None, None, 0

            def write(img) -> None:
                img.time_base = tb
                dst.mux(out.encode(img))

            # Demux both streams in file order: audio and video are re-encoded interleaved.
            for packet in src.demux(*([stream, src_audio] if sound else [stream])):
                for frame in packet.decode():
                    if packet.stream.index != stream.index:
                        sound.encode(frame)
                        continue
                    if convert is None:  # the encoder is opened with the first frame's geometry
                        convert = _Converter(frame, sar, tb, max_side, limits)
                        out.width, out.height, out.pix_fmt = convert.width, convert.height, "yuv420p"
                        if not options:
                            out.bit_rate = max(200_000, int(convert.height * convert.width * float(rate)))
                        convert.tag(out)
                    pts = frame.pts if frame.pts is not None else i
                    if last is not None and pts <= last:
                        pts = last + 1  # broken timestamps: keep order, stay monotonic
                    last, i = pts, i + 1
                    frame.pts, frame.time_base = pts, tb
                    for img in convert(frame):
                        write(img)
            if convert is None:
                raise ValueError("no video frame could be decoded")
            for img in convert(None):
                write(img)
            dst.mux(out.encode())
            if sound is not None:
                sound.close()
    return out_buf.getvalue()
