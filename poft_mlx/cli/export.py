"""`poft-mlx fuse`, `export-peft`, `export-gguf` and `push`: parse, call export/hub, print what happened."""

from __future__ import annotations

from pathlib import Path

import click

from .common import run

BASE_HELP = "Base model folder, when not where the run's adapter_config.json says."


@click.command("fuse")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--keep-quantization", is_flag=True,
              help="Keep MLX quantization (re-rounds the fused weights; an mlx-lm folder, not transformers).")
@click.option("--no-check", is_flag=True, help="Skip comparing the fused model with base + adapter.")
@click.option("--tol", type=float, default=0.1, show_default=True,
              help="Allowed KL(adapter || fused), as a fraction of the adapter's own effect KL(adapter || base).")
@click.option("--base", type=click.Path(path_type=Path), help=BASE_HELP)
@click.option("--peft", "peft_dir", type=click.Path(path_type=Path), help="Also write a PEFT adapter to this folder.")
def fuse(run_dir: Path, out_dir: Path, keep_quantization: bool, no_check: bool, tol: float,
         base: Path | None, peft_dir: Path | None) -> None:
    """Fuse RUN_DIR's adapter into its base and write a Hugging Face model folder to OUT_DIR."""
    # lazy: keeps --help fast
    from ..export.fuse import fuse_run
    from ..export.peft import export_peft as write_peft

    report = run(fuse_run, run_dir, out_dir, dequantize=not keep_quantization, check=not no_check, tol=tol,
                 base=base)
    if peft_dir is not None:
        run(write_peft, run_dir, peft_dir, base=base)
    state = "dequantized" if report.dequantized else "kept quantized" if report.quantized_base else "float"
    click.echo(f"wrote {report.out_dir} ({report.fine_tune_type} fused into {report.base}, {state})")
    if report.check is not None:
        c = report.check
        click.echo(f"check passed on {c.tokens} tokens ({c.sample_source}): KL(adapter || fused) {c.mean_kl:.3g} "
                   f"vs the adapter's effect KL(adapter || base) {c.effect_kl:.3g}; max |fused - adapter| logit "
                   f"{c.max_abs_diff:.3g} (effect {c.adapter_effect:.3g}); top-1 agreement {c.top1_agreement:.4f}")
        if c.dequantization_kl is not None:
            click.echo(f"dequantizing the base to float cost KL {c.dequantization_kl:.3g} (quantized vs float base)")
        for note in c.notes:
            click.echo(f"note: {note}")
    if peft_dir is not None:
        click.echo(f"wrote PEFT adapter {peft_dir}")


@click.command("export-peft")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--base-model-name", help="base_model_name_or_path to record (default: the run's target model).")
@click.option("--base", type=click.Path(path_type=Path), help=BASE_HELP)
def export_peft(run_dir: Path, out_dir: Path, base_model_name: str | None, base: Path | None) -> None:
    """Write RUN_DIR's LoRA/DoRA adapter to OUT_DIR in PEFT's format."""
    from ..export.peft import export_peft as write_peft  # lazy: keeps --help fast

    config = run(write_peft, run_dir, out_dir, base_model_name=base_model_name, base=base)
    click.echo(f"wrote {out_dir}: r={config['r']}, lora_alpha={config['lora_alpha']}, "
               f"targets {config['target_modules']}, base {config['base_model_name_or_path']}")
    for note in config["notes"]:
        click.echo(f"note: {note}")


@click.command("push")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--dry-run", is_flag=True, help="Show the files and the model card; upload nothing.")
@click.option("--endpoint", help="Hub endpoint URL (default: huggingface.co or HF_ENDPOINT).")
@click.option("--message", "commit_message", help="Commit message.")
def push(path: Path, repo_id: str, private: bool, dry_run: bool, endpoint: str | None,
         commit_message: str | None) -> None:
    """Upload PATH (a fused model or PEFT adapter folder) to the Hub as REPO_ID with a model card."""
    from ..export import hub  # lazy: keeps --help fast

    files = run(hub.push, path, repo_id, private=private, dry_run=dry_run, endpoint=endpoint,
                commit_message=commit_message)
    verb = "would upload" if dry_run else "uploaded"
    click.echo(f"{verb} {len(files)} files ({sum(f.size for f in files):,} bytes) to {repo_id}:")
    for f in files:
        click.echo(f"  {f.size:>14,}  {f.path}")
    if dry_run:
        click.echo("\nREADME.md (model card):\n")
        click.echo(hub.model_card(path, repo_id))


GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # export.gguf.OUTTYPES (not imported: no mlx at startup)


@click.command("export-gguf")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--outtype", type=click.Choice(GGUF_OUTTYPES), default=None,
              help="Tensor type of the matrices: f16 (default), f32, bf16, q8_0, q4_0; a --lora file: f32 "
                   "(default), f16 or bf16.")
@click.option("--lora", is_flag=True,
              help="Write SOURCE's (a run folder) LoRA adapter as a llama.cpp adapter GGUF, to apply to the base "
                   "model's GGUF (llama-cli -m BASE.gguf --lora OUT), instead of the fused model.")
@click.option("--base", type=click.Path(path_type=Path), help=BASE_HELP)
@click.option("--dequantize", is_flag=True,
              help="Accept an MLX-quantized model folder: dequantize its weights, then write OUTTYPE.")
@click.option("--no-check", is_flag=True, help="For a run folder: skip comparing the fused model with base + adapter.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def export_gguf(source: Path, out: Path, outtype: str | None, lora: bool, base: Path | None, dequantize: bool,
                no_check: bool, force: bool) -> None:
    """Write SOURCE (a run folder, fused first, or a model folder) as the GGUF file OUT for llama.cpp,
    Ollama and LM Studio, with its tokenizer and chat template (docs/gguf.md)."""
    if lora:
        from ..export.gguf_lora import export_lora_gguf  # lazy: keeps --help fast

        r = run(export_lora_gguf, source, out, outtype=outtype or "f32", base=base, force=force)
        click.echo(f"wrote {r.path}: {r.architecture} LoRA adapter, rank {r.rank}, alpha {r.alpha:g}, "
                   f"{r.matrices} matrices, for a GGUF of base {r.base}")
        click.echo(f"  llama.cpp: llama-cli -m BASE.gguf --lora {r.path}")
        return
    from ..export.gguf import export_gguf as write_gguf  # lazy: keeps --help fast

    r = run(write_gguf, source, out, outtype=outtype or "f16", base=base, dequantize=dequantize, force=force,
            check=not no_check)
    if r.fused_from is not None:
        click.echo(f"fused {r.fused_from} first" + ("" if no_check else " (check passed)"))
    types = ", ".join(f"{n} {t}" for t, n in sorted(r.tensor_types.items()))
    template = "the chat template" if r.chat_template else "no chat template"
    click.echo(f"wrote {r.path} ({r.nbytes / 2**20:.1f} MiB): {r.architecture}, {r.outtype}, {r.tensors} tensors "
               f"({types}), {r.n_vocab} tokens, {template}")
    click.echo(f"  llama.cpp: llama-cli -m {r.path}   Ollama / LM Studio: see docs/gguf.md")
