"""Opening DS4 model files: base GGUF and MTP GGUF, validated before anything is computed.

Order of checks: container (gguf.py), metadata (config.py), tensor layout (layout.py), tokenizer
tables. Each failure is one `GGUFError` line naming the file. Opening reads only the header:
tensor data stays in the memory map until a weight is bound.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

from ds4.config import ARCH, ModelConfig
from ds4.errors import Ds4Error, GGUFError
from ds4.gguf import FLOAT_TYPES, INTEGER_TYPES, GGUFFile, GGUFTensor, ValueType, type_name
from ds4.layout import (
    base_optional_specs,
    base_tensor_specs,
    check_tensors,
    mtp_tensor_specs,
)
from ds4.tokenizer import Tokenizer

# ds4's default model file (the C engine's download script links it in the working directory),
# then the small trained model embedded in the package (`ds4-train`; base + MTP head).
DS4FLASH = "./ds4flash.gguf"
EMBEDDED_DIR = Path(__file__).parent / "data"
EMBEDDED_MODEL = EMBEDDED_DIR / "ds4-small-q2.gguf"
EMBEDDED_MTP = EMBEDDED_DIR / "ds4-small-mtp.gguf"
EMBEDDED_VECTORS = EMBEDDED_DIR / "ds4-small.vec"  # its logprob vectors (ds4-test --write-vectors)

# An MTP file may state the draft confidence margin it was calibrated for (ds4's own key; the C
# engine reads no MTP metadata). Without it the reference engine's default applies.
MTP_MARGIN_KEY = "ds4.mtp.draft_margin"
DEFAULT_MTP_MARGIN = 3.0

TOKENS_KEY = "tokenizer.ggml.tokens"
MERGES_KEY = "tokenizer.ggml.merges"


@dataclass
class ModelFile:
    """A validated base or MTP GGUF: the open file, the config and the bound tensors."""

    gguf: GGUFFile
    config: ModelConfig
    tensors: dict[str, GGUFTensor]
    is_mtp: bool = False
    _tokenizer: object = field(default=None, repr=False)

    @property
    def path(self) -> str:
        return self.gguf.path

    @property
    def name(self) -> str | None:
        name = self.gguf.get("general.name")
        return name if isinstance(name, str) else None

    def tensor_bytes_by_type(self) -> dict[str, tuple[int, int]]:
        """{type name: (tensor count, bytes)} over the bound tensors."""
        count: Counter = Counter()
        size: Counter = Counter()
        for t in self.tensors.values():
            count[t.type_name] += 1
            size[t.type_name] += t.n_bytes
        return {k: (count[k], size[k]) for k in sorted(count, key=lambda k: -size[k])}

    @property
    def mtp_margin(self) -> float:
        """The draft margin an MTP file recommends (MTP_MARGIN_KEY, checked at open), else DEFAULT_MTP_MARGIN."""
        value = self.gguf.get(MTP_MARGIN_KEY)
        return DEFAULT_MTP_MARGIN if value is None else float(value)

    @cached_property
    def routed_quant_bits(self) -> int:
        """4 when layer 0's routed gate is Q4_K, else 2 (ds4's quant tag for saved caches)."""
        t = self.tensors.get("blk.0.ffn_gate_exps.weight") or self.tensors.get("mtp.0.ffn_gate_exps.weight")
        return 4 if t is not None and t.qtype == QT.Q4_K else 2

    def tokenizer(self):
        """The tokenizer built from the file's token and merge tables (built once)."""
        if self._tokenizer is None:
            tokens = self.gguf.get(TOKENS_KEY)
            merges = self.gguf.get(MERGES_KEY)
            try:
                self._tokenizer = Tokenizer.from_vocab(tokens, merges)
            except Ds4Error as e:
                raise GGUFError(self.path, str(e)) from None
        return self._tokenizer


def _check_string_array(gguf: GGUFFile, key: str, expected_len: int | None = None) -> int:
    f = gguf.fields.get(key)
    if f is None:
        raise GGUFError(gguf.path, f"tokenizer table {key} is missing", "an array of strings")
    if f.type != ValueType.ARRAY or f.item_type != ValueType.STRING:
        raise GGUFError(gguf.path, f"tokenizer table {key} is not an array of strings", "an array of strings")
    if expected_len is not None and f.count != expected_len:
        raise GGUFError(gguf.path, f"{key} has {f.count} entries",
                        f"{expected_len} (= {ARCH}.vocab_size and token_embd rows)")
    return f.count


def open_model(path: str) -> ModelFile:
    """Open and validate a base DS4 Flash GGUF (container, metadata, every tensor, tokenizer tables)."""
    gguf = GGUFFile(path)
    arch = gguf.get("general.architecture")
    if arch is not None and arch != ARCH:
        raise GGUFError(path, f"general.architecture is {arch!r}", f"'{ARCH}'")
    config = ModelConfig.from_gguf(gguf)
    tensors = check_tensors(gguf, base_tensor_specs(config), base_optional_specs(config))
    _check_string_array(gguf, TOKENS_KEY, config.n_vocab)
    _check_string_array(gguf, MERGES_KEY)
    for il in range(min(config.n_hash_layer, config.n_layer)):
        _check_expert_ids(gguf, tensors[f"blk.{il}.ffn_gate_tid2eid.weight"], config.n_expert)
    return ModelFile(gguf, config, tensors)


def _check_expert_ids(gguf: GGUFFile, t: GGUFTensor, n_expert: int) -> None:
    """The hash-routing table's entries index the expert weights: every one must name an expert
    (reading the table costs 3 MB per hash layer of the published model)."""
    ids = t.data()
    bad = np.flatnonzero((ids < 0) | (ids >= n_expert))
    if bad.size:
        token, k = divmod(int(bad[0]), ids.shape[1])
        raise GGUFError(gguf.path, f"{t.name}: token {token} routes to expert {int(ids.flat[bad[0]])} "
                        f"({bad.size} ids out of range)", f"expert ids in 0..{n_expert - 1}")


def _check_mtp_margin(gguf: GGUFFile) -> None:
    f = gguf.fields.get(MTP_MARGIN_KEY)
    if f is None:
        return
    if f.type not in FLOAT_TYPES | INTEGER_TYPES:
        raise GGUFError(gguf.path, f"{MTP_MARGIN_KEY} has type {type_name(f.type)}", "a finite number >= 0")
    value = gguf.get(MTP_MARGIN_KEY)
    if not math.isfinite(value) or value < 0:
        raise GGUFError(gguf.path, f"{MTP_MARGIN_KEY} is {value}", "a finite number >= 0")


def open_mtp(path: str, base: ModelConfig) -> ModelFile:
    """Open and validate an MTP GGUF against the base model it will draft for.

    The MTP file shares the base model's embedding and output head, so its block must have the
    base widths; its metadata is optional, but when it states a width it must agree."""
    gguf = GGUFFile(path)
    for key, want in ((f"{ARCH}.embedding_length", base.n_embd), (f"{ARCH}.expert_count", base.n_expert)):
        got = gguf.get(key)
        if isinstance(got, int) and not isinstance(got, bool) and got != want:
            raise GGUFError(path, f"MTP file has {key}={got}", f"{want} to fit the base model")
    _check_mtp_margin(gguf)
    tensors = check_tensors(gguf, mtp_tensor_specs(base))
    return ModelFile(gguf, base, tensors, is_mtp=True)


@dataclass(frozen=True)
class ModelChoice:
    """Which base model a front end runs, the MTP file that comes with it (the embedded model
    carries its own MTP head), and a line for stderr when the choice was implicit."""

    path: str
    embedded: bool = False
    notice: str | None = None

    def mtp(self, mtp_path: str | None, requested: bool) -> str | None:
        """The MTP file to load: an explicit --mtp, else the embedded head when drafting was
        asked for (--mtp-draft / --mtp-continuous) on the embedded model."""
        if mtp_path or not requested:
            return mtp_path
        if not self.embedded:
            raise Ds4Error("--mtp-draft and --mtp-continuous need --mtp FILE "
                           "(only the embedded model brings its own MTP head)")
        return str(EMBEDDED_MTP)


def choose_model(path: str | None) -> ModelChoice:
    """An explicit path; else ./ds4flash.gguf when present; else the embedded model."""
    if path:
        embedded = os.path.exists(path) and EMBEDDED_MODEL.exists() and os.path.samefile(path, EMBEDDED_MODEL)
        return ModelChoice(path, embedded)
    if os.path.exists(DS4FLASH):
        return ModelChoice(DS4FLASH)
    if not EMBEDDED_MODEL.exists():
        raise Ds4Error(f"no model: {DS4FLASH} not found, no -m FILE given and the embedded model "
                       f"{EMBEDDED_MODEL} is missing from this installation")
    return ModelChoice(str(EMBEDDED_MODEL), True,
                       f"no -m given and no {DS4FLASH}: using the embedded demo model ({EMBEDDED_MODEL.name})")
