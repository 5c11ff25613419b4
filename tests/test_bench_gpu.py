"""bench_gpu's CPU smoke run and the streaming decode it times (models/stream_decode.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from worldline.models.autoencoder import AutoencoderArgs, VideoAutoencoder
from worldline.models.dit import DiTArgs, VideoDiT
from worldline.models.rollout import rollout
from worldline.models.stream_decode import StreamDecoder, fast_denoiser, rollout_decoded
from worldline.scripts import bench_gpu


def _ae(dtype: torch.dtype = torch.float64) -> VideoAutoencoder:
    torch.manual_seed(0)
    ae = VideoAutoencoder(AutoencoderArgs(latent_channels=4, base_channels=8,
                                          channel_mult=(1, 2, 2), num_res_blocks=1,
                                          temporal_downsample=4, spatial_downsample=4))
    return ae.to(dtype).eval()


def _dit(dtype: torch.dtype = torch.float64) -> VideoDiT:
    torch.manual_seed(0)
    dit = VideoDiT(DiTArgs(hidden_size=32, depth=2, num_heads=2, in_channels=4, text_dim=0,
                           num_action_slots=0, camera_dim=0, frame_causal=True))
    with torch.no_grad():  # leave the zero-init regime: the output must depend on the input
        for p in dit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return dit.to(dtype).eval()


def test_quick_json_has_every_field(tmp_path: Path) -> None:
    out_path = tmp_path / "q.json"
    # 45 s for the Trainer part: it completes on an idle 2-core VM (~35 s); on a loaded one it
    # records a timeout error (the field is still there), keeping this test near 90 s.
    bench_gpu.main(["--quick", "--json", str(out_path), "--trainer-budget-s", "45"])
    out = json.loads(out_path.read_text())
    for key in ("quick", "machine", "matmul", "peak", "step", "wan", "trainer", "rollout",
                "total_s"):
        assert key in out, key
    assert out["machine"]["cpu_capability"]
    assert sorted(out["step"]) == sorted(f"{c}/{a}/{p}" for c, a, p in bench_gpu.STEP_MODES)
    assert sorted(out["rollout"]) == [f"tiny/{m}" for m in sorted(bench_gpu.ROLLOUT_MODES)]
    for name, v in [("matmul", out["matmul"]), *out["step"].items(), ("wan", out["wan"]),
                    ("trainer", out["trainer"]), *out["rollout"].items()]:
        assert isinstance(v, dict) or v.startswith(("skipped", "error")), (name, v)
    # The parts that need no compiler and no GPU really ran.
    assert isinstance(out["matmul"], dict) and out["matmul"]["tflops"] > 0
    for c, a, p in bench_gpu.STEP_MODES:
        if c == "eager":
            assert out["step"][f"{c}/{a}/{p}"]["mfu"] > 0
    assert out["rollout"]["tiny/decode"]["pixel_fps"] > 0
    assert out["rollout"]["tiny/no_decode"]["pixel_frames"] == \
        out["rollout"]["tiny/decode"]["pixel_frames"]


def test_stream_decode_equals_whole_decode_fp64() -> None:
    ae = _ae()
    z = torch.randn(1, 4, 5, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        whole = ae.decode(ae.denormalize(z)).clamp(-1, 1)
    dec = StreamDecoder(ae)
    assert dec.state_frames() == 0
    parts = [dec(z[:, :, i:i + 1]) for i in range(5)]
    assert [p.shape[2] for p in parts] == [1, 4, 4, 4, 4]
    # The carried state is the k-1 = 2 frame tail of every causal conv, nothing more.
    n_convs = sum(1 for m in ae.decoder.modules() if type(m).__name__ == "CausalConv3d")
    assert dec.state_frames() == 2 * n_convs
    # ChannelRMSNorm takes its statistics in fp32 even for fp64 inputs (x.float()), and the
    # chunk's memory layout changes that fp32 summation's order: agreement is ~1e-7, not 1e-15.
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=0, atol=1e-6)


def test_stream_decode_bf16_autocast_close() -> None:
    ae = _ae(torch.float32)
    z = torch.randn(1, 4, 3, 4, 4)
    with torch.no_grad():
        whole = ae.decode(ae.denormalize(z)).clamp(-1, 1)
    dec = StreamDecoder(ae, dtype=torch.bfloat16)
    out = torch.cat([dec(z[:, :, i:i + 1]) for i in range(3)], 2).float()
    assert out.shape == whole.shape
    assert (out - whole).abs().max() < 0.1  # bf16 rounding, not a different computation


def test_rollout_streaming_decode_matches_rollout_then_decode() -> None:
    dit, ae = _dit(), _ae()
    g = torch.Generator().manual_seed(3)
    ctx = torch.randn(1, 4, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(1, 4, 3, 4, 4, generator=g, dtype=torch.float64)
    kw = dict(noise=noise, num_steps=2, window=2)
    seen: list[int] = []
    res = rollout_decoded(dit, ae, ctx, 3, on_pixels=lambda i, px: seen.append(px.shape[2]),
                          **kw)
    ref = rollout(dit, ctx, 3, **kw)
    assert torch.equal(res.latents, ref)
    with torch.no_grad():
        whole = ae.decode(ae.denormalize(torch.cat([ctx, ref], 2))).clamp(-1, 1)
    n_ctx_pix = 1 + (2 - 1) * 4
    assert seen == [4, 4, 4] and res.pixel_frames == 12
    torch.testing.assert_close(res.pixels, whole[:, :, n_ctx_pix:], rtol=0, atol=1e-6)
    assert res.pixel_fps > 0
    # Without context the first latent frame decodes to one pixel frame.
    res0 = rollout_decoded(dit, ae, None, 3, **kw)
    with torch.no_grad():
        whole0 = ae.decode(ae.denormalize(rollout(dit, None, 3, **kw))).clamp(-1, 1)
    assert res0.pixel_frames == 9
    torch.testing.assert_close(res0.pixels, whole0, rtol=0, atol=1e-6)


def test_fast_path_is_off_on_cpu_and_exact() -> None:
    """The compile switch is CUDA-only: on CPU the eager module runs and results are equal
    (compiling on CPU, even with backend="eager", takes > 25 s here: not tested)."""
    dit = _dit(torch.float32)
    assert fast_denoiser(dit, torch.device("cpu")) is dit
    assert fast_denoiser(dit, torch.device("cuda"), mode=None) is dit
    ctx = torch.randn(1, 4, 2, 4, 4)
    noise = torch.randn(1, 4, 3, 4, 4)
    kw = dict(noise=noise, num_steps=2, window=2, decode=False)
    fast = rollout_decoded(dit, None, ctx, 3, compile_mode="reduce-overhead", **kw)
    eager = rollout_decoded(dit, None, ctx, 3, **kw)
    assert not fast.extras["compiled"] and fast.pixels is None
    assert torch.equal(fast.latents, eager.latents)
