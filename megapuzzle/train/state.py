"""Resumable training state in safetensors + json (no pickles: resuming never unpickles).

    DIR/latest                 name of the newest complete step directory
    DIR/step_00000120/params.safetensors     trainable tensors by name
    DIR/step_00000120/optim.safetensors      AdamW moments by "<param>/exp_avg" etc. (and
                                             "<param>/main_param", fp32 master weights of
                                             bf16 params: train.block_optimizer)
    DIR/step_00000120/state.json             step, tokens, rng states, user extras

A step directory is complete once `latest` names it (written last, atomically), so a kill
during a save leaves the previous checkpoint in charge and loses at most one interval.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megapuzzle.fileio import atomic_write_json, atomic_write_text, save_safetensors_atomic


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": base64.b64encode(json.dumps(random.getstate()).encode()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    py = json.loads(base64.b64decode(s["python"]))
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(s["torch"])), dtype=torch.uint8))


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]) -> dict[str, torch.Tensor]:
    out = {}
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if torch.is_tensor(v):
                out[f"{names[p]}/{k}"] = v
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter],
                           tensors: dict[str, torch.Tensor]) -> None:
    for key, v in tensors.items():
        pname, k = key.rsplit("/", 1)
        p = named[pname]
        optimizer.state[p][k] = v.to(p.device) if k != "step" else v
    # AdamW keeps 'step' as a tensor; states without moments yet are simply absent.


def save_train_state(ckpt_dir: str | os.PathLike, step: int, params: dict[str, torch.nn.Parameter],
                     optimizer, extra: dict | None = None, keep: int = 2) -> Path:
    root = Path(ckpt_dir)
    d = root / f"step_{step:08d}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    save_safetensors_atomic({k: v.detach() for k, v in params.items()}, d / "params.safetensors")
    if optimizer is not None:
        if hasattr(optimizer, "state_tensors"):  # keyed by parameter name already (BlockOptimizers)
            tensors = optimizer.state_tensors()
        else:
            tensors = optimizer_tensors(optimizer, {p: n for n, p in params.items()})
        save_safetensors_atomic(tensors, d / "optim.safetensors")
    atomic_write_json(d / "state.json", {"step": step, "rng": _rng_state(), "extra": extra or {}})
    atomic_write_text(root / "latest", d.name + "\n")  # the commit point
    for old in sorted(root.glob("step_*"))[:-keep]:
        if old.name != d.name:
            shutil.rmtree(old, ignore_errors=True)
    return d


def latest_step_dir(ckpt_dir: str | os.PathLike) -> Path | None:
    root = Path(ckpt_dir)
    f = root / "latest"
    if not f.is_file():
        return None
    d = root / f.read_text().strip()
    return d if (d / "state.json").is_file() else None


def load_train_state(ckpt_dir: str | os.PathLike, params: dict[str, torch.nn.Parameter],
                     optimizer, restore_rng: bool = True) -> dict | None:
    """Restore params (in place), optimizer moments and RNG; returns {"step", "extra"} or None.
    `optimizer` (also for save_train_state): a torch optimizer, None, or an object with
    state_tensors() / load_state_tensors(tensors) keyed by parameter name."""
    from megapuzzle.fileio import read_safetensors

    d = latest_step_dir(ckpt_dir)
    fix = f"delete {d} to resume from the step before it (or {ckpt_dir} to start the stage afresh)"
    if d is None:
        return None
    saved = read_safetensors(d / "params.safetensors", fix)
    missing = set(params) - set(saved)
    if missing:
        raise RuntimeError(f"checkpoint {d} lacks {sorted(missing)[0]}; it was written by a different model — "
                           f"delete {ckpt_dir} to start over")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    if optimizer is not None and (d / "optim.safetensors").is_file():
        tensors = read_safetensors(d / "optim.safetensors", fix)
        if hasattr(optimizer, "load_state_tensors"):
            optimizer.load_state_tensors(tensors)
        else:
            load_optimizer_tensors(optimizer, params, tensors)
    state = json.loads((d / "state.json").read_text())
    if restore_rng:
        _set_rng_state(state["rng"])
    return {"step": state["step"], "extra": state.get("extra", {})}
