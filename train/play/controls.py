"""The model's action space as keys, and validation of the page's messages.

Discrete action slots (``DiTArgs.num_action_slots`` x ``num_actions``; action 0 is "no key")
get one key group each: slot 0 W/S/A/D/Q/E/Z/C, slot 1 I/K/J/L/U/O/M/".", slot 2
T/G/F/H/R/Y/V/N; a slot beyond those stays at action 0 (listed without keys). The order within
a group follows the synthetic world's action names (stay, up, down, left, right). A camera
(``camera_dim`` = 2: the view position, as in the synthetic data) moves with the arrow keys:
the page sends a velocity, the session integrates it per pixel frame.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

__all__ = ["ActionSpace", "MessageError", "parse_message", "KEY_GROUPS", "CAMERA_KEYS"]

KEY_GROUPS = (("w", "s", "a", "d", "q", "e", "z", "c"),
              ("i", "k", "j", "l", "u", "o", "m", "."),
              ("t", "g", "f", "h", "r", "y", "v", "n"))
CAMERA_KEYS = {"ArrowLeft": (-1.0, 0.0), "ArrowRight": (1.0, 0.0),
               "ArrowUp": (0.0, -1.0), "ArrowDown": (0.0, 1.0)}
# The synthetic world's names (data/synthetic.py ACTION_NAMES); other models: "action k".
DEFAULT_NAMES = ("stay", "up", "down", "left", "right")


@dataclass
class ActionSpace:
    """What the model can be told each pixel frame: ``slots`` discrete actions in
    [0, num_actions) and a ``camera_dim`` vector (0: none)."""

    slots: int
    num_actions: int
    camera_dim: int
    names: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, pipe: Any, names: Optional[list[str]] = None) -> "ActionSpace":
        """The action space ``pipe`` (a WorldPipeline) was trained with (its conditions)."""
        args, cond = pipe.transformer.args, pipe.conditions
        slots = args.num_action_slots if "actions" in cond else 0
        cam = args.camera_dim if "camera" in cond else 0
        n = args.num_actions
        if not names:
            names = list(DEFAULT_NAMES) if n == len(DEFAULT_NAMES) else [f"action {k}"
                                                                        for k in range(n)]
        return cls(slots, n, cam, list(names)[:n])

    def keymap(self) -> dict[str, Any]:
        """The page's key map: ``keys`` {key: [slot, action]}, ``camera`` {key: [dx, dy]},
        and a human ``legend`` (rows of slot, key, action name)."""
        keys, legend = {}, []
        for slot in range(self.slots):
            group = KEY_GROUPS[slot] if slot < len(KEY_GROUPS) else ()
            for action in range(1, self.num_actions):
                if action - 1 < len(group):
                    keys[group[action - 1]] = [slot, action]
                    legend.append([slot, group[action - 1].upper(), self.names[action]])
            if not group:
                legend.append([slot, "-", "no keys (held at action 0)"])
        camera = {k: v for k, v in CAMERA_KEYS.items()} if self.camera_dim == 2 else {}
        if camera:
            legend.append(["camera", "arrows", "move the view"])
        return {"keys": keys, "camera": camera, "legend": legend}

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), **self.keymap()}


class MessageError(ValueError):
    """A message the session rejects (the session itself goes on)."""


# Per type: field -> (python type(s), required). Anything else in a message is an error.
_SCHEMA: dict[str, dict[str, tuple]] = {
    "controls": {"actions": (list, True), "camera": (list, False), "seq": (int, False),
                 "t": ((int, float), False)},
    "reset": {"context": (str, False), "image": (str, False)},
    "pause": {"paused": (bool, True)},
    "settings": {"num_steps": (int, False), "cfg_scale": ((int, float), False),
                 "action_cfg_scale": ((int, float), False)},
    "record": {"frames": (int, True)},
    "stop_record": {},
    "ping": {"t": ((int, float), False)},
}
LIMITS = {"num_steps": (1, 64), "cfg_scale": (0.0, 20.0), "action_cfg_scale": (0.0, 20.0),
          "frames": (1, 512)}


def parse_message(text: str, space: ActionSpace, max_bytes: int) -> dict[str, Any]:
    """A WebSocket text message → a validated dict with ``type``; raises MessageError with a
    reason the page can show. Values are range-checked here so the session never sees an
    out-of-range action index (it would index the embedding table out of bounds)."""
    if len(text) > max_bytes:
        raise MessageError(f"message of {len(text)} bytes exceeds the limit of {max_bytes}")
    try:
        msg = json.loads(text)  # JSON only: nothing from the page is ever unpickled or eval'd
    except ValueError as e:
        raise MessageError(f"not JSON: {e}") from None
    if not isinstance(msg, dict) or msg.get("type") not in _SCHEMA:
        raise MessageError(f"unknown message type; expected one of {sorted(_SCHEMA)}")
    schema = _SCHEMA[msg["type"]]
    for key, value in msg.items():
        if key == "type":
            continue
        if key not in schema:
            raise MessageError(f"{msg['type']}: unknown field {key!r}")
        if isinstance(value, bool) and schema[key][0] is not bool:
            raise MessageError(f"{msg['type']}.{key}: wrong type")
        if not isinstance(value, schema[key][0]):
            raise MessageError(f"{msg['type']}.{key}: wrong type {type(value).__name__}")
        if key in LIMITS and not LIMITS[key][0] <= value <= LIMITS[key][1]:
            raise MessageError(f"{msg['type']}.{key}={value} outside {list(LIMITS[key])}")
    for key, (_, required) in schema.items():
        if required and key not in msg:
            raise MessageError(f"{msg['type']}: missing field {key!r}")
    if msg["type"] == "controls":
        acts = msg["actions"]
        if len(acts) != space.slots or not all(
                type(a) is int and 0 <= a < space.num_actions for a in acts):
            raise MessageError(f"controls.actions: {space.slots} integers in "
                               f"[0, {space.num_actions}) expected")
        cam = msg.get("camera", [0.0] * space.camera_dim)
        if len(cam) != space.camera_dim or not all(
                type(c) in (int, float) and abs(c) <= 1.0 for c in cam):
            raise MessageError(f"controls.camera: {space.camera_dim} numbers in [-1, 1] "
                               "expected")
        msg["camera"] = [float(c) for c in cam]
    if msg["type"] == "reset" and ("context" in msg) == ("image" in msg):
        raise MessageError("reset: give exactly one of 'context' (an id) or 'image'")
    return msg
