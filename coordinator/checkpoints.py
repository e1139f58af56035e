"""The coordinator's side of checkpoints: when to ask for one, which stages have saved which
step, and the manifest (RUN_DIR/checkpoints/manifest.json) that names the last step complete on
every stage. A checkpoint is complete only when every stage has said SAVED for the same step;
the stage side of the protocol is workers/checkpointing.py."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from synthgrad.common import wire
from synthgrad.common.config import RunConfig
from synthgrad.common.files import atomic_write_json


class CheckpointBook:
    def __init__(self, cfg: RunConfig, run_dir: Path, num_stages: int, log: Callable[[str], None],
                 wall: Callable[[], float], committed: Callable[[int, int], None] = lambda step, drop: None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.num_stages = num_stages
        self.log = log
        self.wall = wall  # seconds of the run so far (continues across a resume)
        self.committed = committed  # tells every stage (step complete, step to drop): COMMITTED
        self.asked: Optional[float] = None  # when the checkpoint in flight was asked for
        self._last = time.monotonic()
        self._saved: dict[int, dict[int, dict]] = {}  # step -> stage -> where it was saved
        self.taken: list[dict] = []  # complete checkpoints: step, wall_s, took_s
        self.failures = 0
        self.last_complete: Optional[int] = None  # step of the last complete checkpoint

    @property
    def manifest_path(self) -> Path:
        return self.run_dir / "checkpoints" / "manifest.json"

    def started(self) -> None:
        """Training began: the periodic clock starts now."""
        self._last = time.monotonic()

    def due(self) -> bool:
        """Time for a periodic checkpoint (--checkpoint-every seconds since the last)."""
        every = self.cfg.checkpoint_every
        if every > 0 and time.monotonic() - self._last >= every:
            self._last = time.monotonic()
            return True
        return False

    def ask(self, send_to_first: Callable[[wire.Message], None], reason: str) -> None:
        """Ask stage 0 to save at its next step boundary; its marker takes the request down
        the stages. One checkpoint at a time."""
        if self.asked is not None:
            return
        self.asked = time.monotonic()
        send_to_first(wire.Checkpoint(reason))

    def forget_request(self) -> None:
        """Ask anew even if one is in flight (the one in flight still completes)."""
        self.asked = None

    def on_saved(self, msg: wire.Saved) -> None:
        if msg.error:  # this checkpoint is incomplete for good; the last complete one stands
            self._saved.pop(msg.step, None)
            self.asked = None
            self.failures += 1
            self.log(f"[coordinator] checkpoint at step {msg.step} failed on stage {msg.stage}: "
                     f"{msg.error}; the last complete checkpoint stays step {self.last_complete}")
            self.committed(-1 if self.last_complete is None else self.last_complete, msg.step)
            return
        if msg.step not in self._saved and self.asked is None:
            return  # a late SAVED of a checkpoint already given up
        saved = self._saved.setdefault(msg.step, {})
        saved[msg.stage] = {"path": msg.path, "host": msg.host}
        if len(saved) < self.num_stages:
            return
        took = time.monotonic() - (self.asked or time.monotonic())
        self.asked = None
        del self._saved[msg.step]
        try:
            self.write_manifest(msg.step, saved, final=False)
        except OSError as exc:
            self.failures += 1
            self.log(f"[coordinator] cannot write the manifest of step {msg.step}: {exc}; the last "
                     f"complete checkpoint stays step {self.last_complete}")
            self.committed(-1 if self.last_complete is None else self.last_complete, msg.step)
            return
        self.taken.append({"step": msg.step, "wall_s": self.wall(), "took_s": took})
        self.log(f"checkpoint: step {msg.step} saved on every stage in {took:.2f}s ({self.manifest_path})")
        self.committed(msg.step, -1)

    def write_manifest(self, step: int, stages: dict[int, dict], final: bool) -> None:
        """The manifest names the last step that is complete on every stage (written atomically)."""
        atomic_write_json(self.manifest_path, {
            "step": step, "final": final, "mode": self.cfg.mode, "num_stages": self.num_stages,
            "stages": {str(s): stages[s] for s in sorted(stages)}, "wall_s": self.wall(),
            "written_at": time.time(), "config": self.cfg.to_dict()})
        self.last_complete = step


class StopAfterCheckpoint:
    """A first Ctrl-C / SIGTERM: ask for a checkpoint at the next step and stop once it is
    complete, or after 3 x --heartbeat-timeout without one (a second signal stops at once)."""

    def __init__(self, book: CheckpointBook, timeout_s: float, log: Callable[[str], None]):
        self.book = book
        self.timeout_s = timeout_s
        self.log = log
        self.signal: Optional[str] = None  # set by the signal handler
        self._stop_by: Optional[float] = None
        self._before: Optional[int] = None  # the last complete checkpoint when the signal came
        self._failures_before = 0

    def arm(self, signal_name: str) -> None:
        """The first signal came (called from the handler, so the user hears of it at once,
        even when a second signal follows before the loop comes round)."""
        self.signal = signal_name
        self.log(f"{signal_name}: saving every stage at the next step, then stopping "
                 f"(press Ctrl-C again to stop at once)")

    def should_stop(self, ask: Callable[[], None], nothing_to_save: bool) -> bool:
        """Called every loop once a signal came: True when the run should stop now."""
        if self._stop_by is None:
            self._stop_by = time.monotonic() + self.timeout_s
            self._before = self.book.last_complete
            self._failures_before = self.book.failures
            self.book.forget_request()  # a periodic request in flight still completes; ask anew
            ask()
            if nothing_to_save:
                return True
        if self.book.asked is None and self.book.last_complete != self._before:
            self.log(f"stopped after the checkpoint at step {self.book.last_complete}")
            return True
        if self.book.asked is None and self.book.failures > self._failures_before:
            self.log(f"the checkpoint failed; stopping with the last complete one (step {self.book.last_complete})")
            return True
        if time.monotonic() > self._stop_by:
            self.log("no checkpoint within the time allowed; stopping without one")
            return True
        return False
