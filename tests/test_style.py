"""The code base stays clean under the project's ruff rules (pyproject.toml: E, F, W, B, UP; 120 columns), and the
CLIs' help reads right."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--exclude", ".venv", str(ROOT)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_shows_each_default_once():
    """argparse's "(default: None)" beside a help that says what an unset flag means was a second, wrong default."""
    import sample
    import tokenizer_trainer
    from scripts import demo, extract_tokens, study
    from utils import flags

    for build in (flags.build_parser, sample.build_parser, extract_tokens.build_parser, demo.build_parser,
                  tokenizer_trainer.build_parser, study.build_parser):
        text = " ".join(build().format_help().split())
        assert "(default: None)" not in text, build.__module__
    text = " ".join(flags.build_parser().format_help().split())
    assert "--twd TWD initial weight decay (default: 0.05)" in text
    assert "--tlr TLR peak lr override (default from --tblr) --twd" in text
