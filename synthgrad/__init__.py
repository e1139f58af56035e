"""synthgrad as a library: the layer the command line (launch.py) is built on.

    import synthgrad
    cfg = synthgrad.RunConfig(mode="unlocked", true_grad_every=10, dataset="synthetic", steps=200)
    run_dir, summary = synthgrad.train(cfg)            # summary.json's contents
    model = synthgrad.trained_model(run_dir)          # the trained network, a plain nn.Sequential

Everything here is re-exported from the packages below it (common/, workers/, coordinator/),
loaded on first use so that `import synthgrad` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> (module, attribute)
_EXPORTS = {
    "RunConfig": ("common.config", "RunConfig"),
    "ConfigError": ("common.config", "ConfigError"),
    "load_config_file": ("common.config", "load_config_file"),
    "Mode": ("common.modes", "Mode"),
    "DataError": ("common.data", "DataError"),
    "RunFailed": ("coordinator.watchdog", "RunFailed"),
    "load_model_state": ("common.files", "load_model_state"),
    "trained_model": ("coordinator.export", "trained_model"),
    "export": ("coordinator.export", "export"),
    "train": ("coordinator.train", "train"),
    "format_summary": ("coordinator.train", "format_summary"),
    "compare": ("coordinator.compare", "run_compare"),
    "resume_config": ("coordinator.resume", "resume_config"),
    "auto_resume": ("coordinator.resume", "auto_resume"),
    "report": ("coordinator.plots", "draw_run"),
    "monitor": ("coordinator.monitor", "watch"),
    "status_table": ("coordinator.monitor", "status_table"),
    "torchrun": ("coordinator.torchrun", None),
    "make_keys": ("common.security", "make_keys"),
    "RemoteStages": ("workers.remote", "RemoteStages"),
    "run_stages": ("workers.remote", "run_stages"),
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
