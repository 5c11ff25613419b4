"""Streaming causal VAE decode of a rollout, and a timed rollout that includes it.

A world model is only real-time if *pixels* come out at the display rate, so the decoder must
run inside the generation loop: each latent frame is decoded as soon as the rollout finishes
it, instead of decoding the whole clip afterwards.

Why frame-by-frame decoding is exact (models/autoencoder.py): the decoder has no look-ahead.

* ``CausalConv3d`` (kernel k_t = 3, stride 1 in the decoder) pads time on the past side only;
  in chunked mode it keeps the last ``k_t - 1 = 2`` frames of its (padded) input as
  ``_stream["tail"]`` and prepends them to the next chunk. That tail, one per causal conv at
  that conv's resolution and width, is the whole carried state.
* ``Upsample`` in time maps ``[z0, z1, ..] -> [z0, z1, z1, z2, z2, ..]`` (nearest, frame 0
  single): output frames of latent i depend on latents <= i only. Its only state is a
  ``seen`` flag (the first chunk re-emits frame 0 alone, later chunks emit 2 frames per
  frame) and the ``seen`` flag of its depth-to-time shortcut.
* ``ChannelRMSNorm`` normalises each (t, h, w) position over channels: stateless.

So latent frame 0 decodes to 1 pixel frame and every later latent frame to
``temporal_downsample`` pixel frames, the same pixels as a whole-clip decode (up to float
summation order; tested in fp64). :class:`StreamDecoder` holds that state outside the model.

Fast path: :func:`fast_denoiser` wraps the DiT in ``torch.compile`` (``mode="reduce-overhead"``
on CUDA, i.e. CUDA graphs; the KV cache already lives in preallocated buffers,
models/kv_cache.py, so once the rolling window is full every per-frame step has the same
shapes and replays one graph). It is off on CPU, where launch overhead is not the bottleneck.

    >>> res = rollout_decoded(dit, ae, ctx, 8, num_steps=4, window=4)
    >>> res.pixel_fps            # pixel frames per second, decode included
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from worldline.models.rollout import rollout

__all__ = ["StreamDecoder", "RolloutResult", "fast_denoiser", "rollout_decoded"]


class StreamDecoder:
    """Decode normalised latents [B, C, n, h, w] chunk by chunk with the autoencoder's causal
    state carried between calls: pixel frames [B, 3, T, H, W] in [-1, 1] (1 + (n - 1) * tf
    for the first call, n * tf after). Equals one whole-video decode up to float rounding.

    The state lives in this object, not in the autoencoder, so several sessions can share one
    model as long as their calls do not overlap (the player runs them on one worker thread).

    ``dtype``: run the decoder under autocast in this dtype (bf16 on a GPU: the decoder is
    convolution-bound and bf16 halves its memory traffic); None keeps the model's dtype.
    """

    def __init__(self, autoencoder: nn.Module, dtype: Optional[torch.dtype] = None) -> None:
        self.ae = autoencoder
        self.dtype = dtype
        self._mods = [m for m in autoencoder.decoder.modules() if hasattr(m, "_stream")]
        self._state: Optional[list] = None

    def reset(self) -> None:
        """Forget the carried state (the next call starts a new video)."""
        self._state = None

    def state_frames(self) -> int:
        """Frames (at their own resolutions) held in the carried conv tails: 2 per causal
        conv after the first call, 0 before (what the docstring calls the whole state)."""
        if self._state is None:
            return 0
        return sum(s["tail"].shape[2] for s in self._state if s.get("tail") is not None)

    def _autocast(self, z: Tensor) -> contextlib.AbstractContextManager:
        if self.dtype is None or self.dtype == z.dtype:
            return contextlib.nullcontext()
        return torch.autocast(z.device.type, dtype=self.dtype)

    @torch.no_grad()
    def __call__(self, z: Tensor) -> Tensor:
        state = self._state or [{} for _ in self._mods]
        for m, s in zip(self._mods, state):
            m._stream = s  # the autoencoder's chunked-decode hook (models/autoencoder.py)
        try:
            with self._autocast(z):
                out = self.ae.decoder(self.ae.denormalize(z))
            self._state = [m._stream for m in self._mods]
        finally:
            for m in self._mods:
                m._stream = None
        return out.clamp(-1, 1)


def fast_denoiser(dit: nn.Module, device: torch.device, mode: Optional[str] = "reduce-overhead",
                  backend: str = "inductor", allow_cpu: bool = False) -> nn.Module:
    """The DiT compiled for the rollout loop on CUDA; the module itself elsewhere or when
    ``mode`` is None (compile time buys nothing on a CPU, whose steps are compute-bound).

    ``dynamic=False``: the per-frame shapes repeat once the KV window is full, and a
    specialised graph is what CUDA graphs replay. The compiled wrapper forwards attribute
    reads (``args``, ``grid``) to the module, so :func:`rollout` takes it as it is.
    ``allow_cpu`` compiles on CPU too (tests: the compiled path must equal the eager one)."""
    if mode is None or (device.type != "cuda" and not allow_cpu):
        return dit
    # Until the rolling window is full each frame sees a longer cache (a new shape, a new
    # graph); dynamo's default of 8 recompiles would drop back to eager before that.
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(getattr(cfg, "recompile_limit", 8), 64)
    return torch.compile(dit, mode=mode, backend=backend, dynamic=False)


@dataclass
class RolloutResult:
    """Latents, pixels (None without decode) and end-to-end timing of one rollout."""

    latents: Tensor
    pixels: Optional[Tensor]
    seconds: float
    latent_frames: int
    pixel_frames: int  # pixel frames the new latents decode to (counted also without decode)
    extras: dict = field(default_factory=dict)

    @property
    def pixel_fps(self) -> float:
        """Pixel frames produced per second, end to end (decode included when it ran)."""
        return self.pixel_frames / self.seconds

    @property
    def latent_fps(self) -> float:
        return self.latent_frames / self.seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def rollout_decoded(dit: nn.Module, autoencoder: Optional[nn.Module], context: Optional[Tensor],
                    num_frames: int, *, decode: bool = True,
                    decode_dtype: Optional[torch.dtype] = None,
                    compile_mode: Optional[str] = None, compile_backend: str = "inductor",
                    compile_on_cpu: bool = False,
                    on_pixels: Optional[Callable[[int, Tensor], None]] = None,
                    **rollout_kwargs: Any) -> RolloutResult:
    """:func:`rollout` with each finished latent frame decoded at once (streaming), timed.

    The decoder is first primed with the context latents (their pixels are the given past,
    not counted and not returned), so the new frames decode exactly as in a whole-clip
    decode of ``cat(context, latents)``. Timing covers generation plus decode of the new
    frames, with a device sync at the end (CUDA work is asynchronous).

    Args:
        dit, context, num_frames, rollout_kwargs: as :func:`rollout` (normalised latents).
        autoencoder: a VideoAutoencoder (only needed with ``decode``).
        decode: False times the rollout alone (same pixel-frame count, for the comparison).
        decode_dtype: autocast dtype of the decoder (bf16 on GPU), None = the model's.
        compile_mode: e.g. "reduce-overhead" to run the denoiser through
            :func:`fast_denoiser` (CUDA only; ignored on CPU).
        on_pixels: called as on_pixels(frame_index, pixels [B, 3, n, H, W]) per frame.
    """
    ref = context if context is not None else rollout_kwargs.get("noise")
    device = ref.device
    net = fast_denoiser(dit, device, compile_mode, compile_backend, compile_on_cpu)
    tf = dit.args.temporal_downsample
    dec = StreamDecoder(autoencoder, decode_dtype) if decode else None
    if dec is not None and context is not None:
        dec(context)  # prime the causal state with the known past
    first_new = 0 if context is None else context.shape[2]
    chunks: list[Tensor] = []
    user_cb = rollout_kwargs.pop("on_frame", None)

    def on_frame(idx: int, z: Tensor) -> None:
        if user_cb is not None:
            user_cb(idx, z)
        if dec is not None:
            px = dec(z)
            chunks.append(px)
            if on_pixels is not None:
                on_pixels(idx, px)

    _sync(device)
    t0 = time.perf_counter()
    latents = rollout(net, context, num_frames, on_frame=on_frame, **rollout_kwargs)
    _sync(device)
    seconds = time.perf_counter() - t0
    n_pix = num_frames * tf - (tf - 1 if first_new == 0 and num_frames else 0)
    pixels = torch.cat(chunks, 2) if chunks else None
    return RolloutResult(latents, pixels, seconds, num_frames, n_pix,
                         {"decode": decode, "compiled": net is not dit,
                          "state_frames": dec.state_frames() if dec is not None else 0})
