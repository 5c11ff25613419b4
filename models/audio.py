"""Audio as a control signal: a per-pixel-frame log-mel front end and the DiT's audio
cross-attention.

Audio enters the world model like camera or actions: one feature vector per *pixel frame*,
grouped causally into latent frames (see ``models/conditioning.py``). The data pipeline hands
raw samples to :class:`LogMelFrames` on the device (cheap, no parameters) and the DiT gets its
features ``[B, T_pix, n_mels]``; ``DiTArgs.audio_mode`` then chooses how they condition:

* ``"modulation"``: ``ConditionEmbedder`` embeds them per pixel frame and mean-pools them into
  the per-latent-frame conditioning vector, like camera;
* ``"cross_attn"``: :class:`AudioCrossAttention` layers (every ``audio_every`` blocks) let the
  video tokens of latent frame i attend to the audio tokens of pixel frames <= i's last one.

Both are causal in time (latent frame i never sees later audio), so cached rollouts work, and
both start as the identity when their output layers are zero (adding audio to a pretrained
model changes nothing until it is trained).

    >>> mel = LogMelFrames(sample_rate=16000, n_mels=32)
    >>> feats, valid = mel(torch.randn(2, 16000), None, num_frames=17)  # [2, 17, 32], [2, 17]
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from worldline.models.attention import CrossAttentionProjections, attention

__all__ = ["LogMelFrames", "mel_filterbank", "AudioCrossAttention", "audio_pixel_positions",
           "audio_cross_attn", "LOG_MEL_OFFSET", "LOG_MEL_SCALE"]

# Fixed affine normalisation of log(eps + mel power): (log_mel - OFFSET) / SCALE. Measured on
# the front end's own output at 16 kHz, 32 mels (power normalised by the window energy, so the
# level does not depend on n_fft): digital silence gives log(1e-5) = -11.5 -> -1.9; white
# noise at -40 dBFS -> -1.7 .. -0.4, at -20 dBFS -> -0.5 .. +0.7; a full-scale 1 kHz tone's
# band +2.1. Real signals land within about +-2 of 0, like the other (unit-scale) controls.
LOG_MEL_EPS = 1e-5
LOG_MEL_OFFSET = -4.0
LOG_MEL_SCALE = 4.0


def _hz_to_mel(f: Tensor | float) -> Tensor:
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def _mel_to_hz(m: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, sample_rate: int, n_mels: int, f_min: float,
                   f_max: float) -> Tensor:
    """Triangular HTK-mel filters [n_freqs, n_mels] (peak 1, no area normalisation) over the
    rfft bins 0 .. sample_rate / 2. Written out here rather than taken from torchaudio, whose
    releases are locked to one torch version; this is torchaudio's ``melscale_fbanks`` with
    ``norm=None, mel_scale="htk"``."""
    if not 0.0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got {f_min}, {f_max}")
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)
    edges = _mel_to_hz(torch.linspace(float(_hz_to_mel(f_min)), float(_hz_to_mel(f_max)),
                                      n_mels + 2, dtype=torch.float64))
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    up = (freqs[:, None] - lo) / (mid - lo)
    down = (hi - freqs[:, None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


class LogMelFrames(nn.Module):
    """Raw audio -> one normalised log-mel vector per pixel frame (no trainable parameters).

    Segmentation: the N samples are cut into ``num_frames`` (T) consecutive segments, segment
    i = samples ``[floor(i N / T), floor((i + 1) N / T))`` (lengths differ by at most one).
    Frame i's features come only from segment i (causal: frame i never sees later audio):

    1. the segment's first ``floor(N / T)`` samples (dropping the possible extra sample lets
       one batched ``torch.stft`` serve every segment), masked samples set to 0; a segment
       shorter than ``n_fft`` is repeated (circular padding, within the segment) to n_fft,
       which keeps its level, where zero padding would lower it;
    2. ``torch.stft`` (Hann window n_fft, hop n_fft / 4, no centring: every STFT frame lies
       inside the segment); power |X|^2 / sum(window^2), so white noise of variance s^2 has
       power s^2 per bin whatever n_fft;
    3. triangular mel filters, mean over the segment's STFT frames, ``log(LOG_MEL_EPS + x)``,
       then ``(x - LOG_MEL_OFFSET) / LOG_MEL_SCALE`` (fixed constants, see above).

    ``valid[b, i]``: at least half of segment i's samples are real (``mask`` True; no mask:
    all real). Invalid frames still get features (of the zeroed samples); the DiT replaces
    them by its learned null audio.

    Args:
        sample_rate: Hz. n_mels: mel bands. f_min, f_max: band edges in Hz (f_max None:
            sample_rate / 2). n_fft: STFT size (None: the power of two nearest 32 ms, 512 at
            16 kHz, so a 24 fps segment of 667 samples still holds two STFT frames).
    """

    def __init__(self, sample_rate: int = 16000, n_mels: int = 32, f_min: float = 0.0,
                 f_max: float | None = None, n_fft: int | None = None) -> None:
        super().__init__()
        self.sample_rate, self.n_mels = sample_rate, n_mels
        self.n_fft = n_fft or 2 ** round(math.log2(0.032 * sample_rate))
        self.hop = max(1, self.n_fft // 4)
        f_max = sample_rate / 2 if f_max is None else f_max
        # Non-persistent buffers: derived from the constructor arguments, so they follow the
        # module across devices without entering checkpoints.
        self.register_buffer("window", torch.hann_window(self.n_fft, periodic=True),
                             persistent=False)
        self.register_buffer("fbank", mel_filterbank(self.n_fft // 2 + 1, sample_rate, n_mels,
                                                     f_min, f_max), persistent=False)

    def segment_bounds(self, num_samples: int, num_frames: int) -> Tensor:
        """[T + 1] long: segment i is samples [bounds[i], bounds[i + 1])."""
        return torch.arange(num_frames + 1, dtype=torch.long) * num_samples // num_frames

    def forward(self, audio: Tensor, mask: Tensor | None, num_frames: int
                ) -> tuple[Tensor, Tensor]:
        """audio [B, N] float, mask [B, N] bool (True = real sample) or None ->
        (feats [B, num_frames, n_mels] float32, valid [B, num_frames] bool)."""
        b, n = audio.shape
        if num_frames < 1 or n < num_frames:
            raise ValueError(f"cannot split {n} samples into {num_frames} frames")
        dev = audio.device
        bounds = self.segment_bounds(n, num_frames).to(dev)
        x = audio.float()
        if mask is not None:
            x = x * mask.to(x.dtype)
        seg = n // num_frames
        # Sample index of every kept sample, per segment: [T, L]; circular within a short one.
        offs = torch.arange(max(seg, self.n_fft), device=dev) % seg
        x = x[:, bounds[:-1, None] + offs]                           # [B, T, L]
        spec = torch.stft(x.flatten(0, 1), self.n_fft, self.hop, window=self.window,
                          center=False, return_complex=True)         # [B*T, F, n_stft]
        power = spec.abs().square() / self.window.square().sum()
        mel = torch.einsum("bfs,fm->bm", power, self.fbank) / power.shape[-1]
        feats = (torch.log(LOG_MEL_EPS + mel) - LOG_MEL_OFFSET) / LOG_MEL_SCALE
        if mask is None:
            valid = torch.ones(b, num_frames, dtype=torch.bool, device=dev)
        else:
            real = torch.nn.functional.pad(mask.long().cumsum(1), (1, 0))[:, bounds]
            valid = 2 * (real[:, 1:] - real[:, :-1]) >= (bounds[1:] - bounds[:-1])
        return feats.view(b, num_frames, self.n_mels), valid


# ---------------------------------------------------------------------------------------------
# Audio cross-attention (DiTArgs.audio_mode = "cross_attn")
# ---------------------------------------------------------------------------------------------
def audio_cross_attn(mode: str) -> bool:
    """Whether DiTArgs.audio_mode selects cross-attention (else modulation); checks it."""
    if mode not in ("modulation", "cross_attn"):
        raise ValueError(f"audio_mode must be 'modulation' or 'cross_attn', got {mode!r}")
    return mode == "cross_attn"


def audio_pixel_positions(num_rows: int, frame_start: int, tf: int, past: int = 0,
                          device=None) -> Tensor:
    """Absolute pixel-frame index of each of ``num_rows`` audio rows: the rows of this call's
    latent frames from ``frame_start`` on (pixel frame 0 first when frame_start = 0, else
    1 + (frame_start - 1) * tf), preceded by ``past`` rows of earlier pixel frames."""
    first = 0 if frame_start == 0 else 1 + (frame_start - 1) * tf
    return torch.arange(num_rows, device=device) + (first - past)


def _rope_1d(pos: Tensor, head_dim: int, theta: float) -> Tensor:
    """Rotation factors exp(i pos w) [len(pos), head_dim / 2] (complex64), RoPE frequencies."""
    inv = theta ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float64)
                    / head_dim)
    ang = torch.outer(pos.double(), inv)
    return torch.polar(torch.ones_like(ang), ang).to(torch.complex64)


def _rotate(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate consecutive pairs of x [B, H, N, Dh] by rot [N, Dh / 2] in fp32 (as
    dit.apply_rope, which this module cannot import: dit.py imports it)."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


class _AudioAttnLayer(CrossAttentionProjections):
    """Pre-norm cross-attention of video tokens to audio tokens; ``proj`` starts at zero."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__(dim, num_heads, qk_norm)
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # no random init: the draws stay in order

    def forward(self, x: Tensor, ctx: "AudioContext") -> Tensor:
        """x [B, N, D] video tokens -> update [B, N, D] (add it to x)."""
        b, n, d = x.shape
        q = self.q(self.norm(x)).view(b, n, self.num_heads, -1).transpose(1, 2)
        k, v = self.kv(ctx.tokens.to(q.dtype)).view(b, -1, 2, self.num_heads, d // self.num_heads
                                                    ).permute(2, 0, 3, 1, 4)
        # Norm and rotation in fp32, one cast back (as the DiT's self-attention).
        q = _rotate(self.q_norm(q.float()), ctx.q_rot).to(v.dtype)
        k = _rotate(self.k_norm(k.float()), ctx.k_rot).to(v.dtype)
        out = attention(q, k, v, attn_mask=ctx.mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class AudioContext:
    """What every audio layer of one DiT forward shares: audio tokens [B, L, D], the causal
    mask [N, L] (True = attend), the rotations of queries [N, Dh/2] and keys [L, Dh/2], and
    the number of video tokens (reference tokens after them are left alone)."""

    def __init__(self, tokens: Tensor, mask: Tensor, q_rot: Tensor, k_rot: Tensor,
                 n_video: int) -> None:
        self.tokens, self.mask, self.q_rot, self.k_rot = tokens, mask, q_rot, k_rot
        self.n_video = n_video


class AudioCrossAttention(nn.Module):
    """Audio cross-attention for VideoDiT: after block i (i % every == 0), video tokens attend
    to per-pixel-frame audio tokens, block-causally in time.

    Audio tokens: ``embed(features)`` per pixel frame (a learned null token for invalid or
    dropped frames; no audio at all = one null token). Video tokens of token frame j (latent
    frames up to L_j) see the audio of pixel frames <= L_j * tf, the last pixel frame of L_j
    (the causal autoencoder's grouping), so no frame hears the future and a cached rollout
    gives the same result as a full forward, given the audio of the frames in its cache
    (``past`` rows). Relative time enters through a 1D RoPE over absolute pixel-frame
    positions (queries sit at their last pixel frame), so "how long ago" is what the layer
    sees, at any position in a rollout. Output projections start at zero: identity at init.
    """

    def __init__(self, dim: int, audio_dim: int, num_heads: int, depth: int, every: int,
                 qk_norm: bool = True, theta: float = 10000.0) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"audio_every must be >= 1, got {every}")
        self.every, self.head_dim, self.theta = every, dim // num_heads, theta
        self.embed = nn.Sequential(nn.Linear(audio_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.null = nn.Parameter(torch.zeros(dim))
        self.layers = nn.ModuleList(_AudioAttnLayer(dim, num_heads, qk_norm)
                                    for _ in range(math.ceil(depth / every)))

    @torch.no_grad()
    def init_custom(self) -> None:
        """On top of the owner's xavier linears / reset norms: null token N(0, 0.02), output
        projections zero (the layers start as the identity)."""
        nn.init.normal_(self.null, std=0.02)
        for layer in self.layers:
            nn.init.zeros_(layer.proj.weight)
            nn.init.zeros_(layer.proj.bias)

    def context(self, audio: Tensor | None, valid: Tensor | None, drop: Tensor | None,
                batch: int, grid: tuple[int, int, int], frame_start: int, pt: int, tf: int,
                past: int = 0) -> AudioContext:
        """Tokens, mask and rotations for video tokens on ``grid`` (t-major, frames from
        latent frame ``frame_start``, p_t latent frames per token frame); audio [B, R, A]
        with R = past + this call's pixel-frame rows, valid [B, R] bool, drop [B] bool."""
        dev = self.null.device
        if audio is None:  # one null token at pixel frame 0: every query sees it
            tokens = self.null.view(1, 1, -1).expand(batch, 1, -1)
            kpos = torch.zeros(1, dtype=torch.long, device=dev)
        else:
            n_lat = grid[0] * pt
            want = past + (n_lat * tf if frame_start > 0 else 1 + (n_lat - 1) * tf)
            if audio.shape[1] != want:
                raise ValueError(f"audio has {audio.shape[1]} pixel-frame rows, {n_lat} latent "
                                 f"frames from {frame_start} with {past} past rows need {want}")
            tokens = self.embed(audio.to(self.null.dtype))
            keep = torch.ones(tokens.shape[:2], dtype=torch.bool, device=dev)
            if valid is not None:
                keep = keep & valid.bool()
            if drop is not None:
                keep = keep & ~drop.bool().view(-1, 1)
            tokens = torch.where(keep[..., None], tokens, self.null)
            kpos = audio_pixel_positions(audio.shape[1], frame_start, tf, past, dev)
        gt, gh, gw = grid
        # Last pixel frame of each token frame's last latent frame: latent frame l ends at l*tf.
        qpos = (frame_start + (torch.arange(gt, device=dev) + 1) * pt - 1) * tf
        mask = (kpos[None, :] <= qpos[:, None]).repeat_interleave(gh * gw, dim=0)
        q_rot = _rope_1d(qpos, self.head_dim, self.theta).repeat_interleave(gh * gw, dim=0)
        k_rot = _rope_1d(kpos, self.head_dim, self.theta)
        return AudioContext(tokens, mask, q_rot, k_rot, gt * gh * gw)

    def forward(self, block: int, h: Tensor, ctx: AudioContext) -> Tensor:
        """h [B, N (+ refs), D] after block ``block`` -> h plus audio attention on its video
        tokens when that block has an audio layer, else h itself."""
        if block % self.every:
            return h
        n = ctx.n_video
        upd = self.layers[block // self.every](h[:, :n], ctx)
        if n == h.shape[1]:
            return h + upd
        return torch.cat([h[:, :n] + upd, h[:, n:]], dim=1)

    def flops(self, n_video: int, n_audio: int) -> float:
        """Training FLOPs (fwd + bwd) for n_video tokens attending n_audio pixel-frame tokens,
        in VideoDiT.flops_per_sample's convention: 6 per weight per token (q/proj per video
        token, the embedder and k/v per audio token) + 12 D N L per layer for attention."""

        def w(*mods: nn.Module) -> int:
            return sum(m.weight.numel() for mod in mods for m in mod.modules()
                       if isinstance(m, nn.Linear))

        per_video = sum(w(layer.q, layer.proj) for layer in self.layers)
        per_audio = w(self.embed) + sum(w(layer.kv) for layer in self.layers)
        d = self.null.numel()
        return float(6 * (per_video * n_video + per_audio * n_audio)
                     + 12 * len(self.layers) * d * n_video * n_audio)
