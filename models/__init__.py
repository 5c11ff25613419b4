"""Pure model code for worldline: nn.Modules and math, no distributed code, no I/O.

Modules (import them directly; this package stays import-light):

- ``autoencoder``: causal 3D-conv video VAE (``VideoAutoencoder``, ``AutoencoderArgs``).
- ``dit``: latent video diffusion transformer (``VideoDiT``, ``DiTArgs``, ``DIT_SIZES``).
- ``text``: byte tokenizer and small text encoder (``ByteTokenizer``, ``TextEncoder``).
- ``world_model``: text encoder + DiT with CFG dropout (``WorldModel``).
- ``flow``: rectified-flow timesteps, path, loss, Euler/Heun samplers, CFG.
- ``attention``: one attention entry point (flash-attn on CUDA when importable, SDPA otherwise).
"""
