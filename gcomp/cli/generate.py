"""``gcomp generate``: greedy decoding of a decoder LLM with its KV cache on ONNX Runtime.

Token ids in, token ids out (no tokenizer): stdout gets exactly one line, the new token ids
comma-separated (the prompt excluded); timings and notes go to stderr. The work is
:mod:`gcomp.decode`'s; a model it cannot decode, or a prompt the model cannot take, is one
line and a non-zero exit (2 for a bad option value: an empty prompt, a token id outside the
vocabulary, a prompt longer than the model allows).
"""

from __future__ import annotations

__all__ = ["generate", "parse_token_ids"]

import click

from gcomp.cli.group import CONTEXT, PathIn, Say, cli, stderr, verbosity_options
from gcomp.cli.providers import provider_options
from gcomp.errors import OptionError


def parse_token_ids(text: str, option: str = "--prompt-ids") -> list[int]:
    """``1,2,3`` as [1, 2, 3]; an empty string is an empty prompt (refused by the decoder)."""
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    try:
        return [int(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not p.lstrip("-").isdigit())
        raise OptionError(f"{option}: '{bad}' is not a token id (give integers separated by commas: 1,2,3)") from None


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=PathIn)
@click.option("--prompt-ids", required=True, metavar="ID,ID,...", help="The prompt as token ids, comma-separated.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True,
              help="Tokens to generate (greedy: the most likely token each step).")
@provider_options
@click.option("--threads", type=click.IntRange(min=0), default=0, help="Intra-op threads (0: runtime default).")
@verbosity_options
def generate(model, prompt_ids, max_new_tokens, threads, provider=None, provider_option=(), quiet=False,
             verbose=False):
    """Decode greedily after a prompt with MODEL's KV cache on ONNX Runtime.

    Prints the new token ids on one line (the prompt excluded); the prefill time and the
    decode rate go to stderr. MODEL is a decoder with past_key_values.{i}.key/.value inputs
    and present.{i}.key/.value outputs (or past.{i}.*, past_key.{i}); a decoder without a
    cache runs the whole sequence again for every token.
    """
    from gcomp import decode, io
    from gcomp.backends import get_backend
    from gcomp.cli.providers import chosen_provider

    say = Say(quiet, verbose)
    provider, options = chosen_provider(provider, provider_option)
    prompt = parse_token_ids(prompt_ids)
    layout = decode.layout_of(io.load(model))
    decode.check_prompt(layout, prompt, max_new_tokens)  # before the session is built
    say.step(f"{len(layout.cache) // 2} cached layers, {layout.kv_heads} KV heads of {layout.head_size}"
             if layout.cache else "no KV cache")
    exe = get_backend("ort").compile(model, provider or "cpu", threads=threads or None, provider_options=options)
    say.step("session ready")
    result = decode.generate(exe, layout, prompt, max_new_tokens)
    click.echo(",".join(str(t) for t in result.tokens))
    if not quiet:
        err = stderr()
        for note in result.notes:
            err.print(f"note: {note}", markup=False, soft_wrap=True)
        err.print(_timing_line(result), markup=False, soft_wrap=True)
    say.done()


def _timing_line(result) -> str:
    rate = result.decode_tokens_per_s
    steps = len(result.step_s)
    decode_text = (f"decode {rate:.1f} tokens/s (median of {steps} step{'s' * (steps != 1)})" if rate is not None
                   else "no decode step (the one new token comes from the prompt's run)")
    return f"prefill {result.prefill_s * 1e3:.2f} ms ({result.prompt_tokens} tokens); {decode_text}"
