"""Local-folder adapters: a diffusers video VAE and a transformers text encoder (no network)."""

import pytest
import torch

from worldline.models.dit import DiTArgs
from worldline.models.text import TextEncoderArgs
from worldline.models.world_model import WorldModel

# Zero-init nets produce denormals on CPU: flushing them avoids a ~20x slowdown.
torch.set_flush_denormal(True)

diffusers = pytest.importorskip("diffusers", reason="the hf extra is not installed")
transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

from worldline.models.adapters import DiffusersVideoVAE, HFTextEncoder  # noqa: E402


def test_diffusers_wan_vae_adapter_from_a_local_folder(tmp_path):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=[0.1, 0.2, 0.3, 0.4],
        latents_std=[1.0, 2.0, 3.0, 4.0])
    vae.save_pretrained(tmp_path)
    ad = DiffusersVideoVAE.from_pretrained(tmp_path)
    assert ad.latent_shape(9, 32, 32) == (4, 3, 4, 4)
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    mean, logvar = ad.encode(x)
    assert mean.shape == logvar.shape == (1, 4, 3, 4, 4)
    z = ad.normalize(mean)
    torch.testing.assert_close(ad.denormalize(z), mean)
    torch.testing.assert_close(z[:, 3], (mean[:, 3] - 0.4) / 4.0)
    assert ad.decode(mean).shape == x.shape
    assert not any(p.requires_grad for p in ad.parameters())
    given = DiffusersVideoVAE(vae, latents_mean=[0.0] * 4, latents_std=[2.0] * 4)
    assert given.latent_std.tolist() == [2.0] * 4
    with pytest.raises(FileNotFoundError):
        DiffusersVideoVAE.from_pretrained(tmp_path / "missing")


def _tiny_t5_folder(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "red": 4, "ball": 5, "moves": 6}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    cfg = transformers.T5Config(vocab_size=8, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                num_heads=4)
    torch.manual_seed(0)
    transformers.T5EncoderModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def test_hf_text_encoder_from_a_local_folder_feeds_the_world_model(tmp_path):
    _tiny_t5_folder(tmp_path)
    enc = HFTextEncoder.from_pretrained(tmp_path, max_len=8)
    emb, mask = enc(["a red ball moves", "ball"])
    assert emb.shape == (2, 8, 32) and mask.tolist()[1][:2] == [True, False]
    assert emb[1, 1:].abs().sum() == 0  # padding zeroed: cacheable independent of batch
    solo, _ = enc(["ball"])
    torch.testing.assert_close(solo[0], emb[1])
    assert not any(p.requires_grad for p in enc.parameters())
    # cached features go straight into the world model (text_dim = encoder width)
    wm = WorldModel(DiTArgs(in_channels=4, hidden_size=64, depth=1, num_heads=4, text_dim=32),
                    TextEncoderArgs(dim=32, depth=1, num_heads=4, max_len=8))
    v = wm(torch.randn(2, 4, 2, 4, 4), torch.rand(2), None, mask, text_emb=emb,
           drop_text=torch.tensor([False, True]))
    assert v.shape == (2, 4, 2, 4, 4)


def _tiny_ltx(tmp_path):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8,) * 4,
        layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5, scaling_factor=0.7)
    with torch.no_grad():  # non-trivial statistics, saved with the weights as LTX stores them
        vae.latents_mean.copy_(torch.linspace(-0.5, 0.5, 8))
        vae.latents_std.copy_(torch.linspace(0.5, 2.0, 8))
    vae.save_pretrained(tmp_path)
    return vae


def test_ltx_vae_uses_its_true_compression_and_the_ltx_pipeline_normalisation(tmp_path):
    from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline

    ref = _tiny_ltx(tmp_path)
    ad = DiffusersVideoVAE.from_pretrained(tmp_path)
    assert ad.family == "AutoencoderKLLTXVideo"
    assert ad.latent_shape(9, 64, 64) == (8, 2, 2, 2)  # 8x temporal, 32x spatial
    x = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    raw, _ = ad.encode(x)
    want = LTXPipeline._normalize_latents(raw, ref.latents_mean, ref.latents_std, 0.7)
    torch.testing.assert_close(ad.normalize(raw), want, rtol=0, atol=1e-6)
    back = LTXPipeline._denormalize_latents(want, ref.latents_mean, ref.latents_std, 0.7)
    torch.testing.assert_close(ad.denormalize(want), back, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="1 \\+ k\\*8"):
        ad.latent_shape(17, 64, 60)


def test_hunyuan_vae_scales_by_its_scaling_factor(tmp_path):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8,) * 4,
                                              layers_per_block=1, norm_num_groups=4)
    vae.save_pretrained(tmp_path)
    ad = DiffusersVideoVAE.from_pretrained(tmp_path)
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    raw, _ = ad.encode(x)
    assert raw.shape == (1, 4, 2, 4, 4) == (1, *ad.latent_shape(5, 32, 32))
    # HunyuanVideoPipeline: latents = encode(x) * scaling_factor; decode(latents / factor)
    torch.testing.assert_close(ad.normalize(raw), raw * 0.476986, rtol=0, atol=1e-6)
    torch.testing.assert_close(ad.denormalize(raw * 0.476986), raw, rtol=0, atol=1e-6)


def test_wan_vae_matches_the_wan_pipeline_formulas(tmp_path):
    torch.manual_seed(0)
    mean, std = [0.1, -0.2, 0.3, 0.05], [0.5, 2.0, 1.5, 3.0]
    diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                               temperal_downsample=[False, True, True], latents_mean=mean,
                               latents_std=std).save_pretrained(tmp_path)
    ad = DiffusersVideoVAE.from_pretrained(tmp_path)
    raw = torch.randn(2, 4, 3, 4, 4)
    m, inv_std = torch.tensor(mean).view(1, 4, 1, 1, 1), 1.0 / torch.tensor(std).view(1, 4, 1, 1, 1)
    # pipeline_wan_i2v: (z - latents_mean) * (1 / latents_std); pipeline_wan: z / (1/std) + mean
    torch.testing.assert_close(ad.normalize(raw), (raw - m) * inv_std, rtol=0, atol=1e-6)
    torch.testing.assert_close(ad.denormalize(raw), raw / inv_std + m, rtol=0, atol=1e-6)


def test_bad_vae_and_text_encoder_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="hub id.*never downloads"):
        DiffusersVideoVAE.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    _tiny_t5_folder(tmp_path / "t5")
    with pytest.raises(ValueError, match=r"t5/config.json: _class_name is None"):
        DiffusersVideoVAE.from_pretrained(tmp_path / "t5")
    (tmp_path / "bare").mkdir()
    transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=8, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=4)
    ).save_pretrained(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*bare.*model.text_encoder"):
        HFTextEncoder.from_pretrained(tmp_path / "bare")
    enc = HFTextEncoder.from_pretrained(tmp_path / "bare", tokenizer=tmp_path / "t5",
                                        hidden_state=-2, max_len=4)
    emb, _ = enc(["a red ball"])
    assert emb.shape == (1, 4, 16)


def test_wan22_style_vae_patchifies_to_16x_spatial(tmp_path):
    """Wan 2.2's VAE (residual, 2x2 pixel patching: 16x spatial, 48 channels at full size)."""
    torch.manual_seed(0)
    diffusers.AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
        out_channels=12, patch_size=2, scale_factor_spatial=16, latents_mean=[0.5] * 8,
        latents_std=[2.0] * 8).save_pretrained(tmp_path)
    ad = DiffusersVideoVAE.from_pretrained(tmp_path)
    assert ad.latent_shape(9, 64, 64) == (8, 3, 4, 4)
    raw, _ = ad.encode(torch.rand(1, 3, 9, 64, 64) * 2 - 1)
    assert raw.shape == (1, 8, 3, 4, 4)
    torch.testing.assert_close(ad.normalize(raw), (raw - 0.5) / 2.0)
    assert ad.decode(raw).shape == (1, 3, 9, 64, 64)
