"""Audio–visual sync metric: does a video move when its (conditioning) audio sounds?

Pure tensor math, no I/O (issue 19, "Audio as a control signal"). Three steps:

    >>> env = onset_envelope(audio, num_frames=T, mask=audio_mask)   # [B, T] audio activity
    >>> mot = motion_energy(video)                                    # [B, T] visual activity
    >>> av_sync(env, mot)    # {"av_sync/score_lag0": ..., "av_sync/margin": ..., ...}

The score is a per-clip Pearson correlation between the two activity curves, so it is blind to
loudness and to how much a scene moves overall; only *when* things happen counts. It comes with
its own chance level (the same score with the audio of other clips, or shifted in time) and the
spread of that chance level (the noise floor): a margin of a few noise floors means sync, a
margin inside the noise floor means the video ignores the audio. The score of the real clips is
the reference a model should reach: real footage is not perfectly in sync either (off-screen
sounds, motion without sound).

``av_sync_metrics`` is the evaluation group (``eval.metrics: [av_sync]``) on a batch dict that
carries ``audio`` / ``audio_mask``; it says why it skipped when the batch has none.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["onset_envelope", "motion_energy", "av_sync", "av_sync_metrics"]

# -60 dBFS: the level below which audio counts as silence in the envelope's log compression.
SILENCE_RMS = 1e-3


def onset_envelope(audio: Tensor, num_frames: int, mask: Optional[Tensor] = None) -> Tensor:
    """Audio activity per video frame: [B, N] samples (float, full scale 1) -> [B, T].

    Frame i covers samples ``[floor(i*N/T), floor((i+1)*N/T))`` (equal segments; a segment can
    be empty when N < T, and then reads as silence). Its value is the log-compressed RMS
    ``log(1 + rms / SILENCE_RMS)``: ~0 for silence (and exactly 0 for digital silence), about
    ln(1000) ~ 6.9 at full scale. The energy itself rather than its positive difference (a
    pure onset) because the motion curve it is compared with is also "activity during frame
    i", not "start of activity": an impact sound that lasts three frames goes with motion
    over those frames. The log keeps one loud event from drowning the rest of the clip.

    Masked-out samples (``mask`` False: padding, missing audio) count as silence: they are
    zeroed and still count in their segment's length, so a half-masked frame is quieter.
    """
    n = audio.shape[1]
    x = audio.double()
    if mask is not None:
        x = x * mask.to(x.device, torch.bool)
    # Cumulative energy with a leading 0: a segment's energy is a difference of two entries.
    cum = torch.nn.functional.pad(x.square().cumsum(1), (1, 0))
    edges = torch.arange(num_frames + 1, device=x.device) * n // num_frames  # floor(i*N/T)
    energy = cum[:, edges[1:]] - cum[:, edges[:-1]]
    length = (edges[1:] - edges[:-1]).clamp_min(1).to(x.dtype)
    rms = (energy.clamp_min(0) / length).sqrt()
    return torch.log1p(rms / SILENCE_RMS).float()


def motion_energy(video: Tensor) -> Tensor:
    """Visual activity per frame: [B, 3, T, H, W] in [-1, 1] (or uint8) -> [B, T].

    Frame t (t >= 1) gets the mean absolute difference between frames t and t-1 (in [-1, 1]
    units): the motion that arrives at frame t. Frame 0 has no predecessor and takes frame 1's
    value, so it neither reads as a still frame (a spurious dip next to a loud first frame)
    nor adds a new value to the correlation. One frame: zeros."""
    v = video.float() / 127.5 - 1 if video.dtype == torch.uint8 else video.float()
    b, _, t = v.shape[:3]
    if t < 2:
        return v.new_zeros(b, t)
    diff = (v[:, :, 1:] - v[:, :, :-1]).abs().mean(dim=(1, 3, 4))  # [B, T-1]
    return torch.cat([diff[:, :1], diff], dim=1)


def _corr(a: Tensor, m: Tensor) -> Tensor:
    """Pearson correlation along the last dim, [..., L] x [..., L] -> [...]; 0 where either
    side is constant to float32 precision (a silent clip, a still video) or L < 2, never
    NaN."""
    a, m = a.double(), m.double()
    ac, mc = a - a.mean(-1, keepdim=True), m - m.mean(-1, keepdim=True)
    na, nm = ac.norm(dim=-1), mc.norm(dim=-1)
    # "Constant" up to float32 resolution: a level that wobbles by an ulp or two (rounding in
    # the envelope's or the motion's arithmetic) would otherwise correlate at +-1 with
    # anything that wobbles alike. A spread under 1e-6 of the curve's peak is no signal.
    tiny = 1e-6 * (a.abs().amax(-1) * a.shape[-1] ** 0.5 + 1e-30)
    tinm = 1e-6 * (m.abs().amax(-1) * m.shape[-1] ** 0.5 + 1e-30)
    ok = (na > tiny) & (nm > tinm) & (a.shape[-1] >= 2)
    r = (ac * mc).sum(-1) / (na * nm).clamp_min(1e-300)
    return torch.where(ok, r, torch.zeros_like(r))


def _lagged(a: Tensor, m: Tensor, lag: int) -> Tensor:
    """Per-clip correlation of a[t] with m[t + lag] over the frames where both exist: [B]."""
    t = a.shape[-1]
    if lag >= 0:
        return _corr(a[:, : t - lag], m[:, lag:])
    return _corr(a[:, -lag:], m[:, : t + lag])


def _derangement(n: int, generator: Optional[torch.Generator]) -> Tensor:
    """A uniformly random permutation of range(n) without fixed points (n >= 2)."""
    while True:
        p = torch.randperm(n, generator=generator)
        if not (p == torch.arange(n)).any():
            return p


def av_sync(audio_env: Tensor, motion: Tensor, max_lag: int = 4,
            generator: Optional[torch.Generator] = None,
            num_shuffles: int = 8) -> dict[str, float]:
    """Sync of motion with audio: [B, T] envelope and [B, T] motion -> report dict.

    * ``av_sync/score_lag0``: mean over clips of the correlation at lag 0.
    * ``av_sync/best_lag``, ``av_sync/score_best``: the lag in [-max_lag, max_lag] (positive:
      motion follows the audio by that many frames) with the highest batch-mean correlation,
      and that correlation (ties go to the lag nearest 0).
    * ``av_sync/score_shuffled``: the chance level, the lag-0 score with every clip's audio
      paired with another clip's motion (a random derangement of the batch), averaged over
      ``num_shuffles`` draws from ``generator``. With fewer than 3 clips there are too few
      pairings (2 clips have a single derangement, so no spread) and each clip's audio is
      circularly shifted in time instead, by a random shift past ``max_lag`` where T allows.
    * ``av_sync/noise_floor``: the standard deviation of those shuffled scores (population
      std; 0 with one shuffle). ``av_sync/margin`` = score_lag0 - score_shuffled.
    * ``av_sync/num_clips``: B (a count: summed over ranks by the evaluator).

    Constant curves (silence, a still video) correlate 0 with everything, never NaN.
    """
    if audio_env.shape != motion.shape or audio_env.dim() != 2:
        raise ValueError(f"av_sync: want two [B, T] tensors, got {tuple(audio_env.shape)} "
                         f"and {tuple(motion.shape)}")
    b, t = audio_env.shape
    a, m = audio_env.detach().cpu(), motion.detach().cpu()
    max_lag = max(0, min(max_lag, t - 2))
    lags = list(range(-max_lag, max_lag + 1))
    per_lag = torch.stack([_lagged(a, m, k).mean() for k in lags])  # [L]
    # Highest score, ties to the smallest |lag|: scan lags ordered by |lag| (0, -1, 1, ...).
    order = sorted(range(len(lags)), key=lambda i: (abs(lags[i]), lags[i]))
    best = max(order, key=lambda i: float(per_lag[i]))
    lag0 = float(per_lag[lags.index(0)])
    shuffled = []
    for _ in range(max(1, num_shuffles)):
        if b >= 3:
            other = a[_derangement(b, generator)]
        else:
            lo, hi = (max_lag + 1, t - max_lag - 1) if t > 2 * max_lag + 2 else (1, t - 1)
            shifts = torch.randint(lo, max(hi, lo) + 1, (b,), generator=generator)
            other = torch.stack([a[i].roll(int(s)) for i, s in enumerate(shifts)])
        shuffled.append(float(_corr(other, m).mean()))
    sh = torch.tensor(shuffled, dtype=torch.float64)
    return {"av_sync/score_lag0": lag0,
            "av_sync/best_lag": float(lags[best]),
            "av_sync/score_best": float(per_lag[best]),
            "av_sync/score_shuffled": float(sh.mean()),
            "av_sync/margin": lag0 - float(sh.mean()),
            "av_sync/noise_floor": float(sh.std(correction=0)),
            "av_sync/num_clips": float(b)}


def av_sync_metrics(batch: dict[str, Any], generated: Optional[Tensor], real: Tensor,
                    seed: int = 0, max_lag: int = 4, num_shuffles: int = 8) -> dict[str, Any]:
    """The ``av_sync`` eval group: ``av_sync/*`` for the generated videos, ``av_sync_real/*``
    for the ground-truth clips (the score real data reaches), both against the batch's
    ``audio`` [B, N] (``audio_mask`` [B, N] bool optional). The same seed draws the same
    shuffles for both. Without audio in the batch: ``{"av_sync/skipped": reason}`` (then
    ``generated`` may be None: the caller need not roll out just for this group)."""
    audio = batch.get("audio")
    if not torch.is_tensor(audio) or audio.dim() != 2 or audio.shape[0] != real.shape[0]:
        return {"av_sync/skipped": "the eval data has no audio (no batch['audio'] [B, N])"}
    mask = batch.get("audio_mask")
    mask = mask if torch.is_tensor(mask) else None
    if generated is None:
        raise ValueError("av_sync_metrics: the batch has audio but no generated videos came")
    out: dict[str, Any] = {}
    for prefix, video in (("av_sync", generated), ("av_sync_real", real)):
        env = onset_envelope(audio, video.shape[2], mask)
        gen = torch.Generator().manual_seed(seed)
        rep = av_sync(env, motion_energy(video), max_lag, gen, num_shuffles)
        out.update({k.replace("av_sync/", f"{prefix}/", 1): v for k, v in rep.items()})
    return out
