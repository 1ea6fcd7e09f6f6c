"""`poft-mlx generate` and `poft-mlx chat`: answers from a base model, a run or a fused folder."""

from __future__ import annotations

import click

from .common import run

SOURCE_HELP = "a run folder (its adapters and the template it trained with), a fused folder, or a model reference"


def _decoding(fn):
    for opt in reversed([
        click.option("--max-tokens", default=256, show_default=True, help="Most tokens per reply."),
        click.option("--temp", "temperature", default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-p", default=1.0, show_default=True),
        click.option("--seed", default=0, show_default=True, help="Sampling seed."),
        click.option("--system", default=None, help="A system message before the prompt."),
        click.option("--chat-template", default=None,
                     help="Override the template: a builtin (gemma, chatml, zephyr), a .jinja file or Jinja text."),
        click.option("--adapter-path", default=None, type=click.Path(file_okay=False, exists=True),
                     help="Adapters to apply to a base SOURCE (a run folder brings its own)."),
    ]):
        fn = opt(fn)
    return fn


def _open(source, chat_template, adapter_path):
    from ..models.generation import open_generator  # lazy: loads mlx; keeps --help fast

    return run(open_generator, source, chat_template=chat_template, adapter_path=adapter_path)


@click.command(help=f"Answer each PROMPT with SOURCE: {SOURCE_HELP}. One prompt streams its reply (printed whole with --answer gsm8k).")
@click.argument("source")
@click.option("-p", "--prompt", "prompts", multiple=True, required=True,
              help="A user message (repeatable: the prompts are decoded as one batch).")
@click.option("--batch-size", default=8, show_default=True, help="Prompts decoded together.")
@click.option("--answer", type=click.Choice(["none", "gsm8k"]), default="none", show_default=True,
              help="gsm8k: end each reply once it has given its final answer ('#### N') (the final answer), as eval --generate does.")
@_decoding
def generate(source, prompts, batch_size, answer, max_tokens, temperature, top_p, seed, system, chat_template, adapter_path):
    from ..evaluation.answers import gsm8k_answer_end
    from ..models.generation import StreamPrinter, generate as gen_replies  # lazy: keeps --help fast

    gen = _open(source, chat_template, adapter_path)
    convs = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
             for p in prompts]
    stream = None
    # --answer gsm8k cuts a reply where its answer ends, which shows only a token after the answer
    # (the character that cannot continue the number): a streamed reply would print that token.
    if len(prompts) == 1 and answer == "none":
        stream = StreamPrinter(gen.tokenizer, lambda s: click.echo(s, nl=False))
    replies = run(gen_replies, gen, convs, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                   batch_size=batch_size, on_token=stream, answer_end=gsm8k_answer_end if answer == "gsm8k" else None)
    if stream is not None:
        stream.finish()
        click.echo("")
        return
    if len(prompts) == 1:
        click.echo(replies[0].text)
        return
    for p, r in zip(prompts, replies):
        click.echo(f"### {p}\n{r.text}\n")


@click.command()
@click.argument("source")
@_decoding
def chat(source, max_tokens, temperature, top_p, seed, system, chat_template, adapter_path):
    """Talk to SOURCE in the terminal (/reset clears the history, /exit or Ctrl-D quits)."""
    from ..models.generation import StreamPrinter, generate as gen_replies  # lazy: keeps --help fast

    gen = _open(source, chat_template, adapter_path)
    history = [{"role": "system", "content": system}] if system else []
    click.echo(f"chatting with {source} (template: {gen.source['chat_template']}); /reset, /exit")
    turn = 0
    while True:
        try:
            text = input("you> ")
        except (EOFError, KeyboardInterrupt):
            click.echo("")
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/reset":
            history = history[:1] if system else []
            click.echo("(history cleared)")
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        click.echo("model> ", nl=False)
        stream = StreamPrinter(gen.tokenizer, lambda s: click.echo(s, nl=False))
        reply = run(gen_replies, gen, [history], max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                     seed=seed + turn, on_token=stream)[0]
        stream.finish()
        click.echo("")
        history.append({"role": "assistant", "content": reply.text})
        turn += 1
