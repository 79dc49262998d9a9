"""`distsgd compare`: a grid of training runs, each cell a normal run folder under one parent.

The grid file is TOML::

    description = "EASGD, the communication period"   # optional, kept in grid.json

    [run]                    # fixed options of every cell: any RunConfig field (distsgd/config.py)
    dataset = "digits"       # except the grid's own keys below and out/progress, which compare sets
    model = "mlp"
    steps = 100

    [grid]                   # the axes: each a list, or one value
    algorithm = ["downpour", "eamsgd"]   # required
    workers = [4, 8]                     # default 4
    seed = [0, 1]                        # default 0
    batch_size = [16, 64]                # any other RunConfig field may be an axis too

    [grid.hyperparameters]               # for every algorithm of the grid that has them
    period = [1, 4, 16]
    [grid.hyperparameters.eamsgd]        # for eamsgd only; replaces a shared list of that name
    beta = [0.5, 0.9]

`[[grid]]` instead of `[grid]` gives several sub-grids over the same [run] options, each a
table as above; the cells are their union (a cell two sub-grids share runs once). It says what a
product cannot: a global batch held fixed as the workers grow, or a run option for one algorithm
only::

    [[grid]]
    algorithm = "sgp"
    workers = 8
    batch_size = 64
    [[grid]]
    algorithm = "sgp"
    workers = 16
    batch_size = 32

An optional `[report]` table names what `distsgd report` measures on the grid's runs, besides its
usual table: ``target_accuracy = 0.85`` (first evaluation with test accuracy at least this) and
``target_loss = 0.5`` (first with test loss at most this: the evaluated model's, not the noisy
mini-batch loss) add the steps and the virtual and real seconds each run took to get there.

The cells of an algorithm are the product of workers × the other [grid] axes × its hyperparameter
lists × seeds. A shared hyperparameter applies to the algorithms that have it; for one that lacks
it the axis collapses (`period = [1, 4]` over downpour and sgp gives two downpour cells and one sgp
cell) rather than failing, so one grid can compare algorithms with different knobs. A value is
typed as TOML (`workers = "four"` is an error); a hyperparameter may also be text, as with `--set`
(`alpha = "none"`).

An unknown key, algorithm or hyperparameter (one no algorithm of the grid has, or one its
per-algorithm table's algorithm lacks), a wrong type or an out-of-range value raises `UsageError`
before any cell runs: every cell's `RunConfig` is built and checked first. What only a run can
check (e.g. crossover's `groups` against the workers) fails that cell alone; the others go on.

The output::

    OUT/grid.json                         the spec and every cell: coordinates, status, error
    OUT/downpour-w4-period=4-seed0/       a run folder (config.json, metrics.jsonl, summary.json)

A cell's name holds its algorithm, `w` workers, every other [grid] key and `seed`, so names stay
put when a list grows. Running again into the same OUT resumes: a cell whose folder holds a
summary.json and a config.json equal to the cell's config is not rerun; any other folder of that
name (interrupted, failed, or made with other options) is deleted and the cell runs from scratch.

    >>> results = run_grid({"run": {"steps": 20}, "grid": {"algorithm": ["sgp", "allreduce"]}},
    ...                    "runs/demo", jobs=2)
    >>> print(format_table(results))

The package, one concept a module: `grid` (the spec and its cells), `values` (typing a value as
the field it sets), `document` (the TOML file and the flags over it), `cell` (one cell and its
result), `execute` (running the cells: resuming, the grid.json ledger), `pool` (the worker
processes that run them and never outlive the compare), `display` (the live lines and the final
table).
"""

from distsgd.compare.cell import Cell, CellResult, cell_name
from distsgd.compare.display import Display, format_table
from distsgd.compare.document import load, override
from distsgd.compare.execute import default_out, finished_summary, run_grid
from distsgd.compare.grid import AXES, BACKENDS, TARGETS, GridSpec, report_targets

__all__ = ["AXES", "BACKENDS", "TARGETS", "Cell", "CellResult", "Display", "GridSpec",
           "cell_name", "default_out", "finished_summary", "format_table", "load", "override",
           "report_targets", "run_grid"]
