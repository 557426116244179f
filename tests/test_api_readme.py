"""The README's command lines, executed exactly as written.

Every line of the unlabelled code blocks of the README section "The reference trainer" is
run with bash, in order, in an empty folder that holds a copy of ``docs/`` (the reproduce
commands read and rewrite ``docs/results`` and ``docs/reproduction.md``), with the venv's
``bin`` on PATH; the multi-node torchrun line gets ``NNODES=1 HEAD=127.0.0.1`` as its text
says. (The two ``make`` commands are what CI itself runs; the drop-in snippet has its own
test.)"""

import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))


def readme_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index("## The reference trainer")
    end = text.index("\n## ", start + 1)
    blocks = re.findall(r"^```\n(.*?)^```$", text[start:end], flags=re.S | re.M)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            command = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
            if command:
                commands.append(command)
    return commands


def test_readme_lists_the_commands():
    commands = readme_commands()
    assert any(c.startswith("silent-vae eval --run-dir runs/sg") for c in commands)
    assert any(c.startswith("silent-vae gradvar --run-dir runs/sg") for c in commands)
    assert any("--rdzv-backend c10d" in c and "--nnodes $NNODES" in c for c in commands)
    assert not any("..." in c for c in commands)        # every line is a complete command


def test_readme_exit_code_table_matches_the_code():
    from silent_kernels.api.errors import EXIT_CODES

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    rows = dict(re.findall(r"^\| (\d+) \| (.+) \|$", text, flags=re.M))
    assert sorted(map(int, rows)) == sorted(EXIT_CODES)


def test_readme_commands_run_as_written(tmp_path):
    shutil.copytree(os.path.join(ROOT, "docs"), tmp_path / "docs")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "NNODES": "1", "HEAD": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)     # what a user's shell has
    for command in readme_commands():
        res = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=900)
        assert res.returncode == 0, f"{command}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        assert "Traceback" not in res.stderr, command
    runs = tmp_path / "runs"
    assert [json.loads(line)["epoch"] for line in open(runs / "sg" / "metrics.jsonl")] == [1, 2, 3]
    assert json.load(open(runs / "sg" / "eval_val.json"))["n"] == 500
    assert json.load(open(runs / "sg" / "gradvar.json"))["results"]["silent"]["total"] == 0.0
    for name in ("reconstructions.png", "curves.png"):
        assert (runs / "sg" / "figures" / name).stat().st_size > 0
    assert json.load(open(runs / "ddp" / "run_info.json"))["world_size"] == 2
    assert json.load(open(runs / "multinode" / "run_info.json"))["world_size"] == 2
    assert (tmp_path / "docs" / "reproduction.md").stat().st_size > 0
