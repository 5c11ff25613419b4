"""One ``worldline-play`` session: a rollout of one world, advanced one latent frame per call.

Each session owns its KV cache (a rolling window, :class:`~worldline.models.stepper.
RolloutStepper`), its decoder state, its noise and its recording; sessions share only the
(read-only) pipeline. :meth:`PlaySession.advance` is the only method that computes: the server
runs it on its worker thread and everything the page asks for (reset, settings, record)
is queued and applied at the start of the next advance, so a command never races a step.

Recording (``record`` N frames) restarts from the current context with the noise
``worldline-sample`` draws for a rollout of N frames (same seed), so the downloaded actions
JSON + first frame replay to the same frames::

    worldline-sample sample.checkpoint=RUN sample.mode=rollout sample.rollout_frames=N \\
        sample.actions=actions.json sample.first_image=first.png sample.window=W ...

(the exact command is in the JSON's ``replay.command``; replay is exact when
``replay.exact`` is true: the settings did not change and all N frames were recorded).

Audio (``worldline-play RUN --audio FILE``, models with ``audio`` in ``stage.conditions``):
the session plays along to a :class:`Soundtrack` in *frame time*: the context frame hears
pixel frame 0's samples, each advance the next tf pixel frames', cut exactly as
``pipe.rollout`` / ``worldline-sample sample.audio=FILE`` cut a whole clip (pixel frame k =
samples ``[k*rate/fps, (k+1)*rate/fps)`` when rate/fps is an integer, e.g. 16000 / 8 = 2000;
otherwise LogMelFrames' near-equal segments of the clip). A recording computes the features of
its 1 + N*tf pixel frames in one go, as the replay will, so it replays bitwise. After the end
of the file the model hears silence marked invalid (its learned null audio), exactly what
worldline-sample feeds past the end of a short file; the audio does not loop. Every reset
(new context, record) starts the audio again at sample 0.

CPU example (tiny)::

    s = PlaySession(WorldPipeline.from_pretrained("runs/control"), ctx, PlaySettings())
    s.set_controls([1, 0, 0], [], seq=1)      # slot 0 "up"
    frame = s.advance()                      # Frame(index=1, frames uint8 [4, H, W, 3], ...)
"""
from __future__ import annotations

import io
import json
import shlex
from pathlib import Path
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from worldline.models.stepper import RolloutStepper, StreamDecoder
from worldline.train.play.contexts import Context
from worldline.train.play.controls import ActionSpace

__all__ = ["PlaySettings", "Frame", "PlaySession", "Soundtrack", "encode_jpeg"]


@dataclass
class PlaySettings:
    """Sampling and session settings (the page may change the first three)."""

    num_steps: int = 4
    cfg_scale: float = 1.0
    action_cfg_scale: float = 1.0
    window: int = 8  # past latent frames kept in the KV cache
    seed: int = 0
    fps: float = 8.0  # of the recorded mp4: worldline-play passes the model's (as sample)
    camera_speed: float = 1.0  # view units per pixel frame while an arrow key is held
    jpeg_quality: int = 90


@dataclass
class Frame:
    """What one advance produced: pixel frames uint8 [n, H, W, 3] of latent frame ``index``
    (n = 1 for a context, tf otherwise), JPEG-encoded, the controls seq it used, timings."""

    index: int
    frames: np.ndarray
    jpegs: list[bytes]
    seq: int
    actions: list[int]
    compute_ms: float
    reset: bool = False
    recording: Optional[dict[str, Any]] = None  # progress, or the finished files
    errors: list[str] = field(default_factory=list)


@dataclass
class Soundtrack:
    """An audio file a session plays along to: its absolute path (for the replay command
    and the page's ``GET /audio``) and its waveform, float32 mono [S] at the model's
    ``settings.audio_rate``."""

    path: Path
    wave: np.ndarray
    _live: Optional[tuple] = field(default=None, init=False, repr=False)  # see live()

    @classmethod
    def load(cls, path: str | Path, pipe: Any) -> "Soundtrack":
        """Read ``path`` at ``pipe``'s audio rate; ValueError (one line) when the model was
        not trained with audio or the file holds no readable audio."""
        from worldline.data.audio import read_audio_control

        if "audio" not in pipe.conditions:
            raise ValueError(f"--audio: {pipe.source} was not trained with audio "
                             "(stage.conditions has no audio)")
        return cls(Path(path).resolve(), read_audio_control(path, pipe.settings.audio_rate,
                                                            "--audio"))

    def frames(self, pipe: Any) -> int:
        """Pixel frames the file covers at the model's frame rate (the last one partly)."""
        fps = pipe.settings.fps or 8.0
        return max(1, int(np.ceil(self.wave.size * fps / pipe.settings.audio_rate)))

    def features(self, pipe: Any, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [1, frames, M] and valid [1, frames] of a clip of ``frames`` pixel frames
        from sample 0, as pipe.rollout computes them."""
        return pipe.audio_features(torch.from_numpy(self.wave), frames)

    def live(self, pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole file's features (computed once; sessions share them)."""
        if self._live is None:
            self._live = self.features(pipe, self.frames(pipe))
        return self._live

    def samples(self, pipe: Any, frames: int) -> np.ndarray:
        """The samples that play during ``frames`` pixel frames, silence after the file."""
        n = pipe.audio_samples(frames)
        return np.pad(self.wave[:n], (0, max(0, n - self.wave.size)))


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """uint8 [H, W, 3] → JPEG bytes (Pillow)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(frame: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame.permute(1, 2, 0).cpu().numpy()).save(buf, format="PNG")
    return buf.getvalue()


class PlaySession:
    """A live rollout from ``context`` (see the module docstring)."""

    def __init__(self, pipe: Any, context: Context, settings: PlaySettings,
                 prompt: Optional[str] = None, space: Optional[ActionSpace] = None,
                 audio: Optional[Soundtrack] = None) -> None:
        self.pipe, self.settings, self.prompt = pipe, settings, prompt
        # A model that does not hear ignores the soundtrack (the server may offer it anyway).
        self.audio = audio if audio is not None and "audio" in pipe.conditions else None
        self.space = space or ActionSpace.of(pipe)
        self.tf = pipe.transformer.args.temporal_downsample
        self._controls = ([0] * self.space.slots, [0.0] * self.space.camera_dim, 0)
        self._camera_pos = [0.0] * self.space.camera_dim
        # Commands from the page, applied by the worker before the next step. Bounded: a
        # flood of commands drops the oldest instead of growing memory.
        self.pending: deque = deque(maxlen=16)
        self.decoder = StreamDecoder(pipe.autoencoder)
        self.recording: Optional[dict[str, Any]] = None
        self.context = context
        self.first: Optional[Frame] = None
        self.first = self._reset(context)

    # ------------------------------------------------------------------ controls
    def set_controls(self, actions: list[int], camera: list[float], seq: int) -> None:
        """The keys held now (called from the event loop; one tuple assignment is atomic)."""
        self._controls = (list(actions), list(camera), seq)

    def _rows(self, n: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], int]:
        """Controls for ``n`` pixel frames from the keys held now: actions [1, n, S] and the
        integrated camera position [1, n, D] (None when the model takes no such input)."""
        acts, vel, seq = self._controls
        dev = self.pipe.device
        a = c = None
        if self.space.slots:
            a = torch.tensor([acts] * n, dtype=torch.long, device=dev)[None]
        if self.space.camera_dim:
            rows = []
            for _ in range(n):
                self._camera_pos = [p + v * self.settings.camera_speed
                                    for p, v in zip(self._camera_pos, vel)]
                rows.append(list(self._camera_pos))
            c = torch.tensor(rows, dtype=torch.float32, device=dev)[None]
        return a, c, seq

    def audio_rows(self, lo: int, n: int, track: Optional[tuple] = None
                    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Audio features [1, n, M] and valid [1, n] of pixel frames lo..lo+n-1 (None, None
        without a soundtrack) from ``track`` (default: the recording's own while one runs,
        else the whole file's); past its end silence marked invalid (the DiT's null audio,
        as worldline-sample feeds past the end of a short file)."""
        if self.audio is None:
            return None, None
        rec = self.recording
        if track is None:
            track = rec["audio"] if rec is not None and rec["audio"] is not None \
                else self.audio.live(self.pipe)
        feats, valid = track
        feats, valid = feats[:, lo:lo + n], valid[:, lo:lo + n]
        short = n - feats.shape[1]
        if short > 0:
            feats = torch.cat([feats, feats.new_zeros(1, short, feats.shape[2])], 1)
            valid = torch.cat([valid, valid.new_zeros(1, short)], 1)
        return feats, valid

    # ------------------------------------------------------------------ compute
    def _shift(self, frames: int) -> float:
        c, _, h, w = self.pipe.latent_shape(1, *self.context.frame.shape[1:])
        return self.pipe.shift_for((c, frames, h, w))

    def start(self, context: Context, rows: Optional[tuple] = None, record: int = 0) -> Frame:
        """Start again from ``context`` now (see :meth:`_reset`; for headless callers that
        own the session, no page commands in between)."""
        return self._reset(context, rows, record)

    def _reset(self, context: Context, rows: Optional[tuple] = None,
               record: int = 0) -> Frame:
        """Start again from ``context``: encode it, prefill a fresh cache, decode frame 0.
        ``record`` > 0 starts a recording of that many frames (worldline-sample's noise)."""
        t0 = time.perf_counter()
        pipe, st = self.pipe, self.settings
        self.context = context
        prompt = self.prompt if self.prompt is not None else context.caption
        cond = pipe.condition_inputs({"caption": [prompt], "text_emb": None}, 1)
        text = None
        if cond["text_ids"] is not None:
            text = pipe.world_model.encode_text(cond["text_ids"], cond["text_mask"])
        z0 = pipe.encode_images(context.frame[None].to(pipe.device))[:, :, None]
        self._camera_pos = [0.0] * self.space.camera_dim
        a0, c0, seq = rows if rows is not None else self._rows(1)
        self.recording = None  # a reset ends a recording (its audio track too)
        # A recording hears its 1 + N*tf pixel frames' features computed in one go, exactly
        # as its replay (pipe.rollout) will; live play slices the whole file's.
        track = self.audio.features(pipe, 1 + record * self.tf) if record and self.audio \
            else None
        s0, v0 = self.audio_rows(0, 1, track)  # the context frame hears pixel frame 0
        # Live play uses the shift of the model's training clip; a recording the one
        # pipe.rollout uses for 1 + N frames (shift_for depends on the token count).
        f_lat = pipe.latent_shape(pipe.settings.sample_size[0], *context.frame.shape[1:])[1]
        self.stepper = RolloutStepper(
            pipe.transformer, z0, text=text, text_mask=cond["text_mask"],
            null_text=pipe.world_model.null_text, window=st.window, num_steps=st.num_steps,
            shift=self._shift(1 + record if record else f_lat), text_scale=st.cfg_scale,
            action_scale=st.action_cfg_scale, context_actions=a0, context_camera=c0,
            context_audio=s0, context_audio_valid=v0)
        self.generator = torch.Generator(device=pipe.device).manual_seed(st.seed)
        if record:
            # pipe.rollout's draw: one [1, C, N, h, w] tensor from a fresh seeded generator.
            g = torch.Generator(device=pipe.device).manual_seed(st.seed)
            noise = torch.randn((1, *z0.shape[1:2], record, *z0.shape[3:]), generator=g,
                                device=g.device).to(z0.device, z0.dtype)
            self.recording = {"frames": record, "noise": noise, "latents": [z0],
                              "actions": [a0], "camera": [c0], "prompt": prompt,
                              "settings": asdict(st), "exact": True, "audio": track}
        self.decoder.reset()
        return self._finish(0, z0, seq, a0, t0, reset=True)

    def _finish(self, index: int, z: torch.Tensor, seq: int, acts: Optional[torch.Tensor],
                t0: float, reset: bool = False) -> Frame:
        from worldline.train.media import to_uint8_frames

        frames = to_uint8_frames(self.decoder(z))[0]
        jpegs = [encode_jpeg(f, self.settings.jpeg_quality) for f in frames]
        actions = [] if acts is None else acts[0, -1].tolist()
        return Frame(index, frames, jpegs, seq, actions, 1000 * (time.perf_counter() - t0),
                     reset=reset)

    def _apply(self, cmd: dict[str, Any]) -> Optional[Frame]:
        """One queued page command; a reset/record returns the new context frame."""
        kind, st = cmd["type"], self.settings
        if kind == "settings":
            for k in ("num_steps", "cfg_scale", "action_cfg_scale"):
                if k in cmd:
                    setattr(st, k, cmd[k])
            self.stepper.num_steps = st.num_steps
            self.stepper.text_scale, self.stepper.action_scale = st.cfg_scale, st.action_cfg_scale
            if self.recording is not None:
                self.recording["exact"] = False
            return None
        if kind == "reset":
            return self._reset(cmd["context_obj"])
        if kind == "record":
            return self._reset(self.context, record=cmd["frames"])
        if kind == "stop_record" and self.recording is not None:
            self.recording["exact"] = False
            self.recording["frames"] = len(self.recording["latents"]) - 1
        return None

    @torch.no_grad()
    def advance(self, rows: Optional[tuple] = None) -> Frame:
        """Apply queued commands, then generate, decode and JPEG-encode the next latent frame
        under the keys held now (or explicit ``rows``: actions [1, tf, S], camera
        [1, tf, D], seq). A reset returns the new context frame instead of stepping."""
        errors = []
        while self.pending:
            try:
                out = self._apply(self.pending.popleft())
            except (KeyError, ValueError) as e:
                errors.append(str(e))
                continue
            if out is not None:
                out.errors = errors
                return out
        rec = self.recording
        if rec is not None and len(rec["latents"]) - 1 >= rec["frames"]:
            out = self._stop_recording()
            self.recording = None
            return out
        t0 = time.perf_counter()
        acts, cam, seq = rows if rows is not None else self._rows(self.tf)
        i = self.stepper.next_frame
        if rec is not None:
            noise = rec["noise"][:, :, len(rec["latents"]) - 1:len(rec["latents"])]
        else:
            c, h, w = self._latent_chw()
            noise = torch.randn((1, c, 1, h, w), generator=self.generator,
                                device=self.generator.device).to(self.pipe.device)
        aud, aud_valid = self.audio_rows(1 + (i - 1) * self.tf, self.tf)
        z = self.stepper.step(noise, acts, cam, aud, aud_valid)
        out = self._finish(i, z, seq, acts, t0)
        out.errors = errors
        if rec is not None:
            rec["latents"].append(z)
            rec["actions"].append(acts)
            rec["camera"].append(cam)
            out.recording = {"recorded": len(rec["latents"]) - 1, "of": rec["frames"]}
        return out

    def _latent_chw(self) -> tuple[int, int, int]:
        c, _, h, w = self.pipe.latent_shape(1, *self.context.frame.shape[1:])
        return c, h, w

    # ------------------------------------------------------------------ recording
    def _stop_recording(self) -> Frame:
        """The finished recording as files (mp4, actions JSON, first.png) on an empty Frame."""
        t0 = time.perf_counter()
        files = self.recording_files()
        return Frame(self.stepper.next_frame - 1, np.zeros((0, 1, 1, 3), np.uint8), [], -1, [],
                     1000 * (time.perf_counter() - t0), recording={"files": files})

    def recording_files(self) -> dict[str, bytes]:
        """``session.mp4`` (the recorded latents decoded in one go, as worldline-sample
        does), ``actions.json`` (worldline-sample's sample.actions format + ``replay``) and
        ``first.png`` (the context frame, for sample.first_image)."""
        from worldline.data.video import encode_mp4
        from worldline.train.media import frames_sha256, to_uint8_frames

        rec, pipe = self.recording, self.pipe
        n = len(rec["latents"]) - 1
        video = pipe.decode(torch.cat(rec["latents"], 2))
        frames = to_uint8_frames(video)[0]
        sound = None if self.audio is None else self.audio.samples(pipe, frames.shape[0])
        mp4 = encode_mp4(frames, rec["settings"]["fps"], audio=sound,
                         audio_rate=pipe.settings.audio_rate)
        doc: dict[str, Any] = {}
        if rec["actions"][0] is not None:
            doc["actions"] = torch.cat(rec["actions"], 1)[0].tolist()
        if rec["camera"][0] is not None:
            doc["camera"] = torch.cat(rec["camera"], 1)[0].tolist()
        s = rec["settings"]
        h, w = self.context.frame.shape[1:]
        cmd = ["worldline-sample", f"sample.checkpoint={Path(pipe.source).resolve()}", "sample.mode=rollout",
               f"sample.rollout_frames={n}", "sample.actions=actions.json",
               "sample.first_image=first.png", f"sample.prompts=[{json.dumps(rec['prompt'])}]",
               f"sample.seed={s['seed']}", f"sample.num_steps={s['num_steps']}",
               f"sample.cfg_scale={s['cfg_scale']}",
               f"sample.action_cfg_scale={s['action_cfg_scale']}",
               f"sample.window={s['window']}", f"data.resolution=[{h},{w}]"]
        if self.audio is not None:
            cmd.append(f"sample.audio={self.audio.path}")
        if pipe.device.type == "cpu":  # thread count changes CPU reductions' bits
            cmd.append(f"run.threads={torch.get_num_threads()}")
        doc["replay"] = {"command": shlex.join(cmd), "args": cmd[1:], "frames": n,
                         "frames_sha256": frames_sha256(frames),
                         "exact": rec["exact"] and n == rec["frames"], "settings": s,
                         "prompt": rec["prompt"], "context": self.context.id}
        return {"session.mp4": mp4, "actions.json": json.dumps(doc, indent=1).encode(),
                "first.png": _png(self.context.frame)}
