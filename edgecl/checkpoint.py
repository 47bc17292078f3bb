"""Learner checkpoints: one torch file holding the learner spec and its full state.

Loaded with `weights_only=True`: a checkpoint never runs code when it is read.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from edgecl.atomic import atomic_open
from edgecl.learners import Learner, LearnerSpec, build_learner

FORMAT = "edgecl-checkpoint/1"


def checkpoint_payload(learner: Learner, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint file holds: `learner`'s spec and state, and `meta` (plain data and
    tensors), for `torch.save`."""
    return {"format": FORMAT, "spec": learner.spec.to_dict(), "state": learner.state_dict(),
            "meta": meta or {}}


def save_checkpoint(path: str | Path, learner: Learner, meta: dict[str, Any] | None = None) -> None:
    """Atomically write `learner` (spec + state) and any JSON-like `meta` to `path`."""
    with atomic_open(path) as f:
        torch.save(checkpoint_payload(learner, meta), f)


def checkpoint_bytes(path: str | Path) -> bytes:
    """The raw file, for callers that also hash what they load."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path.read_bytes()


def read_checkpoint(path: str | Path, data: bytes | None = None) -> dict[str, Any]:
    """The checkpoint's payload; `data`: the file's bytes, if the caller has read them."""
    path = Path(path)
    data = checkpoint_bytes(path) if data is None else data
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on foreign files
            warnings.simplefilter("ignore")
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own message is a page of advice to unpickle it
        raise ValueError(f"{path}: not an edgecl checkpoint (a weights-only load refuses what "
                         "it holds: Python objects, or no pickle at all)") from None
    except Exception as e:  # corrupt, truncated or not a torch file at all
        raise ValueError(f"{path}: not an edgecl checkpoint ({_one_line(e)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not an edgecl checkpoint (expected format {FORMAT})")
    return payload


def load_learner(path: str | Path, device: str | None = None, data: bytes | None = None
                 ) -> Learner:
    """Rebuild the learner saved at `path` (`data`: its bytes, if already read); `device`
    overrides the saved device setting."""
    return learner_from_payload(path, read_checkpoint(path, data), device)


def learner_from_payload(path: str | Path, payload: dict[str, Any], device: str | None = None
                         ) -> Learner:
    """The learner of a payload `read_checkpoint` returned (`path` names it in errors)."""
    try:
        spec_dict = payload["spec"]
        if device is not None:
            spec_dict = {**spec_dict, "config": {**spec_dict["config"], "device": device}}
        learner = build_learner(LearnerSpec.from_dict(spec_dict))
        learner.load_state_dict(payload["state"])
    except KeyError as e:
        raise ValueError(f"{path}: damaged edgecl checkpoint (missing key {e})") from None
    except (TypeError, ValueError, RuntimeError) as e:  # wrong types, shapes or config values
        raise ValueError(f"{path}: damaged edgecl checkpoint ({_one_line(e)})") from None
    return learner


def _one_line(err: BaseException) -> str:
    first = str(err).strip().splitlines()
    return f"{type(err).__name__}: {first[0]}" if first else type(err).__name__
