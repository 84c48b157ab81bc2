"""Write the student version of the project: the course pieces and the notebooks' exercises without solutions.

The files of the repository are the solution version. A solution is marked with plain comments, so the
reference stays runnable and readable:

    def hint_fraction(t, T_hint, p_low=0.05, p_high=0.95):
        \"\"\"docstring (kept)\"\"\"
        # BEGIN SOLUTION: what to implement (becomes the NotImplementedError message)
        ...
        # END SOLUTION

Inside a function the block becomes `raise NotImplementedError("<piece>: <what to implement>")`; at the top
level of a notebook cell it becomes `name = None  # your code here` for each name the solution assigns, so
later cells keep the same variable names. Markdown answers sit between `<!-- BEGIN SOLUTION -->` and
`<!-- END SOLUTION -->` and are replaced by a placeholder. Exercise cells of the student notebooks lose their
outputs. What a student needs besides (tasks.py, common.py, models.py, runs.py, docs, the experiments'
reports, the autograder in course/) is copied unchanged; tests/ and benchmarks/ are not.

    python course/make.py --out student/     # then: cd student && python -m pytest course -k hint_fraction
"""
from __future__ import annotations

import argparse
import ast
import re
import shutil
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN = re.compile(r"^(?P<indent>\s*)# BEGIN SOLUTION(?::\s*(?P<what>.*?))?\s*$")
END = re.compile(r"^\s*# END SOLUTION\s*$")
MD_SOLUTION = re.compile(r"<!-- BEGIN SOLUTION -->.*?<!-- END SOLUTION -->", re.S)
MD_PLACEHOLDER = "*(your answer here)*"
STUBBED = ["uft.py", "sft_go.py"]                       # files whose marked bodies become stubs
COPIED = ["tasks.py", "common.py", "guards.py", "models.py", "runs.py", "requirements.txt", "README.md", "docs",
          "experiments/reproduce.py", "experiments/results"]
COURSE_SKIP = {"make.py", "__pycache__"}                # the student kit needs no builder


def enclosing_function(lines: list[str], index: int) -> str | None:
    """Name of the innermost `def` above line `index` that is less indented than it (None: top level)."""
    indent = len(lines[index]) - len(lines[index].lstrip())
    for line in reversed(lines[:index]):
        stripped = line.lstrip()
        if stripped.startswith("def ") and len(line) - len(stripped) < indent:
            return stripped[4:].split("(")[0]
    return None


def assigned_names(block: str) -> list[str]:
    """Top-level names a solution block binds (assignments, defs, for targets), in order of appearance."""
    names = []
    for node in ast.parse(textwrap.dedent(block)).body:
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        for target in targets:
            names += [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]
    return list(dict.fromkeys(names))


def strip_solutions(source: str, where: str) -> tuple[str, int]:
    """(source with every marked block replaced by its stub, number of blocks). Unbalanced markers raise."""
    lines, out, count, i = source.splitlines(), [], 0, 0
    while i < len(lines):
        begin = BEGIN.match(lines[i])
        if not begin:
            if END.match(lines[i]):
                raise ValueError(f"{where}, line {i + 1}: END SOLUTION without BEGIN SOLUTION")
            out.append(lines[i])
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if END.match(lines[j])), None)
        if end is None or any(BEGIN.match(line) for line in lines[i + 1: end]):
            raise ValueError(f"{where}, line {i + 1}: BEGIN SOLUTION without its END SOLUTION")
        indent, what = begin["indent"], begin["what"] or "write this part"
        function = enclosing_function(lines, i)
        if function:                                   # a function body: the call fails loudly
            message = f"{function}: {what}".replace("\\", "\\\\").replace('"', '\\"')
            line = f'{indent}raise NotImplementedError("{message}")'
            out += [line] if len(line) <= 110 else [f"{indent}raise NotImplementedError(",
                                                     f'{indent}    "{message}")']
        else:                                          # a notebook's top-level answer: keep its names
            names = assigned_names("\n".join(lines[i + 1: end]))
            out.append(f"{indent}# your code here: {what}")
            out += [f"{indent}{name} = None" for name in names]
        count, i = count + 1, end + 1
    text = "\n".join(out) + ("\n" if source.endswith("\n") else "")
    compile(text, where, "exec")                       # a stub that does not parse is a bug of the markers
    return text, count


def exercise_cells(cells) -> set[int]:
    """Indices of the code cells under an '## Exercise' heading (up to the next non-exercise heading)."""
    inside, found = False, set()
    for index, cell in enumerate(cells):
        if cell.cell_type == "markdown":
            heading = next((line for line in cell.source.splitlines() if line.startswith("## ")), None)
            if heading is not None:
                inside = heading.startswith("## Exercise")
        elif inside:
            found.add(index)
    return found


def student_notebook(path: Path, dest: Path) -> int:
    """Write the student copy of one notebook; returns how many solution blocks it stubbed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    total, exercises = 0, exercise_cells(nb.cells)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            cell.source, n = MD_SOLUTION.subn(MD_PLACEHOLDER, cell.source)
            total += n
            continue
        cell.source, n = strip_solutions(cell.source, f"{path.name}, cell {index}")
        total += n
        if n or index in exercises:                  # an answer's output would give the answer away
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, dest)
    return total


def build(out: Path) -> dict[str, int]:
    """Write the student version into `out` (created; must be empty or absent). Returns blocks per file."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out}: not empty; choose a new folder (nothing is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in STUBBED:
        text, counts[name] = strip_solutions((ROOT / name).read_text(), name)
        (out / name).write_text(text)
    for name in COPIED:
        src, dest = ROOT / name, out / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy2(src, dest)
    (out / "notebooks").mkdir()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        counts[f"notebooks/{path.name}"] = student_notebook(path, out / "notebooks" / path.name)
    (out / "course").mkdir()
    for path in sorted((ROOT / "course").iterdir()):
        if path.name in COURSE_SKIP:
            continue
        text = path.read_text()
        if path.suffix == ".md":
            text, counts[f"course/{path.name}"] = MD_SOLUTION.subn(MD_PLACEHOLDER, text)
        (out / "course" / path.name).write_text(text)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write the student version of the project (solutions removed).")
    p.add_argument("--out", required=True, help="a new folder for the student version")
    args = p.parse_args(argv)
    counts = build(Path(args.out))
    for name, n in counts.items():
        print(f"{name}: {n} solution block(s) removed")
    print(f"student version in {args.out}; autograder: cd {args.out} && python -m pytest course -k <piece>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
