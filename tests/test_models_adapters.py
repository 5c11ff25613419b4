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
