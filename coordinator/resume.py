"""`launch.py train --resume RUN_DIR`: continue a run from its last complete checkpoint.

The run continues as it was configured (config.json of RUN_DIR); only options that do not
change what is computed may be given again (run length, monitoring, timeouts, transport). The
manifest (RUN_DIR/checkpoints/manifest.json) names the step saved on every stage and where each
stage's file is (on that stage's host); stage 0 skips the batches up to it, so a locked run
resumed at step S ends with the same parameters as one never interrupted.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from synthgrad.common.config import ConfigError, RunConfig
from synthgrad.common.modes import STAGE_WORKER_MODES, spoken

# options a resumed run may change: how long, how it is watched and transported, not what it
# computes (each field says so itself: common/config.py, resume=True)
MAY_CHANGE = RunConfig.may_change_on_resume()


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / "checkpoints" / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"nothing to resume in {run_dir}: no {path.relative_to(run_dir)} "
                          f"(checkpoints are written every --checkpoint-every seconds, on Ctrl-C and at the end)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not readable: {exc}") from None


def auto_resume(given: dict) -> Optional[str]:
    """`--resume auto --out DIR`, for jobs that a launcher restarts (torchrun --max-restarts, a
    Slurm requeue): the folder to continue when DIR holds a complete checkpoint, else None (the
    first start: a new run into DIR)."""
    out = given.get("out")
    if not out:
        raise ConfigError("--resume auto needs --out DIR: the folder a restarted job finds its "
                          "checkpoints in")
    return str(out) if (Path(out) / "checkpoints" / "manifest.json").is_file() else None


def resume_config(run_dir: str, given: dict) -> RunConfig:
    """The resumed run's config: the saved one, with the allowed options of `given` applied."""
    folder = Path(run_dir)
    saved_path = folder / "config.json"
    if not saved_path.is_file():
        raise ConfigError(f"--resume {run_dir}: not a run folder (no config.json)")
    saved = RunConfig.from_dict(json.loads(saved_path.read_text()))
    if not saved.mode.on_stage_workers:
        raise ConfigError(f"--resume continues {spoken(STAGE_WORKER_MODES)} runs; {run_dir} is {saved.mode}")
    changed = sorted(k for k, v in given.items()
                     if k not in MAY_CHANGE and k not in ("resume", "out") and v != getattr(saved, k))
    if changed:
        raise ConfigError(f"--resume continues the run as it was configured; drop "
                          f"{', '.join('--' + k.replace('_', '-') for k in changed)} (these would change "
                          f"what it computes)")
    read_manifest(folder)  # fail now if there is nothing to resume
    return saved.replace(**{k: v for k, v in given.items() if k in MAY_CHANGE},
                         resume=str(folder), out=str(folder))
