"""The course kit: the student version is built, its autograder tests fail on every piece and pass on the
reference; the student files keep docstrings and variable names but no solution; `-k <piece>` selects.

The autograder runs in one pytest subprocess per version (not one per piece): its JUnit report gives each
test's outcome, and a test belongs to the piece its name contains.
"""
import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course import grading, make  # noqa: E402


def run_autograder(folder: Path, report: Path, *extra: str) -> dict[str, bool]:
    """Run `python -m pytest course` in `folder`; returns test name -> passed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "course",
                    f"--junitxml={report}", *extra], cwd=folder, env=env, capture_output=True, text=True)
    cases = ET.parse(report).getroot().iter("testcase")
    return {case.get("name"): not any(child.tag in ("failure", "error") for child in case) for case in cases}


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("course") / "student"
    counts = make.build(out)
    return out, counts


@pytest.fixture(scope="module")
def outcomes(student, tmp_path_factory):
    reports = tmp_path_factory.mktemp("reports")
    return {"reference": run_autograder(ROOT, reports / "reference.xml"),
            "student": run_autograder(student[0], reports / "student.xml")}


@pytest.mark.parametrize("piece", grading.PIECES)
def test_each_piece_fails_in_the_student_version_and_passes_on_the_reference(piece, outcomes):
    mine = {name: passed for name, passed in outcomes["reference"].items() if piece in name}
    assert mine, f"no autograder test is named after {piece}"
    assert all(mine.values()), f"reference fails: {[n for n, ok in mine.items() if not ok]}"
    theirs = {name: passed for name, passed in outcomes["student"].items() if piece in name}
    assert theirs.keys() == mine.keys()
    assert not any(theirs.values()), f"passes without a solution: {[n for n, ok in theirs.items() if ok]}"


def test_every_autograder_test_belongs_to_a_piece(outcomes):
    orphans = [name for name in outcomes["reference"] if not any(p in name for p in grading.PIECES)]
    assert not orphans and len(outcomes["reference"]) >= 2 * len(grading.PIECES)


def test_k_selects_one_piece(tmp_path):
    selected = run_autograder(ROOT, tmp_path / "k.xml", "-k", "kl_k3")
    assert selected and all("kl_k3" in name for name in selected) and all(selected.values())


def test_student_files_keep_docstrings_but_no_solution(student):
    out, counts = student
    assert counts["uft.py"] + counts["sft_go.py"] == len(grading.PIECES)
    for name in ("uft.py", "sft_go.py"):
        ref, stu = (ast.parse((folder / name).read_text()) for folder in (ROOT, out))
        ref_docs = {f.name: ast.get_docstring(f) for f in ast.walk(ref) if isinstance(f, ast.FunctionDef)}
        stu_fns = {f.name: f for f in ast.walk(stu) if isinstance(f, ast.FunctionDef)}
        assert ref_docs.keys() == stu_fns.keys(), name              # every function is still there
        for piece in (p for p in grading.PIECES if p in stu_fns):
            fn = stu_fns[piece]
            assert ast.get_docstring(fn) == ref_docs[piece]
            raised = fn.body[-1]
            assert isinstance(raised, ast.Raise) and piece in ast.unparse(raised), ast.unparse(fn)
        assert "SOLUTION" not in (out / name).read_text()
    for path in (out / "course").glob("*.md"):
        assert "BEGIN SOLUTION" not in path.read_text() and "your answer here" in path.read_text()
    assert not (out / "tests").exists() and not (out / "course" / "make.py").exists()


def test_student_notebooks_keep_names_and_lose_answers(student):
    out, counts = student
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert counts[f"notebooks/{path.name}"] >= 2, f"{path.name}: fewer than two marked solutions"
        ref, stu = nbformat.read(path, 4), nbformat.read(out / "notebooks" / path.name, 4)
        exercises = make.exercise_cells(ref.cells)
        for index, (a, b) in enumerate(zip(ref.cells, stu.cells)):
            assert "# BEGIN SOLUTION" not in b.source and "<!-- BEGIN" not in b.source, (path.name, index)
            if a.cell_type != "code" or "BEGIN SOLUTION" not in a.source:
                continue
            defined = set(make.assigned_names(a.source))
            assert defined <= set(make.assigned_names(b.source)), (path.name, index)   # same names
            assert not b.outputs and index in exercises, (path.name, index)


def test_strip_solutions_stubs_functions_and_top_level_answers():
    source = ("def f(x):\n    \"\"\"doc\"\"\"\n    # BEGIN SOLUTION: twice x\n    y = 2 * x\n    return y\n"
              "    # END SOLUTION\n\n# BEGIN SOLUTION\nanswer, other = f(1), 3\n# END SOLUTION\n"
              "print(answer)\n")
    text, n = make.strip_solutions(source, "example")
    assert n == 2 and 'raise NotImplementedError("f: twice x")' in text and "2 * x" not in text
    assert "answer = None\nother = None\nprint(answer)" in text
    with pytest.raises(ValueError, match="without its END"):
        make.strip_solutions("# BEGIN SOLUTION\nx = 1\n", "broken")


def test_disabled_stops_delegation_and_restores():
    import uft

    namespace = {"hint_fraction": uft.hint_fraction}
    delegate = lambda: uft.hint_fraction(1, 4)            # noqa: E731  what a lazy answer would do
    with grading.disabled((uft, "hint_fraction"), namespace=namespace):
        with pytest.raises(grading.Disabled):
            delegate()
        with pytest.raises(grading.Disabled):
            namespace["hint_fraction"](1, 4)               # `from uft import hint_fraction` is caught too
    assert abs(delegate() - 0.8181980515339463) < 1e-12 and namespace["hint_fraction"] is uft.hint_fraction
