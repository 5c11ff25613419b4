"""Pure model code for worldline: nn.Modules and math, no distributed code, no I/O.

Modules (import them directly; this package stays import-light):

- ``autoencoder``: causal 3D-conv video VAE (``VideoAutoencoder``, ``AutoencoderArgs``).
- ``dit``: latent video diffusion transformer (``VideoDiT``, ``DiTArgs``; named sizes
  live in conf/model/*.yaml).
- ``text``: byte tokenizer and small text encoder (``ByteTokenizer``, ``TextEncoder``).
- ``world_model``: text encoder + DiT with CFG dropout (``WorldModel``).
- ``flow``: rectified-flow timesteps, path, loss, Euler/Heun samplers, CFG.
- ``attention``: one attention entry point (flash-attn on CUDA when importable, SDPA otherwise).
- ``conditioning``: per-frame timestep/action/camera/audio embedder, reference-image builder.
- ``audio``: log-mel front end per pixel frame (``LogMelFrames``), audio cross-attention.
- ``rollout``: autoregressive world-model rollout with a windowed KV cache and per-condition CFG.
- ``losses``: optional perceptual loss (user-supplied local net) and 3D PatchGAN + hinge loss.
- ``init``: meta-device construction (``build_on_meta``, ``materialize``) and init replay.
- ``metrics``: PSNR and SSIM.
- ``av_sync``: audio–visual sync metric (audio envelope vs motion energy, with its baseline).
- ``adapters``: diffusers video VAE and transformers text encoders from local folders.
"""
