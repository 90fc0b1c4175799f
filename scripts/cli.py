"""One command-line vocabulary for every script: `ArgumentParser` accepts every spelling of every flag.

Scripts build their parser with `scripts.cli.ArgumentParser` instead of `argparse.ArgumentParser`; nothing
else changes. Then, for every option the script defines:
  - `--foo-bar` and `--foo_bar` are the same flag (the released MedITok/LlamaGen scripts use both styles);
  - the synonyms in `SYNONYMS` are accepted too, e.g. `--global-seed` where a script defines `--seed`, or
    `--mixed-precision` where it defines `--precision`. A synonym is only taken when the script defines
    exactly one word of its group, so it can never pick between two different flags.
Values follow the same rule (`VALUE_SYNONYMS`): `--precision none` where a script's choices say `fp32`.
The translation happens on the command line before argparse sees it, so groups, sub-commands, `--flag=value`
and `--help` all work; an unknown flag still fails with argparse's own message.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

# Each group is one word: the first spelling is ours (documented), the others are accepted aliases.
# Only words with a single meaning in every script belong here.
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("--precision", "--mixed-precision"),  # compute dtype: none / fp16 / bf16
    ("--seed", "--global-seed"),  # base seed; with several processes each derives its own from it
    ("--meta-path", "--meta", "--metadata"),  # one metadata file (csv / jsonl / json)
    ("--output-dir", "--out-dir", "--out"),  # a folder that receives the outputs
    ("--vq-ckpt", "--tokenizer-ckpt", "--pretrained-path"),  # the tokenizer weights a script encodes/decodes with
)
# Values that name one thing: where a flag's choices hold one spelling, the others are accepted for it.
VALUE_SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("fp32", "none", "float32"),  # --precision: no reduced precision
    ("bf16", "bfloat16"),
    ("fp16", "float16"),
)


def _dash(option: str) -> str:
    """'--foo_bar' -> '--foo-bar' (the form used to compare spellings)."""
    return "--" + option[2:].replace("_", "-")


def _value(value: str, choices) -> str:
    """`value`, or its synonym that `choices` holds (e.g. 'none' where the choices say 'fp32')."""
    if value in choices:
        return value
    for group in VALUE_SYNONYMS:
        if value in group:
            present = [v for v in group if v in choices]
            if len(present) == 1:
                return present[0]
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser that accepts `_`/`-` spellings and the `SYNONYMS` of every option."""

    def _spellings(self) -> dict[str, str]:
        """{accepted spelling, dash form: the option string the parser defines}."""
        defined = [s for s in self._option_string_actions if s.startswith("--")]
        by_dash: dict[str, set[str]] = {}
        for s in defined:
            by_dash.setdefault(_dash(s), set()).add(s)
        table = {d: next(iter(opts)) for d, opts in by_dash.items() if len(opts) == 1}
        for group in SYNONYMS:
            present = {table[w] for w in group if w in table}
            if len(present) == 1:  # exactly one word of the group is defined: the others are aliases
                target = present.pop()
                for word in group:
                    table.setdefault(word, target)
        return table

    def _canonical(self, args: Sequence[str]) -> list[str]:
        known = self._option_string_actions
        table = self._spellings()
        out, choices = [], None  # choices: of the option whose value comes next
        for i, token in enumerate(args):
            if token == "--":  # everything after is positional
                return out + list(args[i:])
            if choices is not None:
                token, choices = _value(token, choices), None
            elif token.startswith("--") and len(token) > 2:
                name, eq, value = token.partition("=")
                if name not in known and _dash(name) in table:
                    name = table[_dash(name)]
                action = known.get(name)
                if action is not None and action.choices is not None:
                    if eq:
                        value = _value(value, action.choices)
                    else:
                        choices = action.choices
                token = name + eq + value
            out.append(token)
        return out

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._canonical(args), namespace)

    def format_help(self) -> str:
        table = self._spellings()
        aliases = sorted(f"{w} -> {t}" for w, t in table.items() if _dash(w) != _dash(t))
        note = "Every flag may be spelled with '-' or '_' (--foo-bar / --foo_bar)."
        if aliases:
            note += " Also accepted: " + ", ".join(aliases) + "."
        return super().format_help() + "\n" + note + "\n"
