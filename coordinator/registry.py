"""Who is who in a run: stages register (or are turned away), the coordinator learns each one's
ZeroMQ identity and activation endpoint, and every later message is checked against the stage
its sender registered as."""
from __future__ import annotations

from typing import Optional

from synthgrad.common import wire

# what a registered stage may say only about itself
OWN_MESSAGES = (wire.Metrics, wire.Done, wire.Ready, wire.Error, wire.Heartbeat, wire.Saved)


class Registry:
    def __init__(self, num_stages: int):
        self.num_stages = num_stages
        self.registered: dict[int, wire.Register] = {}
        self.identities: dict[int, bytes] = {}
        self.stage_of: dict[bytes, int] = {}
        self.ready: dict[int, str] = {}  # stage -> its activation input endpoint

    def sender_problem(self, msg: wire.Message, identity: bytes) -> Optional[str]:
        """Why `msg` may not come from this peer (None when it may): only REGISTER comes from a
        peer the coordinator does not know; a stage speaks only for itself, and sends gradients
        only to the stage before it."""
        if isinstance(msg, wire.Register):
            return None
        sender = self.stage_of.get(identity)
        if sender is None:
            return f"{type(msg).__name__} from a peer that never registered"
        claimed = getattr(msg, "stage", sender)
        if isinstance(msg, OWN_MESSAGES) and claimed != sender:
            return f"{type(msg).__name__} for stage {claimed} from stage {sender}"
        if isinstance(msg, wire.Grad) and msg.to_stage != sender - 1:
            return f"stage {sender} sent a gradient for stage {msg.to_stage}"
        if isinstance(msg, wire.EvalResult) and sender != self.num_stages - 1:
            return f"an evaluation from stage {sender} (only the last stage evaluates)"
        return None

    def register(self, identity: bytes, msg: wire.Register, started: bool) -> Optional[str]:
        """Record the stage, or say why it is turned away (the run goes on either way)."""
        if identity in self.stage_of:
            return f"this peer is stage {self.stage_of[identity]} already"
        if not 0 <= msg.stage < self.num_stages:
            return f"this run has stages 0..{self.num_stages - 1}"
        if msg.stage in self.registered:
            first = self.registered[msg.stage]
            return f"stage {msg.stage} is taken (pid {first.pid} on {first.host})"
        if started or self.complete:
            return "the run has started"
        self.registered[msg.stage] = msg
        self.identities[msg.stage] = identity
        self.stage_of[identity] = msg.stage
        return None

    @property
    def complete(self) -> bool:
        return len(self.registered) == self.num_stages

    def set_ready(self, stage: int, endpoint: str) -> bool:
        """Note a stage's input endpoint; True once every stage is ready."""
        self.ready[stage] = endpoint
        return len(self.ready) == self.num_stages

    def downstream(self, stage: int) -> str:
        return self.ready[stage + 1] if stage + 1 < self.num_stages else ""
