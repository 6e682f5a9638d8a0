"""Every notebooks/NN_*.py runs to the end at small parameters; a failing cell fails it.
CI runs every one of them.

How CI runs a notebook (docs/ARCHITECTURE.md, "Notebooks"): the jupytext py:percent file is
read with jupytext, papermill injects the small parameters after its ``parameters`` cell
(the same ``injected-parameters`` cell ``papermill -p`` writes), and the cells run in order
in this process, so the suite pays no kernel start-up and the notebooks share the tests'
compiled functions. Every notebook receives the same parameters (a notebook uses those it
needs): ``small=True`` (the notebook itself picks its small sizes), ``root`` (a temporary
directory for its runs), ``data_dir`` (the tests' fake Fashion-MNIST), ``model_workdir``
(the tests' shared tiny diffusion run). A new notebook needs no edit here.
``make notebooks`` runs the same files through papermill with a Jupyter kernel at their
full-size defaults.
"""

import glob
import os
import shutil

import jupytext
import matplotlib
import pytest
from papermill.parameterize import parameterize_notebook

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "[0-9][0-9]_*.py")))


class CellError(RuntimeError):
    pass


def execute(path: str, parameters: dict) -> dict:
    """Runs the notebook's code cells with ``parameters`` injected; returns its namespace.
    CellError names the failing cell's number and first line."""
    nb = jupytext.read(path)
    if not any("parameters" in c.metadata.get("tags", []) for c in nb.cells):
        raise CellError(f'{path} has no `# %% tags=["parameters"]` cell.')
    nb.metadata.setdefault("papermill", {})  # what papermill's own loader adds
    for c in nb.cells:
        c.metadata.setdefault("tags", [])
    nb = parameterize_notebook(nb, parameters)
    namespace = {"__name__": "__main__"}
    try:
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            try:
                exec(compile(cell.source, f"{os.path.basename(path)}[cell {i}]", "exec"), namespace)
            except Exception as e:
                first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
                raise CellError(f"{os.path.basename(path)} cell {i} ({first!r}): {e!r}") from e
    finally:
        plt.close("all")
    return namespace


def test_every_notebook_has_a_parameters_cell_with_small_false():
    assert len(NOTEBOOKS) >= 5
    for path in NOTEBOOKS:
        cells = jupytext.read(path).cells
        params = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and "small = False" in params[0].source, path


def test_the_runs_03_and_04_share_are_defined_alike_in_both():
    """04 loads the runs 03 trains (same workdirs): the cell that configures them must be
    the same text in both, or 04 would load runs of another config (its resume check
    then refuses them)."""
    marker = "# The three runs 03 and 04 share"
    cells = []
    for name in ("03_samplers", "04_guidance"):
        path = os.path.join(ROOT, "notebooks", f"{name}.py")
        found = [c.source for c in jupytext.read(path).cells if c.source.startswith(marker)]
        assert len(found) == 1, path
        cells.append(found[0])
    assert cells[0] == cells[1]


BROKEN = """# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %%
ran = []

# %% tags=["parameters"]
small = False

# %%
ran.append(small)

# %%
1 / 0

# %%
ran.append("after")
"""


def test_a_failing_cell_fails_the_run(tmp_path):
    path = tmp_path / "99_broken.py"
    path.write_text(BROKEN)
    with pytest.raises(CellError, match=r"cell 4 .*ZeroDivisionError") as e:
        execute(str(path), {"small": True})
    assert isinstance(e.value.__cause__, ZeroDivisionError)
    fixed = tmp_path / "98_fixed.py"
    fixed.write_text(BROKEN.replace("1 / 0", "pass"))
    namespace = execute(str(fixed), {"small": True})
    assert namespace["ran"] == [True, "after"]  # the injected parameter reached the cells


@pytest.mark.slow
def test_papermill_in_a_kernel_fails_on_a_broken_cell(tmp_path):
    """What `make notebooks` runs: papermill executing the converted notebook in a kernel."""
    import jupytext
    import papermill

    path = tmp_path / "broken.ipynb"
    jupytext.write(jupytext.reads(BROKEN, fmt="py:percent"), str(path))
    with pytest.raises(papermill.PapermillExecutionError, match="ZeroDivisionError"):
        papermill.execute_notebook(
            str(path), str(tmp_path / "out.ipynb"), parameters={"small": True}, progress_bar=False
        )


# Every notebook runs in CI: 06, 07 and 08, the longest, took 80, 51 and 78 s of a worker in the
# suite from an empty cache (check25, docs/BENCHMARKS.md, "Test suite"), down from 236, 128
# and 154 s before the train step's update went flat (diffax_lab/optimizer.py); 08 from 91 s
# since its small mode draws one ODE tolerance. tests/conftest.py collects these runs first.


@pytest.mark.slow  # each trains or samples tiny models
@pytest.mark.parametrize("path", [pytest.param(p, id=os.path.basename(p)[:-3]) for p in NOTEBOOKS])
def test_notebook_runs_at_small_parameters(path, tiny_data, tiny_run, tmp_path):
    model_workdir = str(tmp_path / "model")
    shutil.copytree(tiny_run[1], model_workdir)
    params = {
        "small": True,
        "root": str(tmp_path / "runs"),
        "data_dir": str(tiny_data),
        "model_workdir": model_workdir,
    }
    execute(path, params)
