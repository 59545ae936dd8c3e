"""The README claims only what exists: every path it names exists, and every ``genmodels``
command in its code blocks composes (``--print_config``, parsed in-process by genmodels.cli)."""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PATH_RE = re.compile(r"(?<![\w./-])((?:configs|scripts|benchmarks|docs|tests|genmodels)/[\w./-]*)")
COMMAND_RE = re.compile(r"^genmodels (fit|validate|test|predict)\b")


def code_blocks(text: str, langs: tuple[str, ...] = ("", "bash", "sh")) -> list[str]:
    """The fenced code blocks of ``text`` whose language tag is in ``langs``."""
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M) if lang in langs]


def readme_commands(text: str) -> list[list[str]]:
    """``genmodels <subcommand> ...`` lines of the code blocks, with ``NAME="..."`` shell
    variables of the same block expanded and ``\\`` continuations joined."""
    commands = []
    for block in code_blocks(text):
        env: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if m := re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", line):
                env[m[1]] = " ".join(shlex.split(m[2]))
            elif COMMAND_RE.match(line):
                line = re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", lambda v: env[v[1]], line)
                commands.append(shlex.split(line))
    return commands


def test_every_named_path_exists():
    # a path followed by ``<``, ``*`` or ``{`` is a template (``imagenet256_<model>.yaml``), not a file
    paths = {m[1].rstrip(".,:;") for m in PATH_RE.finditer(README) if README[m.end():m.end() + 1] not in "<*{"}
    assert {"configs/evaluation/digits.yaml", "scripts/main.sh", "docs/main_job_grid.png"} <= paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README.md names paths that do not exist: {missing}"


def test_fresh_machine_commands_are_unchanged():
    """CI runs the second one (.ci/run); both must stay exactly as they are."""
    blocks = [b.strip() for b in code_blocks(README)]
    assert "bash scripts/setup.sh && bash scripts/main.sh" in blocks
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest -q" in blocks


def test_readme_commands_are_found():
    commands = readme_commands(README)
    subcommands = {c[1] for c in commands}
    assert len(commands) >= 5 and {"fit", "test", "predict"} <= subcommands, commands
    for c in commands:
        assert "..." not in c and not any(a.startswith("<") for a in c), f"placeholder in {' '.join(c)}"


@pytest.mark.parametrize("argv", readme_commands(README), ids=lambda a: " ".join(a[1:])[:90])
def test_readme_command_composes(argv, monkeypatch):
    from genmodels.cli import main

    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository root
    monkeypatch.setattr("sys.argv", ["genmodels"])
    args = [a for a in argv[1:] if a != "--print_config"] + ["--print_config"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code in (0, None), f"`{' '.join(argv)}` does not compose"
    config = yaml.safe_load(out.getvalue())
    assert config["model"]["class_path"].startswith("genmodels.training.")
    assert config["data"]["class_path"].startswith("genmodels.data.")
    if "--ckpt_path" in argv:
        assert config["ckpt_path"] == argv[argv.index("--ckpt_path") + 1]
    if argv[1] == "test":
        assert config["model"]["init_args"]["evaluator"]["class_path"] == "genmodels.evaluation.Evaluator"
