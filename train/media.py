"""Sample media for the run dir and W&B: one mp4 per video and one contact-sheet PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from worldline.data.video import write_contact_sheet, write_mp4


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[N, 3, T, H, W] in [-1, 1] → uint8 [N, T, H, W, 3]."""
    v = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(0, 2, 3, 4, 1).cpu().numpy()


def frames_sha256(frames: np.ndarray) -> str:
    """SHA-256 of uint8 frames [T, H, W, 3] (C order): the identity of generated pixels.

    mp4 bytes are not: the same frames through libx264 came out different in about one
    process in four here (decoded pixels off by up to 20 levels), so worldline-play's
    recordings and their worldline-sample replays compare these digests, not files."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(frames, np.uint8).tobytes()).hexdigest()


def save_samples(out_dir: Path, videos: dict[str, torch.Tensor], fps: float,
                 captions: Optional[list[str]] = None,
                 audio: Optional[dict[str, torch.Tensor]] = None,
                 audio_rate: int = 16000) -> dict[str, dict[str, Path]]:
    """Write ``<name>_<i>.mp4`` for every video of every group, plus ``contact_sheet.png`` whose
    rows are the videos (groups in order) and columns are frames. ``audio``: per group, the
    waveforms [N, S] at ``audio_rate`` that conditioned its videos; each mp4 carries its
    clip's, muxed in sync from time 0. Returns the files by W&B key."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    rows = []
    for name, video in videos.items():
        frames = to_uint8_frames(video)
        rows.append(frames)
        sound = (audio or {}).get(name)
        for i, clip in enumerate(frames):
            path = out_dir / f"{name}_{i}.mp4"
            if sound is not None and i < len(sound):
                write_mp4(path, clip, fps, audio=sound[i].detach().float().cpu().numpy(),
                          audio_rate=audio_rate)
            else:
                write_mp4(path, clip, fps)
            written[f"samples/{name}_{i}"] = path
    # Groups may differ in length (e.g. 1-frame references): pad time by repeating the last frame.
    t_max = max(r.shape[1] for r in rows)
    rows = [np.concatenate([r, np.repeat(r[:, -1:], t_max - r.shape[1], 1)], 1) for r in rows]
    sheet = out_dir / "contact_sheet.png"
    write_contact_sheet(sheet, np.concatenate(rows, 0))
    if captions:
        (out_dir / "captions.txt").write_text("\n".join(captions) + "\n")
    return {"videos": written, "images": {"samples/contact_sheet": sheet}}
