"""The man pages come from the parsers and the policy docstring: every command, option
and policy key is in them, and groff reads them without a warning."""

import re
import shutil
import subprocess

import pytest

from vfiod.cmd import manpage
from vfiod.cmd.ctl import vfioctl_parser
from vfiod.cmd.server import vfiod_parser
from vfiod.policy import CLAIM_KEYS, RESOURCE_KEYS, RULE_KEYS


def _walk(parser, prefix):
    """(command words, option strings, positional metavars) of a parser and every sub-command."""
    import argparse
    options, positionals = [], []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, prefix + [name])
        elif action.option_strings:
            options += action.option_strings
        else:
            positionals.append(action.metavar or action.dest)
    yield prefix, options, positionals


def _plain(roff):
    """The page's text with the escapes this generator writes undone."""
    text = re.sub(r"\\f[BIR]", "", roff).replace("\\-", "-").replace("\\e", "\\").replace("\\&", "")
    return re.sub(r"\\\[u([0-9A-F]{4})\]", lambda m: chr(int(m.group(1), 16)), text)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    out = tmp_path_factory.mktemp("man")
    assert manpage.main([str(out)]) == 0
    return {p.name: p.read_text() for p in out.iterdir()}


@pytest.mark.parametrize("page,parser", [("vfiod.8", vfiod_parser), ("vfioctl.1", vfioctl_parser)])
def test_every_command_and_option_is_in_the_page(pages, page, parser):
    text = _plain(pages[page])
    prog = page.split(".")[0]
    seen_commands = 0
    for words, options, positionals in _walk(parser(), [prog]):
        if len(words) > 1:
            assert f'.SS "{" ".join(words)}"' in text, words
            seen_commands += 1
        # the command's own section: from its heading to the next one (the top: up to COMMANDS)
        section = (text.split(".SH COMMANDS")[0] if len(words) == 1 else
                   text.split(f'.SS "{" ".join(words)}"', 1)[1].split(".SS ")[0])
        for option in options:
            assert re.search(rf"(^|[ ,\[]){re.escape(option)}\b", section, flags=re.M), (words, option)
        for name in positionals:
            assert name in section, (words, name)
    assert seen_commands >= (2 if prog == "vfiod" else 12)


def test_the_policy_page_is_the_docstring_with_every_key(pages):
    text = _plain(pages["vfiod.policy.5"])
    for key in (*RULE_KEYS, *RESOURCE_KEYS, *CLAIM_KEYS):
        assert re.search(rf"\b{key}\b", text), key
    for heading in ("FILES", "RULES", "PROTECTED DEVICES", "NAMED RESOURCES", "CLAIMS"):
        assert f".SH {heading}" in text
    assert "Pure domain code" not in text          # the docstring's note for developers stays there


def test_groff_reads_the_pages_without_warnings(pages, tmp_path):
    if not shutil.which("groff"):
        pytest.skip("groff is not installed")
    for name, text in pages.items():
        path = tmp_path / name
        path.write_text(text)
        p = subprocess.run(["groff", "-man", "-ww", "-z", "-Tutf8", str(path)], capture_output=True, text=True,
                           env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
        assert p.returncode == 0 and not p.stderr, (name, p.stderr)
