"""World-model rollout: autoregressive generation one latent frame at a time with a KV cache.

The DiT is trained with block-causal attention (`DiTArgs.frame_causal` / diffusion forcing),
so the keys and values of a clean past frame never change once that frame is generated. The
rollout therefore

1. prefills the cache with the context frames (and reference images) at flow time 0;
2. for each new frame, integrates the flow ODE on that frame's tokens only; every step
   attends to the cached K/V of the past (no recomputation of the past);
3. runs the finished frame once more at time 0 and appends its K/V to the cache;
4. keeps at most `window` recent past frames (references are never evicted), plus the first
   `sink` frames for good as an attention sink (StreamingLLM / Self-Forcing: a model trained
   on short clips always saw its first frames; evicting them shifts every attention row), so
   the per-frame cost is bounded however long the rollout runs. RoPE time positions keep
   increasing (frame index), which 3D RoPE handles at any size.

Classifier-free guidance runs the conditional, text-dropped and fully unconditional branches
as one batch of 3B, each with its own cache (their past K/V differ), and combines them with
separate text and action scales (`flow.guided_velocity`).

    >>> dit = VideoDiT(DiTArgs(hidden_size=64, depth=2, num_heads=4, text_dim=0,
    ...                        num_action_slots=1, camera_dim=0, frame_causal=True))
    >>> ctx = torch.randn(1, 4, 2, 8, 8)                        # 2 clean context frames
    >>> acts = torch.zeros(1, 1 + (2 + 6 - 1) * 4, 1, dtype=torch.long)
    >>> video = rollout(dit, ctx, 6, actions=acts, window=4, num_steps=4)   # [1, 4, 6, 8, 8]
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from worldline.models.dit import VideoDiT
from worldline.models.flow import guided_velocity, sampling_schedule
from worldline.models.kv_cache import KVBlock

__all__ = ["KVCache", "rollout"]

KV = list[tuple[Tensor, Tensor]]


class KVCache:
    """Per-block K/V of reference tokens (kept) and past video frames (the first ``sink``
    frames kept, then a rolling window of ``window`` recent ones), in preallocated
    :class:`~worldline.models.kv_cache.KVBlock` buffers (references first).

    Tensors are [B, H, N, Dh] with RoPE already applied at their absolute positions.
    """

    def __init__(self, window: int | None = None, sink: int = 0) -> None:
        if sink < 0:
            raise ValueError(f"sink frames must be >= 0, got {sink}")
        self.window, self.sink = window, sink
        self.blocks: list[KVBlock] | None = None
        self.ref_tokens = 0
        self.tokens_per_frame = 0
        self.next_frame = 0  # absolute latent-frame index of the next frame to generate

    @property
    def num_frames(self) -> int:
        """Past video frames currently held."""
        if self.blocks is None or not self.tokens_per_frame:
            return 0
        return (self.blocks[0].length - self.ref_tokens) // self.tokens_per_frame

    def past(self) -> list[KVBlock] | None:
        """Per block the cache (references, then the kept video frames); None when empty."""
        return self.blocks

    def append(self, kvs: KV, frames: int, tokens_per_frame: int, ref_tokens: int = 0) -> None:
        """Add the K/V of `frames` new frames (then `ref_tokens` reference tokens) per block."""
        self.tokens_per_frame = tokens_per_frame
        nv = frames * tokens_per_frame
        if self.blocks is None:
            self.blocks = [KVBlock() for _ in kvs]
        for blk, (k, v) in zip(self.blocks, kvs):
            if ref_tokens:  # only on the first append: references go first, for good
                blk.commit(k[:, :, nv:], v[:, :, nv:])
            blk.commit(k[:, :, :nv], v[:, :, :nv])
        self.ref_tokens += ref_tokens
        if self.window is not None and self.num_frames > self.window + self.sink:
            # The oldest frames after the sink go; the sink stays where it is.
            extra = (self.num_frames - self.window - self.sink) * tokens_per_frame
            for blk in self.blocks:
                blk.drop(self.ref_tokens + self.sink * tokens_per_frame, extra)
        self.next_frame += frames


def _controls(ctrl: Tensor | Callable[[int], Tensor] | None, start: int, frames: int, tf: int):
    """Pixel-frame controls of latent frames start..start+frames-1 from a whole-video tensor
    [B, T_pix, ...] (pixel frame 0 first) or a callable frame_index -> [B, n_pix, ...]."""
    if ctrl is None:
        return None
    if callable(ctrl):
        return torch.cat([ctrl(i) for i in range(start, start + frames)], dim=1)
    lo = 0 if start == 0 else 1 + (start - 1) * tf
    return ctrl[:, lo : 1 + (start + frames - 1) * tf]


def audio_kwargs(dit, audio, valid, start: int, frames: int, cached: int, tf: int) -> dict:
    """DiT audio kwargs for latent frames start..start+frames-1 (nothing when audio is None).

    Cross-attention (``audio_mode="cross_attn"``) also hears the audio of the ``cached``
    frames before ``start`` (the past that the KV cache holds), passed as ``audio_past``
    leading rows; modulation reads this call's rows only."""
    if audio is None:
        return {}
    if getattr(dit.args, "audio_mode", "modulation") != "cross_attn":
        cached = 0
    lo = start - cached

    def first_row(j: int) -> int:  # pixel-frame row where latent frame j's controls begin
        return 0 if j == 0 else 1 + (j - 1) * tf

    return dict(audio=_controls(audio, lo, cached + frames, tf),
                audio_past=first_row(start) - first_row(lo),
                audio_valid=None if valid is None else _controls(valid, lo, cached + frames, tf))


def _memo(fn: Callable[[int], Tensor] | Tensor | None):
    """A control callable that answers each frame index once (cross-attention re-reads the
    audio of cached frames; an interactive source must not be asked twice)."""
    if not callable(fn):
        return fn
    seen: dict[int, Tensor] = {}

    def get(i: int) -> Tensor:
        if i not in seen:
            seen[i] = fn(i)
        return seen[i]
    return get


@torch.no_grad()
def rollout(
    dit: VideoDiT,
    context: Tensor | None,
    num_frames: int,
    *,
    text: Tensor | None = None,
    text_mask: Tensor | None = None,
    null_text: Tensor | None = None,
    actions: Tensor | Callable[[int], Tensor] | None = None,
    camera: Tensor | Callable[[int], Tensor] | None = None,
    audio: Tensor | Callable[[int], Tensor] | None = None,
    audio_valid: Tensor | None = None,
    refs: Tensor | None = None,
    window: int | None = None,
    sink: int = 0,
    num_steps: int = 8,
    shift: float = 1.0,
    text_scale: float = 1.0,
    action_scale: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    noise: Tensor | None = None,
    on_frame: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Generate `num_frames` latent frames after `context`, one frame at a time (Euler).

    Args:
        dit: a VideoDiT trained with block-causal attention (p_t = 1 frames per block).
        context: clean latents [B, C, n0, h, w] to continue from (None: start from frame 0;
            then `noise` or `generator` fixes the shape via `noise`).
        text, text_mask: text features [B, L, text_dim] and mask; null_text [text_dim] is the
            learned null embedding (WorldModel.null_text) used by the guidance branches.
        actions, camera: controls of the whole video from pixel frame 0, [B, T_pix, ...]
            with T_pix = 1 + (n0 + num_frames - 1) * tf, or callables frame -> [B, n_pix, ...]
            (tf pixel frames per latent frame; 1 for frame 0) for interactive use.
        audio, audio_valid: audio features [B, T_pix, audio_dim] (or a callable, as
            camera) and their validity [B, T_pix] bool (tensor audio only); CFG's fully
            unconditional branch drops them with the actions.
        refs: reference latents [B, K, C, h, w] (cached once, never evicted).
        window: recent past frames kept in the cache (None: all).
        sink: the first frames (context first) kept for good besides the window.
        text_scale, action_scale: guidance scales (1 = off); see flow.guided_velocity.
        use_cache: False recomputes the visible past at every step (the reference
            computation the cache must match; cost grows with the context).
        noise: [B, C, num_frames, h, w] initial noise (else drawn from `generator`).
        on_frame: called as on_frame(frame_index, latent [B, C, 1, h, w]) as soon as each
            frame is final (stream it to a decoder / display while the rollout goes on).
    Returns:
        the generated latents [B, C, num_frames, h, w].
    """
    if dit.args.patch_size[0] != 1:
        raise ValueError("rollout generates one latent frame per block; needs p_t = 1")
    if noise is None:
        if context is None:
            raise ValueError("give `noise` to fix the shape when there is no context")
        b, c, _, h, w = context.shape
        gen_dev = generator.device if generator is not None else context.device
        noise = torch.randn((b, c, num_frames, h, w), generator=generator, device=gen_dev)
        noise = noise.to(context.device, context.dtype)
    b = noise.shape[0]
    dev = noise.device
    tf = dit.args.temporal_downsample
    guided = text_scale != 1.0 or action_scale != 1.0
    nb = 3 if guided else 1  # branches: full, text dropped, all dropped
    drop_a = torch.zeros(nb * b, dtype=torch.bool, device=dev)
    txt, tmask = text, text_mask
    if guided:
        drop_a[2 * b :] = True
        if text is not None:
            null = null_text.to(text.dtype).view(1, 1, -1).expand(2 * b, text.shape[1], -1)
            txt = torch.cat([text, null], 0)
            if text_mask is not None:
                ones = torch.ones_like(text_mask.bool()).repeat(2, 1)
                tmask = torch.cat([text_mask.bool(), ones])

    def rep(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.repeat(nb, *([1] * (x.dim() - 1)))

    audio = _memo(audio)

    def call(x: Tensor, t: Tensor, start: int, past: KV | None, with_refs=None, kv=False):
        n = x.shape[2]
        cached = cache.num_frames if past is not None else 0
        aud = audio_kwargs(dit, audio, audio_valid, start, n, cached, tf)
        if aud:
            aud = dict(aud, audio=rep(aud["audio"]), audio_valid=rep(aud["audio_valid"]),
                       drop_audio=drop_a)
        if dit.args.mask_channel:  # clean (t = 0) frames are the given ones: mask 1
            m = (t == 0).to(x.dtype)[:, None, :, None, None].expand(-1, 1, -1, *x.shape[3:])
            x = torch.cat([x, m], 1)
            if with_refs is not None:
                with_refs = torch.cat([with_refs, torch.ones_like(with_refs[:, :, :1])], 2)
        return dit(rep(x), rep(t), txt, tmask, rep(_controls(actions, start, n, tf)),
                   rep(_controls(camera, start, n, tf)), drop_a, frame_causal=True,
                   refs=rep(with_refs), frame_start=start, past_kv=past, return_kv=kv, **aud)

    if not use_cache and sink and window is not None:
        # The recomputed past must be contiguous in time (one frame_start); a sink is not.
        raise ValueError("an attention sink needs the KV cache (use_cache=True)")
    cache = KVCache(window, sink)
    frames: list[Tensor] = []  # clean latent frames so far (for the uncached path)
    n0 = 0
    if context is not None:
        n0 = context.shape[2]
        frames = list(context.unbind(2))
        if use_cache:
            zeros = torch.zeros(b, n0, device=dev)
            _, kvs = call(context, zeros, 0, None, refs, kv=True)
            ref_tokens = 0 if refs is None else kvs[0][0].shape[2] - n0 * _per_frame(dit, context)
            cache.append(kvs, n0, _per_frame(dit, context), ref_tokens)
    ts = sampling_schedule(num_steps, shift, device=dev)
    out = []
    for i in range(num_frames):
        idx = n0 + i
        x = noise[:, :, i : i + 1]
        if not use_cache and frames:  # visible past, recomputed each step
            lo = 0 if window is None else max(0, idx - window)
            past_x = torch.stack(frames[lo:], 2)
        for s in range(num_steps):
            t_cur = ts[s].expand(b, 1)
            if use_cache:
                first_refs = refs if (cache.past() is None and refs is not None) else None
                v = call(x, t_cur, idx, cache.past(), first_refs)
            elif frames:
                t_all = torch.cat([torch.zeros(b, past_x.shape[2], device=dev), t_cur], 1)
                v = call(torch.cat([past_x, x], 2), t_all, lo, None, refs)[:, :, -1:]
            else:
                v = call(x, t_cur, idx, None, refs)
            if guided:
                v = guided_velocity(*v.chunk(nb), text_scale, action_scale)
            x = x + (ts[s + 1] - ts[s]).to(x.dtype) * v
        out.append(x)
        frames.append(x[:, :, 0])
        if use_cache:
            first_refs = refs if (cache.past() is None and refs is not None) else None
            _, kvs = call(x, torch.zeros(b, 1, device=dev), idx, cache.past(), first_refs, kv=True)
            n_tok = _per_frame(dit, x)
            cache.append(kvs, 1, n_tok, kvs[0][0].shape[2] - n_tok if first_refs is not None else 0)
        if on_frame is not None:
            on_frame(idx, x)
    return torch.cat(out, dim=2)


def _per_frame(dit: VideoDiT, x: Tensor) -> int:
    _, gh, gw = dit.grid(1, *x.shape[3:])
    return gh * gw
