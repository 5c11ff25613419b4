"""stage=self_forcing (train/self_forcing.py) and the rollout's attention sink: the student's
training rollout is the sampler's, gradients pass only through each frame's last denoising
step, the DMD gradient, the sink/window cache, config rules, and a smoke-world run that
resumes bitwise."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from _runs import compose_cfg, smoke_overrides
from worldline.models.dit import DiTArgs
from worldline.models.flow import sampling_schedule
from worldline.models.rollout import KVCache, rollout
from worldline.models.text import TextEncoderArgs
from worldline.models.world_model import WorldModel
from worldline.train.config import ConfigError
from worldline.train.pipeline import WorldPipeline
from worldline.train.self_forcing import FrameModel, dmd_loss, self_rollout
from worldline.train.validate import validate

DIT = DiTArgs(in_channels=4, hidden_size=32, depth=2, num_heads=2, text_dim=32,
              num_action_slots=2, camera_dim=2, mask_channel=True, frame_causal=True,
              temporal_downsample=4)
TEXT = TextEncoderArgs(dim=32, depth=1, num_heads=2, max_len=8)


def _world(seed: int = 0) -> tuple[WorldPipeline, dict, torch.Tensor, torch.Tensor]:
    """A tiny random world model whose adaLN-zero outputs are perturbed (so velocities are
    not all zero), its conditions, a 1-frame context and noise for 3 frames."""
    torch.manual_seed(seed)
    wm = WorldModel(DIT, TEXT)
    with torch.no_grad():
        for p in wm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe = WorldPipeline(torch.nn.Linear(1, 1), wm)
    ids, mask = wm.tokenizer(["a red circle", "a blue square"], 8)
    frames = 1 + (1 + 3 - 1) * 4
    cond = {"text_ids": ids, "text_mask": mask, "text_emb": None,
            "actions": torch.randint(0, 5, (2, frames, 2)), "camera": torch.randn(2, frames, 2),
            "audio": None, "audio_valid": None}
    return pipe, cond, torch.randn(2, 4, 1, 4, 4), torch.randn(2, 4, 3, 4, 4)


def test_student_rollout_is_the_sampler() -> None:
    """Without grad, the training rollout equals models.rollout.rollout (what worldline-sample
    and worldline-play run) for the same noise: the student trains on what it samples."""
    pipe, cond, ctx, noise = _world()
    wm = pipe.world_model
    ts = sampling_schedule(4, 1.0)
    with torch.no_grad():
        ours = self_rollout(FrameModel(wm, pipe, cond), ctx, noise, ts)
        ref = rollout(wm.dit, ctx, 3, text=wm.encode_text(cond["text_ids"], cond["text_mask"]),
                      text_mask=cond["text_mask"], null_text=wm.null_text,
                      actions=cond["actions"], camera=cond["camera"], noise=noise,
                      num_steps=4)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_gradient_flows_only_through_the_last_step_of_each_frame() -> None:
    pipe, cond, ctx, noise = _world()
    wm = pipe.world_model
    ts = sampling_schedule(3, 1.0)
    calls: list[tuple[bool, float, int, bool]] = []

    def spy(mod, args, kwargs):
        x, t, past = args[0], args[1], kwargs.get("past_kv")
        # what a differentiable call could send gradient into: its input and the cache
        pairs = [(b.k, b.v) if hasattr(b, "commit") else b for b in (past or [])]
        leaks = x.requires_grad or any(k.requires_grad or v.requires_grad for k, v in pairs)
        calls.append((torch.is_grad_enabled(), float(t.flatten()[-1]), x.shape[2], leaks))

    h = wm.dit.register_forward_pre_hook(spy, with_kwargs=True)
    out = self_rollout(FrameModel(wm, pipe, cond), ctx, noise, ts)
    h.remove()
    grad_calls = [c for c in calls if c[0]]
    # one differentiable forward per generated frame, each the last step (t = ts[-2]) on a
    # detached input and a detached cache: no path back to earlier steps or frames
    assert len(grad_calls) == noise.shape[2]
    assert all(abs(t - float(ts[-2])) < 1e-6 and n == 1 and not leak
               for _, t, n, leak in grad_calls)
    # 1 context commit + per frame 3 steps and 1 commit
    assert len(calls) == 1 + noise.shape[2] * (3 + 1)
    assert out.requires_grad
    out.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in wm.parameters())


def test_dmd_gradient_is_the_normalised_score_difference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 4, 4, generator=g, requires_grad=True)
    real, fake = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 3, 4, 4, generator=g)
    dmd_loss(x, real, fake).backward()
    norm = (x.detach() - real).abs().mean([1, 2, 3, 4], keepdim=True)
    torch.testing.assert_close(x.grad, (fake - real) / norm / x.numel())
    # Fake == real: nothing to match, no gradient.
    x.grad = None
    dmd_loss(x, real, real).backward()
    assert x.grad.abs().max() == 0


def test_kv_cache_keeps_the_sink_and_a_window() -> None:
    """References stay first, then the `sink` first frames, then the `window` newest."""
    cache = KVCache(window=2, sink=1)

    def kv(frames: list[int], refs: int = 0) -> list:
        vals = [float(f) for f in frames for _ in range(2)] + [-1.0] * refs
        k = torch.tensor(vals).view(1, 1, -1, 1)
        return [(k, k.clone())]

    cache.append(kv([0], refs=2), 1, 2, ref_tokens=2)
    for f in range(1, 6):
        cache.append(kv([f]), 1, 2)
    blk = cache.past()[0]
    assert blk.k[0, 0, : blk.length, 0].tolist() == [-1, -1, 0, 0, 4, 4, 5, 5]
    assert cache.num_frames == 3 and cache.next_frame == 6
    with pytest.raises(ValueError):
        KVCache(sink=-1)


def test_rollout_with_a_sink() -> None:
    """Within window + sink frames the sink changes nothing; beyond, the first frame is
    still attended (the rollout differs from a plain window) and stays finite."""
    pipe, cond, ctx, _ = _world()
    dit = pipe.world_model.dit
    text = pipe.world_model.encode_text(cond["text_ids"], cond["text_mask"])
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 4, 6, 4, 4, generator=g)
    acts = torch.randint(0, 5, (2, 1 + 6 * 4, 2), generator=g)
    kw = dict(text=text, text_mask=cond["text_mask"], actions=acts, num_steps=2)
    full = rollout(dit, ctx, 2, noise=noise[:, :, :2], **kw)
    short = rollout(dit, ctx, 2, noise=noise[:, :, :2], window=1, sink=1, **kw)
    torch.testing.assert_close(full, short)
    sink = rollout(dit, ctx, 6, noise=noise, window=1, sink=1, **kw)
    plain = rollout(dit, ctx, 6, noise=noise, window=1, **kw)
    assert torch.isfinite(sink).all() and not torch.allclose(sink[:, :, 1:], plain[:, :, 1:])
    torch.testing.assert_close(sink[:, :, :1], plain[:, :, :1])  # nothing evicted yet
    with pytest.raises(ValueError, match="sink"):
        rollout(dit, ctx, 2, noise=noise[:, :, :2], window=1, sink=1, use_cache=False, **kw)


@pytest.mark.parametrize("override, key", [
    ("stage.self_forcing.student_steps=5", "student_steps"),
    ("stage.self_forcing.teacher_steps=6", "teacher_steps"),
    ("model.dit.frame_causal=false", "frame_causal"),
    ("stage.self_forcing.max_t=1.0", "min_t"),
])
def test_bad_self_forcing_configs_fail_in_validate(override: str, key: str) -> None:
    base = ["experiment=smoke", "stage=self_forcing", "stage.init_from=/nowhere"]
    validate(compose_cfg(base))
    with pytest.raises(ConfigError, match=key):
        validate(compose_cfg([*base, override]))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, play_model) -> tuple[Path, Path, Path]:
    """The session's tiny action-conditioned smoke run (tests/_play.py; built once for the
    play and eval tests too) as the teacher: (root for the student runs, its datasets, the
    teacher run)."""
    return tmp_path_factory.mktemp("sf"), play_model["root"] / "_datasets", play_model["run"]


def test_self_forcing_trains_on_the_smoke_world_and_resumes_bitwise(teacher) -> None:
    """ODE warm-up (step 1), then DMD with a fake-score update (step 2); 2 steps straight
    equal 1 step + resume=auto + 1: student, fake score, both optimizers bitwise."""
    from worldline.train.build import build_trainer
    from worldline.train.tracking import read_metrics

    root, ds, teacher_run = teacher
    common = ["stage=self_forcing", f"stage.init_from={teacher_run}",
              "stage.conditions=[text,actions]", "train.steps=2",
              "train.ckpt_every=1", "train.log_every=1", "train.keep_last=3",
              "stage.self_forcing.ode_init_steps=1", "stage.self_forcing.teacher_steps=4",
              "stage.self_forcing.student_steps=2", "optim.lr=1e-3",
              "stage.self_forcing.fake_lr=1e-3", "run.threads=1"]
    a = build_trainer(compose_cfg(smoke_overrides(root, "sf_a", ds, *common)))
    start = {n: p.detach().clone() for n, p in a.module.named_parameters()}
    a.train()
    rows = [r for r in read_metrics(root / "sf_a") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["fake_loss"] == 0 and all(r["fake_loss"] > 0 for r in rows[1:])
    assert rows[0]["sf/dmd"] == 0 and all(r["sf/ode"] == 0 for r in rows[1:])
    assert any(not torch.equal(start[n], p) for n, p in a.module.named_parameters())
    teacher_w = dict(a.objective.teacher.named_parameters())
    assert all(not p.requires_grad for p in teacher_w.values())

    shutil.copytree(root / "sf_a", root / "sf_b")
    shutil.rmtree(root / "sf_b" / "checkpoints" / "step_2")
    (root / "sf_b" / "checkpoints" / "latest").write_text("step_1")
    b = build_trainer(compose_cfg(smoke_overrides(root, "sf_b", ds, *common)))
    b.train()
    assert b.state.step == 2
    for x, y in ((a.module, b.module), (a.objective.fake.score, b.objective.fake.score)):
        for (n, p), (_, q) in zip(x.named_parameters(), y.named_parameters()):
            assert torch.equal(p, q), n
    for oa, ob in ((a.optimizer, b.optimizer),
                   (a.objective.fake.optimizer, b.objective.fake.optimizer)):
        sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
        assert sa.keys() == sb.keys() and all(
            torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    ra = [r["loss"] for r in read_metrics(root / "sf_a") if "loss" in r]
    rb = [r["loss"] for r in read_metrics(root / "sf_b") if "loss" in r]
    assert ra == rb
