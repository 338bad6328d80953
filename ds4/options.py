"""How a run generates, built once from a command's flags and the environment and validated once.

Every setting that changes how tokens are chosen lives here, so the commands only parse flags and
the decode loop (decode.py) only runs a policy. The environment variables read here (and the
others ds4 reads) are listed in README.md, "Options and environment variables".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import click

from ds4.decode import Policy, Speculative
from ds4.session import Sampler
from ds4.speculative import SpecOptions


@dataclass(frozen=True)
class MtpOptions:
    """The speculative-decoding flags of `ds4` and `ds4-bench`."""

    draft: int | None = None  # --mtp-draft (None: 1)
    margin: float | None = None  # --mtp-margin (None: the MTP file's ds4.mtp.draft_margin)
    continuous: bool = False  # --mtp-continuous or DS4_MTP_CONTINUOUS=1: depth-1 cycles
    exact: bool = True  # the exact verifier, unless --mtp-fast-verify (and not --quality or DS4_MTP_STRICT=1)
    adaptive: bool = True  # --mtp-adaptive
    log_path: str | None = None  # --mtp-log
    spec_log: bool = False  # DS4_MTP_SPEC_LOG
    conf_log: bool = False  # DS4_MTP_CONF_LOG

    @classmethod
    def from_flags(cls, draft: int | None = None, margin: float | None = None, continuous: bool = False,
                   fast_verify: bool = False, strict: bool = False, adaptive: bool = True,
                   log_path: str | None = None, environ: Mapping[str, str] | None = None) -> MtpOptions:
        env = os.environ if environ is None else environ
        continuous = continuous or env.get("DS4_MTP_CONTINUOUS") == "1"
        if continuous and draft not in (None, 1):
            raise click.UsageError("--mtp-continuous drafts one token per cycle; it cannot take --mtp-draft > 1")
        strict = strict or env.get("DS4_MTP_STRICT") == "1"
        return cls(draft=draft, margin=margin, continuous=continuous, exact=strict or not fast_verify,
                   adaptive=adaptive, log_path=log_path, spec_log=bool(env.get("DS4_MTP_SPEC_LOG")),
                   conf_log=bool(env.get("DS4_MTP_CONF_LOG")))

    @property
    def requested(self) -> bool:
        """Whether the flags ask for speculation (so for an MTP file, even without --mtp)."""
        return self.draft is not None or self.continuous

    def spec_options(self, file_margin: float) -> SpecOptions:
        return SpecOptions(draft=1 if self.continuous else self.draft or 1,
                           margin=file_margin if self.margin is None else self.margin, exact=self.exact)


@dataclass(frozen=True)
class GenerateOptions:
    """How `ds4` picks tokens: sampling settings, the token budget, speculation and strictness."""

    max_tokens: int = 50000
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.05
    seed: int | None = None
    mtp: MtpOptions = MtpOptions()
    quality: bool = False  # --quality: reference kernels and the exact verifier, as the C engine's flag

    def sampler(self) -> Sampler:
        return Sampler(self.temperature, self.top_k, self.top_p, self.min_p, self.seed)

    def speculates(self, has_mtp: bool, one_shot: bool) -> bool:
        """MTP drafts serve greedy one-shot generation only (a draft is checked against the argmax)."""
        return has_mtp and one_shot and self.temperature == 0

    def policy(self, spec: SpecOptions | None) -> Policy:
        """Speculative cycles of `spec` when given, else one sampled step per token."""
        if spec is None:
            return self.sampler()
        return Speculative(spec, adaptive=self.mtp.adaptive)
