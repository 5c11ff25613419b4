"""worldline-shards keeps colour and geometry: full-range, BT.709, gray and RGB sources decode
to ffmpeg's own colours after re-encoding; rotated and non-square-pixel files are stored (and
bucketed) the way they are shown; AV1 is re-encoded; a bad ``--reencode`` stops before work.

The corpus is made here with FFmpeg's lavfi sources through PyAV (``smptebars``, ``testsrc2``)
in real codecs and containers (MJPEG/avi, H.264/mkv, FFV1/mkv, QuickTime RLE/mov, AV1/mp4).
"ffmpeg's own decode" is FFmpeg's filter graph (``buffer -> format=rgb24``), which converts
with each frame's range and matrix exactly like ``ffmpeg -pix_fmt rgb24 -f rawvideo``.
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction
from pathlib import Path

import av
import decord
import numpy as np
import pytest

from worldline.data.buckets import Bucket, BucketSet
from worldline.data.ingest import IngestOptions, make_shards
from worldline.data.probe import probe_video
from worldline.data.samples import iter_tar_samples
from worldline.data.scheduling import keep_scheduling
from worldline.scripts.make_shards import main as shards_main

BARS, TEST = "smptebars=size=64x48:rate=8", "testsrc2=size=64x48:rate=8"


def lavfi_video(spec: str, fmt: str, codec: str, pix_fmt: str, *, frames: int = 4, options=None,
                colorspace: str | None = None, full_range: bool = False, rotation: int | None = None,
                sar: Fraction | None = None) -> bytes:
    """``frames`` frames of the lavfi source ``spec`` encoded with ``codec`` in ``fmt``, the
    colour tags written into the stream (``colorspace``: a PyAV Colorspace name)."""
    buf = io.BytesIO()
    with keep_scheduling(), av.open(spec, format="lavfi") as src, \
            av.open(buf, "w", format=fmt) as dst:
        inp = src.streams.video[0].codec_context
        out = dst.add_stream(codec, rate=8)
        out.width, out.height, out.pix_fmt = inp.width, inp.height, pix_fmt
        out.options = options or {}
        tags = {}
        if colorspace:
            tags["colorspace"] = {"ITU709": 1, "ITU601": 6}[colorspace]
        if full_range:
            tags["color_range"] = 2
        for k, v in tags.items():
            setattr(out.codec_context, k, v)
        if sar is not None:
            out.codec_context.sample_aspect_ratio = sar
        if rotation is not None:
            out.set_display_rotation(rotation)  # counterclockwise degrees, as in the display matrix
        for i, frame in enumerate(src.decode(video=0)):
            if i == frames:
                break
            img = frame.reformat(format=pix_fmt, dst_colorspace=colorspace,
                                 dst_color_range="JPEG" if full_range else None)
            for k, v in tags.items():
                setattr(img, k, v)
            img.pts, img.time_base = i, Fraction(1, 8)
            dst.mux(out.encode(img))
        dst.mux(out.encode())
    return buf.getvalue()


def ffmpeg_rgb(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """FFmpeg's own RGB decode of ``data`` (its filter graph converts with each frame's tags),
    scaled to ``size`` (H, W) if given."""
    out = []
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        graph = av.filter.Graph()
        chain = [graph.add_buffer(template=stream)]
        if size is not None:
            chain.append(graph.add("scale", f"{size[1]}:{size[0]}"))
        chain += [graph.add("format", "pix_fmts=rgb24"), graph.add("buffersink")]
        for a, b in zip(chain, chain[1:]):
            a.link_to(b)
        graph.configure()
        for frame in c.decode(stream):
            graph.push(frame)
            out.append(graph.pull().to_ndarray())
    return np.stack(out)


def ffmpeg_reencode(data: bytes) -> bytes:
    """``ffmpeg -i src -c:v libx264 -crf 20 -pix_fmt yuv420p out.mp4``: FFmpeg's automatic
    conversion (same range and matrix as the source, tagged), the baseline for quality."""
    buf = io.BytesIO()
    with av.open(io.BytesIO(data)) as c, av.open(buf, "w", format="mp4") as o:
        stream = c.streams.video[0]
        graph = av.filter.Graph()
        chain = [graph.add_buffer(template=stream), graph.add("format", "pix_fmts=yuv420p|yuvj420p"),
                 graph.add("buffersink")]
        chain[0].link_to(chain[1])
        chain[1].link_to(chain[2])
        graph.configure()
        out = o.add_stream("libx264", rate=8)
        out.width, out.height = stream.codec_context.width, stream.codec_context.height
        out.options = {"crf": "20", "preset": "veryfast"}
        for i, frame in enumerate(c.decode(stream)):
            graph.push(frame)
            img = graph.pull()
            if i == 0:
                out.pix_fmt = img.format.name
                out.codec_context.color_range, out.codec_context.colorspace = img.color_range, img.colorspace
            o.mux(out.encode(img))
        o.mux(out.encode())
    return buf.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / ((a.astype(np.float64) - b) ** 2).mean()))


def decord_rgb(mp4: bytes) -> np.ndarray:
    """What the loader sees: decord's RGB frames of a stored mp4."""
    reader = decord.VideoReader(io.BytesIO(mp4), num_threads=1)
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def stored(out: Path) -> dict[str, dict]:
    """Every sample of the shards in ``out`` by key."""
    return {r.key: r.members for tar in sorted(out.glob("*.tar")) for r in iter_tar_samples(str(tar))}


COLOUR_SOURCES = {  # name -> (file name, bytes)
    "mjpeg_full": ("mjpeg_full.avi", lambda: lavfi_video(BARS, "avi", "mjpeg", "yuvj420p", options={"q:v": "2"})),
    "h264_709_full": ("h264_709_full.mkv", lambda: lavfi_video(BARS, "matroska", "libx264", "yuv420p",
                                                               options={"crf": "10"}, colorspace="ITU709",
                                                               full_range=True)),
    "ffv1_gray": ("ffv1_gray.mkv", lambda: lavfi_video(TEST, "matroska", "ffv1", "gray")),
    "ffv1_rgb": ("ffv1_rgb.mkv", lambda: lavfi_video(TEST, "matroska", "ffv1", "bgr0")),
    "qtrle_rgb": ("qtrle_rgb.mov", lambda: lavfi_video(TEST, "mov", "qtrle", "rgb24")),
    "h264_709_full_mp4": ("h264_709_full_mp4.mp4", lambda: lavfi_video(BARS, "mp4", "libx264", "yuv420p",
                                                                       options={"crf": "10"}, colorspace="ITU709",
                                                                       full_range=True)),
}
KEPT = {"qtrle_rgb", "h264_709_full_mp4"}  # mp4/mov decord reads right as they are: stored untouched


@pytest.fixture(scope="module")
def colour_sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colour_src")
    for name, make in COLOUR_SOURCES.values():
        (root / name).write_bytes(make())
    return root


@pytest.mark.parametrize("reencode", [[], ["--reencode", "libx264"]], ids=["auto", "reencode"])
def test_reencoded_colours_match_ffmpegs_decode(colour_sources, tmp_path, reencode):
    """Full-range MJPEG, BT.709 full-range H.264, gray and RGB sources: the loader's decode of
    the stored mp4 has per-channel means within 1.0 of FFmpeg's decode of the source (before:
    +3.9 and +12.2 for the first two), and the stored stream is tagged limited range."""
    out = tmp_path / "shards"
    assert shards_main([str(colour_sources), str(out), "--processes", "0", "-q", *reencode]) == 0
    samples = stored(out)
    assert sorted(samples) == sorted(COLOUR_SOURCES)
    for key, (name, _) in COLOUR_SOURCES.items():
        source = (colour_sources / name).read_bytes()
        mp4 = samples[key]["mp4"]
        ref, got = ffmpeg_rgb(source).astype(np.float64), decord_rgb(mp4).astype(np.float64)
        assert got.shape == ref.shape, key
        shift = (got - ref).reshape(-1, 3).mean(0)
        if not reencode and key in KEPT:  # decord honours their tags: equal to FFmpeg's decode
            assert mp4 == source and np.abs(shift).max() < 0.05, (key, shift)
            continue
        assert np.abs(shift).max() < 1.0, (key, shift.round(2))
        # As good as FFmpeg's own re-encode at the same CRF (before: gray/RGB lost up to 10 dB)
        own = psnr(decord_rgb(ffmpeg_reencode(source)), ref)
        assert psnr(got, ref) > own - 1.5, (key, psnr(got, ref), own)
        with av.open(io.BytesIO(mp4)) as c:
            frame = next(c.decode(video=0))
            assert int(frame.color_range) == 1, key  # tagged limited (tv) range
            # BT.601 sources keep their matrix (tag 5/6), others are BT.709 (1)
            assert int(frame.colorspace) == (5 if key == "mjpeg_full" else 1), key


def _bucketed(mp4: bytes) -> Bucket:
    """The bucket the loader's header probe puts ``mp4`` in (upscale off: sizes must fit)."""
    buckets = BucketSet([Bucket(80, 48, 2, 1), Bucket(48, 80, 2, 1), Bucket(48, 144, 2, 1), Bucket(96, 64, 2, 1)])
    return buckets[buckets.assign(probe_video(mp4))]


def test_rotated_and_non_square_pixel_files_stored_and_bucketed_as_shown(tmp_path):
    """An mp4 with a 90-degree display matrix and one with 2:1 (and 1:2) pixels are re-encoded
    upright with square pixels: stored in their displayed shape, bucketed by it (before: the
    rotated file landed in a landscape bucket and lost 56 % of its height to the crop)."""
    src = tmp_path / "src"
    src.mkdir()
    clips = {"rot90": dict(rotation=-90), "rot270": dict(rotation=90), "sar2": dict(sar=Fraction(2)),
             "sar_half": dict(sar=Fraction(1, 2))}
    for key, kw in clips.items():
        (src / f"{key}.mp4").write_bytes(lavfi_video("testsrc2=size=80x56:rate=8", "mp4", "libx264", "yuv420p",
                                                     frames=3, **kw))
    header = probe_video((src / "rot90.mp4").read_bytes())
    assert (header.rotation, header.height, header.width) == (90, 56, 80)  # shown turned clockwise
    assert probe_video((src / "sar2.mp4").read_bytes()).sar == 2
    m = make_shards(src, tmp_path / "out", max_count=8, processes=0)
    assert not m["skipped"]
    shown = {"rot90": (80, 56), "rot270": (80, 56), "sar2": (56, 160), "sar_half": (112, 80)}
    by_key = {e["key"]: e for e in m["samples"]}
    samples = stored(tmp_path / "out")
    for key, (h, w) in shown.items():
        mp4 = samples[key]["mp4"]
        info = probe_video(mp4)
        assert (info.height, info.width, info.rotation, info.sar) == (h, w, 0, 1), key
        assert by_key[key]["resolution"] == [h, w] and by_key[key]["num_frames"] == 3, key
        assert decord_rgb(mp4).shape == (3, h, w, 3), key
    # Pixels: the upright frame is the source frame turned the way the display matrix says.
    ref = ffmpeg_rgb((src / "rot90.mp4").read_bytes())[0].astype(np.float64)
    got = decord_rgb(samples["rot90"]["mp4"])[0].astype(np.float64)
    assert np.abs(np.rot90(ref, k=-1) - got).mean() < 3.0  # clockwise
    assert np.abs(np.rot90(ref, k=1) - got).mean() > 20.0  # not the other way
    assert _bucketed(samples["rot90"]["mp4"]) == Bucket(80, 48, 2, 1)
    assert _bucketed((src / "rot90.mp4").read_bytes()) == Bucket(48, 80, 2, 1)  # the raw header's
    assert _bucketed(samples["sar2"]["mp4"]) == Bucket(48, 144, 2, 1)
    assert _bucketed(samples["sar_half"]["mp4"]) == Bucket(96, 64, 2, 1)
    # --max-side applies to the shown shape: the longer (now vertical) side of rot90 is 40
    small = make_shards(src, tmp_path / "small", max_count=8, processes=0, options=IngestOptions(max_side=40))
    assert {e["key"]: e["resolution"] for e in small["samples"]}["rot90"] == [40, 28]


def test_absurd_pixel_aspect_ratio_is_a_counted_skip(tmp_path):
    """A 200:1 pixel aspect ratio would make a 12,800-pixel-wide frame: skipped as
    ``absurd_dimensions`` naming the file, before an encoder allocates it; the rest is kept."""
    src = tmp_path / "src"
    src.mkdir()
    wide = bytearray(lavfi_video(TEST, "mp4", "libx264", "yuv420p", frames=2, sar=Fraction(20)))
    at = wide.index(b"pasp") + 4  # FFmpeg's encoders refuse such a SAR: a hand-edited header
    wide[at:at + 8] = struct.pack(">II", 200, 1)
    (src / "wide.mp4").write_bytes(bytes(wide))
    assert probe_video(bytes(wide)).sar == 200
    (src / "ok.mp4").write_bytes(lavfi_video(TEST, "mp4", "libx264", "yuv420p", frames=2))
    m = make_shards(src, tmp_path / "out", max_count=8, processes=0)
    assert [e["key"] for e in m["samples"]] == ["ok"]
    (bad,) = m["skipped"]
    assert bad["path"].endswith("wide.mp4") and bad["reason"] == "absurd_dimensions", bad
    assert "12800" in bad["message"], bad


def test_av1_is_reencoded_at_ingest(tmp_path):
    """AV1 in mp4 (decord: "cannot find video stream with wanted index: -1") and in webm is
    re-encoded to H.264 automatically, every frame kept."""
    if "libsvtav1" not in av.codecs_available:
        pytest.skip("this FFmpeg build has no AV1 encoder (libsvtav1)")
    src = tmp_path / "src"
    src.mkdir()
    for fmt, ext in (("mp4", "mp4"), ("webm", "webm")):
        (src / f"av1_{ext}.{ext}").write_bytes(lavfi_video(TEST, fmt, "libsvtav1", "yuv420p", frames=3,
                                                           options={"preset": "12"}))
    raw = (src / "av1_mp4.mp4").read_bytes()
    assert probe_video(raw).codec == "av01"
    with pytest.raises(Exception, match="wanted index"):
        decord.VideoReader(io.BytesIO(raw), num_threads=1)
    m = make_shards(src, tmp_path / "out", max_count=8, processes=0)
    assert not m["skipped"], m["skipped"]
    for entry in m["samples"]:
        assert entry["codec"] == "avc1" and entry["num_frames"] == 3 and entry["resolution"] == [48, 64], entry
    got = decord_rgb(stored(tmp_path / "out")["av1_mp4"]["mp4"]).astype(np.float64)
    assert np.abs((got - ffmpeg_rgb(raw)).reshape(-1, 3).mean(0)).max() < 1.0


@pytest.mark.parametrize("codec, why", [("h265", "unknown encoder 'h265'"), ("aac", "not a video encoder")])
def test_unknown_reencode_codec_is_an_argument_error(tmp_path, capsys, codec, why):
    """``--reencode h265`` (no such encoder) exits 2 naming the flag before any work: no
    output folder (before: every input skipped, exit 0)."""
    with pytest.raises(SystemExit) as exc:
        shards_main([str(tmp_path), str(tmp_path / "out"), "--reencode", codec])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --reencode" in err and why in err, err
    assert not (tmp_path / "out").exists()


def test_options_reencode_is_checked_too(tmp_path):
    """The library path: ``make_shards`` with ``IngestOptions(reencode="h265")`` raises before
    any input is read or any file written (before: every input a ``reencode_error`` skip)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.mp4").write_bytes(lavfi_video(TEST, "mp4", "libx264", "yuv420p", frames=2))
    with pytest.raises(ValueError, match="unknown encoder 'h265'"):
        make_shards(tmp_path / "src", tmp_path / "out", max_count=8, processes=0,
                    options=IngestOptions(reencode="h265"))
    assert not (tmp_path / "out").exists()


def test_a_size_and_range_change_midway_keeps_every_frame(tmp_path):
    """Two MPEG-TS streams back to back (64x48 limited range, then 80x56 full range): the
    re-encode switches its conversion per format and keeps all 6 frames at the first size, the
    second part's colours right (a filter graph fixed to the first frame would fail here)."""
    first = lavfi_video(TEST, "mpegts", "libx264", "yuv420p", frames=3)
    second = lavfi_video("smptebars=size=80x56:rate=8", "mpegts", "libx264", "yuv420p", frames=3,
                         options={"crf": "10"}, colorspace="ITU709", full_range=True)
    (tmp_path / "src").mkdir()
    # MPEG-TS bytes under a listed suffix: FFmpeg probes the content, not the name
    (tmp_path / "src" / "joined.mkv").write_bytes(first + second)
    m = make_shards(tmp_path / "src", tmp_path / "out", max_count=8, processes=0)
    assert not m["skipped"], m["skipped"]
    (entry,) = m["samples"]
    assert entry["num_frames"] == 6 and entry["resolution"] == [48, 64]
    got = decord_rgb(stored(tmp_path / "out")["joined"]["mp4"]).astype(np.float64)
    ref = ffmpeg_rgb(second, size=(48, 64))  # FFmpeg's own decode, scaled to the stored size
    assert np.abs((got[3:] - ref).reshape(-1, 3).mean(0)).max() < 1.5
