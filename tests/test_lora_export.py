"""``worldline-lora``'s PEFT layout on a tiny LoRA "run" (an export folder of a LoRA model
with random B, so the adapter changes the output): PEFT loads it onto ``<out>/base`` and
matches ``<out>/merged``, ``WorldPipeline.from_pretrained(<out>)`` applies it, a wrong base
is one clear error, ``merged/`` still feeds ``stage.init_from`` (~15 s)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from _models import perturb_zero_init
from _runs import compose_cfg
from worldline.scripts.export import lora_main
from worldline.train.lora_export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    SIDECAR,
    LoraBaseMismatch,
    check_lora_base,
)
from worldline.train.pipeline import WorldPipeline

TOL = 1e-5


def _lora_run(root: Path) -> Path:
    """An export folder (what resolve_checkpoint accepts) of a LoRA finetune whose adapters
    are "trained": B random, alpha != r so the scale alpha/r matters."""
    from safetensors.torch import save_file

    from worldline.models.autoencoder import VideoAutoencoder
    from worldline.models.world_model import WorldModel
    from worldline.train.lora import inject_lora
    from worldline.train.pipeline_io import autoencoder_args, world_model_args

    cfg = OmegaConf.to_container(compose_cfg(
        ["stage=finetune", "stage.init_from=x", "experiment=smoke", "stage.lora.rank=4",
         "stage.lora.alpha=12"]), resolve=True, enum_to_str=True)
    torch.manual_seed(0)
    ae = VideoAutoencoder(autoencoder_args(cfg))
    wm = WorldModel(*world_model_args(cfg))
    perturb_zero_init(wm)
    inject_lora(wm, OmegaConf.create(cfg["stage"]["lora"]))
    with torch.no_grad():
        for n, p in wm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    root.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in wm.state_dict().items()},
              str(root / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()},
              str(root / "autoencoder.safetensors"))
    (root / "config.json").write_text(json.dumps({"format": "worldline-export", "config": cfg,
                                                  "step": 7}))
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    run = _lora_run(root / "run")
    lora_main([str(run), "--out", str(root / "export")])
    return root / "export"


def _dit_inputs(dit: torch.nn.Module):
    g = torch.Generator().manual_seed(1)
    a = dit.args
    return (torch.randn(2, a.in_channels + 1, 2, 4, 4, generator=g), torch.rand(2, generator=g),
            torch.randn(2, 6, a.text_dim, generator=g), torch.ones(2, 6, dtype=torch.bool))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_peft_layout_is_what_peft_writes_and_loads_onto_base(exported: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import safe_open

    names = {p.name for p in exported.iterdir()}
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG, SIDECAR, "base", "merged"} <= names
    assert "lora.safetensors" not in names
    conf = json.loads((exported / ADAPTER_CONFIG).read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 12
    assert Path(conf["base_model_name_or_path"]) == (exported / "base").resolve()
    with safe_open(str(exported / ADAPTER_WEIGHTS), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "base_model.model.blocks.0.attn.qkv.lora_A.weight" in keys

    # What PEFT itself writes for a PeftModel around the same DiT and config.
    base = WorldPipeline.from_pretrained(exported / "base").transformer
    ref_cfg = LoraConfig.from_pretrained(str(exported))
    ref_cfg.base_model_name_or_path = None  # a module passed in; PeftModel records None
    ref = get_peft_model(base, ref_cfg)
    ref.save_pretrained(str(exported.parent / "peft_ref"))
    with safe_open(str(exported.parent / "peft_ref" / ADAPTER_WEIGHTS), framework="pt") as f:
        assert set(f.keys()) == keys and f.metadata() == meta
    ref_conf = json.loads((exported.parent / "peft_ref" / ADAPTER_CONFIG).read_text())
    assert set(ref_conf) == set(conf)
    assert {k: v for k, v in ref_conf.items() if k != "base_model_name_or_path"} == \
        {k: v for k, v in conf.items() if k != "base_model_name_or_path"}

    # The acceptance check: PEFT on base/ == merged/, != base.
    base = WorldPipeline.from_pretrained(exported / "base").transformer
    merged = WorldPipeline.from_pretrained(exported / "merged").transformer
    x = _dit_inputs(base)
    with torch.no_grad():
        y_base = base(*x)
        peft_model = PeftModel.from_pretrained(base, str(exported)).eval()
        y_peft, y_merged = peft_model(*x), merged(*x)
    d_merged, d_base = _diff(y_peft, y_merged), _diff(y_peft, y_base)
    print(f"PEFT(base/)+adapter vs merged/: {d_merged:.2e}; vs base/: {d_base:.2e}")
    assert d_merged <= TOL and d_base > 1e-3


def test_from_pretrained_of_the_export_dir_applies_the_adapter(exported: Path) -> None:
    from worldline.train.lora import has_lora

    pipe = WorldPipeline.from_pretrained(exported)
    merged = WorldPipeline.from_pretrained(exported / "merged")
    base = WorldPipeline.from_pretrained(exported / "base")
    assert has_lora(pipe.world_model) and pipe.source == exported
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 5, 2, 4, 4, generator=g), torch.rand(2, generator=g),
         torch.randint(0, 255, (2, 8), generator=g), torch.ones(2, 8, dtype=torch.bool))
    with torch.no_grad():
        y, y_merged, y_base = pipe.world_model(*x), merged.world_model(*x), base.world_model(*x)
    print(f"from_pretrained(DIR) vs merged/: {_diff(y, y_merged):.2e}; "
          f"vs base/: {_diff(y, y_base):.2e}")
    assert _diff(y, y_merged) <= TOL and _diff(y, y_base) > 1e-3
    # save_pretrained of the adapted pipeline merges: the same weights as merged/.
    again = WorldPipeline.from_pretrained(pipe.save_pretrained(exported.parent / "resaved"))
    with torch.no_grad():
        assert _diff(again.world_model(*x), y_merged) <= TOL


def test_a_wrong_base_is_one_clear_error(exported: Path, tmp_path: Path) -> None:
    base = WorldPipeline.from_pretrained(exported / "base")
    check_lora_base(exported, base.transformer)  # the right one, module or folder
    check_lora_base(exported, exported / "base")
    with pytest.raises(LoraBaseMismatch, match="base weights sha256") as e:
        check_lora_base(exported, exported / "merged")  # same shapes, other weights
    assert str(exported) in str(e.value)
    from worldline.models.dit import VideoDiT
    import dataclasses

    other = VideoDiT(dataclasses.replace(base.transformer.args, hidden_size=64))
    with pytest.raises(LoraBaseMismatch, match=r"blocks\.0\.attn\.qkv: weight \[192, 64\], "
                                               r"adapter needs \[384, 128\]"):
        check_lora_base(exported, other)
    shallow = VideoDiT(dataclasses.replace(base.transformer.args, depth=1))
    with pytest.raises(LoraBaseMismatch, match=r"blocks\.1\.attn\.proj: no such layer"):
        check_lora_base(exported, shallow)
    # from_pretrained of an adapter whose base_model_name_or_path is another model.
    moved = tmp_path / "adapter"
    moved.mkdir()
    for f in (ADAPTER_WEIGHTS, SIDECAR):
        (moved / f).write_bytes((exported / f).read_bytes())
    conf = json.loads((exported / ADAPTER_CONFIG).read_text())
    conf["base_model_name_or_path"] = str(exported / "merged")
    (moved / ADAPTER_CONFIG).write_text(json.dumps(conf))
    with pytest.raises(LoraBaseMismatch, match=f"LoRA adapter {moved} does not fit base"):
        WorldPipeline.from_pretrained(moved)


def test_merged_folder_feeds_eval_and_init_from(exported: Path) -> None:
    from worldline.models.world_model import WorldModel
    from worldline.train import checkpoint as ckpt_lib
    from worldline.train.stages import load_init_weights

    merged = exported / "merged"
    assert (merged / "model_index.json").is_file()
    meta = ckpt_lib.read_meta(merged)  # worldline-eval reads the run's model/stage from here
    assert meta["config"]["stage"]["lora"]["enabled"] is False and meta["step"] == 7
    assert ckpt_lib.resolve_checkpoint(merged) == merged
    ref = WorldPipeline.from_pretrained(merged).world_model
    fresh = WorldModel(ref.dit.args, ref.text_encoder.args)
    assert load_init_weights(fresh, merged) == set()
    for (n, a), b in zip(ref.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n


def test_diffusers_format_needs_a_wan_dit(exported: Path, capsys) -> None:
    run = exported.parent / "run"
    with pytest.raises(SystemExit) as e:
        lora_main([str(run), "--out", str(exported.parent / "x"), "--format", "diffusers"])
    assert e.value.code == 2
    assert "Wan-architecture DiT" in capsys.readouterr().err
