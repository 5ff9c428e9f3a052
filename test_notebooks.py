"""Tests of notebooks/: every notebook runs top to bottom in a fresh kernel, and is saved with its outputs.

The notebooks are executed in memory (the files are not rewritten), with notebooks/ as the working directory, as
when they are opened there, and their text outputs must match the saved ones (timings and decimals aside): a notebook
saved before the code changed fails until it is re-executed. Together they take about 6 minutes on a 2-core CPU
(notebook 2 samples from the shipped checkpoint, notebook 3 trains a tiny model), so these runs have a command of
their own, `python -m pytest -q -m notebooks`; the quick checks of the saved files run with the other tests.
"""

import glob
import itertools
import os
import re

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
CELL_TIMEOUT = 600  # seconds per cell
MAX_BYTES = 1_000_000  # a saved notebook, outputs included

try:
    import ipykernel  # noqa: F401  (the kernel that runs the notebooks; it brings the "python3" kernelspec)
    import nbformat
    from nbclient import NotebookClient
    MISSING = None
except ImportError as e:
    MISSING = e


def needs_notebook_tools():
    if MISSING is not None:
        pytest.fail(f"the notebook tests need nbformat, nbclient and ipykernel ({MISSING}): "
                    "pip install -r requirements-dev.txt", pytrace=False)


def test_the_notebooks_are_there():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert {"01_tokens_and_pivots.ipynb", "02_hierarchical_unmasking.ipynb", "03_train_a_tiny_himar.ipynb",
            "04_zero_shot_editing.ipynb", "05_one_training_step.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_saved_with_its_outputs(path):
    needs_notebook_tools()
    assert os.path.getsize(path) < MAX_BYTES, f"{path} is over {MAX_BYTES} bytes: lower the figures' size or dpi"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), f"{path} is saved without running every cell"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{path} was not run top to bottom"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path} is saved with an error: {errors[0].get('ename')}: {errors[0].get('evalue')}"


@pytest.mark.notebooks  # its own command: python -m pytest -q -m notebooks (pytest.ini)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path):
    needs_notebook_tools()
    nb = nbformat.read(path, as_version=4)  # an in-memory copy: the file keeps its saved outputs
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": NOTEBOOK_DIR}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    saved = nbformat.read(path, as_version=4)
    for k, (fresh, old) in enumerate(zip(nb.cells, saved.cells)):
        if fresh.cell_type == "code":
            assert text_of(fresh) == text_of(old), (
                f"{os.path.basename(path)}, cell {k}: the saved text output differs from a fresh run, so the notebook "
                "is stale: re-execute it top to bottom in notebooks/ and save it (in Jupyter: Restart Kernel and Run "
                "All, then Save)")


def text_of(cell):
    """A code cell's printed and plain-text outputs, with what varies between machines masked: seconds taken, and
    every decimal number (float rounding differs between CPUs, and a loss printed after 800 steps shows it)."""
    parts = [o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", "")
             for o in cell.outputs if o.output_type in ("stream", "execute_result")]
    text = "".join("".join(p) if isinstance(p, list) else p for p in parts)
    text = re.sub(r"\d+(\.\d+)? ?s\b", "<seconds>", text)
    return re.sub(r"\d+\.\d+", "<decimal>", text)


# A number that the markdown states as a measurement: a decimal, a percentage, or a time ("26 s", "3 min").
QUOTED = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?=\s?(?:%|s\b|seconds\b|min\b))|(?<![\w.])(\d+\.\d+)(?![\w.])")
CITES = re.compile(r"README|REPORT")  # a sentence that names where its number comes from


def quoted_numbers(markdown):
    """(number as written, its sentence, the documents it cites) for each measurement a markdown cell quotes, code
    spans left out (they are settings, not results). A sentence that names README or REPORT cites it for its
    numbers; a table is cited by the text just above it. Uncited: an empty tuple."""
    prose = re.sub(r"```.*?```", "", markdown, flags=re.S)
    prose = re.sub(r"`[^`]*`", "`code`", prose)
    above = ()  # the documents the text above a table names
    for is_table, lines in itertools.groupby(prose.split("\n"), key=lambda line: line.lstrip().startswith("|")):
        text = "\n".join(lines)
        sentences = [text] if is_table else re.split(r"(?<=[.;!?])\s+(?=[A-Z(])", text)
        for sentence in sentences:
            cites = above if is_table else tuple(sorted(set(CITES.findall(sentence))))
            for match in QUOTED.finditer(sentence):
                yield match.group(1) or match.group(2), sentence, cites
        if not is_table:
            above = tuple(sorted(set(CITES.findall(text))))


def printed_numbers(nb):
    """Every number in a notebook's saved text outputs."""
    text = [o.get("text", "") if o.get("output_type") == "stream" else o.get("data", {}).get("text/plain", "")
            for cell in nb["cells"] if cell["cell_type"] == "code" for o in cell.get("outputs", [])]
    return [float(v) for v in re.findall(r"\d+(?:\.\d+)?", " ".join("".join(t) for t in text))]


def in_document(number, text):
    """Whether `text` (a README or REPORT) states `number` as written (as a whole number, not inside another)."""
    return re.search(r"(?<![\d.])" + re.escape(number) + r"(?![\d]|\.\d)", text) is not None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_every_number_the_markdown_quotes_is_printed_by_the_notebook_or_its_source(path):
    """A measurement quoted in a notebook's text must be one its cells print (rounded as written: "0.06" matches a
    printed 0.0571, "22 s" a printed 21.7), or its sentence must cite the README or REPORT, which must state it."""
    import json

    with open(path) as f:
        nb = json.load(f)
    printed = printed_numbers(nb)
    documents = {name: open(os.path.join(ROOT, f"{name}.md")).read() for name in ("README", "REPORT")}
    for k, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown":
            for number, sentence, cites in quoted_numbers("".join(cell["source"])):
                where = f"{os.path.basename(path)}, cell {k} quotes {number}"
                if cites:
                    assert any(in_document(number, documents[name]) for name in cites), (
                        f"{where}, which {' and '.join(f'{name}.md' for name in cites)} does not state: {sentence!r}")
                else:
                    places = len(number.partition(".")[2])
                    assert any(round(p, places) == float(number) for p in printed), (
                        f"{where}, which no cell prints: {sentence!r}")


def test_the_quoted_number_check_can_fail():
    found = {number: cites for number, _, cites in quoted_numbers(
        "Sampling took 26 s. The gap is 0.05 against 0.60 (REPORT.md). Use `K1 = 0.5`.")}
    assert found == {"26": (), "0.05": ("REPORT",), "0.60": ("REPORT",)}  # `K1 = 0.5` is a setting
    cited_table = [cites for _, _, cites in quoted_numbers("From REPORT.md:\n\n| a | 1.5 |\n| b | 2.5 |")]
    assert cited_table == [("REPORT",), ("REPORT",)]  # a table whose source is said above it
    assert [cites for _, _, cites in quoted_numbers("Measured:\n\n| a | 1.5 |")] == [()]
    assert in_document("8.87", "DiT head 10 / 50 steps | 8.87 / 7.66") and not in_document("8.8", "8.87")
    assert not in_document("87", "8.87") and in_document("26", "26 s")
    nb = {"cells": [{"cell_type": "code", "outputs": [{"output_type": "stream", "text": "took 25.8 s, gap 0.0571"}]}]}
    assert printed_numbers(nb) == [25.8, 0.0571]
