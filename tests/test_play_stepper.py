"""The stepwise rollout behind ``worldline-play`` (models/stepper.py): bitwise the cached
``rollout`` when fed the same noise and controls, guidance switchable mid-session, and a
streamed decode equal to the whole-video decode (~3 s)."""
from __future__ import annotations

import torch

from _models import perturb_zero_init
from worldline.models.autoencoder import AutoencoderArgs, VideoAutoencoder
from worldline.models.dit import DiTArgs, VideoDiT
from worldline.models.rollout import rollout
from worldline.models.stepper import RolloutStepper, StreamDecoder

ARGS = DiTArgs(in_channels=4, hidden_size=64, depth=2, num_heads=4, text_dim=16,
               num_action_slots=2, num_actions=5, camera_dim=2, mask_channel=True,
               frame_causal=True, temporal_downsample=4)


def _dit() -> VideoDiT:
    torch.manual_seed(0)
    dit = VideoDiT(ARGS).eval()
    perturb_zero_init(dit)
    return dit


def test_stepper_equals_rollout_bitwise() -> None:
    dit = _dit()
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 4, 2, 4, 4, generator=g)
    n, tf = 5, 4
    noise = torch.randn(1, 4, n, 4, 4, generator=g)
    acts = torch.randint(0, 5, (1, 1 + (2 + n - 1) * tf, 2), generator=g)
    cam = torch.randn(1, 1 + (2 + n - 1) * tf, 2, generator=g)
    text = torch.randn(1, 3, 16, generator=g)
    mask = torch.ones(1, 3, dtype=torch.bool)
    null = torch.randn(16, generator=g)
    kw = dict(text=text, text_mask=mask, null_text=null, window=3, num_steps=3, shift=1.5,
              text_scale=2.0, action_scale=1.5)
    want = rollout(dit, ctx, n, actions=acts, camera=cam, noise=noise, **kw)
    n_ctx = 1 + tf  # rows of the two context frames
    st = RolloutStepper(dit, ctx, context_actions=acts[:, :n_ctx], context_camera=cam[:, :n_ctx],
                        **kw)
    got = []
    for i in range(n):
        lo = n_ctx + i * tf
        got.append(st.step(noise[:, :, i:i + 1], acts[:, lo:lo + tf], cam[:, lo:lo + tf]))
    assert torch.equal(torch.cat(got, 2), want)
    assert st.next_frame == 2 + n


def test_guidance_switch_rebuilds_the_cache() -> None:
    dit = _dit()
    ctx = torch.randn(1, 4, 1, 4, 4)
    st = RolloutStepper(dit, ctx, window=2, num_steps=2,
                        context_actions=torch.zeros(1, 1, 2, dtype=torch.long))
    a = torch.ones(1, 4, 2, dtype=torch.long)
    z1 = st.step(torch.randn(1, 4, 1, 4, 4), a)
    st.action_scale = 3.0  # 1 -> 3 batch branches: the cache is rebuilt from kept frames
    z2 = st.step(torch.randn(1, 4, 1, 4, 4), a)
    st.action_scale, st.num_steps = 1.0, 1
    z3 = st.step(torch.randn(1, 4, 1, 4, 4), a)
    assert all(torch.isfinite(z).all() for z in (z1, z2, z3))
    assert st.next_frame == 4 and st.cache.num_frames == 2  # window kept


def test_stream_decoder_matches_whole_decode() -> None:
    torch.manual_seed(0)
    ae = VideoAutoencoder(AutoencoderArgs(latent_channels=4, base_channels=8,
                                          channel_mult=(1, 2, 2), num_res_blocks=1,
                                          temporal_downsample=4, spatial_downsample=4)).eval()
    z = torch.randn(1, 4, 3, 4, 4)
    with torch.no_grad():
        whole = ae.decode(ae.denormalize(z)).clamp(-1, 1)
    dec = StreamDecoder(ae)
    parts = [dec(z[:, :, i:i + 1]) for i in range(3)]
    assert [p.shape[2] for p in parts] == [1, 4, 4]
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=0, atol=1e-5)
    dec.reset()
    torch.testing.assert_close(dec(z[:, :, :1]), whole[:, :, :1], rtol=0, atol=1e-5)
