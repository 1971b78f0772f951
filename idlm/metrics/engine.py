"""Engine-wide counters: what the engine did, summed over requests and steps.

Gauges (running, waiting, KV blocks) are set by the engine after every step; everything else only
grows. The draft-verification counters are ``VerifyCounters``, fed the same ``VerifyStep`` as the
request's own ``DecodeStats``. The server exports these (Prometheus); benches read the rates."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .verify import VerifyCounters

MAX_DRAFT_POSITIONS = 7  # stride 8


def _per_position() -> list[int]:
    return [0] * MAX_DRAFT_POSITIONS


@dataclass
class EngineMetrics(VerifyCounters):
    # gauges
    running: int = 0  # requests holding KV (prefilling or decoding)
    waiting: int = 0  # requests queued (new or preempted)
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    # counters
    requests_added: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> requests
    steps: int = 0  # batched forwards
    stationary_steps: int = 0  # steps whose requests were the previous step's (batch state reused)
    rows: int = 0  # tokens fed to the model (prompt chunks + windows, padding included)
    request_forwards: int = 0  # sum over steps of the requests in the step
    preemptions: int = 0
    prompt_tokens: int = 0  # prompt tokens prefilled (first time)
    recomputed_tokens: int = 0  # tokens prefilled again after a preemption
    generation_tokens: int = 0  # output tokens committed
    # VerifyCounters' per-position counters, summed over request-steps, for every draft position a stride allows
    proposed_at: list[int] = field(default_factory=_per_position)  # drafts verified, by position
    tested_at: list[int] = field(default_factory=_per_position)  # drafts checked, by position
    accepted_at: list[int] = field(default_factory=_per_position)  # drafts accepted, by position
    schedule_s: float = 0.0  # time choosing the batch (scheduler, block allocation)
    prepare_s: float = 0.0  # time building the batch's tensors
    forward_s: float = 0.0  # time in the model (forward and logits)
    postprocess_s: float = 0.0  # time verifying, committing and building outputs

    def reset(self) -> None:
        """Every counter and gauge back to its start value, in place; the pool size stays."""
        fresh = type(self)(kv_blocks_total=self.kv_blocks_total)
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))

    @property
    def tpf(self) -> float:
        """Output tokens per request-forward (a forward that served k requests counts k times)."""
        return self.generation_tokens / self.request_forwards if self.request_forwards else 0.0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def overhead_ratio(self) -> float:
        """Scheduling, batch preparation and post-processing time per unit of forward time."""
        return (self.schedule_s + self.prepare_s + self.postprocess_s) / self.forward_s if self.forward_s else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(tpf=round(self.tpf, 4), acceptance_at=[round(x, 4) for x in self.acceptance_at],
                 kv_usage=round(self.kv_usage, 4), overhead_ratio=round(self.overhead_ratio, 4))
        return d
