"""Greedy speculative decoding with the MTP head.

One cycle, from a session holding the logits after its last token:

1. first = argmax(session logits): the trunk's own next token, committed whatever happens.
2. Draft: the MTP head pairs the trunk state at the last position with `first` and proposes the
   token after it; more drafts chain on the MTP's own output state. Drafting stops at the depth
   limit (clamped by the token budget, the context left and the prefill chunk), before an EOS,
   or when the MTP's top1-top2 margin falls under `margin` (confidence gate).
3. Verify [first, d1..dn] in one n+1-row trunk pass: d_i is accepted while it equals the trunk's
   argmax after the row before it. Only the verifier's argmax is ever committed; a non-finite
   row is a verifier failure (commit `first` by plain decode instead, never token 0).
4. Commit first + the accepted drafts; the session then holds the logits after them, so the next
   cycle needs no standalone trunk step (continuous mode when n = 1).

Verifiers: `exact` (default) commits exactly what plain greedy decode commits, with bit-identical
logits carried forward. It uses the batched pass where the backend computes every row as a 1-row
decode does (Engine.row_invariant), otherwise it verifies row by row with plain decode steps.
`fast` always uses the batched pass (near-greedy where rows are not computed identically).

Invariant: on return, the session's tokens, states (MTP included) and logits describe exactly the
committed tokens; rejected rows leave nothing behind (states are values and rows a rejected pass
wrote are beyond the committed position, see state.py).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx

from ds4.mtp import same_position_pairing
from ds4.session import Session

MAX_DRAFT = 16


@dataclass(frozen=True)
class SpecOptions:
    draft: int = 1  # drafts per cycle (1 = continuous depth-1)
    margin: float = 3.0  # minimum MTP top1-top2 logit margin to keep drafting; 0 disables
    exact: bool = True  # exact verifier (default) or the fast batched one


@dataclass
class SpecStats:
    """Telemetry of a speculative run."""

    cycles: int = 0
    proposed: Counter = field(default_factory=Counter)  # drafts proposed at lookahead k
    accepted: Counter = field(default_factory=Counter)  # drafts accepted at lookahead k
    committed: int = 0
    trunk_passes: int = 0
    plain_steps: int = 0
    failures: int = 0  # verify rows with non-finite logits
    t_draft: float = 0.0
    t_verify: float = 0.0
    t_rollback: float = 0.0
    t_plain: float = 0.0
    log: Callable[[dict], None] | None = None  # --mtp-log: one record per cycle
    spec_log: Callable[[str], None] | None = None  # DS4_MTP_SPEC_LOG lines (reference engine's format)
    conf_log: Callable[[str], None] | None = None  # DS4_MTP_CONF_LOG lines

    def summary(self) -> str:
        ks = sorted(self.proposed)
        acc = ", ".join(f"k={k} {self.accepted[k]}/{self.proposed[k]}" for k in ks) or "none"
        per_cycle = (self.committed - self.plain_steps) / self.cycles if self.cycles else 0.0
        passes = self.trunk_passes / self.committed if self.committed else 0.0
        spec_pass = (self.t_verify + self.t_rollback) / max(1, self.trunk_passes - self.plain_steps)
        ratio = f"{spec_pass / (self.t_plain / self.plain_steps):.2f}" if self.plain_steps and self.cycles else "n/a"
        return (f"ds4: mtp: {self.cycles} cycles, drafts accepted {acc}, {per_cycle:.2f} tokens/cycle, "
                f"{passes:.2f} trunk passes/token, verify/plain cost {ratio}, "
                f"time draft {self.t_draft:.2f}s verify {self.t_verify:.2f}s rollback {self.t_rollback:.2f}s, "
                f"{self.plain_steps} plain steps, {self.failures} verify failures")


def mtp_drafts(session: Session, first: int, n: int, margin: float,
               eos_id: int) -> tuple[list[int], list[float], tuple[int, int, float] | None]:
    """Up to n MTP drafts for the tokens after `first`, their top1-top2 margins, and the first
    draft step's (top, runner-up, margin) whether or not it passed the gate."""
    mtp, state = session.engine.mtp, session.mtp
    if mtp is None or state is None or not state.ready(session.pos):
        return [], [], None
    # Diagnostic same-position pairing: row pos-1 (h, token pos-1) is in the block; the first
    # draft chains from its MTP output state with `first` at position pos.
    hidden = state.hidden if same_position_pairing() else session.hidden
    if hidden is None:
        return [], [], None
    block = state.block
    drafts, margins, head = [], [], None
    state, token = hidden[None], first
    for _ in range(n):
        logits, block, X = mtp.forward(state, [token], block)
        order = mx.argsort(-logits)[:2]
        top2 = logits[order]
        mx.eval(order, top2)
        (token, runner), (v1, v2) = order.tolist(), top2.tolist()
        if head is None:
            head = (token, runner, v1 - v2)
        if token == eos_id or (margin > 0 and v1 - v2 < margin):
            break
        drafts.append(token)
        margins.append(v1 - v2)
        state = X[-1:]
    return drafts, margins, head


Drafter = Callable[[Session, int, int], list[int]]


def speculative_step(session: Session, opts: SpecOptions, budget: int, eos_id: int, stats: SpecStats,
                     drafter: Drafter | None = None) -> list[int]:
    """One cycle; returns the committed tokens (the first is the trunk's own choice). If that is
    EOS it is returned without being evaluated, as plain decode never evaluates EOS."""
    first = session.argmax()
    if first == eos_id:
        return [first]
    depth = min(opts.draft, MAX_DRAFT, budget - 1, session.ctx - session.pos - 2, session.prefill_chunk - 1)
    t0 = time.perf_counter()
    margins: list[float] = []
    head = None
    if depth <= 0:
        drafts = []
    elif drafter is not None:
        drafts = list(drafter(session, first, depth))[:depth]
    else:
        drafts, margins, head = mtp_drafts(session, first, depth, opts.margin, eos_id)
    if eos_id in drafts:
        drafts = drafts[:drafts.index(eos_id)]
    stats.t_draft += time.perf_counter() - t0
    if not drafts:
        plain_step(session, first, stats)
        return [first]
    stats.cycles += 1
    for k in range(len(drafts)):
        stats.proposed[k] += 1
    t0 = time.perf_counter()
    if opts.exact and not session.engine.row_invariant:
        committed = _verify_row_by_row(session, first, drafts, stats)
        stats.t_verify += time.perf_counter() - t0
    else:
        v = session.verify([first] + drafts)
        stats.trunk_passes += 1
        stats.t_verify += time.perf_counter() - t0
        n_ok = 0
        while n_ok < len(drafts) and v.argmax[n_ok] == drafts[n_ok]:
            n_ok += 1
        if not all(v.finite[:n_ok + 1]):
            stats.failures += 1
            if stats.spec_log:
                stats.spec_log("ds4: mtp spec micro verifier failed, falling back to sequential")
            plain_step(session, first, stats)
            return [first]
        if stats.spec_log:
            if n_ok == 0:
                stats.spec_log(f"ds4: mtp spec miss first draft={drafts[0]}")
            elif n_ok == len(drafts):
                stats.spec_log(f"ds4: mtp spec seq accept drafted={len(drafts)} accepted={n_ok}")
            else:
                stats.spec_log(f"ds4: mtp spec seq partial drafted={len(drafts)} verified={len(drafts)} accepted={n_ok}")
        if stats.conf_log and head is not None:
            draft_next = drafts[1] if len(drafts) > 1 else -1
            stats.conf_log(f"ds4: mtp conf drafted={len(drafts)} committed={n_ok + 1} mtp_top={head[0]} "
                           f"runner={head[1]} margin={head[2]:.6f} target_next={v.argmax[0]} draft_next={draft_next}")
        t0 = time.perf_counter()
        session.accept(v, n_ok + 1)
        stats.t_rollback += time.perf_counter() - t0
        committed = [first] + drafts[:n_ok]
    for k in range(len(committed) - 1):
        stats.accepted[k] += 1
    stats.committed += len(committed)
    if stats.log is not None:
        stats.log({"pos": session.pos, "first": first, "drafts": drafts, "margins": margins,
                   "accepted": len(committed) - 1, "committed": committed})
    return committed


def _verify_row_by_row(session: Session, first: int, drafts: list[int], stats: SpecStats) -> list[int]:
    """The exact verifier where batched rows are not computed like 1-row decodes: plain decode
    steps, stopping at the first draft the trunk disagrees with."""
    committed = [first]
    session.eval(first)
    stats.trunk_passes += 1
    for d in drafts:
        if session.argmax() != d:
            break
        session.eval(d)
        stats.trunk_passes += 1
        committed.append(d)
    return committed


def plain_step(session: Session, token: int, stats: SpecStats) -> None:
    t0 = time.perf_counter()
    session.eval(token)
    stats.t_plain += time.perf_counter() - t0
    stats.trunk_passes += 1
    stats.plain_steps += 1
    stats.committed += 1


class AdaptiveGate:
    """Speculate only while it pays: compare committed tokens per second of the last `window`
    speculative cycles with plain steps; when speculation is slower, decode plainly for
    `cooldown` tokens, then probe again. Each failed probe doubles the cooldown (up to
    `max_cooldown`), so text that never accepts drafts costs only rare probes."""

    def __init__(self, window: int = 4, cooldown: int = 32, probe_plain: int = 4, max_cooldown: int = 4096):
        self.spec: deque = deque(maxlen=window)  # (tokens, seconds) per cycle
        self.plain: deque = deque(maxlen=16)  # seconds per plain step
        self.base_cooldown = self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.plain_left = probe_plain  # start by measuring plain steps

    def speculate(self) -> bool:
        return self.plain_left <= 0

    def record_plain(self, seconds: float) -> None:
        self.plain.append(seconds)
        self.plain_left -= 1

    def record_cycle(self, tokens: int, seconds: float) -> None:
        self.spec.append((tokens, seconds))
        if len(self.spec) < self.spec.maxlen or not self.plain:
            return
        spec_rate = sum(t for t, _ in self.spec) / sum(s for _, s in self.spec)
        plain_rate = len(self.plain) / sum(self.plain)
        if spec_rate < plain_rate:
            self.plain_left = self.cooldown
            self.cooldown = min(2 * self.cooldown, self.max_cooldown)
            self.spec.clear()
        else:
            self.cooldown = self.base_cooldown


def replay_gaps(session: Session, prompt: list[int], committed: list[int]) -> list[float]:
    """Teacher-forcing oracle for a speculative run: replay `committed` after `prompt` through plain
    decode in `session` (reset first) and return, per committed token, the gap between the plain
    argmax logit and that token's logit (0 where the token is the plain greedy choice)."""
    session.invalidate()
    session.sync(prompt)
    gaps = []
    for i, token in enumerate(committed):
        logits = session.logits
        gaps.append(float(mx.max(logits) - logits[token]))
        if i + 1 < len(committed):
            session.eval(token)
    return gaps
