"""Context parallelism (Ulysses) for the latent DiT: tokens sharded across a CP group.

Each CP rank holds ``N / cp`` consecutive video tokens (whole token frames, tokens are
t-major) through every block. Only self-attention needs all tokens: an all-to-all turns
``q, k, v [B, H, N/cp, Dh]`` (all heads, local tokens) into ``[B, H/cp, N, Dh]`` (local heads,
all tokens), attention runs on full sequences, and a second all-to-all returns
``[B, H, N/cp, Dh]`` (DeepSpeed-Ulysses). Everything else in a block (adaLN modulation per
frame, cross-attention to the text, SwiGLU) is per token. The tokens are all-gathered before
the final layer, so every CP rank computes the same full output and loss.

Applied *around* the unmodified model (models/ holds no distributed code):

- a forward pre-hook on ``VideoDiT`` records the token grid (and rejects reference frames
  and KV caches, which this CP does not support yet);
- a forward hook on ``x_embed`` keeps this rank's token slice;
- a forward pre-hook on every block slices the per-frame modulation and the RoPE tables to
  the local frames/tokens (a frame-causal mask stays full: attention sees all tokens);
- each block's ``attn.forward`` is replaced by :func:`ulysses_self_attention` (same math as
  ``SelfAttention.forward``, plus the two all-to-alls);
- a forward pre-hook on ``final`` all-gathers the tokens.

Gradients: the all-gather's backward sums the (identical) output gradients of the CP ranks
and keeps the local slice, so on every CP rank each parameter's gradient is ``cp x`` its share
of the true gradient; averaging gradients over dp x cp (what DDP / FSDP do on the (dp, cp)
mesh) gives exactly the true gradient averaged over dp. The equivalence test
(tests/test_dist_cp.py) checks outputs and gradients against the non-parallel model.

A cleaner model-side hook (for the models/ owner): ``VideoDiT.forward(..., cp_group=None)``
that shards after ``x_embed`` / gathers before ``final``, and an ``attention_fn`` argument on
``SelfAttention`` that receives rotated q, k, v — then nothing here would need to replace a
method.

Constraints: ``cp`` divides the number of heads and the number of token frames.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group: Any) -> Tensor:
    world = dist.get_world_size(group)
    inputs = [t.contiguous() for t in x.chunk(world, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(world)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scatter_dim: int, gather_dim: int, group: Any) -> Tensor:
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        s, g = ctx.dims
        return _all_to_all(grad, g, s, ctx.group), None, None, None


class _GatherTokens(torch.autograd.Function):
    """All-gather along ``dim``; backward: sum the ranks' output grads, keep the local slice."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: Any) -> Tensor:
        ctx.dim, ctx.group = dim, group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(world, dim=ctx.dim)[rank].contiguous(), None, None


def gather_tokens(x: Tensor, group: Any, dim: int = 1) -> Tensor:
    return _GatherTokens.apply(x, dim, group)


def ulysses_self_attention(attn: nn.Module, group: Any, x: Tensor, rope: tuple[Tensor, Tensor],
                           attn_mask: Optional[Tensor] = None,
                           past_kv: Optional[tuple[Tensor, Tensor]] = None):
    """``SelfAttention.forward`` on local tokens x [B, N/cp, D] (rope already local)."""
    from worldline.models.attention import attention

    if past_kv is not None:
        raise NotImplementedError("context parallelism does not support KV-cached rollout")
    b, n, d = x.shape
    q, k, v = attn.project(x, rope)
    kv = (k, v)
    # [B, H, N/cp, Dh] -> [B, H/cp, N, Dh]: local heads, every token.
    q, k, v = (_AllToAll.apply(t, 1, 2, group) for t in (q, k, v))
    out = attention(q, k, v, attn_mask=attn_mask)
    out = _AllToAll.apply(out, 2, 1, group)  # back to [B, H, N/cp, Dh]
    return attn.proj(out.transpose(1, 2).reshape(b, n, d)), kv


class _CPState:
    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.frames = self.tokens = 0

    def local(self, x: Tensor, dim: int) -> Tensor:
        return x.chunk(self.world, dim=dim)[self.rank]


def apply_context_parallel(module: nn.Module, group: Any) -> int:
    """Shard every ``VideoDiT`` inside ``module`` over the CP ``group``. Returns how many."""
    from worldline.models.dit import VideoDiT
    from worldline.models.wan_dit import WanDiT

    if any(isinstance(m, WanDiT) for m in module.modules()):
        # WanDiT has the pieces (block signature, attn.project / attn.proj) but the embed and
        # final hooks here are VideoDiT's (x_embed, final), and no CP test covers it yet.
        raise NotImplementedError("context parallelism does not support arch='wan' (WanDiT) "
                                  "yet; run it with dist.cp=1")
    dits = [m for m in module.modules() if isinstance(m, VideoDiT)]
    for dit in dits:
        st = _CPState(group)
        if dit.args.num_heads % st.world:
            raise ValueError(f"dist.cp={st.world} does not divide {dit.args.num_heads} heads")

        def dit_pre(mod, args, kwargs, st=st):
            x = args[0] if args else kwargs["x"]
            if kwargs.get("refs") is not None or kwargs.get("past_kv") is not None:
                raise NotImplementedError("context parallelism: no reference frames / KV cache")
            grid = mod.grid(*x.shape[2:])
            if grid[0] % st.world:
                raise ValueError(f"dist.cp={st.world} does not divide {grid[0]} token frames")
            st.frames, st.tokens = grid[0], grid[0] * grid[1] * grid[2]

        def embed_post(mod, args, out, st=st):
            return st.local(out, 1) if out.shape[1] == st.tokens else out

        def block_pre(mod, args, st=st):
            h, mod_, rope, *rest = args
            if mod_.shape[1] == st.frames and h.shape[1] * st.world == st.tokens:
                mod_ = st.local(mod_, 1)
                rope = (st.local(rope[0], 0), st.local(rope[1], 0))
            return (h, mod_, rope, *rest)

        def final_pre(mod, args, st=st):
            h, *rest = args
            return (gather_tokens(h, st.group, 1), *rest)

        dit.register_forward_pre_hook(dit_pre, with_kwargs=True)
        dit.x_embed.register_forward_hook(embed_post)
        for block in dit.blocks:
            block.register_forward_pre_hook(block_pre)
            attn = block.attn
            attn.forward = (lambda *a, _attn=attn, _g=group, **k:
                            ulysses_self_attention(_attn, _g, *a, **k))
        dit.final.register_forward_pre_hook(final_pre)
    return len(dits)
