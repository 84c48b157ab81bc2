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


# Answers that only call the library. Each notebook run below also tries these: after the check of an exercise
# it defines the delegating answer, runs the check again (which must raise grading's `Disabled`: the library is
# switched off while the student's code runs), then restores the reference answer for the cells that follow.
DELEGATING = {
    "01_kv_cache_sampler.ipynb": {
        "my_positions_from_mask": "return uft.positions_from_mask(mask)",
        "my_cached_greedy": "return model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,\n"
                            "                          do_sample=False)[0, len(prompt):].tolist()"},
    "02_countdown_and_rewards.ipynb": {
        "my_extract_answer": "return tasks.extract_answer(text)",
        "my_countdown_reward": "from tasks import countdown_reward\n"
                               "    return countdown_reward(text, nums, target)"},
    "03_hints_and_hint_decay.ipynb": {
        "my_hint_fraction": "return uft.hint_fraction(t, T_hint, p_low, p_high)",
        "my_cut_points": "return uft.cut_points(n, max_chunks)"},
    "04_policy_gradient.ipynb": {
        "my_group_advantages": "return uft.group_advantages(rewards, eps)",
        "my_ppo_clip_loss": "return uft.policy_gradient_loss(logp, old_logp, advantages, epsilon)"},
    "05_uft_vs_sft_vs_rft.ipynb": {
        "my_logged_hint_fraction": "return (uft.hint_fraction(step, config['T_hint'], config['p_low'],\n"
                                   "                              config['p_high']) if config['algo'] == 'uft' else 0.0)",
        "my_paired_change": "c = uft.paired_comparison(before, after)\n"
                            "    return {**c, 'gained': c['wins'], 'lost': c['losses']}"},
    "06_why_hints_help.ipynb": {
        "my_growth_factor": "return float(np.exp(reproduce.growth_rate(list(zip(heights, rollouts)))))"},
    "07_token_grouping.ipynb": {
        "my_tfidf": "return sft_go.tfidf_scores(docs)",
        "my_top_eta": "return sft_go.top_eta_groups(scores, mask, eta)"},
    "08_worst_group_loss.ipynb": {
        "my_worst_group_loss": "return sft_go.worst_group_loss(token_losses, groups, mask, lam)[0]"},
}


def with_delegating_answers(nb, answers: dict[str, str]) -> list:
    """Insert, after each exercise's check, [delegating answer, the check again, the reference answer];
    returns the repeated check cells, tagged so that nbclient lets them raise."""
    repeated = []
    for function, body in answers.items():
        (index,) = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and f"def {function}(" in c.source]
        check = next(i for i in range(index + 1, len(nb.cells)) if nb.cells[i].cell_type == "code")
        head, rest = nb.cells[index].source.split("    # BEGIN SOLUTION", 1)
        delegating = nbformat.v4.new_code_cell(head + "    " + body + rest.split("# END SOLUTION", 1)[1])
        again = nbformat.v4.new_code_cell(nb.cells[check].source, metadata={"tags": ["raises-exception"]})
        restore = nbformat.v4.new_code_cell(nb.cells[index].source)
        nb.cells[check + 1:check + 1] = [delegating, again, restore]
        repeated.append((function, again))
    return repeated


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, this_python_kernel, monkeypatch):
    """Quick mode, every cell without error; an answer that only calls the library fails its check."""
    monkeypatch.setenv("UFT_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")      # tiny models: one thread is faster and does not fight other jobs
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(this_python_kernel),
                                                                      os.environ.get("JUPYTER_PATH")])))
    nb = nbformat.read(path, as_version=4)          # an in-memory copy: the file is never written
    repeated = with_delegating_answers(nb, DELEGATING.get(path.name, {}))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()                                # raises CellExecutionError on the first failing cell
    for function, cell in repeated:
        errors = [o.ename for o in cell.outputs if o.output_type == "error"]
        assert errors == ["Disabled"], f"{function} that calls the library: its check raised {errors or 'nothing'}"
    repeated_ids = {id(cell) for _, cell in repeated}
    errors = [o for cell in nb.cells if cell.cell_type == "code" and id(cell) not in repeated_ids
              for o in cell.outputs if o.output_type == "error"]
    assert not errors


def test_every_delegating_answer_names_a_solved_exercise():
    """A guard for the table above: each entry names a function with a marked solution in that notebook."""
    for name, answers in DELEGATING.items():
        sources = code_cells(nbformat.read(NOTEBOOK_DIR / name, as_version=4))
        for function in answers:
            assert any(f"def {function}(" in s and "# BEGIN SOLUTION" in s for s in sources), (name, function)


def exercise_sections(nb) -> list[tuple[str, list]]:
    """(heading, cells) of each '## Exercise' section: the cells up to the next '## ' heading."""
    sections, current = [], None
    for cell in nb.cells:
        heading = next((line for line in cell.source.splitlines() if line.startswith("## ")), None)
        if cell.cell_type == "markdown" and heading is not None:
            current = (heading, []) if heading.startswith("## Exercise") else None
            if current:
                sections.append(current)
        elif current:
            current[1].append(cell)
    return sections


def checks_something(source: str) -> bool:
    """An assert, or a call of a grading.expect_* helper (which raises with a message)."""
    tree = ast.parse(source)
    return any(isinstance(node, ast.Assert) for node in ast.walk(tree)) or any(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr.startswith("expect")
        for node in ast.walk(tree))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exercises_have_a_marked_solution_and_a_check(path):
    """At least two exercises, one of them code; each has a reference answer between solution markers (removed
    from the student version by course/make.py); a code answer is followed by a cell that checks it (a written
    answer is graded by reading)."""
    sections = exercise_sections(nbformat.read(path, as_version=4))
    assert len(sections) >= 2, f"{len(sections)} exercise(s)"
    coded = 0
    for heading, cells in sections:
        code = [c.source for c in cells if c.cell_type == "code"]
        written = [c.source for c in cells if c.cell_type == "markdown"]
        answered = (any("# BEGIN SOLUTION" in c for c in code)
                    or any("<!-- BEGIN SOLUTION -->" in c for c in written))
        assert answered, f"{heading}: no answer between solution markers"
        if any("# BEGIN SOLUTION" in c for c in code):
            coded += 1
            checks = [c for c in code if "# BEGIN SOLUTION" not in c]
            assert any(checks_something(c) for c in checks), f"{heading}: no check"
    assert coded >= 1, "no exercise where the student writes code"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_states_its_measured_run_time_and_memory(path):
    intro = nbformat.read(path, as_version=4).cells[0].source
    assert "Run time and memory on this machine" in intro and "⟨timing⟩" not in intro
    line = intro.split("Run time and memory on this machine")[1]
    assert " s" in line and "GB" in line, line


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_plot_says_what_you_should_see(path):
    """The first markdown cell after a cell that draws a figure tells the reader what to look for."""
    nb = nbformat.read(path, as_version=4)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and any("image/png" in o.get("data", {}) for o in cell.outputs):
            after = next((c.source for c in nb.cells[index + 1:] if c.cell_type == "markdown"), "")
            assert "What you should see" in after, f"cell {index}: a figure with no 'What you should see' under it"


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
