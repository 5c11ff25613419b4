"""Procedural synthetic "world": the embedded default dataset (no downloads, fully seeded).

A clip shows a camera window panning slowly over a static background texture (a "location")
that is larger than the view, with a few sprites of persistent identity (shape + colour)
moving by discrete per-frame actions. Everything a world model might condition on is
recorded: actions ``[T, S]``, camera position ``[T, 2]``, sprite tracks and a caption.

Agents (``agents=True``, the default): each action slot also drives a small (2-4 px), fast
dot of its own colour (``AGENT_COLOURS``), drawn on top of everything and kept inside the
view. They are the hard case for an autoencoder: a world model that must follow the actions
needs them, yet erasing them barely moves whole-frame PSNR (models/metrics.py). Their start
positions come from a generator of their own, so sprites, camera and caption are the same
with and without them; ``clip["agents"][i]["positions"]`` follows ``sprites``' conventions.

Conventions (world pixels, origin top-left, (x, y) order):
- ``camera[t]`` is the top-left corner of the view in the world at frame ``t``;
- ``sprites[i]["positions"][t]`` is the top-left corner of sprite ``i`` at frame ``t``;
- ``actions[t, i]`` is the action sprite ``i`` takes *at* frame ``t``, i.e.
  ``positions[t + 1] = clamp(positions[t] + step * ACTION_DELTAS[actions[t]])``; the last
  row is sampled but its effect falls outside the clip (the usual ``s_{t+1} = f(s_t, a_t)``).

Sound (``audio=True``): every sprite has a pure tone of its own (``TONES_HZ``, by colour, so
an identity sounds the same in every clip) that plays during the frame intervals in which
the sprite moves (``positions[t] != positions[t - 1]``: frame ``t``'s interval
``[t / fps, (t + 1) / fps)``), with 5 ms fades against clicks. The mp4 carries it as an AAC
track from time 0; ``render_audio`` renders it for any motion (e.g. swapped-audio controls).

Tiny CPU example::

    cfg = SyntheticWorldConfig(num_frames=9, height=32, width=32)
    clip = render_clip(cfg, index=0)   # clip["frames"]: uint8 [9, 32, 32, 3]
    print(clip["caption"])             # "a red circle, ... in a meadow, camera panning left"
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from worldline.data.video import encode_mp4

# Bump when rendering changes, so cached datasets (keyed by a config hash) are regenerated.
SYNTHETIC_VERSION = 1  # agents are versioned by their config field (data/shards.py)

# Held-out clips (validation, worldline-eval, benchmarks) come from the same world settings
# with the seed moved by this much: clips no training run drew.
HELDOUT_SEED_OFFSET = 1000

ACTION_NAMES = ("stay", "up", "down", "left", "right")
NUM_ACTIONS = 5
# (dx, dy) per action in units of the sprite step; y grows downwards.
ACTION_DELTAS = np.array([[0, 0], [0, -1], [0, 1], [-1, 0], [1, 0]], dtype=np.int64)
ACTION_PERSISTENCE = 0.7  # probability of repeating the previous action: smooth-ish motion

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 70, 230),
    "yellow": (250, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "cyan": (40, 220, 230),
}
# name -> (top colour, bottom colour, blob colours); palettes differ enough to tell apart.
LOCATIONS: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, ...], ...]]] = {
    "meadow": ((120, 190, 90), (60, 130, 50), ((90, 160, 60), (200, 210, 90), (40, 100, 40))),
    "desert": ((235, 205, 140), (200, 150, 90), ((180, 120, 70), (245, 225, 170), (160, 110, 60))),
    "ocean": ((80, 150, 220), (20, 60, 140), ((30, 90, 170), (200, 230, 250), (10, 40, 110))),
    "city": ((150, 150, 160), (80, 80, 90), ((60, 60, 70), (220, 200, 120), (120, 120, 135))),
}
PAN_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "static": (0, 0)}
_PAN_PROBS = (0.225, 0.225, 0.225, 0.225, 0.1)
_WORLD_SCALE = 1.5  # background is 1.5x the view in each dimension: room to pan and roam


@dataclass
class SyntheticWorldConfig:
    """Synthetic dataset definition. Primitive fields only: used as an OmegaConf structured
    config, and its values hash into the on-disk cache directory name."""

    num_clips: int = 256
    clips_per_shard: int = 32
    num_frames: int = 17
    height: int = 64
    width: int = 64
    num_sprites: int = 3
    fps: float = 8.0
    seed: int = 0
    codec: str = "libx264"
    audio: bool = False  # a tone per moving sprite in the mp4 (module docstring)
    audio_rate: int = 16000
    agents: bool = True  # a small fast dot per action slot (module docstring)


# One tone per colour (index as in COLOURS), about a fourth apart: well separated for a
# one-frame FFT at 8 fps and below the Nyquist frequency of 8 kHz audio.
TONES_HZ = (330.0, 440.0, 587.0, 784.0, 1046.0, 1397.0, 1865.0, 2489.0)
_FADE_S = 0.005


def tone_of(colour: str) -> float:
    """The tone (Hz) of a sprite of ``colour`` (a ``COLOURS`` name) in the world with sound."""
    return TONES_HZ[list(COLOURS).index(colour) % len(TONES_HZ)]


def sprite_moving(positions: np.ndarray) -> np.ndarray:
    """bool ``[T, S]`` from sprite positions ``[S, T, 2]``: whether sprite ``s`` moved into
    frame ``t`` (position differs from frame ``t - 1``; never at ``t = 0``)."""
    positions = np.asarray(positions)
    moving = np.zeros(positions.shape[:2][::-1], bool)
    moving[1:] = (positions[:, 1:] != positions[:, :-1]).any(-1).T
    return moving


def render_audio(cfg: SyntheticWorldConfig, moving: np.ndarray, tones: list[float]) -> np.ndarray:
    """The clip's sound: float32 mono ``[round(T * audio_rate / fps)]`` in [-1, 1].

    ``moving`` bool ``[T, S]``: sprite ``s`` sounds its tone ``tones[s]`` (Hz) throughout frame
    ``t``'s interval when ``moving[t, s]``; each run of moving frames fades in and out over
    5 ms. Phase runs from time 0, so consecutive moving frames make one continuous tone.
    """
    moving = np.asarray(moving, bool)
    if moving.ndim != 2 or moving.shape[1] != len(tones):
        raise ValueError(f"moving must be [T, S] with S = len(tones) = {len(tones)}, got {moving.shape}")
    rate, fps = int(cfg.audio_rate), float(cfg.fps)
    T, S = moving.shape
    n = int(round(T * rate / fps))
    bounds = np.round(np.arange(T + 1) * rate / fps).astype(np.int64)
    t = np.arange(n) / rate
    out = np.zeros(n, np.float64)
    amp = 0.8 / max(S, 1)  # the sum of all tones stays inside [-1, 1]
    fade = max(1, int(round(_FADE_S * rate)))
    for s in range(S):
        env = np.zeros(n)
        for ti in np.flatnonzero(moving[:, s]):
            env[bounds[ti] : bounds[ti + 1]] = 1.0
        # Raised-cosine ramps at the edges of every run (inside it, so silence stays silent).
        edges = np.flatnonzero(np.diff(np.concatenate([[0.0], env, [0.0]])))
        for on, off in zip(edges[0::2], edges[1::2]):
            k = min(fade, (off - on) // 2)
            if k:
                ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)
                env[on : on + k] *= ramp
                env[off - k : off] *= ramp[::-1]
        out += amp * env * np.sin(2 * np.pi * float(tones[s]) * t)
    return out.astype(np.float32)


def world_size(cfg: SyntheticWorldConfig) -> tuple[int, int]:
    """(height, width) of the background world in pixels."""
    return int(round(cfg.height * _WORLD_SCALE)), int(round(cfg.width * _WORLD_SCALE))


def _sprite_size(cfg: SyntheticWorldConfig) -> int:
    return max(4, min(cfg.height, cfg.width) // 6)


def _sprite_step(cfg: SyntheticWorldConfig) -> int:
    return max(1, min(cfg.height, cfg.width) // 32)


# Agent dot colours by action slot (cycled): each is more than 50 levels away in some channel
# from every sprite colour (eval's colour-based sprite tracking tolerates 32).
AGENT_COLOURS = ((255, 0, 255), (0, 255, 0), (255, 128, 192), (0, 128, 255))


def _agent_size(cfg: SyntheticWorldConfig) -> int:
    """Side of an agent dot: 2 px at 32, 3 px at 64, 4 px from 80 px frames up."""
    return int(np.clip(min(cfg.height, cfg.width) // 20, 2, 4))


def _agent_step(cfg: SyntheticWorldConfig) -> int:
    """Pixels an agent moves per frame: twice a sprite's step (2 px at 32, 4 px at 64), more
    than its own size at 64 px, so consecutive positions do not overlap."""
    return 2 * _sprite_step(cfg)


def _agent_positions(cfg: SyntheticWorldConfig, index: int, actions: np.ndarray,
                     camera: np.ndarray) -> np.ndarray:
    """int64 ``[S, T, 2]`` world top-left corners of the agent dots. Same action semantics as
    the sprites (``actions[t]`` moves frame ``t`` to ``t + 1``), clamped to the view of the
    frame they land in so a dot is always visible."""
    T, S = actions.shape
    size, step = _agent_size(cfg), _agent_step(cfg)
    rng = np.random.default_rng([cfg.seed, index, 1])  # not the clip's: the rest is unchanged
    span = np.array([cfg.width - size, cfg.height - size])
    pos = np.zeros((S, T, 2), np.int64)
    pos[:, 0] = camera[0] + rng.integers(0, np.maximum(span, 0) + 1, size=(S, 2))
    for ti in range(1, T):
        moved = pos[:, ti - 1] + step * ACTION_DELTAS[actions[ti - 1]]
        pos[:, ti] = np.clip(moved, camera[ti], camera[ti] + span)
    return pos


@functools.lru_cache(maxsize=64)
def _shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean mask ``[size, size]`` of a shape centred in its box."""
    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = np.abs(x - c), np.abs(y - c)
    r = size / 2
    if shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif shape == "square":
        mask = np.ones((size, size), bool)
    elif shape == "triangle":  # apex up: half-width grows linearly from top to bottom
        mask = dx <= (y + 1) / size * r
    elif shape == "diamond":
        mask = dx + dy <= r
    elif shape == "cross":
        mask = (dx <= size / 6) | (dy <= size / 6)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=32)
def location_texture(location: str, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Static background uint8 ``[height, width, 3]`` for a named location.

    Vertical gradient + soft coloured blobs + faint diagonal stripes, seeded by
    ``(seed, location)`` so every clip at that location sees the same world. Read-only.
    """
    top, bottom, blobs = LOCATIONS[location]
    rng = np.random.default_rng([seed, list(LOCATIONS).index(location), 7919])
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    g = (y / max(height - 1, 1))[..., None]
    img = (1 - g) * np.array(top, np.float32) + g * np.array(bottom, np.float32)
    for _ in range(max(6, height * width // 400)):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.04, 0.12) * min(height, width)
        colour = np.array(blobs[rng.integers(len(blobs))], np.float32)
        # Smooth falloff (not a hard disc) keeps the texture easy on the codec.
        alpha = np.clip(1.5 - np.hypot(x - cx, y - cy) / radius, 0, 1)[..., None]
        img = (1 - alpha) * img + alpha * colour
    period, angle = rng.uniform(10, 20), rng.uniform(0, np.pi)
    img *= 1 + 0.06 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)[..., None]
    out = np.clip(img, 0, 255).round().astype(np.uint8)
    out.setflags(write=False)
    return out


def _sample_actions(rng: np.random.Generator, num_frames: int, num_sprites: int) -> np.ndarray:
    """Random policy with persistence: int64 ``[T, S]`` in ``[0, NUM_ACTIONS)``."""
    fresh = rng.integers(0, NUM_ACTIONS, size=(num_frames, num_sprites))
    repeat = rng.random((num_frames, num_sprites)) < ACTION_PERSISTENCE
    actions = fresh.copy()
    for t in range(1, num_frames):
        actions[t] = np.where(repeat[t], actions[t - 1], fresh[t])
    return actions.astype(np.int64)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(sprites: list[dict], location: str, pan: str) -> str:
    """E.g. ``"a red circle, a blue square and a yellow triangle in a meadow, camera panning left"``."""
    names = [f"{_article(s['colour'])} {s['colour']} {s['shape']}" for s in sprites]
    where = f"{_article(location)} {location}"
    camera = "static camera" if pan == "static" else f"camera panning {pan}"
    if not names:
        return f"{where}, {camera}"
    things = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{things} in {where}, {camera}"


def render_clip(cfg: SyntheticWorldConfig, index: int, actions: np.ndarray | None = None,
                pan: str | None = None) -> dict:
    """Render clip ``index``; deterministic in ``(cfg.seed, index)``. ``actions`` int64
    ``[T, S]`` and ``pan`` (a ``PAN_DIRECTIONS`` key) replace the drawn ones (controlled
    experiments: every random draw still happens, so the rest of the clip is unchanged).

    Returns a dict: ``frames`` uint8 ``[T, H, W, 3]``, ``actions`` int64 ``[T, S]``,
    ``camera`` float32 ``[T, 2]`` (view top-left (x, y) in world pixels), ``caption`` str,
    ``sprites`` list of ``{"shape", "colour", "positions": int64 [T, 2]}``, ``location`` str,
    ``pan`` str, ``sprite_size``. With ``cfg.agents``: ``agents`` list of ``{"colour": [r, g, b],
    "positions": int64 [T, 2]}`` (one per action slot) and ``agent_size``. With ``cfg.audio``: ``audio`` float32 ``[round(T * audio_rate / fps)]``
    (``render_audio``) and each sprite's ``tone_hz``.
    """
    T, H, W, S = cfg.num_frames, cfg.height, cfg.width, cfg.num_sprites
    rng = np.random.default_rng([cfg.seed, index])
    world_h, world_w = world_size(cfg)
    location = list(LOCATIONS)[rng.integers(len(LOCATIONS))]
    background = location_texture(location, world_h, world_w, cfg.seed)

    # Camera: constant slow pan, speed capped so the whole path stays inside the world.
    drawn = list(PAN_DIRECTIONS)[rng.choice(len(PAN_DIRECTIONS), p=_PAN_PROBS)]
    pan = drawn if pan is None else pan
    direction = np.array(PAN_DIRECTIONS[pan], np.float64)
    room = np.array([world_w - W, world_h - H], np.float64)
    speed = min(rng.uniform(0.5, 1.0), float(room.min()) / max(T - 1, 1))
    travel = np.abs(direction) * speed * (T - 1)
    start = rng.uniform(0, 1, size=2) * (room - travel) + np.where(direction < 0, travel, 0)
    t = np.arange(T, dtype=np.float64)[:, None]
    # Rendering uses whole-pixel crops; record exactly what was rendered.
    camera = np.round(start + t * speed * direction).astype(np.int64)

    size, step = _sprite_size(cfg), _sprite_step(cfg)
    shapes = rng.choice(len(SHAPES), size=S, replace=S > len(SHAPES))
    colours = rng.choice(len(COLOURS), size=S, replace=S > len(COLOURS))
    drawn_actions = _sample_actions(rng, T, S)
    if actions is None:
        actions = drawn_actions
    elif actions.shape != (T, S) or actions.min() < 0 or actions.max() >= NUM_ACTIONS:
        raise ValueError(f"actions must be [{T}, {S}] in [0, {NUM_ACTIONS}), got {actions.shape}")
    positions = np.zeros((S, T, 2), np.int64)
    # Sprites start inside the first view so clips open with everything visible.
    positions[:, 0, 0] = camera[0, 0] + rng.integers(0, max(W - size, 0) + 1, size=S)
    positions[:, 0, 1] = camera[0, 1] + rng.integers(0, max(H - size, 0) + 1, size=S)
    upper = np.array([world_w - size, world_h - size])
    for ti in range(1, T):
        moved = positions[:, ti - 1] + step * ACTION_DELTAS[actions[ti - 1]]
        positions[:, ti] = np.clip(moved, 0, upper)

    agent_size = _agent_size(cfg)
    agent_pos = (_agent_positions(cfg, index, actions, camera) if cfg.agents
                 else np.zeros((0, T, 2), np.int64))

    frames = np.empty((T, H, W, 3), np.uint8)
    palette = list(COLOURS.values())
    for ti in range(T):
        cx, cy = camera[ti]
        view = frames[ti]
        view[:] = background[cy : cy + H, cx : cx + W]
        for si in range(S):  # later sprites are drawn on top
            mask = _shape_mask(SHAPES[shapes[si]], size)
            x0, y0 = positions[si, ti, 0] - cx, positions[si, ti, 1] - cy
            # Clip the sprite box to the view (sprites may roam outside it).
            vx0, vy0, vx1, vy1 = max(x0, 0), max(y0, 0), min(x0 + size, W), min(y0 + size, H)
            if vx0 >= vx1 or vy0 >= vy1:
                continue
            sub = mask[vy0 - y0 : vy1 - y0, vx0 - x0 : vx1 - x0]
            view[vy0:vy1, vx0:vx1][sub] = palette[colours[si]]
        for si in range(len(agent_pos)):  # dots on top: small, but always in view
            x0, y0 = agent_pos[si, ti] - camera[ti]
            view[y0 : y0 + agent_size, x0 : x0 + agent_size] = AGENT_COLOURS[si % len(AGENT_COLOURS)]

    sprites = [
        {"shape": SHAPES[shapes[i]], "colour": list(COLOURS)[colours[i]], "positions": positions[i]}
        for i in range(S)
    ]
    clip = {
        "frames": frames,
        "actions": actions,
        "camera": camera.astype(np.float32),
        "caption": make_caption(sprites, location, pan),
        "sprites": sprites,
        "location": location,
        "pan": pan,
        "sprite_size": size,
    }
    if cfg.agents:
        clip["agents"] = [{"colour": list(AGENT_COLOURS[i % len(AGENT_COLOURS)]),
                           "positions": agent_pos[i]} for i in range(S)]
        clip["agent_size"] = agent_size
    if cfg.audio:  # after all random draws: clips are the same with and without sound
        tones = [tone_of(s["colour"]) for s in sprites]
        for sprite, tone in zip(sprites, tones):
            sprite["tone_hz"] = tone
        clip["audio"] = render_audio(cfg, sprite_moving(positions), tones)
    return clip


def clip_to_sample(cfg: SyntheticWorldConfig, index: int, clip: dict | None = None) -> dict:
    """Encode a rendered clip as a shard sample: ``__key__``, ``mp4`` bytes, ``json``, ``txt``."""
    clip = render_clip(cfg, index) if clip is None else clip
    meta = {
        "source": "synthetic",
        "version": SYNTHETIC_VERSION,
        "index": index,
        "seed": cfg.seed,
        "fps": cfg.fps,
        "num_frames": cfg.num_frames,
        "height": cfg.height,
        "width": cfg.width,
        "world_size": list(world_size(cfg)),
        "location": clip["location"],
        "pan": clip["pan"],
        "action_names": list(ACTION_NAMES),
    }
    audio = {}
    if clip.get("audio") is not None:
        audio = {"audio": clip["audio"], "audio_rate": cfg.audio_rate}
        meta["audio_rate"] = cfg.audio_rate
    return {
        "__key__": f"{index:08d}",
        "mp4": encode_mp4(clip["frames"], cfg.fps, codec=cfg.codec, **audio),
        "json": {
            "actions": clip["actions"].tolist(),
            "camera": clip["camera"].tolist(),
            "sprites": [
                {"shape": s["shape"], "colour": s["colour"], "positions": s["positions"].tolist(),
                 **({"tone_hz": s["tone_hz"]} if "tone_hz" in s else {})}
                for s in clip["sprites"]
            ],
            **({"agents": [{"colour": a["colour"], "positions": a["positions"].tolist()}
                           for a in clip["agents"]]} if "agents" in clip else {}),
            "caption": clip["caption"],
            "meta": meta,
        },
        "txt": clip["caption"],
    }


def synthetic_samples(cfg: SyntheticWorldConfig, indices: Iterable[int] | None = None) -> Iterator[dict]:
    """Yield encoded shard samples for ``indices`` (default: all ``cfg.num_clips``)."""
    for index in range(cfg.num_clips) if indices is None else indices:
        yield clip_to_sample(cfg, index)


def config_dict(cfg) -> dict:
    """Plain dict of a config given as the dataclass, a mapping or an OmegaConf DictConfig."""
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return {k: cfg[k] for k in cfg}
