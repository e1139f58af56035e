"""synthgrad as a library: the layer the command line (launch.py) is built on.

    import synthgrad
    cfg = synthgrad.RunConfig(mode="unlocked", true_grad_every=10, dataset="synthetic", steps=200)
    result = synthgrad.train(cfg)                     # or: run_dir, summary = synthgrad.train(cfg)
    result.summary["test_accuracy"]                   # summary.json's contents
    model = result.model()                            # the trained network, a plain nn.Sequential
    model = synthgrad.trained_model(result.run_dir)   # the same, from any finished run's folder

Everything here is re-exported from the packages below it (common/, workers/, coordinator/),
loaded on first use so that `import synthgrad` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

# synthgrad.common, .workers and .coordinator are the repository's top-level folders: in a
# checkout synthgrad/common (and the others) are relative symbolic links to them, so every
# imported module exists at its path for every tool; installed, they are copied into the package.

# public name -> (module, attribute)
_EXPORTS = {
    "RunConfig": ("synthgrad.common.config", "RunConfig"),
    "ConfigError": ("synthgrad.common.config", "ConfigError"),
    "load_config_file": ("synthgrad.common.config", "load_config_file"),
    "Mode": ("synthgrad.common.modes", "Mode"),
    "PLACEMENTS": ("synthgrad.common.placement", "PLACEMENTS"),
    "DataError": ("synthgrad.common.data", "DataError"),
    "Stream": ("synthgrad.common.streams", "Stream"),
    "Recurrent": ("synthgrad.common.recurrent", "Recurrent"),
    "Slow": ("synthgrad.common.recurrent", "Slow"),
    "RunFailed": ("synthgrad.coordinator.watchdog", "RunFailed"),
    "load_model_state": ("synthgrad.common.files", "load_model_state"),
    "trained_model": ("synthgrad.coordinator.export", "trained_model"),
    "export": ("synthgrad.coordinator.export", "export"),
    "train": ("synthgrad.coordinator.train", "train"),
    "RunResult": ("synthgrad.coordinator.train", "RunResult"),
    "format_summary": ("synthgrad.coordinator.train", "format_summary"),
    "compare": ("synthgrad.coordinator.compare", "run_compare"),
    "resume_config": ("synthgrad.coordinator.resume", "resume_config"),
    "auto_resume": ("synthgrad.coordinator.resume", "auto_resume"),
    "report": ("synthgrad.coordinator.plots", "draw_run"),
    "monitor": ("synthgrad.coordinator.monitor", "watch"),
    "status_table": ("synthgrad.coordinator.monitor", "status_table"),
    "torchrun": ("synthgrad.coordinator.torchrun", None),
    "make_keys": ("synthgrad.common.security", "make_keys"),
    "CONNECT_TIMEOUT_S": ("synthgrad.common.endpoints", "CONNECT_TIMEOUT_S"),
    "RemoteStages": ("synthgrad.workers.remote", "RemoteStages"),
    "run_stages": ("synthgrad.workers.remote", "run_stages"),
    "warm_up_early": ("synthgrad.common.procs", "warm_up_early"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'synthgrad' has no attribute {name!r}") from None
    value = importlib.import_module(module)
    return value if attribute is None else getattr(value, attribute)


def __dir__() -> list[str]:
    return __all__
