"""What a stage worker that cannot go on tells the coordinator (ERROR): a verdict in liveness's
vocabulary (common/liveness.py), saying which process failed and how, and, for an error of its
own, what it ran into, so that the restart policy can tell a failure another try may mend from
one that would only repeat."""
from __future__ import annotations

import dataclasses
import os

from synthgrad.common.config import ConfigError
from synthgrad.common.data import DataError
from synthgrad.common.imports import ImportPathError
from synthgrad.common.liveness import Fault, Process, Verdict, reported
from synthgrad.common.models import ModelError
from synthgrad.common.parts import NonFinite
from synthgrad.common.recurrent import RecurrentError
from synthgrad.common.streams import StreamError

# errors that the same configuration meets again on every try (a device this host lacks is a
# ConfigError too: common/devices.py DeviceError)
CONFIGURATION_ERRORS = (ConfigError, ModelError, DataError, ImportPathError, RecurrentError, StreamError)
MAX_WORDS = 4000  # of an error's words on the wire (its header is bounded: common/wire.py)


def fault_of(exc: BaseException) -> Fault:
    """What a stage's own error says about another try."""
    if isinstance(exc, NonFinite):
        return Fault.DIVERGED
    if isinstance(exc, CONFIGURATION_ERRORS):
        return Fault.CONFIGURATION
    return Fault.OTHER


def own_failure(stage: int, exc: BaseException) -> Verdict:
    """Stage `stage` (this process) failed with `exc`, in its words."""
    return bounded(reported(Process.of_stage(stage, os.getpid()), f"{type(exc).__name__}: {exc}",
                            fault=fault_of(exc)))


def bounded(verdict: Verdict) -> Verdict:
    """The verdict with its words cut to MAX_WORDS (a message's header has a bound)."""
    if len(verdict.detail) <= MAX_WORDS:
        return verdict
    return dataclasses.replace(verdict, detail=verdict.detail[:MAX_WORDS] + " ...")
