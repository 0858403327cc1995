"""The README stays a first page, and the docs site builds in strict mode (a broken link or anchor fails)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

README = Path(ROOT) / "README.md"


def test_the_readme_is_a_first_page_whose_links_exist():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 200
    fenced = [line.lstrip().startswith("```") for line in lines]
    inside = [sum(fenced[: n + 1]) % 2 == 1 or fenced[n] for n in range(len(lines))]  # quoted output may be wider
    assert [n for n, line in enumerate(lines, 1) if len(line) > 110 and not inside[n - 1]] == []
    assert lines[2:6] == ["```bash",
                          "bash scripts/in-venv.sh ssl-tune run search_spaces/twist.yaml   # set up, then search TWIST's "
                          "hyperparameters",
                          "bash scripts/in-venv.sh python -m pytest -q                     # set up, then run the tests",
                          "```"]
    for target in re.findall(r"\]\(([^)#]+)", text):
        if "://" not in target:
            assert (Path(ROOT) / target).exists(), target


def test_the_docs_site_builds_in_strict_mode(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "python-api" / "index.html").is_file()


def test_the_commands_pages_example_error_is_what_the_command_prints(cli_here):
    """docs/commands.md quotes a refused `--set` as the command prints it: the quote stays true."""
    text = (Path(ROOT) / "docs" / "commands.md").read_text()
    (block,) = [b for b in re.findall(r"```text\n(\$ ssl-tune .*?)```", text, flags=re.S) if "\nerror: " in b]
    command, *printed = block.strip().splitlines()
    status, _, err = cli_here(*shlex.split(command.removeprefix("$ ssl-tune ")), cwd=ROOT)
    assert status == 2 and err.strip().splitlines() == printed
