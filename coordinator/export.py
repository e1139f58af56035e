"""A run's trained network as one plain PyTorch module (`launch.py export`, `synthgrad.trained_model`).

The stages' files hold {unit index: state dict}; this rebuilds the network from the run's
config.json, loads every unit, and hands back an `nn.Sequential` of torch.nn layers only, so the
exported file needs nothing but torch to load; a recurrent model's layers are synthgrad's
`Recurrent` (and `Slow`), so loading it needs synthgrad, and each call starts from a zero state
(the stream a run carried its state along is not the caller's).
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from synthgrad.common.config import ConfigError, RunConfig
from synthgrad.common.files import atomic_torch_save, load_model_state
from synthgrad.common.models import build_units
from synthgrad.common.recurrent import recurrent_layers


def trained_model(run_dir: str | Path) -> nn.Sequential:
    """The network a run trained, in eval mode. Raises ConfigError when the folder is not a
    finished run, or when a stage's file is missing (a multi-host run keeps each host's stages
    in that host's folder: copy them together first)."""
    run_dir = Path(run_dir)
    config = run_dir / "config.json"
    if not config.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.json in it)")
    cfg = RunConfig.from_dict(json.loads(config.read_text()))
    units = build_units(cfg)
    try:
        states = load_model_state(run_dir)
    except FileNotFoundError as exc:
        raise ConfigError(f"{exc}: the run has not finished (its checkpoints are under "
                          f"{run_dir}/checkpoints; resume it to the end first)") from None
    missing = [i for i in range(len(units)) if i not in states]
    if missing:
        raise ConfigError(f"{run_dir} holds no weights for layers {missing}: a run across hosts writes "
                          f"each host's stage*.pt there; copy them into this folder")
    for i, unit in enumerate(units):
        unit.load_state_dict(states[i])
    for layer in recurrent_layers(nn.Sequential(*units)):
        layer.streaming = False
    return nn.Sequential(*units).eval()


def export(run_dir: str | Path, out: str | Path, state_dict_only: bool = False) -> Path:
    """Write the trained network to `out`: the module (`torch.load(out, weights_only=False)`), or
    with `state_dict_only` its state dict (`torch.load(out)`, for a model built elsewhere)."""
    model = trained_model(run_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(out, model.state_dict() if state_dict_only else model)
    return out
