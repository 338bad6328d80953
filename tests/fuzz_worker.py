"""A worker for test_fuzz.py: opens model files and generates from each one it accepts.

Reads one JSON request per line on stdin, `{"path": ..., "base": ... | null}` (`base` set: `path`
is an MTP file for that base model), and answers one JSON line per request on stdout,
`{"status": "rejected" | "generated" | "stopped" | "bug", "detail": ...}`. An accepted base file
generates two tokens after a three-token prompt (a prefill, then a decode step); an accepted MTP
file runs a speculative cycle. "rejected" is a one-line `GGUFError` at open, "stopped" a one-line
`Ds4Error` while generating (non-finite logits from NaN weights, say); anything else raised is a
"bug" with its traceback. A crash (a signal) or a hang is seen by the parent as a dead or silent
worker.

The address space is capped (argv[1], bytes) so an accepted file that asks for a huge
allocation fails here instead of taking the machine's memory.
"""

from __future__ import annotations

import json
import resource
import sys
import traceback

PROMPT_IDS = [0, 17, 100]  # rows of the hash-routing tables the fuzzer aims at
CTX = 64


def attempt(path: str, base: str | None, cache: dict) -> dict:
    from ds4.chat import ThinkMode, render_prompt
    from ds4.errors import Ds4Error, GGUFError
    from ds4.decode import generate
    from ds4.loader import open_model, open_mtp
    from ds4.session import Engine, Sampler, Session
    from ds4.speculative import SpecOptions, SpecStats, speculative_step

    try:
        if base is None:
            model = open_model(path)
            mtp = None
        else:
            if base not in cache:
                cache[base] = open_model(base)
            model = cache[base]
            mtp = open_mtp(path, model.config)
        tok = model.tokenizer()
    except GGUFError as e:
        msg = str(e)
        if not msg.startswith(f"{path}: ") or "\n" in msg:
            return {"status": "bug", "detail": f"rejection is not one line naming the file: {msg!r}"}
        return {"status": "rejected", "detail": msg}
    try:
        render_prompt(tok, "Quel ramo del lago", "", ThinkMode.NONE)  # the tables drive the tokenizer too
        engine = Engine(model.path, model, mtp_path=path if mtp else None)
        session = Session(engine, CTX)
        if mtp is None:  # the loop `ds4 -p` runs: a prefill, then a decode step (whose row compresses)
            stats = generate(session, PROMPT_IDS, 2, Sampler(temperature=0.0), tok.eos_id)
            return {"status": "generated", "detail": stats.generated}
        session.sync(PROMPT_IDS)
        committed = speculative_step(session, SpecOptions(draft=2, margin=mtp.mtp_margin), 4, tok.eos_id,
                                     SpecStats())
        return {"status": "generated", "detail": committed}
    except Ds4Error as e:
        if "\n" in str(e):
            return {"status": "bug", "detail": f"error is not one line: {e!s}"}
        return {"status": "stopped", "detail": str(e)}
    except BaseException:  # noqa: BLE001 - a Rust panic from the tokenizer is a BaseException
        return {"status": "bug", "detail": traceback.format_exc()}


def main() -> None:
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cache: dict = {}
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(attempt(request["path"], request["base"], cache)), flush=True)


if __name__ == "__main__":
    main()
