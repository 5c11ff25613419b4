"""Meta-device construction: ``materialize(build_on_meta(f))`` equals eager ``f()`` bitwise
after the same seed, for every model class the trainer builds; the largest configured sizes
build on the meta device in seconds without allocating their weights."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Callable

import pytest
import torch
import torch.nn as nn

from worldline.models.autoencoder import AutoencoderArgs, VideoAutoencoder
from worldline.models.dit import DiTArgs, VideoDiT
from worldline.models.init import build_on_meta, materialize, reset_default_parameters
from worldline.models.losses import PatchDiscriminator3D
from worldline.models.text import TextEncoder, TextEncoderArgs
from worldline.models.world_model import WorldModel

TEXT = TextEncoderArgs(dim=32, depth=2, num_heads=4, max_len=16)


def _dit(**kw) -> DiTArgs:
    return DiTArgs(**{**dict(in_channels=4, hidden_size=48, depth=2, num_heads=4, text_dim=32,
                             camera_dim=0), **kw})


# The DiT's optional parts each add modules (and RNG draws) in a different place.
DIT_VARIANTS = {
    "plain": _dit(),
    "no-text": _dit(text_dim=0),
    "discrete-actions": _dit(num_action_slots=3),
    "continuous-actions": _dit(action_dim=6),
    "camera": _dit(camera_dim=2),
    "refs-mask": _dit(max_refs=2, mask_channel=True),
    "everything": _dit(num_action_slots=2, camera_dim=2, max_refs=3, mask_channel=True,
                       qk_norm=False, patch_size=[2, 2, 2], frame_causal=True),
}

FACTORIES: dict[str, Callable[[], nn.Module]] = {
    **{f"dit-{k}": (lambda a=a: VideoDiT(a)) for k, a in DIT_VARIANTS.items()},
    "text-encoder": lambda: TextEncoder(TEXT),
    "world-model": lambda: WorldModel(_dit(num_action_slots=3, camera_dim=2, max_refs=2), TEXT),
    "world-model-actions": lambda: WorldModel(_dit(action_dim=4, mask_channel=True), TEXT),
    "autoencoder": lambda: VideoAutoencoder(AutoencoderArgs(base_channels=8)),
    "autoencoder-deep": lambda: VideoAutoencoder(AutoencoderArgs(
        base_channels=8, channel_mult=[1, 2, 2, 4], num_res_blocks=2, latent_channels=8)),
    "discriminator": lambda: PatchDiscriminator3D(3, base_channels=8, num_layers=3,
                                                  time_strides=2),
}


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return dict(m.state_dict())


@pytest.mark.parametrize("name", list(FACTORIES))
def test_meta_then_materialize_is_bitwise_eager(name: str) -> None:
    factory = FACTORIES[name]
    torch.manual_seed(1234)
    eager = _state(factory())

    meta = build_on_meta(factory)
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    meta.to_empty(device="cpu")
    # to_empty leaves whatever memory held; NaN makes a parameter init_weights forgot visible.
    with torch.no_grad():
        for t in [*meta.parameters(), *meta.buffers()]:
            t.fill_(float("nan"))
    torch.manual_seed(1234)
    meta.init_weights()
    got = _state(meta)

    assert list(got) == list(eager)  # same names, same order
    for k in eager:
        assert got[k].dtype == eager[k].dtype and torch.equal(got[k], eager[k]), k


def test_materialize_helper_and_reinit_from_trained_values() -> None:
    factory = FACTORIES["world-model"]
    torch.manual_seed(7)
    eager = _state(factory())
    model = build_on_meta(factory)
    torch.manual_seed(7)
    assert materialize(model, "cpu") is model
    assert all(torch.equal(v, eager[k]) for k, v in _state(model).items())
    # init_weights is a full re-init, not an adjustment: it undoes training.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.manual_seed(7)
    model.init_weights()
    assert all(torch.equal(v, eager[k]) for k, v in _state(model).items())


def test_autoencoder_buffers_are_reset() -> None:
    ae = materialize(build_on_meta(FACTORIES["autoencoder"]), "cpu")
    assert ae.latent_mean.eq(0).all() and ae.latent_std.eq(1).all()


def test_preorder_is_construction_order() -> None:
    # reset_default_parameters replays reset_parameters() in modules() pre-order; that is the
    # order the constructors ran in only when every layer is assigned right after it is built.
    built: list[nn.Module] = []
    originals = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding, nn.Conv3d)}

    def recording(orig):
        def reset(self):
            built.append(self)
            orig(self)
        return reset

    try:
        for cls, orig in originals.items():
            cls.reset_parameters = recording(orig)
        model = nn.ModuleList([FACTORIES["world-model"](), FACTORIES["autoencoder"](),
                               FACTORIES["dit-everything"]()])
    finally:
        for cls, orig in originals.items():
            cls.reset_parameters = orig
    in_tree = [m for m in model.modules() if type(m) in originals]
    assert [id(m) for m in built] == [id(m) for m in in_tree]


def test_materialize_needs_init_weights() -> None:
    with pytest.raises(TypeError, match="init_weights"):
        materialize(build_on_meta(lambda: nn.Linear(2, 2)), "cpu")
    lin = nn.Linear(3, 3)
    torch.manual_seed(0)
    reset_default_parameters(lin)
    torch.manual_seed(0)
    assert torch.equal(lin.weight, nn.Linear(3, 3).weight)


# A fresh interpreter builds one configured size (WorldModel + autoencoder) on the meta device
# and reports its peak resident memory: the weights (28 GB for 7B in fp32) must not exist.
_BUILD = textwrap.dedent("""
    import json, re, sys, time
    from omegaconf import OmegaConf
    from worldline.models.autoencoder import VideoAutoencoder
    from worldline.models.init import build_on_meta
    from worldline.models.world_model import WorldModel
    from worldline.train.config import load_model_config

    m = load_model_config(sys.argv[1])
    dit, text, ae = (OmegaConf.to_object(m[k]) for k in ("dit", "text", "autoencoder"))
    t0 = time.perf_counter()
    wm = build_on_meta(lambda: WorldModel(dit, text))
    vae = build_on_meta(lambda: VideoAutoencoder(ae))
    took = time.perf_counter() - t0
    meta = all(p.is_meta for p in [*wm.parameters(), *vae.parameters(), *vae.buffers()])
    # VmHWM (this process's peak RSS), not ru_maxrss: Linux carries ru_maxrss across exec, so
    # under a big pytest process the child would report its parent's peak.
    hwm = re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)
    print(json.dumps({"seconds": took, "params": wm.num_params() + vae.num_params(),
                      "meta": meta, "maxrss_mb": int(hwm) / 1024}))
""")


@pytest.mark.parametrize("size, min_params", [("3B", 3e9), ("7B", 7e9)])
def test_large_sizes_build_on_meta_in_seconds_and_little_memory(size: str,
                                                                min_params: float) -> None:
    r = subprocess.run([sys.executable, "-c", _BUILD, size], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["meta"] and out["params"] > min_params, out
    assert out["maxrss_mb"] < 1024, out
    assert out["seconds"] < 30, out  # ~2 s here; generous for a loaded 2-core machine
    print(f"\n{size}: {out['params'] / 1e9:.2f}B params on meta in {out['seconds']:.1f} s, "
          f"peak RSS {out['maxrss_mb']:.0f} MB")
