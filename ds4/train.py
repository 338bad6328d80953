"""Train the small DS4-architecture model that ds4 embeds as its default (and its MTP head).

The model has the DS4 Flash layout at small widths (`SMALL`): the same metadata keys, tensor
names and layer kinds (sliding-window, ratio-4 with the lightning indexer, ratio-128), hash-routed
first layers, 4 HC streams, MoE with a shared expert, and an MTP block. Training runs the
*engine's* forward (`Model`, `MTPHead`) on float weights that have the interface of the quantized
ones, so there is no second model definition: the QAT round-trips run as in inference, with
straight-through gradients. What does not get a gradient is kept as the architecture defines it:
the hash tables are fixed random rows, the expert-selection biases follow DeepSeek-V3's
auxiliary-loss-free balancing (nudged towards equal load after every step), and the lightning
indexer (its projections and compressor) keeps its initial random weights: its top-k is a hard
choice with no gradient, so it selects compressed rows by a fixed random scoring.

Objective: next-token cross-entropy of the trunk, plus `mtp_weight` times the DeepSeek-V3 MTP
loss (trunk state at q and the embedding of token q+1 predict token q+2), on windows of the
corpus; a fraction of the windows repeat an earlier passage so the model learns to copy (what
speculative decoding exploits). Export quantizes the float weights through the same writer as the
synthetic models (`ds4.synth.write_parts`).

`ds4-train` trains on the CPU (about an hour on 2 cores, README.md "The embedded demo model");
on a machine with mlx-cuda or Metal it uses the GPU (`--backend gpu`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from gguf import GGMLQuantizationType as QT
from tqdm import tqdm

from ds4 import codecs
from ds4.atomic import atomic_write
from ds4.numerics import Numerics
from ds4.chat import DEFAULT_SYSTEM
from ds4.config import ModelConfig
from ds4.errors import Ds4Error
from ds4.frontend import OUTPUT_HELP, SEED, UTF8_TEXT, FiniteFloat, run_click
from ds4.layout import TensorSpec, mtp_tensor_specs
from ds4.model import Model
from ds4.mtp import MTPHead
from ds4.synth import base_parts, float_init, mtp_parts, tensor_rng, write_parts
from ds4.textfile import read_text
from ds4.tokenizer import Tokenizer, synthetic_vocab

# The shipped model: 6 layers (0-1 sliding window, 2/4 ratio-4 + indexer, 3/5 ratio-128; 0-2 hash
# routed), DS4's 128-token window and top-6 of 16 experts, a 2048-token BPE vocabulary.
SMALL = dict(n_layer=6, n_embd=256, n_head=4, head_dim=128, value_dim=128, n_rot=64, q_lora_rank=128,
             o_lora_rank=128, n_out_group=2, n_expert=16, n_expert_used=6, n_ff_exp=256, n_hash_layer=3,
             n_swa=128, n_indexer_head=4, indexer_head_dim=128, indexer_top_k=16)
SMALL_VOCAB = 2048

TRAIN_NUMERICS = Numerics(qat=True, straight_through=True)
BIAS_STEP = 1e-3  # aux-loss-free balancing: bias change per step towards equal expert load
# The draft margin written into the exported MTP file: the distilled head's drafts are accepted
# ~88 % of the time even when unsure (speed-bench/quality_small.py), so no confidence gate; the
# adaptive gate still falls back to plain decode where speculation does not pay.
EXPORT_MTP_MARGIN = 0.0


class FloatWeight:
    """A float matrix W [out, in] with QuantWeight's interface."""

    def __init__(self, w: mx.array):
        self.w = w

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.w.T

    def grouped(self, x: mx.array) -> mx.array:
        _, groups, n_in = x.shape
        return mx.einsum("tgi,goi->tgo", x, self.w.reshape(groups, -1, n_in))


class FloatExperts:
    """Float routed experts W [n_expert, out, in] with QuantExperts' interface; remembers the
    expert ids of the last call (the trainer's load statistics).

    Every expert runs on every row and the chosen ones are picked out: at 16 experts that is a
    few large matmuls, far faster to differentiate on the CPU than gather_mm's per-row products.
    The values are those of the routed product (a row's experts are distinct)."""

    def __init__(self, w: mx.array):
        self.w = w
        self.ids = None

    def gather_matmul(self, x: mx.array, expert_ids: mx.array) -> mx.array:
        self.ids = expert_ids
        n_expert, n_out, n_in = self.w.shape
        if x.ndim == 2:  # one input per row, shared by its experts
            y = (x @ self.w.reshape(n_expert * n_out, n_in).T).reshape(x.shape[0], n_expert, n_out)
        else:  # one input per (row, expert): scatter to expert slots, batched matmul per expert
            onehot = (expert_ids[..., None] == mx.arange(n_expert)).astype(x.dtype)  # [M, k, N]
            y = mx.einsum("mni,noi->mno", mx.einsum("mkn,mki->mni", onehot, x), self.w)
        return mx.take_along_axis(y, expert_ids[..., None], axis=1)


def small_config(n_vocab: int = SMALL_VOCAB) -> ModelConfig:
    return ModelConfig(n_vocab=n_vocab, **SMALL)


def base_specs(config: ModelConfig) -> list[TensorSpec]:
    """The base file's tensors, biases included (as `base_parts` writes them)."""
    return [s for s, _ in base_parts(config, ([], [], []))[1]]


def is_fixed(spec: TensorSpec) -> bool:
    """Tensors without a gradient: hash tables, the balancing biases and the indexer (its top-k
    choice is not differentiable)."""
    return spec.role in ("tid2eid", "bias") or "indexer" in spec.name


def init_tensor(spec: TensorSpec, seed: int, config: ModelConfig) -> np.ndarray:
    """Initial value of one tensor, in engine orientation (GGUF dims reversed)."""
    rng = tensor_rng(seed, spec.name)
    shape = tuple(reversed(spec.dims))
    if spec.role == "tid2eid":
        keys = rng.random((config.n_vocab, config.n_expert))
        return np.argsort(keys, axis=1)[:, :config.n_expert_used].astype(np.int32)
    if spec.role == "hc_scale":
        return (0.5 + rng.random(shape)).astype(np.float32)
    if spec.role == "bias":
        return np.zeros(shape, np.float32)
    mean, std = float_init(spec, logit_std=1.0)
    if spec.role == "norm":
        std = 0.0
    if spec.role == "embed":
        std = 0.5
    return (rng.standard_normal(shape) * std + mean).astype(np.float32)


def init_weights(config: ModelConfig, seed: int) -> tuple[dict, dict]:
    """(trainable params, fixed tensors) by GGUF name, base and MTP."""
    params, fixed = {}, {}
    for spec in base_specs(config) + mtp_tensor_specs(config):
        (fixed if is_fixed(spec) else params)[spec.name] = mx.array(init_tensor(spec, seed, config))
    return params, fixed


def bind(arrays: dict, specs: list[TensorSpec]) -> dict:
    """What the forward multiplies by: FloatWeight/FloatExperts for matrices, arrays otherwise."""
    out = {}
    for s in specs:
        a = arrays[s.name]
        if s.role == "routed":
            out[s.name] = FloatExperts(a)
        elif a.ndim == 2 and s.role not in ("embed", "ape", "tid2eid"):
            out[s.name] = FloatWeight(a)
        else:
            out[s.name] = a
    return out


def build(arrays: dict, config: ModelConfig, numerics: Numerics = TRAIN_NUMERICS) -> tuple[Model, MTPHead]:
    base = Model(config, bind(arrays, base_specs(config)), numerics)
    return base, MTPHead(bind(arrays, mtp_tensor_specs(config)), base, numerics)


def _cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean next-token cross-entropy (nats)."""
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return mx.mean(mx.logsumexp(logits, axis=-1) - picked)


def trunk_and_mtp_logits(model: Model, mtp: MTPHead, tokens) -> tuple[mx.array, mx.array]:
    """Both heads over a window of T tokens from an empty cache: trunk logits [T, V] (row q
    predicts token q+1) and MTP logits [T-1, V] (row q pairs the trunk state h_q with token q+1
    and predicts token q+2)."""
    tokens = tokens if isinstance(tokens, mx.array) else mx.array(np.asarray(tokens, np.int32))
    T = len(tokens)
    logits, _, X = model.forward(tokens, model.empty_state(T, T), all_logits=True)
    _, _, Y = mtp.forward(X[:-1], tokens[1:], mtp.empty_state(T), head=False, compiled=False)
    return logits, mtp.logits(Y)


def sequence_losses(model: Model, mtp: MTPHead, seq) -> tuple[mx.array, mx.array]:
    """(trunk CE, MTP CE) of one window seq [T + 1]: the trunk predicts seq[1:] from seq[:-1], the
    MTP (DeepSeek-V3 pairing) seq[2:]."""
    seq = seq if isinstance(seq, mx.array) else mx.array(np.asarray(seq, np.int32))
    logits, mtp_logits = trunk_and_mtp_logits(model, mtp, seq[:-1])
    return _cross_entropy(logits, seq[1:]), _cross_entropy(mtp_logits, seq[2:])


def expert_loads(model: Model, mtp: MTPHead) -> list[mx.array]:
    """Tokens routed to each expert in the last forward, per biased-routing block (MTP last)."""
    blocks = [w for il, w in enumerate(model.layers) if not model.config.is_hash_layer(il)] + [mtp.block]
    n = model.config.n_expert
    return [mx.zeros((n,), mx.float32).at[w.ffn_gate_exps.ids.reshape(-1)].add(1.0) for w in blocks]


def balance_bias_names(config: ModelConfig) -> list[str]:
    return [f"blk.{il}.exp_probs_b.bias" for il in range(config.n_layer) if not config.is_hash_layer(il)] + \
        ["mtp.0.exp_probs_b.bias"]


# -- data ---------------------------------------------------------------------------------------

@dataclass
class Corpus:
    """Token ids of the corpus split into training and held-out (the last `held_out` fraction of
    the text, cut at a paragraph), and the chat-format ids used to build chat windows."""

    train: np.ndarray
    valid: np.ndarray
    chat: dict
    focus: int | None = None  # token offset in `train` of the passage to learn by heart

    @classmethod
    def from_text(cls, tok: Tokenizer, text: str, held_out: float = 0.05, focus: str | None = None) -> Corpus:
        cut = int(len(text) * (1 - held_out))
        paragraph = text.rfind("\n\n", 0, cut)
        cut = paragraph + 2 if paragraph > 0 else cut
        at = text.find(focus, 0, cut) if focus else -1
        if focus and at < 0:
            raise ValueError(f"--focus text {focus[:40]!r} is not in the training part of the corpus")
        focus_offset = len(tok.encode(text[:at])) if at >= 0 else None
        ends = [tok.token_bytes(i).rstrip().endswith((b".", b"!", b"?")) for i in range(len(tok.tokens))]
        chat = dict(bos=tok.bos_id, eos=tok.eos_id, user=tok.user_id, assistant=tok.assistant_id,
                    think=tok.think_id, think_end=tok.think_end_id, system=tok.encode(DEFAULT_SYSTEM),
                    sentence_end=np.array(ends))
        return cls(np.array(tok.encode(text[:cut]), np.int32), np.array(tok.encode(text[cut:]), np.int32), chat,
                   focus_offset)


def sample_window(corpus: Corpus, length: int, rng: np.random.Generator, copy_fraction: float,
                  chat_fraction: float, focus_fraction: float = 0.0) -> np.ndarray:
    """A training window of `length` tokens from the training split: a corpus slice; or (with
    probability copy_fraction) one whose second part repeats a passage of its first part, so
    copying pays; or (chat_fraction) a chat turn whose user text is the start of a passage and
    whose answer continues it up to a sentence end and EOS, as `ds4 -p` renders prompts (think
    and no-think); the window goes on with the text after the answer. With probability
    focus_fraction the window starts at the corpus's focus passage (the demo prompt's text)."""
    ids = corpus.train
    start = int(rng.integers(0, len(ids) - length))
    if corpus.focus is not None and rng.random() < focus_fraction:
        start = min(corpus.focus, len(ids) - length)
    seq = ids[start:start + length].copy()
    u = rng.random()
    if u < copy_fraction:
        span = int(rng.integers(min(16, length // 4), length // 2 + 1))
        at = int(rng.integers(span, length - span + 1))  # the copy starts after the original
        src = int(rng.integers(0, at - span + 1))
        seq[at:at + span] = seq[src:src + span]
    elif u < copy_fraction + chat_fraction:
        c = corpus.chat
        head = [c["bos"], *(c["system"] if rng.random() < 0.7 else []), c["user"]]
        marks = [c["assistant"], c["think"], c["think_end"]] if rng.random() < 0.5 else [c["assistant"], c["think_end"]]
        split = int(rng.integers(4, 48))
        answer = seq[split:]
        ends = np.flatnonzero(c["sentence_end"][answer[16:]])  # answers of at least 17 tokens
        if len(ends):
            stop = 17 + int(ends[min(len(ends) - 1, int(rng.integers(0, 3)))])
            answer = np.concatenate([answer[:stop], [c["eos"]], answer[stop:]])
        seq = np.array(head + list(seq[:split]) + marks + list(answer), np.int32)[:length]
    return seq


# -- training -----------------------------------------------------------------------------------

@dataclass
class TrainOptions:
    steps: int = 1000
    seq_len: int = 256
    batch: int = 3
    lr: float = 3e-3
    warmup: int = 100
    mtp_weight: float = 0.3
    copy_fraction: float = 0.25
    chat_fraction: float = 0.15
    focus_fraction: float = 0.0
    seed: int = 1
    clip: float = 1.0


def _optimise(loss_fn, params: dict, frozen: dict, steps: int, opts: TrainOptions, batches, bias_names: list[str],
              log=None) -> tuple[dict, dict]:
    """AdamW with warmup and cosine decay on `params`; `loss_fn(params, frozen, batch)` returns
    (loss, metric a, metric b, *expert loads of the blocks named by `bias_names`), whose
    selection biases (in `frozen`) then move towards equal load."""
    loss_and_grad = mx.value_and_grad(loss_fn)
    warmup = min(opts.warmup, max(1, steps // 10))
    schedule = optim.join_schedules(
        [optim.linear_schedule(opts.lr / 100, opts.lr, warmup),
         optim.cosine_decay(opts.lr, max(1, steps - warmup), opts.lr / 20)], [warmup])
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    for step in tqdm(range(steps), desc="training", file=sys.stderr, disable=None, dynamic_ncols=True):
        (_, a, b, *loads), grads = loss_and_grad(params, frozen, batches())
        grads, _ = optim.clip_grad_norm(grads, opts.clip)
        params = opt.apply_gradients(grads, params)
        for name, load in zip(bias_names, loads):
            frozen[name] = frozen[name] + BIAS_STEP * mx.sign(mx.mean(load) - load)
        mx.eval(params, frozen, opt.state, a, b)
        if log is not None:
            log(step, a.item(), b.item())
    return params, frozen


def _batches(corpus: Corpus, opts: TrainOptions):
    rng = np.random.default_rng(opts.seed)
    return lambda: [sample_window(corpus, opts.seq_len + 1, rng, opts.copy_fraction, opts.chat_fraction,
                                  opts.focus_fraction) for _ in range(opts.batch)]


def train(config: ModelConfig, corpus: Corpus, opts: TrainOptions, params: dict | None = None,
          fixed: dict | None = None, log=None) -> tuple[dict, dict]:
    """Train trunk and MTP jointly from scratch (or continue); returns (params, fixed). `log`
    gets (step, trunk CE, MTP CE)."""
    if params is None:
        params, fixed = init_weights(config, opts.seed)

    def loss(p, f, batch):
        model, mtp = build({**p, **f}, config)
        trunk = mtp_ce = mx.array(0.0)
        loads = None
        for seq in batch:
            a, b = sequence_losses(model, mtp, seq)
            trunk, mtp_ce = trunk + a / len(batch), mtp_ce + b / len(batch)
            step_loads = expert_loads(model, mtp)
            loads = step_loads if loads is None else [x + y for x, y in zip(loads, step_loads)]
        return trunk + opts.mtp_weight * mtp_ce, trunk, mtp_ce, *loads

    return _optimise(loss, params, fixed, opts.steps, opts, _batches(corpus, opts), balance_bias_names(config), log)


def distill_mtp(config: ModelConfig, corpus: Corpus, opts: TrainOptions, params: dict, fixed: dict,
                steps: int, log=None) -> tuple[dict, dict]:
    """Fine-tune the MTP block alone towards the frozen trunk: the MTP row q (h_q, token q+1) learns
    the trunk's distribution for token q+2 (KL), which is what a draft is verified against.
    `log` gets (step, KL, agreement of the two argmaxes)."""
    trainable = {k: v for k, v in params.items() if k.startswith("mtp.")}
    frozen = {**{k: v for k, v in params.items() if k not in trainable}, **fixed}

    def loss(p, f, batch):
        model, mtp = build({**p, **f}, config)
        kl = agree = mx.array(0.0)
        loads = mx.zeros((config.n_expert,))
        for seq in batch:
            logits, student = trunk_and_mtp_logits(model, mtp, seq[:-1])
            teacher = mx.stop_gradient(logits[1:])  # the trunk's row for q+2
            t_log = teacher - mx.logsumexp(teacher, axis=-1, keepdims=True)
            s_log = student - mx.logsumexp(student, axis=-1, keepdims=True)
            kl = kl + mx.mean(mx.sum(mx.exp(t_log) * (t_log - s_log), axis=-1)) / len(batch)
            agree = agree + mx.mean(mx.argmax(teacher, -1) == mx.argmax(student, -1)) / len(batch)
            loads = loads + expert_loads(model, mtp)[-1]
        return kl, kl, agree, loads

    trained, frozen = _optimise(loss, trainable, frozen, steps, opts, _batches(corpus, opts),
                                ["mtp.0.exp_probs_b.bias"], log)
    fixed = {k: frozen[k] for k in fixed}
    return {**{k: frozen[k] for k in params if k not in trained}, **trained}, fixed


def evaluate(model: Model, mtp: MTPHead, ids: np.ndarray, seq_len: int = 256, n_windows: int = 16) -> tuple[float, float]:
    """(trunk CE, MTP CE) in nats/token on evenly spaced windows of `ids`: any Model/MTPHead, the
    float ones of `build` or the quantized ones of a GGUF."""
    starts = np.linspace(0, len(ids) - seq_len - 2, n_windows).astype(int)
    trunk = mtp_ce = 0.0
    for s in starts:
        a, b = sequence_losses(model, mtp, ids[s:s + seq_len + 1])
        mx.eval(a, b)
        trunk, mtp_ce = trunk + a.item() / n_windows, mtp_ce + b.item() / n_windows
    return trunk, mtp_ce


# -- checkpoints and export -----------------------------------------------------------------------

def save_checkpoint(path: str, params: dict, fixed: dict, config: ModelConfig, vocab) -> None:
    """Float weights (safetensors) and the tokenizer tables next to them (.vocab.npz), each
    written atomically (ds4.atomic); the weights last, so a checkpoint never lacks its vocab."""
    tokens, merges, types = vocab
    with atomic_write(Path(path).with_suffix(".vocab.npz"), "wb") as f:
        np.savez(f, tokens=np.array(tokens, dtype=object), merges=np.array(merges, dtype=object),
                 types=np.array(types, np.int32))
    with atomic_write(path, "wb") as f:
        mx.save_safetensors(f, {**params, **fixed}, metadata={"n_vocab": str(config.n_vocab)})


def load_checkpoint(path: str) -> tuple[dict, ModelConfig, tuple]:
    """(arrays by GGUF name, config, vocab) of a `save_checkpoint` file."""
    vocab_path = Path(path).with_suffix(".vocab.npz")
    try:
        arrays, meta = mx.load(path, return_metadata=True)
        v = np.load(vocab_path, allow_pickle=True)
        vocab = (list(v["tokens"]), list(v["merges"]), [int(t) for t in v["types"]])
        config = small_config(int(meta["n_vocab"]))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise Ds4Error(f"{path}: not a ds4-train checkpoint with its {vocab_path.name} ({e})") from None
    missing = [s.name for s in base_specs(config) + mtp_tensor_specs(config) if s.name not in arrays]
    if missing:
        raise Ds4Error(f"{path}: checkpoint lacks {len(missing)} tensors (first {missing[0]}), expected the SMALL layout")
    return arrays, config, vocab


def tensor_source(arrays: dict):
    """A synth TensorSource writing trained float weights (engine orientation) as `qtype`."""
    host = {}

    def source(spec: TensorSpec, qtype: QT):
        if spec.name not in host:
            host[spec.name] = np.array(arrays[spec.name])
        rows = host[spec.name].reshape(-1, spec.dims[0])
        if qtype == QT.I32:
            yield rows.astype(np.int32)
        elif qtype in (QT.F32, QT.F16):
            yield rows.astype(np.float16 if qtype == QT.F16 else np.float32)
        else:
            step = max(1, (1 << 20) // spec.dims[0])
            for r0 in range(0, len(rows), step):
                yield codecs.quantize(np.ascontiguousarray(rows[r0:r0 + step], np.float32), qtype)

    return source


def export(arrays: dict, config: ModelConfig, vocab, base_path: str, mtp_path: str | None, quant: str = "q2",
           name: str = "ds4 small (trained on I promessi sposi)") -> None:
    """Write the base GGUF with the `quant` expert mix (and the MTP GGUF: Q4_K experts, F32)."""
    source = tensor_source(arrays)
    write_parts(base_path, *base_parts(config, vocab, quant, f"{name}, {quant}"), source, progress=True)
    if mtp_path:
        write_parts(mtp_path, *mtp_parts(config, margin=EXPORT_MTP_MARGIN), source, progress=True)


# -- command line ---------------------------------------------------------------------------------

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--corpus", "corpus_path", default="speed-bench/promessi_sposi.txt", show_default=True,
              type=click.Path(exists=True, dir_okay=False), help="UTF-8 training text")
@click.option("--out", default="build/train/small.safetensors", show_default=True,
              type=click.Path(dir_okay=False), help=f"float checkpoint to write ({OUTPUT_HELP})")
@click.option("--export-dir", type=click.Path(file_okay=False),
              help="also write ds4-small-q2.gguf, ds4-small-q4.gguf and ds4-small-mtp.gguf here")
@click.option("--steps", type=click.IntRange(min=0), default=TrainOptions.steps, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=2), default=TrainOptions.seq_len, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=TrainOptions.batch, show_default=True)
@click.option("--lr", type=FiniteFloat(0, min_open=True), default=TrainOptions.lr, show_default=True)
@click.option("--seed", type=SEED, default=TrainOptions.seed, show_default=True)
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), help="continue from a checkpoint")
@click.option("--focus", type=UTF8_TEXT, default="Quel ramo del lago di Como", show_default=True,
              help="a passage of the corpus to learn by heart (the demo prompt's text); '' for none")
@click.option("--focus-fraction", type=FiniteFloat(0, 1), default=0.05, show_default=True,
              help="share of windows starting at --focus")
@click.option("--mtp-distill-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="then fine-tune the MTP block alone towards the frozen trunk for this many steps")
@click.option("--backend", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
def cli(corpus_path, out, export_dir, steps, seq_len, batch, lr, seed, resume, focus, focus_fraction,
        mtp_distill_steps, backend):
    """Train the small DS4-architecture model (and MTP head) on a text corpus."""
    if not (steps or resume):
        raise click.UsageError("--steps 0 needs --resume: there are no weights to start from")
    if backend == "cpu" or (backend == "auto" and not mx.is_available(mx.gpu)):
        mx.set_default_device(mx.cpu)
    text = read_text(corpus_path, "corpus")
    t0 = time.perf_counter()
    if resume:
        arrays, config, vocab = load_checkpoint(resume)
        names = {s.name: s for s in base_specs(config) + mtp_tensor_specs(config)}
        params = {k: v for k, v in arrays.items() if not is_fixed(names[k])}
        fixed = {k: v for k, v in arrays.items() if is_fixed(names[k])}
    else:
        vocab = synthetic_vocab(SMALL_VOCAB, text)
        config, params, fixed = small_config(len(vocab[0])), None, None
    try:
        corpus = Corpus.from_text(Tokenizer.from_vocab(vocab[0], vocab[1]), text, focus=focus or None)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"ds4-train: {len(corpus.train)} training tokens, {len(corpus.valid)} held out "
               f"({time.perf_counter() - t0:.1f} s)", err=True)
    opts = TrainOptions(steps=steps, seq_len=seq_len, batch=batch, lr=lr, seed=seed, focus_fraction=focus_fraction)

    def logger(what, total):
        def log(step, a, b):
            if step % 50 == 0 or step == total - 1:
                click.echo(f"ds4-train: step {step}: {what.format(a, b)} ({time.perf_counter() - t0:.0f} s)", err=True)
        return log

    # The output folders exist before hours of training, not after (and not for a run refused above).
    for folder in (Path(out).parent, Path(export_dir) if export_dir else None):
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise Ds4Error(f"{folder}: cannot create the output folder: {e.strerror or e}") from None
    t0 = time.perf_counter()
    if steps:
        params, fixed = train(config, corpus, opts, params, fixed, logger("trunk CE {:.3f}, MTP CE {:.3f}", steps))
    if mtp_distill_steps:
        params, fixed = distill_mtp(config, corpus, opts, params, fixed, mtp_distill_steps,
                                    logger("MTP distillation KL {:.3f}, argmax agreement {:.1%}", mtp_distill_steps))
    elapsed = time.perf_counter() - t0
    save_checkpoint(out, params, fixed, config, vocab)
    trunk, mtp_ce = evaluate(*build({**params, **fixed}, config, Numerics()), corpus.valid)
    click.echo(f"ds4-train: {steps} + {mtp_distill_steps} steps in {elapsed / 60:.1f} min; held-out CE {trunk:.3f} "
               f"nats (ppl {math.exp(trunk):.1f}), MTP CE {mtp_ce:.3f}; wrote {out}", err=True)
    if export_dir:
        d = Path(export_dir)
        arrays = {**params, **fixed}
        export(arrays, config, vocab, str(d / "ds4-small-q2.gguf"), str(d / "ds4-small-mtp.gguf"), "q2")
        export(arrays, config, vocab, str(d / "ds4-small-q4.gguf"), None, "q4")


def main(argv: list[str] | None = None) -> None:
    run_click(cli, argv, "ds4-train")
