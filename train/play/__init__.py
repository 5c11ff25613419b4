"""``worldline-play``: step into a trained world model from the browser.

Keys become actions, frames stream back live. The parts, one direction:

* :mod:`.controls`: the model's action space → the page's key map; message validation;
* :mod:`.contexts`: context frames from the shard folders given on the command line, or an
  uploaded image (no other file is ever read);
* :mod:`.session`: one rollout per connection (its own KV cache, decoder state, noise,
  recording), advanced one latent frame at a time (models/stepper.py);
* :mod:`.server`: the aiohttp app (page, WebSocket, downloads), model compute on one worker
  thread so the event loop stays responsive.

CLI: ``scripts/play.py`` (``worldline-play RUN``; ``--script actions.json --out s.mp4`` is the
headless mode). No Trainer, no process group: the pipeline only (ARCHITECTURE.md).
"""
