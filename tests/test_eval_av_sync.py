"""The audio–visual sync metric (models/av_sync.py) on synthetic clips where the truth is
known: motion exactly on the audio bursts, motion two frames late, unrelated motion, silence
and still video, masked audio; and the ``av_sync`` eval group on batch dicts (< 5 s)."""
from __future__ import annotations

import math

import pytest
import torch

from worldline.models.av_sync import av_sync, av_sync_metrics, motion_energy, onset_envelope

B, T, SPF = 12, 24, 80  # clips, frames, audio samples per frame


def _bursts(g: torch.Generator, b: int = B, t: int = T) -> torch.Tensor:
    """[b, t] bool: frames with a sound event (about a third of them). Every clip has one at
    mid-clip, structure shared by all clips: unrelated pairs then correlate a little above 0
    (~0.08), which the shuffled baseline measures and a fixed zero baseline would miss."""
    on = torch.rand(b, t, generator=g) < 0.35
    on[:, t // 2] = True
    return on


def _audio(on: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """[b, t * SPF] samples: loud noise on burst frames, faint noise (-80 dBFS) elsewhere."""
    amp = torch.where(on, 0.5, 1e-4).repeat_interleave(SPF, dim=1)
    return amp * torch.randn(amp.shape, generator=g)


def _video(moves: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """[b, 3, t, 8, 8] in [-1, 1]: a new random image on every frame where ``moves`` is set
    (frame 0 always has one), the previous image held elsewhere."""
    b, t = moves.shape
    frames = []
    cur = torch.rand(b, 3, 8, 8, generator=g) * 2 - 1
    for i in range(t):
        new = torch.rand(b, 3, 8, 8, generator=g) * 2 - 1
        cur = torch.where(moves[:, i, None, None, None], new, cur)
        frames.append(cur)
    return torch.stack(frames, dim=2)


def _lagged(on: torch.Tensor, lag: int) -> torch.Tensor:
    """Motion ``lag`` frames after each burst (no wrap-around)."""
    out = torch.zeros_like(on)
    out[:, lag:] = on[:, : on.shape[1] - lag]
    return out


def test_envelope_follows_the_frame_segments() -> None:
    """Segment i is samples [floor(i*N/T), floor((i+1)*N/T)), N not a multiple of T; an empty
    segment (N < T) is silence, not NaN."""
    g = torch.Generator().manual_seed(0)
    n, t = 103, 7
    audio = torch.randn(2, n, generator=g) * 0.3
    env = onset_envelope(audio, t)
    for i in range(t):
        seg = audio[:, i * n // t:(i + 1) * n // t].double()
        rms = seg.square().mean(1).sqrt()
        assert torch.allclose(env[:, i].double(), torch.log1p(rms / 1e-3), atol=1e-5)
    short = onset_envelope(torch.ones(1, 3), 5)  # 3 samples over 5 frames: two empty frames
    assert torch.isfinite(short).all() and (short == 0).sum() == 2
    assert onset_envelope(torch.zeros(1, 50), 5).abs().max() == 0  # digital silence


def test_masked_audio_counts_as_silence() -> None:
    g = torch.Generator().manual_seed(1)
    audio = torch.randn(2, 400, generator=g) * 0.5
    mask = torch.ones(2, 400, dtype=torch.bool)
    mask[:, 200:] = False
    masked = onset_envelope(audio, 8, mask)
    zeroed = onset_envelope(torch.cat([audio[:, :200], torch.zeros(2, 200)], 1), 8)
    assert torch.equal(masked, zeroed)
    assert masked[:, 4:].abs().max() == 0 and masked[:, :4].min() > 5  # loud, then silent
    assert onset_envelope(audio, 8)[:, 4:].min() > 5  # without the mask the end is loud


def test_motion_energy_of_float_and_uint8_video() -> None:
    v = torch.zeros(1, 3, 4, 2, 2)
    v[:, :, 2:] = 1.0  # a jump of 1 between frames 1 and 2
    assert motion_energy(v).tolist() == [[0.0, 0.0, 1.0, 0.0]]
    v[:, :, 1] = 0.5  # now 0 -> 0.5 -> 1 -> 1: frame 0 copies frame 1's motion
    assert motion_energy(v).tolist() == [[0.5, 0.5, 0.5, 0.0]]
    u8 = torch.zeros(1, 3, 3, 2, 2, dtype=torch.uint8)
    u8[:, :, 2] = 255
    assert motion_energy(u8)[0].tolist() == pytest.approx([0.0, 0.0, 2.0])
    assert motion_energy(v[:, :, :1]).tolist() == [[0.0]]


def test_motion_on_the_audio_bursts_scores_high_above_the_noise_floor() -> None:
    g = torch.Generator().manual_seed(2)
    on = _bursts(g)
    env, mot = onset_envelope(_audio(on, g), T), motion_energy(_video(on, g))
    r = av_sync(env, mot, generator=torch.Generator().manual_seed(0))
    assert r["av_sync/score_lag0"] > 0.9 and r["av_sync/best_lag"] == 0
    assert r["av_sync/score_best"] == pytest.approx(r["av_sync/score_lag0"])
    assert abs(r["av_sync/score_shuffled"]) < 0.2
    assert 0 < r["av_sync/noise_floor"] < 0.1
    assert r["av_sync/margin"] > 10 * r["av_sync/noise_floor"]
    assert r["av_sync/num_clips"] == B
    # The same generator seed gives the same baseline (a reproducible report).
    assert av_sync(env, mot, generator=torch.Generator().manual_seed(0)) == r


def test_motion_two_frames_late_is_found_at_lag_two() -> None:
    g = torch.Generator().manual_seed(3)
    on = _bursts(g)
    env = onset_envelope(_audio(on, g), T)
    late = av_sync(env, motion_energy(_video(_lagged(on, 2), g)),
                   generator=torch.Generator().manual_seed(0))
    assert late["av_sync/best_lag"] == 2
    assert late["av_sync/score_best"] > 0.8 > 0.3 > late["av_sync/score_lag0"]
    # Motion two frames early: negative lag.
    early = av_sync(env, motion_energy(_video(torch.roll(on, -2, 1), g)),
                    generator=torch.Generator().manual_seed(0))
    assert early["av_sync/best_lag"] == -2
    # A lag beyond max_lag is not searched.
    assert av_sync(env, motion_energy(_video(_lagged(on, 2), g)), max_lag=1,
                   generator=torch.Generator().manual_seed(0))["av_sync/best_lag"] != 2


def test_unrelated_motion_stays_within_the_noise_floor() -> None:
    """Independent bursts in audio and video: the margin over the shuffled baseline is chance,
    within a few noise floors (for every one of several seeds)."""
    for seed in range(4):
        g = torch.Generator().manual_seed(10 + seed)
        env = onset_envelope(_audio(_bursts(g, 24), g), T)
        mot = motion_energy(_video(_bursts(g, 24), g))
        r = av_sync(env, mot, generator=torch.Generator().manual_seed(seed), num_shuffles=32)
        assert abs(r["av_sync/score_lag0"]) < 0.15
        assert r["av_sync/noise_floor"] > 0
        assert abs(r["av_sync/margin"]) < 4 * r["av_sync/noise_floor"], (seed, r)


def test_constant_inputs_give_zero_not_nan() -> None:
    silent = onset_envelope(torch.zeros(3, T * SPF), T)
    hum = onset_envelope(torch.full((3, T * SPF), 0.1), T)  # constant level, float residues
    still = motion_energy(torch.zeros(3, 3, T, 4, 4))
    moving = motion_energy(_video(_bursts(torch.Generator().manual_seed(4), 3), torch.Generator()))
    for env, mot in ((silent, still), (silent, moving), (hum, moving), (onset_envelope(
            _audio(_bursts(torch.Generator().manual_seed(5), 3), torch.Generator()), T), still)):
        r = av_sync(env, mot, generator=torch.Generator().manual_seed(0))
        assert all(math.isfinite(v) for v in r.values()), r
        assert r["av_sync/score_lag0"] == 0 and r["av_sync/score_best"] == 0
        assert r["av_sync/best_lag"] == 0 and r["av_sync/noise_floor"] == 0
    # A level that wobbles by one float32 ulp (rounding, not a signal) is constant too: the
    # same wobble in both curves must not read as perfect sync.
    wobble = torch.full((3, T), 2.0)
    wobble[:, ::3] = torch.nextafter(torch.tensor(2.0), torch.tensor(3.0))
    r = av_sync(wobble, wobble * 0.01, generator=torch.Generator().manual_seed(0))
    assert r["av_sync/score_lag0"] == 0 and r["av_sync/score_best"] == 0


@pytest.mark.parametrize("b", [1, 2])
def test_small_batches_use_time_shifts_for_the_baseline(b: int) -> None:
    g = torch.Generator().manual_seed(6)
    on = _bursts(g, b, 48)
    env, mot = onset_envelope(_audio(on, g), 48), motion_energy(_video(on, g))
    r = av_sync(env, mot, generator=torch.Generator().manual_seed(0), num_shuffles=16)
    assert r["av_sync/score_lag0"] > 0.9
    assert r["av_sync/noise_floor"] > 0  # shifts differ between draws (a derangement of 2 not)
    assert r["av_sync/margin"] > 3 * r["av_sync/noise_floor"]


def test_eval_group_scores_generated_and_real_clips_or_says_it_skipped() -> None:
    g = torch.Generator().manual_seed(7)
    on = _bursts(g, 6)
    real = _video(on, g)
    generated = _video(_bursts(g, 6), g)  # a model that ignores the audio
    batch = {"audio": _audio(on, g), "audio_mask": torch.ones(6, T * SPF, dtype=torch.bool)}
    rep = av_sync_metrics(batch, generated, real)
    assert rep["av_sync_real/score_lag0"] > 0.9 and rep["av_sync_real/best_lag"] == 0
    assert rep["av_sync/score_lag0"] < 0.5 < rep["av_sync_real/margin"]
    assert {k.split("/", 1)[1] for k in rep if k.startswith("av_sync/")} == {
        "score_lag0", "best_lag", "score_best", "score_shuffled", "margin", "noise_floor",
        "num_clips"}
    # Masking the whole track out: silence, so no sync at all.
    silent = av_sync_metrics({**batch, "audio_mask": torch.zeros_like(batch["audio_mask"])},
                             generated, real)
    assert silent["av_sync_real/score_lag0"] == 0
    skipped = av_sync_metrics({"caption": ["a"] * 6}, None, real)
    assert list(skipped) == ["av_sync/skipped"] and "no audio" in skipped["av_sync/skipped"]


def test_eval_clips_pad_audio_of_different_lengths() -> None:
    """The evaluator's clip gathering (``first_clips`` over loader batches) keeps audio whose
    length differs between batches (right-padded, mask False on the padding)."""
    from worldline.data.batch import Batch
    from worldline.train.inference import first_clips

    def batch(keys: list[str], n: int) -> Batch:
        b = len(keys)
        return Batch(key=keys, caption=keys, style=[[]] * b, epoch=[0] * b,
                     actions=torch.zeros(b, 4, 0, dtype=torch.long), camera=torch.zeros(b, 4, 2),
                     clip_shape=(4, 8, 8), video=torch.zeros(b, 3, 4, 8, 8, dtype=torch.uint8),
                     audio=torch.ones(b, n), audio_mask=torch.ones(b, n, dtype=torch.bool))

    out = first_clips(iter([batch(["a", "b"], 5), batch(["c", "d"], 3)]), 3, torch.device("cpu"))
    assert out["caption"] == ["a", "b", "c"] and out["audio"].shape == (3, 5)
    assert out["audio_mask"].dtype == torch.bool
    assert out["audio_mask"][2].tolist() == [True, True, True, False, False]
    assert out["audio"][2].tolist() == [1, 1, 1, 0, 0]
