"""The notebooks run top to bottom (quick mode), keep their exercises checked, and never paste the code of
uft.py, sft_go.py, tasks.py or common.py.

Each notebook is executed in memory with nbclient: the files on disk keep their saved outputs.
"""
import ast
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import common
import sft_go
import tasks
import uft

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
UFT_PUBLIC = {name for name in dir(uft) if not name.startswith("_") and callable(getattr(uft, name))}


def defined_in(module) -> set[str]:
    """Public functions and classes the module itself defines (not the ones it imports)."""
    return {name for name, obj in vars(module).items()
            if not name.startswith("_") and callable(obj) and getattr(obj, "__module__", None) == module.__name__}


PUBLIC = {"uft": UFT_PUBLIC | defined_in(uft), "sft_go": defined_in(sft_go), "tasks": defined_in(tasks),
          "common": defined_in(common)}


def code_cells(nb):
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


@pytest.fixture(scope="session")
def this_python_kernel(tmp_path_factory):
    """A 'python3' kernel spec that runs this very interpreter, ahead of any user-level spec on JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tests)", "language": "python"}))
    return root


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, this_python_kernel, monkeypatch):
    monkeypatch.setenv("UFT_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")      # tiny models: one thread is faster and does not fight other jobs
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(this_python_kernel),
                                                                      os.environ.get("JUPYTER_PATH")])))
    nb = nbformat.read(path, as_version=4)          # an in-memory copy: the file is never written
    client = NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()                                # raises CellExecutionError on the first failing cell
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exercises_are_checked_by_an_assert(path):
    nb = nbformat.read(path, as_version=4)
    seen_exercise, checked = False, False
    for cell in nb.cells:
        if cell.cell_type == "markdown" and "Exercise" in cell.source:
            seen_exercise = True
        elif cell.cell_type == "code" and seen_exercise:
            checked |= any(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(cell.source)))
    assert seen_exercise, "no markdown cell mentions an Exercise"
    assert checked, "no code cell after the Exercise checks the answer with assert"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_defines_no_copy_of_a_project_function(path):
    nb = nbformat.read(path, as_version=4)
    defined = {node.name for source in code_cells(nb) for node in ast.walk(ast.parse(source))
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    copies = sorted(f"{module}.{name}" for module, names in PUBLIC.items() for name in defined & names)
    assert not copies, f"redefines {copies}: import it instead"
    imported = {alias.name for source in code_cells(nb) for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for source in code_cells(nb) for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.ImportFrom)}
    assert imported & set(PUBLIC), f"imports none of {sorted(PUBLIC)}"


def test_the_no_copy_check_knows_each_modules_functions():
    """A guard for the check above: each module's own functions are in its set, imported ones are not."""
    assert {"generate", "rl_loss", "Batch"} <= PUBLIC["uft"]
    assert {"top_eta_groups", "worst_group_loss", "train_step"} <= PUBLIC["sft_go"]
    assert {"countdown_reward", "solve_countdown", "Task", "reward"} <= PUBLIC["tasks"]
    assert {"widen", "load_pretrained", "make_optimizer"} <= PUBLIC["common"]
    assert "Path" not in PUBLIC["tasks"] and "Fraction" not in PUBLIC["tasks"] and "Counter" not in PUBLIC["sft_go"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_saved_notebook_carries_its_outputs(path):
    """Committed notebooks are executed, so plots and tables show on GitHub, and no cell failed."""
    nb = nbformat.read(path, as_version=4)
    cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in cells), "some cells were never executed"
    outputs = [o for cell in cells for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) or "text/html" in o.get("data", {}) for o in outputs)
