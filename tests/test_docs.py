"""Executable documentation: every fenced ``python`` and ``bash`` block of README.md and docs/*.md runs.

The rules a block may rely on (and a writer of the docs must keep):

1. The blocks of one Markdown file run in document order, in one Python process per file (``_DRIVER``) and
   in a fresh working directory. Python blocks share one namespace, as cells of a notebook do; bash blocks
   run with ``bash -euo pipefail`` in the same directory, so a block may use what an earlier block of the
   same file created (a saved folder, a variable). Files never share anything.
2. The working directory holds links to the repository's ``recipes/``, ``benchmarks/``, ``scripts/``,
   ``hub_cards/`` and ``tests/`` and a copy of ``docs/`` (a block may regenerate a plot there).
3. Names resolve here, with no network: ``HF_ENDPOINT`` points at a loopback Hub (``tests/olah_server.py``)
   serving the model repos of ``SERVED_MODELS`` (tiny models saved by bimask-hf under the ids the docs use)
   and a small CIFAR-10-shaped ``uoft-cs/cifar10``, so ``cifar10`` works; ``fashion_mnist`` is Debian's
   local copy.
4. A block that needs a GPU, a network, other machines or hours is marked by an HTML comment on the line
   before its fence, ``<!-- doctest: skip (REASON) -->``; it is reported as skipped with REASON and not run.
   Every other ``python`` / ``bash`` block must run. Every fence must name its language (``text``, ``yaml``
   ... for what is not run), so no block escapes by having none.
5. Sizes are shrunk here, never in what the reader sees: ``SUBSTITUTIONS`` rewrites a block's source
   before it runs, and ``_BASH_PRELUDE`` appends ``TRAIN_FLAGS`` (a few steps on a few samples) to every
   ``bimask-train`` / ``python -m bimask_hf.train`` and ``accelerate launch`` call and ``EVAL_FLAGS`` to
   every ``bimask-eval`` / ``python -m bimask_hf.evaluation`` call.

Each block is one test case named ``FILE:LINE`` (the line of its opening fence); a failure shows the
block's output, with Python tracebacks pointing at the Markdown file's own line numbers. When a block fails,
the later blocks of its file are not run and fail naming it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGUAGES = {"python", "bash"}
SKIP_MARK = re.compile(r"^<!--\s*doctest:\s*skip\s*\((?P<reason>.+)\)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")

# (file, regex, replacement, why): applied to a block's source before it runs. Keep each one narrow enough
# that it cannot hide a change of meaning; the reader's text stays as written.
SUBSTITUTIONS: list[tuple[str, str, str, str]] = [
    ("README.md", r'"resnet18"', '"test_resnet"', "timm's tiny test ResNet: searching ResNet-18's permutations "
     "takes minutes on a loaded 2-core CPU"),
    ("README.md", r"range\(300\)", "range(3)", "three steps of the training loop instead of 300"),
    ("README.md", r"num_train_epochs=300", "max_steps=2",
     "two optimizer steps instead of 300 epochs"),
]

# Appended to every `bimask-train` / `accelerate launch` call of a bash block (later flags win).
TRAIN_FLAGS = ("--max_steps 2 --per_device_train_batch_size 8 --per_device_eval_batch_size 16 "
               "--max_train_samples 64 --max_eval_samples 16 --dataloader_num_workers 0 --report_to none "
               "--save_strategy no --logging_steps 1 --disable_tqdm true")
EVAL_FLAGS = "--max_samples 16 --batch_size 16"

_BASH_PRELUDE = f"""
bimask-train() {{ command bimask-train "$@" {TRAIN_FLAGS}; }}
bimask-eval() {{ command bimask-eval "$@" {EVAL_FLAGS}; }}
accelerate() {{ if [ "${{1:-}}" = launch ]; then command accelerate "$@" {TRAIN_FLAGS}; else command accelerate "$@"; fi; }}
python() {{
  case "${{1:-}} ${{2:-}}" in
    "-m bimask_hf.train") command python "$@" {TRAIN_FLAGS} ;;
    "-m bimask_hf.evaluation") command python "$@" {EVAL_FLAGS} ;;
    *) command python "$@" ;;
  esac
}}
"""

# Model repos the loopback Hub serves: id -> how to build it (a tiny model saved by save_sparse_model).
SERVED_MODELS = {
    "you/resnet-bimask-2x4": "timm",
    "you/vit-bimask-2x4": "vit",
}

FILE_TIMEOUT_S = 600

_DRIVER = r'''
import json, resource, subprocess, sys, time, traceback


def cpu():
    return sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
               for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


blocks = json.load(open(sys.argv[1]))
prelude = open(sys.argv[2]).read()
namespace = {"__name__": "__main__"}
for block in blocks:
    print(f"@@doctest begin {block['line']}", flush=True)
    start, start_cpu = time.perf_counter(), cpu()
    try:
        if block["lang"] == "python":
            code = compile("\n" * block["first_code_line"] + block["code"], block["file"], "exec")
            exec(code, namespace)
        else:
            rc = subprocess.run(["bash", "-euo", "pipefail", "-c", prelude + block["code"]]).returncode
            if rc:
                raise SystemExit(f"bash exited with status {rc}")
    except BaseException:
        sys.stdout.flush()
        traceback.print_exc()
        sys.stderr.flush()
        print(f"@@doctest failed {block['line']} {time.perf_counter() - start:.1f} {cpu() - start_cpu:.1f}", flush=True)
        sys.exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    print(f"@@doctest passed {block['line']} {time.perf_counter() - start:.1f} {cpu() - start_cpu:.1f}", flush=True)
'''


@dataclass
class Block:
    file: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the reason given by a skip mark

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def parse_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the skip mark (if any) on the line before each."""
    rel = path.relative_to(ROOT).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, info, start = match["fence"], match["info"].strip(), i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        if end is None:
            raise ValueError(f"{rel}:{start + 1}: code fence is never closed")
        if not info:
            raise ValueError(f"{rel}:{start + 1}: code fence names no language; use python/bash to run it, "
                             "text/yaml/... otherwise")
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = SKIP_MARK.match(prev.strip())
        indent = len(match["indent"])
        code = "\n".join(ln[indent:] if ln[:indent].isspace() else ln for ln in lines[start + 1:end]) + "\n"
        blocks.append(Block(rel, start + 1, info.split()[0].lower(), code, mark["reason"] if mark else None))
        i = end + 1
    return blocks


def _substituted(block: Block) -> str:
    code = block.code
    for file, pattern, replacement, _why in SUBSTITUTIONS:
        if file == block.file:
            code = re.sub(pattern, replacement, code)
    return code


ALL_BLOCKS = [b for path in DOC_FILES for b in parse_blocks(path) if b.lang in RUN_LANGUAGES]


def test_every_substitution_applies():
    # A substitution that no longer matches means the docs changed: the block would run at full size.
    for file, pattern, _replacement, why in SUBSTITUTIONS:
        assert any(re.search(pattern, b.code) for b in ALL_BLOCKS if b.file == file), (file, pattern, why)


def test_the_two_commands_are_marked_skipped():
    # They set up .venv and run for minutes; run here, test.sh would also run this test again.
    commands = [b for b in ALL_BLOCKS if re.search(r"scripts/(main_job|test)\.sh", b.code)]
    assert commands and all(b.skip for b in commands), [b.id for b in commands if not b.skip]


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[|\]\([^)]*\)", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    in_code, anchors = False, set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_github_anchor(line.lstrip("#")))
    return anchors


def test_links_between_the_docs_resolve():
    # Pages moved out of the README: a link to a file or heading that is not there is a dead end.
    broken = []
    for path in DOC_FILES:
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, broken


def test_readme_stays_a_five_minute_read():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= 200, f"README.md has {lines} lines; move detail into docs/ and link it"


def test_parser_reads_marks_languages_and_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    doc = tmp_path / "x.md"
    doc.write_text("# t\n\n<!-- doctest: skip (needs a CUDA GPU) -->\n```bash\nnvidia-smi\n```\n\n"
                   "```python\nprint(1)\n```\n```text\nout\n```\n", encoding="utf-8")
    blocks = parse_blocks(doc)
    assert [(b.line, b.lang, b.skip, b.code) for b in blocks] == [
        (4, "bash", "needs a CUDA GPU", "nvidia-smi\n"), (8, "python", None, "print(1)\n"), (11, "text", None, "out\n")]
    doc.write_text("```\nno language\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="x.md:1: code fence names no language"):
        parse_blocks(doc)


# ---- running the blocks -------------------------------------------------------------------------


def _save_served_model(kind: str, folder: str) -> None:
    import timm

    import bimask_hf as bh

    from . import models

    config = bh.BiMaskConfig(n=2, m=4, permutation_search="random", num_permutations=4)
    if kind == "timm":
        model = bh.sparsify(timm.create_model("test_resnet", num_classes=10), config)
        data_config = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                       "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
    else:
        model = bh.sparsify(models.tiny_vit(num_labels=10), config)
        data_config = None
    bh.save_sparse_model(model, folder, data_config=data_config)


@pytest.fixture(scope="module")
def docs_hub(tmp_path_factory):
    """A loopback Hub serving SERVED_MODELS and a small CIFAR-10-shaped dataset."""
    from .hub_datasets import write_cifar10_like
    from .olah_server import serve_local_repos

    root = tmp_path_factory.mktemp("docs_hub")
    with serve_local_repos(str(root / "hub")) as hub:
        for repo_id, kind in SERVED_MODELS.items():
            folder = str(root / "models" / repo_id)
            _save_served_model(kind, folder)
            hub.add_model_repo(repo_id, folder)
        write_cifar10_like(str(root / "cifar10"), train=64, test=32)
        hub.add_dataset_repo("uoft-cs/cifar10", str(root / "cifar10"))
        yield hub


@pytest.fixture(scope="module")
def run_file(request, tmp_path_factory):
    """run_file(name) -> {line: (status, output)}, running the file's blocks once (see the module docstring)."""
    results: dict[str, dict[int, tuple[str, str]]] = {}
    home = tmp_path_factory.mktemp("docs_home")

    def run(file: str) -> dict[int, tuple[str, str]]:
        if file in results:
            return results[file]
        work = tmp_path_factory.mktemp("doc_" + re.sub(r"\W", "_", file))
        for name in ("recipes", "benchmarks", "scripts", "hub_cards", "tests"):
            (work / name).symlink_to(ROOT / name)
        shutil.copytree(ROOT / "docs", work / "docs")
        blocks = [b for b in ALL_BLOCKS if b.file == file and b.skip is None]
        spec = [{"file": str(ROOT / b.file), "line": b.line, "first_code_line": b.line, "lang": b.lang,
                 "code": _substituted(b)} for b in blocks]
        (work / ".doctest_blocks.json").write_text(json.dumps(spec), encoding="utf-8")
        (work / ".doctest_prelude.sh").write_text(_BASH_PRELUDE, encoding="utf-8")
        (work / ".doctest_driver.py").write_text(_DRIVER, encoding="utf-8")
        docs_hub = request.getfixturevalue("docs_hub")  # started only when a block runs
        env = {**os.environ, "HF_ENDPOINT": docs_hub.endpoint, "HF_HOME": str(home / "hf"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "WANDB_MODE": "offline",
               "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               "MPLBACKEND": "Agg"}
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env.pop(key, None)
        try:
            proc = subprocess.run([sys.executable, ".doctest_driver.py", ".doctest_blocks.json", ".doctest_prelude.sh"],
                                  cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=FILE_TIMEOUT_S)
            stdout = proc.stdout
        except subprocess.TimeoutExpired as err:
            stdout = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            stdout += f"\n(the blocks of {file} ran past {FILE_TIMEOUT_S} s and were stopped)\n"
        results[file] = _parse_output(stdout, blocks)
        return results[file]

    return run


def _parse_output(stdout: str, blocks: list[Block]) -> dict[int, tuple[str, str]]:
    out: dict[int, tuple[str, str]] = {}
    current, chunk = None, []
    for line in stdout.splitlines():
        match = re.match(r"^@@doctest (begin|passed|failed) (\d+)(?: ([\d.]+) ([\d.]+))?$", line)
        if not match:
            chunk.append(line)
            continue
        kind, number = match[1], int(match[2])
        if kind == "begin":
            current, chunk = number, []
        else:
            out[number] = (kind, "\n".join(chunk) + f"\n({kind} in {match[3]} s, {match[4]} s CPU)")
            current = None
    if current is not None:  # the process died inside this block (a crash or the timeout)
        out[current] = ("failed", "\n".join(chunk))
    failed = next((b for b in blocks if out.get(b.line, ("",))[0] == "failed"), None)
    for b in blocks:
        if b.line not in out:
            why = f"not run: {failed.id} failed first" if failed else "not run (the driver stopped)"
            out[b.line] = ("failed", why + "\n" + stdout[-4000:])
    return out


@pytest.mark.slow  # starts one process (and the CLIs' processes) per documentation file
@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[b.id for b in ALL_BLOCKS])
def test_doc_block_runs(block: Block, run_file):
    if block.skip is not None:
        pytest.skip(block.skip)
    from bimask_hf.data.local import fashion_mnist_available

    if not fashion_mnist_available():
        pytest.skip("Debian's dataset-fashion-mnist is not installed: the docs' cifar10 and fashion_mnist come from it")
    status, output = run_file(block.file)[block.line]
    print(output)  # shown by pytest -rP
    assert status == "passed", f"{block.id} ({block.lang}) failed:\n{output[-6000:]}"
