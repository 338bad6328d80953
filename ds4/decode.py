"""The decode loop: the one place tokens are generated, for `ds4 -p`, the chat, `ds4-bench` and
`ds4-test`.

`decode(session, prompt, max_tokens, policy, eos_id)` syncs the prompt (timed as prefill), then
yields committed tokens one by one. The policy says how they are chosen:

* a `Sampler`: one trunk step per token, the sampler picks (temperature 0: greedy argmax);
* `Speculative`: greedy with MTP (or any drafter's) speculative cycles (speculative.py), whose
  committed stream is the one greedy sampling gives; with `adaptive`, cycles that do not pay for
  themselves make way for plain steps for a while (AdaptiveGate).

One stopping rule set for every policy: the token budget, the context end (the session keeps one
position free, so the last token can still be evaluated) and EOS, which is neither yielded nor
evaluated; with `exclude_eos` (benchmarks that must run a fixed number of steps) the best other
token is taken instead. `DecodeStats` records the stream, the timings, why it stopped, and for
speculative policies the cycle telemetry (`SpecStats`).

A plain step yields its token before evaluating it, so a consumer can still read the logits that
chose it (`--dump-logprobs`); a speculative cycle yields its tokens once committed. Either way a
session whose decode ran to its end holds prompt + generated tokens. Ctrl+C between or inside
steps leaves the session at its last committed token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterator

from ds4.session import Sampler, Session
from ds4.speculative import AdaptiveGate, Drafter, SpecOptions, SpecStats, plain_step, speculative_step


@dataclass(frozen=True)
class Speculative:
    """Greedy decoding through speculative cycles of `opts`; drafts from the session's MTP head,
    or from `drafter` when given."""

    opts: SpecOptions = SpecOptions()
    drafter: Drafter | None = None
    adaptive: bool = False


Policy = Sampler | Speculative


class StopReason(Enum):
    BUDGET = "budget"  # max_tokens generated
    CONTEXT = "context"  # the context is full
    EOS = "eos"


@dataclass
class DecodeStats:
    prompt_tokens: int = 0  # prefilled tokens (past the reused live prefix)
    prefill_seconds: float = 0.0
    generated: list[int] = field(default_factory=list)
    decode_seconds: float = 0.0
    stopped_by: StopReason | None = None  # None while running, or after an interruption
    max_commit: int = 0  # the most tokens one step or cycle committed
    spec: SpecStats = field(default_factory=SpecStats)  # speculative cycles (untouched by plain policies)

    @property
    def stopped_by_eos(self) -> bool:
        return self.stopped_by is StopReason.EOS

    def line(self) -> str:
        prefill = self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0
        gen = len(self.generated) / self.decode_seconds if self.decode_seconds > 0 else 0.0
        return f"ds4: prefill: {prefill:.2f} t/s, generation: {gen:.2f} t/s"


def decode(session: Session, prompt: list[int] | None, max_tokens: int, policy: Policy, eos_id: int,
           stats: DecodeStats | None = None, exclude_eos: bool = False) -> Iterator[int]:
    """Sync `prompt` (None: go on from the session as it is), then yield up to `max_tokens`
    committed tokens chosen by `policy`, recording into `stats`."""
    stats = DecodeStats() if stats is None else stats
    if exclude_eos and isinstance(policy, Sampler) and policy.temperature > 0:
        raise ValueError("exclude_eos is for greedy decoding")
    if prompt is not None:
        _timed_sync(session, prompt, stats)
    room = session.ctx - session.pos - 1
    budget = min(max_tokens, room)
    t0 = time.perf_counter()
    steps = _plain if isinstance(policy, Sampler) else _speculative
    try:
        for committed in steps(session, policy, budget, eos_id, stats, exclude_eos):
            stats.max_commit = max(stats.max_commit, len(committed))
            for token in committed:
                stats.generated.append(token)
                stats.decode_seconds = time.perf_counter() - t0
                yield token
        if stats.stopped_by is None:
            stats.stopped_by = StopReason.BUDGET if budget == max_tokens else StopReason.CONTEXT
    finally:
        stats.decode_seconds = time.perf_counter() - t0


def generate(session: Session, prompt: list[int] | None, max_tokens: int, policy: Policy, eos_id: int,
             on_token: Callable[[int], None] | None = None, stats: DecodeStats | None = None,
             exclude_eos: bool = False) -> DecodeStats:
    """Run `decode` to its end, passing each token to `on_token`; returns the stats."""
    stats = DecodeStats() if stats is None else stats
    for token in decode(session, prompt, max_tokens, policy, eos_id, stats, exclude_eos):
        if on_token is not None:
            on_token(token)
    return stats


def _timed_sync(session: Session, prompt: list[int], stats: DecodeStats) -> None:
    """Sync the prompt, recording as prefill only the tokens past the reused live prefix."""
    reused = session.pos if session.valid and prompt[:session.pos] == session.tokens else 0
    stats.prompt_tokens = len(prompt) - reused
    t0 = time.perf_counter()
    session.sync(prompt)
    stats.prefill_seconds = time.perf_counter() - t0


def _greedy(session: Session, eos_id: int, exclude_eos: bool) -> int:
    return session.argmax(exclude=eos_id if exclude_eos else None)


def _plain(session: Session, sampler: Sampler, budget: int, eos_id: int, stats: DecodeStats,
           exclude_eos: bool) -> Iterator[list[int]]:
    """One token per step, yielded before it is evaluated (its logits are still the session's)."""
    for _ in range(budget):
        token = _greedy(session, eos_id, True) if exclude_eos else session.sample(sampler)
        if token == eos_id:
            stats.stopped_by = StopReason.EOS
            return
        yield [token]
        session.eval(token)


def _speculative(session: Session, policy: Speculative, budget: int, eos_id: int, stats: DecodeStats,
                 exclude_eos: bool) -> Iterator[list[int]]:
    """Speculative cycles (or, while the adaptive gate says so, plain greedy steps) until `budget`
    tokens are committed."""
    gate = AdaptiveGate() if policy.adaptive else None
    done = 0
    while done < budget:
        t_step = time.perf_counter()
        if gate is not None and not gate.speculate():
            token = _greedy(session, eos_id, exclude_eos)
            if token == eos_id:
                stats.stopped_by = StopReason.EOS
                return
            plain_step(session, token, stats.spec)
            gate.record_plain(time.perf_counter() - t_step)
            committed = [token]
        else:
            committed = speculative_step(session, policy.opts, budget - done, eos_id, stats.spec, policy.drafter)
            if committed == [eos_id]:
                if not exclude_eos:
                    stats.stopped_by = StopReason.EOS
                    return
                committed = [_greedy(session, eos_id, True)]
                plain_step(session, committed[0], stats.spec)
            elif gate is not None:
                gate.record_cycle(len(committed), time.perf_counter() - t_step)
        done += len(committed)
        yield committed
