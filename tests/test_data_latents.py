"""Latent caches: encode real shards once with a tiny real autoencoder, stream them back."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from worldline.data import latents as latents_lib
from worldline.data.latents import encode_latent_shards
from worldline.data.loader import ShardLoader
from worldline.data.samples import iter_tar_samples

CLIP = dict(num_frames=5, resolution=(32, 32), position="center")


def tiny_encoder():
    """``encode(uint8 video) -> latents`` from a tiny real VideoAutoencoder (a pooling
    callable if models/ does not provide one yet) plus the module itself (or None)."""
    torch.manual_seed(0)
    try:
        from worldline.models.autoencoder import AutoencoderArgs, VideoAutoencoder
    except ImportError:
        return (lambda v: torch.nn.functional.avg_pool3d(v.float() / 127.5 - 1, (4, 8, 8), ceil_mode=True)), None
    ae = VideoAutoencoder(AutoencoderArgs(latent_channels=4, base_channels=8, channel_mult=[1, 2, 2],
                                          temporal_downsample=4, spatial_downsample=8)).eval()

    @torch.no_grad()
    def encode(video_u8: torch.Tensor) -> torch.Tensor:
        return ae.encode(video_u8.float() / 127.5 - 1)[0]

    return encode, ae


def test_latent_cache_round_trip(data_synthetic_dir, tmp_path):
    encode, _ = tiny_encoder()
    out = tmp_path / "lat"
    manifest = encode_latent_shards(data_synthetic_dir, out, encode, batch_size=5, num_workers=1,
                                    dtype="float32", **CLIP)
    assert manifest["input"] == "latent" and manifest["num_samples"] == 24 and len(manifest["shards"]) == 6
    shape = manifest["latent_shape"]
    assert len(shape) == 4 and shape[1] == 2  # 5 frames -> 1 + (5 - 1) // 4 latent frames
    members = next(iter_tar_samples(str(out / manifest["shards"][0]))).members
    assert sorted(members) == ["json", "safetensors", "txt"]  # no pickle anywhere

    # Stream the cache and the pixels in the same order; re-encoding pixels gives the latents.
    lat = ShardLoader(out, batch_size=4, input="latent", shuffle_shards=False)
    pix = ShardLoader(data_synthetic_dir, batch_size=4, shuffle_shards=False, **CLIP)
    for a, b in itertools.islice(zip(lat, pix), 6):
        assert a["key"] == b["key"] and a["caption"] == b["caption"]
        assert a["latents"].shape == (4, *shape) and a["latents"].dtype == torch.float32
        torch.testing.assert_close(a["latents"], encode(b["video"]), rtol=1e-4, atol=1e-5)
        assert torch.equal(a["actions"], b["actions"]) and torch.equal(a["camera"], b["camera"])
        assert "video" not in a
    # Latent streams resume exactly too.
    state = lat.state_dict()
    again = ShardLoader(out, batch_size=4, input="latent", shuffle_shards=False)
    again.load_state_dict(state)
    nxt = next(iter(again))
    assert nxt["key"] == next(iter(lat))["key"]


def test_latent_encoding_resumes_and_skips_bad_samples(data_synthetic_dir, tmp_path, monkeypatch):
    calls = itertools.count()

    def flaky(video: torch.Tensor) -> torch.Tensor:
        if next(calls) == 3:
            raise KeyboardInterrupt  # "preempted" mid-run
        return torch.nn.functional.avg_pool3d(video.float(), (1, 8, 8))

    out = tmp_path / "lat"
    with pytest.raises(KeyboardInterrupt):
        encode_latent_shards(data_synthetic_dir, out, flaky, batch_size=4, dtype="float16", **CLIP)
    finished = sorted(p.name for p in out.glob("shard-*.tar"))
    assert 0 < len(finished) < 6 and not list(out.glob(".*.tmp-*"))
    manifest = encode_latent_shards(data_synthetic_dir, out, flaky, batch_size=4, dtype="float16", **CLIP)
    assert manifest["num_samples"] == 24 and manifest["dtype"] == "float16"
    batch = next(iter(ShardLoader(out, batch_size=3, input="latent")))
    assert batch["latents"].dtype == torch.float16 and batch["latents"].shape == (3, 3, 5, 4, 4)
    with pytest.raises(ValueError, match="other settings"):
        encode_latent_shards(data_synthetic_dir, out, flaky, batch_size=4, num_frames=3)


def test_encode_latents_cli_loads_a_worldline_checkpoint(data_synthetic_dir, tmp_path):
    encode, ae = tiny_encoder()
    if ae is None:
        pytest.skip("worldline.models.autoencoder is not available yet")
    from dataclasses import asdict

    from worldline.scripts.encode_latents import main
    from worldline.train.checkpoint import Checkpointer
    from worldline.train.state import TrainState

    run = tmp_path / "ae_run"
    meta = {"config": {"model": {"autoencoder": asdict(ae.args)}}}
    Checkpointer(run, keep_last=1).save(1, {"model": ae.state_dict()}, TrainState(), {}, meta)
    out = tmp_path / "lat"
    assert main([data_synthetic_dir, str(out), "--checkpoint", str(run), "--num-frames", "5",
                 "--resolution", "32", "32", "--position", "center", "--workers", "0",
                 "--dtype", "float32", "--device", "cpu"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 24
    lat = next(iter(ShardLoader(out, batch_size=4, input="latent", shuffle_shards=False)))
    pix = next(iter(ShardLoader(data_synthetic_dir, batch_size=4, shuffle_shards=False, **CLIP)))
    torch.testing.assert_close(lat["latents"], encode(pix["video"]), rtol=1e-4, atol=1e-5)


def test_hostile_latent_members(tmp_path):
    import io
    import tarfile

    from safetensors.numpy import save

    good = save({"latents": np.ones((2, 1, 2, 2), np.float32), "actions": np.zeros((3, 1), np.int64),
                 "camera": np.zeros((3, 2), np.float32)})
    nan = save({"latents": np.full((2, 1, 2, 2), np.nan, np.float32)})
    files = [("a.safetensors", good), ("a.txt", b"ok"), ("b.safetensors", b"\xff" * 64),
             ("c.safetensors", nan), ("d.json", b"{}"), ("e.safetensors", good), ("e.pyd", b"x"),
             ("f.safetensors", good)]
    with tarfile.open(tmp_path / "l.tar", "w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    loader = ShardLoader(str(tmp_path / "l.tar"), batch_size=2, input="latent", max_skip_fraction=1.0)
    batch = next(iter(loader))
    assert batch["key"] == ["a", "f"] and batch["latents"].shape == (2, 2, 1, 2, 2)
    assert loader.stats["skipped_reasons"] == {"bad_latents": 2, "missing_latents": 1, "unsafe_member": 1}
    assert Path(latents_lib.__file__).read_text().count("pickle") <= 1  # only the docstring's "unlike pickle"
