"""Every code block of the documentation site runs here, and the site's pieces fit together.

How a page's fenced blocks are run (one namespace per page, blocks in order, ``torch.manual_seed(0)`` first):

- ``python`` blocks with ``>>>`` prompts are doctests (outputs checked; ELLIPSIS and NORMALIZE_WHITESPACE on);
  ``python`` blocks without prompts are executed.
- ``console`` blocks: each ``$ command`` line is run and the lines after it, up to the next ``$``, are its expected
  output (same checker). ``bash`` blocks: each command line is run, output not checked.
- A command runs in this process, through ``structmat.cli.main``, when it is one of :data:`IN_PROCESS` (instant,
  shapes only); every other command must be listed in :data:`NOT_RUN` with the reason it is not run here
  (installation, minutes of training, timing; an excuse no page uses fails a test). An unknown command fails the
  test, so a new command in the docs is either run or explicitly excused.
- Blocks in any other language (or none) are refused: a code block is code that runs. (Pages may still show
  formulas as inline code; an indented code block is not used.)

``mkdocs build --strict`` runs in CI (.ci/run) after the tests, and here when ``STRUCTMAT_DOCS_BUILD=1``.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)

#: Command prefixes the tests do not run, with the reason. Keep this short.
NOT_RUN = {
    "pip install": "installation (CI installs the package itself, see .ci/run)",
    "structmat-attention icl --preset quick": "trains for about 9 minutes; the smoke presets run in tests/",
    "structmat-attention lm --preset quick": "trains for about 6 minutes; the smoke presets run in tests/",
    "structmat-attention timeseries": "needs the ETTh1.csv data file and minutes of training",
    "structmat-attention report": "reads a finished run's directory",
    "torchrun": "starts several processes (a DDP test in tests/ runs it at the smoke size)",
    "structmat bench": "timing, seconds per call; structmat.bench runs in the python examples",
}

#: Command prefixes run in this process through ``structmat.cli.main`` (argv after the program name).
IN_PROCESS = ("structmat info", "structmat --help")

_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


def _blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line, language, body) of every fenced block of a page."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        indent = m.group("indent")
        body = "".join(ln[len(indent) :] if ln.startswith(indent) else ln for ln in m.group("body").splitlines(True))
        out.append((line, m.group("lang"), body))
    return out


def _commands(body: str) -> list[str]:
    """Command lines of a shell block: comments stripped, ``\\`` continuations joined, ``&&`` chains split."""
    joined = body.replace("\\\n", " ")
    cmds = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith("#") or not line:
            continue
        cmds.extend(part.strip() for part in line.split("&&") if part.strip())
    return cmds


def _shell_commands() -> list[str]:
    return [cmd for page in PAGES for _, lang, body in _blocks(page) if lang == "bash" for cmd in _commands(body)]


def test_every_excuse_is_used() -> None:
    unused = [prefix for prefix in NOT_RUN if not any(cmd.startswith(prefix) for cmd in _shell_commands())]
    assert not unused, f"NOT_RUN entries no page uses (delete them): {unused}"


def _not_run(cmd: str) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if cmd.startswith(prefix)), None)


def _run_in_process(cmd: str) -> str:
    """Run a ``structmat ...`` command through its entry point in this process; return its stdout."""
    from structmat.cli import main

    argv = shlex.split(cmd)[1:]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's --help
            code = e.code
    assert code in (0, None), f"{cmd!r} exited with {code}:\n{buf.getvalue()}"
    return buf.getvalue()


def _check_shell(path: Path, line: int, lang: str, body: str) -> None:
    if lang == "console":
        chunks = re.split(r"^\$ ", body, flags=re.M)
        assert not chunks[0].strip(), f"{path.name}:{line}: a console block starts with '$ command'"
        pairs = []
        for chunk in chunks[1:]:
            cmd, _, expected = chunk.partition("\n")
            pairs.append((cmd.strip(), expected))
    else:
        pairs = [(cmd, None) for cmd in _commands(body)]
    checker = doctest.OutputChecker()
    for cmd, expected in pairs:
        if cmd.startswith(IN_PROCESS):
            got = _run_in_process(cmd)
            if expected is not None and expected.strip():
                assert checker.check_output(expected, got, _FLAGS), (
                    f"{path.name}:{line}: {cmd}\nexpected:\n{expected}\ngot:\n{got}"
                )
        else:
            assert _not_run(cmd), f"{path.name}:{line}: {cmd!r} is neither run here nor listed in NOT_RUN"


def _run_python(path: Path, line: int, body: str, globs: dict) -> None:
    if ">>>" in body:
        test = doctest.DocTestParser().get_doctest(body, globs, f"{path.name}:{line}", str(path), line)
        runner = doctest.DocTestRunner(optionflags=_FLAGS)
        out = io.StringIO()
        test.globs = globs  # the parser copies them; the page's blocks share one namespace
        result = runner.run(test, out=out.write, clear_globs=False)
        assert result.failed == 0, out.getvalue()
    else:
        exec(compile(body, f"{path}:{line}", "exec"), globs)


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_every_code_block_runs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    globs: dict = {"__name__": f"docs.{path.stem}"}
    with warnings_as_in_docs():
        for line, lang, body in _blocks(path):
            if lang == "python":
                _run_python(path, line, body, globs)
            elif lang in ("console", "bash"):
                _check_shell(path, line, lang, body)
            else:
                pytest.fail(f"{path.name}:{line}: a code block in language {lang!r}: use python, console or bash")


@contextlib.contextmanager
def warnings_as_in_docs():
    """Warnings stay visible (as a reader would see them), never errors."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        yield


def _pictures_module():
    spec = importlib.util.spec_from_file_location("docs_pictures", DOCS / "hooks" / "pictures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_family_page_has_its_picture_and_every_picture_a_page() -> None:
    pictures = _pictures_module()
    used = set()
    for page in (DOCS / "families").glob("*.md"):
        used.update(re.findall(r"\.\./pictures/([\w-]+)\.png", page.read_text(encoding="utf-8")))
    assert used == set(pictures.FIGURES), (
        f"pictures without a page or pages without a picture: {used ^ set(pictures.FIGURES)}"
    )
    png = pictures.render("btt")
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert pictures.render("btt") == png  # deterministic


def test_every_public_family_has_a_page() -> None:
    import structmat as sm

    pages = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "families").glob("*.md"))
    missing = [
        name
        for name in sm.__all__
        if isinstance(getattr(sm, name), type)
        and issubclass(getattr(sm, name), sm.LinearOperator)
        and name != "LinearOperator"
        and f"sm.{name}" not in pages
        and f"structmat.{name}" not in pages
    ]
    assert not missing, f"families without a page (or not mentioned on one): {missing}"


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [str(p.relative_to(DOCS)) for p in PAGES if str(p.relative_to(DOCS)) not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"


def _resolve(target: str) -> object:
    """The object a ``::: dotted.path`` line documents (modules, then attributes)."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(target)


@pytest.mark.parametrize("package", ["structmat", "structmat_attention"])
def test_api_reference_covers_every_public_name(package: str) -> None:
    import types

    text = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "reference").glob("*.md"))
    targets = re.findall(r"^::: ([\w.]+)", text, re.M)
    documented = [_resolve(t) for t in targets]
    module = importlib.import_module(package)
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, types.ModuleType):
            covered = any(t.startswith(f"{package}.{name}.") for t in targets)
        else:
            covered = any(d is obj for d in documented)
        if not covered:
            missing.append(name)
    assert not missing, f"{package}.__all__ names missing from docs/reference/: {missing}"


def test_benchmark_results_are_included_not_copied() -> None:
    page = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    assert '--8<-- "benchmarks/README.md"' in page
    assert (ROOT / "benchmarks" / "README.md").exists()


def test_ci_builds_the_site_strictly() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "mkdocs build --strict" in ci and "docs" in ci


@pytest.mark.skipif(os.environ.get("STRUCTMAT_DOCS_BUILD") != "1", reason="set STRUCTMAT_DOCS_BUILD=1 (CI builds it)")
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "pictures" / "btt.png").exists()
