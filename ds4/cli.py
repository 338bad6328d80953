"""The `ds4` command line.

Every user-facing failure is a `Ds4Error` turned into one `ds4: <message>` line on stderr and exit
status 1 here, and nowhere else; click's usage errors exit 2.
"""

from __future__ import annotations

import sys

import click

from ds4.errors import Ds4Error

DEFAULT_MODEL = "./ds4flash.gguf"


def format_inspect(model, mtp=None) -> str:
    """The `--inspect` summary: dims, tensor counts and bytes per quant type, KV bytes per token."""
    c = model.config
    kinds = [c.ratio(il) for il in range(c.n_layer)]
    lines = [
        f"file:          {model.path}",
        f"name:          {model.name or '-'}",
        f"layers:        {c.n_layer} ({kinds.count(0)} sliding-window, {kinds.count(4)} ratio-4 + indexer, "
        f"{kinds.count(128)} ratio-128; {min(c.n_hash_layer, c.n_layer)} hash-routed)",
        f"embedding:     {c.n_embd} x {c.n_hc} hyper-connection streams, vocab {c.n_vocab}",
        f"attention:     {c.n_head} heads x {c.head_dim} (rope {c.n_rot}), 1 KV head, q-lora {c.q_lora_rank}, "
        f"output {c.n_out_group} groups x {c.o_lora_rank}, window {c.n_swa}",
        f"indexer:       {c.n_indexer_head} heads x {c.indexer_head_dim}, top-{c.indexer_top_k}",
        f"experts:       {c.n_expert} routed (top-{c.n_expert_used}) + {c.n_expert_shared} shared, "
        f"ffn {c.n_ff_exp}",
    ]
    for label, f in (("tensors:", model),) + ((("mtp tensors:", mtp),) if mtp else ()):
        by_type = f.tensor_bytes_by_type()
        n = sum(k for k, _ in by_type.values())
        total = sum(b for _, b in by_type.values())
        lines.append(f"{label:<14} {n} in {f.path}, {total:,} bytes ({total / 2**30:.2f} GiB)")
        for name, (count, size) in by_type.items():
            lines.append(f"  {name:<10} {count:5d} tensors {size:>18,} bytes ({size / 2**30:8.3f} GiB)")
    ctx, chunk = 32768, 2048
    lines += [
        f"kv cache:      {c.kv_bytes_per_token():,.0f} bytes per context token (compressed rows, f32)",
        f"               {c.kv_cache_bytes(ctx, chunk):,} bytes at ctx {ctx} "
        f"(raw rings {c.raw_cap(ctx, chunk)} rows/layer + compressed rows)",
    ]
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-m", "--model", "model_path", type=click.Path(dir_okay=False), default=None,
              help=f"base DS4 Flash GGUF (default {DEFAULT_MODEL})")
@click.option("--mtp", "mtp_path", type=click.Path(dir_okay=False), help="MTP support GGUF")
@click.option("--inspect", is_flag=True, help="validate the model file(s) and print a summary")
def cli(model_path, mtp_path, inspect):
    """DeepSeek V4 Flash inference on MLX."""
    from ds4.loader import open_model, open_mtp

    model = open_model(model_path or DEFAULT_MODEL)
    mtp = open_mtp(mtp_path, model.config) if mtp_path else None
    if inspect:
        click.echo(format_inspect(model, mtp))
        return
    raise click.UsageError("nothing to do: give --inspect")


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="ds4", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("ds4: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except Ds4Error as e:
        click.echo(f"ds4: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("ds4: interrupted", err=True)
        sys.exit(130)
