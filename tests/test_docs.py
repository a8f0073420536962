"""The commands README.md and docs/ give are this code's: each `python`/`torchrun` command's flags parse with the
parser of the script it runs (a renamed or removed flag breaks this test, not a reader's copy of the command), and
each `make` target exists."""
import argparse
import importlib
import re
import shlex

import pytest

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SCRIPTS = {"train.py": "utils.flags", "sample.py": "sample"}  # train.py's parser lives beside its flag checks
PLACEHOLDER = re.compile(r"invalid (int|float) value: '[A-Z][A-Z_]*'")  # --steps=N: a number the reader picks


def shell_lines(text: str) -> list[str]:
    """The lines of the fenced code blocks (continuations joined) and the inline `python ...`/`torchrun ...`."""
    lines = re.findall(r"`((?:python3? |torchrun )[^`]*)`", text)
    for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, re.S):
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()
    return lines


def script_module(word: str) -> str | None:
    """The module whose `build_parser` parses the flags after `word` (train.py, sample.py, scripts/x.py,
    scripts.x), else None."""
    if word in SCRIPTS:
        return SCRIPTS[word]
    match = re.fullmatch(r"scripts[/.](\w+)(\.py)?", word)
    return f"scripts.{match[1]}" if match and (REPO / "scripts" / f"{match[1]}.py").is_file() else None


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, module, argv) of every documented command that runs one of this project's scripts."""
    found = []
    for doc in DOCS:
        for line in shell_lines(doc.read_text()):
            words = shlex.split(line, comments=True)
            if not words or not ({"python", "python3", "torchrun"} & {w.rsplit("/", 1)[-1] for w in words}):
                continue
            for i, word in enumerate(words):
                if module := script_module(word):
                    found.append((f"{doc.relative_to(REPO)}: {line.strip()[:80]}", module,
                                  [w for w in words[i + 1:] if w != "..."]))  # `--data_path=...`: a value
                    break
    return found


COMMANDS = documented_commands()


def test_the_docs_give_commands_of_every_kind():
    """The scan itself: README's training, sampling, FID, export, study and app commands are found (a scan that
    found nothing would pass the test below)."""
    modules = {module for _, module, _ in COMMANDS}
    assert {"utils.flags", "sample", "scripts.fid", "scripts.export", "scripts.study", "scripts.app",
            "scripts.extract_tokens", "scripts.train_tokenizer", "scripts.bench"} <= modules
    assert len(COMMANDS) >= 30


@pytest.mark.parametrize("where, module, argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_each_documented_command_parses_with_its_scripts_flags(where, module, argv):
    parser = importlib.import_module(module).build_parser()
    parser.exit_on_error = False  # a bad value raises ArgumentError; an unknown flag still exits through error()
    parser.allow_abbrev = False  # the docs name each flag in full (a renamed flag could still be a prefix)
    try:
        parser.parse_args(argv)
    except argparse.ArgumentError as e:
        if not PLACEHOLDER.search(str(e)):
            pytest.fail(f"{where}: {e}")
    except SystemExit as e:
        assert e.code == 0, f"{where}: its flags do not parse with {module}'s parser (see the message above)"


def test_each_documented_make_target_exists():
    targets = set(re.findall(r"^([\w.-]+):", (REPO / "Makefile").read_text(), re.M))
    documented = {words[1] for doc in DOCS for line in shell_lines(doc.read_text())
                  if len(words := shlex.split(line, comments=True)) > 1 and words[0] == "make"}
    assert documented and documented <= targets, documented - targets


RECIPES = sorted((REPO / "scripts").glob("train_*.sh"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_each_training_recipes_flags_parse_with_train_pys(recipe):
    """scripts/train_d16.sh etc.: the flags each passes to torchrun.sh (train.py) before the user's ("$@")."""
    text = re.sub(r"\\\n\s*", " ", recipe.read_text())
    words = next(shlex.split(line, comments=True) for line in text.splitlines() if "torchrun.sh" in line
                 and not line.lstrip().startswith("#"))
    argv = words[[i for i, w in enumerate(words) if w.endswith("torchrun.sh")][0] + 1:words.index("$@")]
    parser = importlib.import_module(SCRIPTS["train.py"]).build_parser()
    parser.allow_abbrev = False
    parser.parse_args([a.replace("$VAE", "vae.pth") for a in argv])
    assert argv and all(a.startswith("--") for a in argv)
