"""`distsgd report`: plots, the HTML page (checked in headless Chromium) and the Markdown table.

The runs are tiny (6 steps of an MLP on 2 workers): the report only needs their folders' shape.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.colors import to_hex

import distsgd
from distsgd import cli
from distsgd.errors import UsageError
from distsgd.report import Report, Run, make_report, plots, style
from distsgd.report.table import COLUMNS

pytestmark = pytest.mark.timeout(120)
CHROMIUM = Path("/usr/bin/chromium")
PLOTS = {"vs_steps.png", "vs_virtual_time.png", "vs_real_time.png", "vs_bytes_sent.png",
         "consensus_distance.png", "staleness.png"}


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A parent folder like `compare` writes: three finished runs and one still going."""
    root = tmp_path_factory.mktemp("grid")
    runs: list[tuple[str, dict[str, Any]]] = [
        ("sgp", {"algorithm": "sgp"}),
        ("allreduce", {"algorithm": "allreduce", "lr": 0.2}),
        ("ssp", {"algorithm": "ssp"}),  # a parameter server: it has a staleness histogram
    ]
    for name, options in runs:
        distsgd.train(steps=6, model="mlp", workers=2, eval_every=2, out=str(root / name),
                      **options)
    # A run caught mid-way: no summary yet, and its last line only half appended.
    running = root / "nested" / "running"
    shutil.copytree(root / "sgp", running)
    (running / "summary.json").unlink()
    lines = (running / "metrics.jsonl").read_text().splitlines()
    (running / "metrics.jsonl").write_text("\n".join(lines[:2]) + '\n{"step": 4, "epo')
    return root


@pytest.fixture(scope="module")
def report(grid: Path, tmp_path_factory: pytest.TempPathFactory) -> Report:
    return make_report([grid], tmp_path_factory.mktemp("report"))


def test_plots_are_nontrivial_images(report: Report) -> None:
    from matplotlib.image import imread

    assert {p.name for p in report.plots} == PLOTS
    for path in report.plots:
        pixels = imread(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300, path.name
        colours = np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)
        assert len(colours) > 20, f"{path.name} is nearly blank"


def test_markdown_has_a_row_per_run_with_distinguishing_labels(report: Report) -> None:
    lines = report.markdown.read_text().splitlines()
    assert lines[0].startswith("| run | status |") and set(lines[1]) <= set("|-: ")
    # The first cell, with the Markdown escapes (of the brackets) undone.
    rows = {re.sub(r"\\(.)", r"\1", line.split(" | ")[0].removeprefix("| ")): line
            for line in lines[2:]}
    # lr is told only among runs of one algorithm (its default is the algorithm's); the unfinished
    # copy of the sgp run has the same config, so its folder tells it apart.
    assert set(rows) == {"sgp [sgp]", "sgp [running]", "allreduce", "ssp"}
    assert "| finished |" in rows["ssp"] and "| unfinished |" in rows["sgp [running]"]


def test_an_unfinished_run_is_reported_with_its_evaluations_so_far(report: Report) -> None:
    running = next(r for r in report.runs if not r.finished)
    assert [m["step"] for m in running.metrics] == [0, 2]  # the torn last line is left out
    assert running.summary["steps"] == 2 and running.summary["algorithm"] == "sgp"
    assert running.summary["test_accuracy"] == running.metrics[-1]["test_accuracy"]


def test_page_is_self_contained_and_escapes_folder_text(grid: Path, tmp_path: Path) -> None:
    hostile = "<img src=x onerror=alert(1)>"
    run = tmp_path / "runs" / hostile
    shutil.copytree(grid / "ssp", run)
    shutil.copytree(grid / "ssp", tmp_path / "runs" / "plain")  # so the folder names the run
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data_dir": "</pre><script>x()"}))
    page = make_report([tmp_path / "runs"], tmp_path / "out").html.read_text()
    assert hostile not in page and "<script>x()" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    # No external asset: every src is a data URI, and nothing is fetched from anywhere.
    assert re.findall(r'src="([a-z]+):', page) == ["data"] * len(PLOTS)
    assert "http://" not in page and "https://" not in page
    md = (tmp_path / "out" / "report.md").read_text()
    assert "\\<img src=x onerror=alert(1)\\>" in md


def test_first_reaching_is_the_first_evaluation_past_the_target() -> None:
    from distsgd.report import first_reaching

    metrics: list[dict[str, Any]] = [
        {"step": 0, "test_accuracy": 0.1, "test_loss": 2.0},
        {"step": 2, "test_accuracy": None, "test_loss": None},  # not evaluated
        {"step": 4, "test_accuracy": 0.5, "test_loss": 0.9},
        {"step": 6, "test_accuracy": 0.4, "test_loss": 1.1}]
    assert first_reaching(metrics, "test_accuracy", 0.5) == metrics[2]  # >=, and the first
    assert first_reaching(metrics, "test_loss", 1.0, falls=True) == metrics[2]
    assert first_reaching(metrics, "test_accuracy", 0.6) is None


def test_a_grids_report_targets_add_the_steps_and_time_to_reach_them(
        grid: Path, tmp_path: Path) -> None:
    from distsgd.report import first_reaching, grid_targets

    root = tmp_path / "grid"
    shutil.copytree(grid / "sgp", root / "sgp")
    (root / "grid.json").write_text(json.dumps({"spec": {"report": {"target_accuracy": 0.05}}}))
    assert grid_targets([root]) == grid_targets([root / "sgp"]) == {"target_accuracy": 0.05}
    report = make_report([root], tmp_path / "out")
    head, _, row = report.markdown.read_text().splitlines()
    heads = [h.strip() for h in head.strip("|").split("|")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    reached = first_reaching(report.runs[0].metrics, "test_accuracy", 0.05)
    assert reached is not None  # any trained model beats 5% on 10 classes
    values = dict(zip(heads, cells, strict=True))
    assert values["steps to acc ≥ 0.05"] == f"{reached['step']:.0f}"
    assert values["virtual s to acc ≥ 0.05"] == f"{reached['virtual_time_s']:.4g}"
    assert "real s to acc ≥ 0.05" in report.html.read_text()  # the page has every column
    # Targets given explicitly replace the grid's; one no run reaches shows n/a.
    report = make_report([root], tmp_path / "out2", targets={"target_loss": 1e-9})
    values = dict(zip(*(([c.strip() for c in line.strip("|").split("|")])
                        for line in report.markdown.read_text().splitlines()[::2]), strict=True))
    assert values["steps to test loss ≤ 1e-09"] == "n/a"
    with pytest.raises(UsageError, match="unknown target 'target_acc'"):
        make_report([root], tmp_path / "out3", targets={"target_acc": 0.5})


def test_cli_prints_where_it_wrote(
    grid: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["report", str(grid / "ssp"), str(grid / "sgp"), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"distsgd report: 2 runs (0 unfinished) -> {tmp_path}")
    for name in ("report.html", "report.md", "staleness.png"):
        assert str(tmp_path / name) in printed and (tmp_path / name).is_file()


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: tmp, "holds no run folder"),
    (lambda tmp: Path(shutil.copy(__file__, tmp)), "is not a folder"),
])
def test_bad_folders_exit_2_with_one_line(
    make: Any, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["report", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_broken_metrics_line_is_named(grid: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(grid / "sgp", run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(UsageError, match=r"metrics.jsonl line 2 is not valid JSON"):
        make_report([run], tmp_path / "out")


@pytest.mark.parametrize("damage, message", [
    (lambda c: {**c, "hyperparameters": 5}, "hyperparameters=5 is not a valid dict"),
    (lambda c: {**c, "workers": "four"}, "workers='four' is not a valid int"),
    (lambda c: {**c, "algorithm": None}, "algorithm=None is not a valid str"),
    (lambda c: {**c, "stragglers": [[0, "x"]]}, "stragglers="),
    (lambda c: b"\xff\xfe{}", "config.json is not UTF-8 text"),
])
def test_a_damaged_config_is_one_line_and_writes_nothing(
    damage: Any, message: str, grid: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    shutil.copytree(grid / "sgp", run)
    config = damage(json.loads((run / "config.json").read_text()))
    if isinstance(config, bytes):
        (run / "config.json").write_bytes(config)
    else:
        (run / "config.json").write_text(json.dumps(config))
    assert cli.main(["report", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_non_utf8_metrics_are_one_line(grid: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(grid / "sgp", run)
    (run / "metrics.jsonl").write_bytes(b'{"step": 0}\n\xff\n')
    with pytest.raises(UsageError, match=r"metrics\.jsonl is not UTF-8 text"):
        make_report([run], tmp_path / "out")


# --- how the figures tell series apart ----------------------------------------------------------

def _fake_runs(count: int, low: float = 0.1, high: float = 0.9) -> list[Run]:
    """`count` runs whose 8 evaluations send from `low` to `high` MB per worker."""
    runs = []
    for k in range(count):
        metrics = [{"step": s, "bytes_sent": 2e6 * (low + (high - low) * s / 7) * (1 + k / 1e3),
                    "test_accuracy": 0.1 * s + k / 100, "train_loss": 2 - 0.1 * s}
                   for s in range(8)]
        runs.append(Run(Path(f"run{k}"), {"algorithm": "sgp", "workers": 2}, metrics, {}, True,
                        f"run {k}"))
    return runs


def test_twenty_series_each_have_their_own_colour_and_marker() -> None:
    # Before: ten colours, then the same ten dashed; no markers beyond a dot.
    fig = plots._curves(_fake_runs(20), "steps", [("test accuracy", lambda r: plots._series(
        r.metrics, lambda m: m["step"], lambda m: m["test_accuracy"]))])
    lines = fig.axes[0].get_lines()
    assert len(lines) == 20
    assert len({to_hex(line.get_color()) for line in lines}) == 20
    assert len({line.get_marker() for line in lines}) == 20
    assert len({(s["color"], s["marker"]) for s in map(style.series_style, range(40))}) == 20


def test_projection_marks_series_that_coincide(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    from distsgd import project

    saved: list[Any] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    names = sorted(distsgd.algorithms.REGISTRY)
    flat = {"async-sparse", "downpour", "ssp"}  # one server: the same speed-up at every N
    rows = [project.Projection(n, w, 1.0, 1.1 if n in flat else w * (0.3 + i / 30))
            for i, n in enumerate(names) for w in (4, 8, 16)]
    project.plot(rows, tmp_path / "p.png", project.Setting())
    lines = [line for line in saved[0].axes[0].get_lines() if line.get_label() != "ideal (N)"]
    assert len({to_hex(line.get_color()) for line in lines}) == len(names)
    assert len({line.get_marker() for line in lines}) == len(names)
    labels = {line.get_label() for line in lines}
    assert {"async-sparse", "downpour (= async-sparse)", "ssp (= async-sparse)"} <= labels
    sizes = [line.get_markersize() for line in lines if line.get_label().split()[0] in flat]
    assert len(set(sizes)) == 3  # drawn over each other, each larger: all three show


@pytest.mark.parametrize("low, high", [(0.3, 0.4), (0.21, 0.95), (0.05, 3.0), (0.02, 40.0),
                                       (1e-4, 1e4), (3e-7, 2e5)])
def test_log_axis_labels_never_overlap(low: float, high: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    def panel(y: str) -> Any:
        return lambda run: plots._series(run.metrics, lambda m: m["bytes_sent"] / 2e6,
                                         lambda m: m[y])

    fig = plots._curves(_fake_runs(2, low, high), "MB sent per worker",
                        [("test accuracy", panel("test_accuracy")),
                         ("train loss", panel("train_loss"))], log_x=True)
    fig.set_size_inches(8, 3.8)  # narrower than a report's: the labels have less room
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # type: ignore[no-untyped-call]
    renderer = canvas.get_renderer()  # type: ignore[no-untyped-call]
    for ax in fig.axes[:2]:
        left, right = ax.get_xlim()
        labels = [t for t in ax.xaxis.get_ticklabels(which="both")
                  if t.get_visible() and t.get_text() and left <= t.get_position()[0] <= right]
        shown = sorted((t.get_window_extent(renderer) for t in labels),
                       key=lambda box: box.x0)
        assert len(shown) >= 2, (low, high)
        for a, b in itertools.pairwise(shown):
            assert a.x1 + 2 <= b.x0, (low, high, a, b)


def test_the_html_table_lists_only_non_default_hyperparameters() -> None:
    column = next(get for heading, get, *_ in COLUMNS if heading == "hyperparameters")

    def hps(algorithm: str, values: dict[str, Any]) -> str:
        return str(column(Run(Path("r"), {}, [], {"algorithm": algorithm,
                                                  "hyperparameters": values}, True)))

    assert hps("easgd", {"period": 10, "beta": 0.9, "alpha": None}) == "defaults"
    assert hps("easgd", {"period": 4, "beta": 0.9, "alpha": 0.25}) == "period=4, alpha=0.25"
    assert hps("bygone", {"x": 1}) == "x=1"  # an algorithm this version lacks: all of them
    assert hps("easgd", 5) == ""  # type: ignore[arg-type]


# --- the page in a browser ----------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is absent: install Debian's `chromium` "
                                  "package (.ci/run does so when it runs as root)")


def chromium(page: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran, and every console message it logged."""
    done = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
         "--v=0", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=60, check=True)
    # Chromium logs its own complaints (no D-Bus in a container) too; only the page's count.
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))


def elements(dom: str, tag: str) -> list[dict[str, str | None]]:
    parser = _Elements()
    parser.feed(dom)
    return [attrs for name, attrs in parser.found if name == tag]


@needs_chromium
def test_page_loads_in_chromium_with_the_table_and_plots(report: Report, tmp_path: Path) -> None:
    dom, console = chromium(report.html, tmp_path)
    assert console == []  # no error, no CSP violation, nothing at all
    tables = elements(dom, "table")
    assert tables == [{"id": "summary", "data-sortable": "ready"}]  # its script ran
    assert len(elements(dom, "tr")) == 1 + len(report.runs)
    images = [img["src"] or "" for img in elements(dom, "img")]
    assert len(images) == len(PLOTS) and all(s.startswith("data:image/png;base64,") for s in images)


@needs_chromium
def test_clicking_a_heading_sorts_the_table(report: Report, tmp_path: Path) -> None:
    # The page plus a script that clicks "test accuracy" twice and writes down the orders.
    probe = """<script>
      const head = Array.from(document.querySelectorAll("#summary th"));
      const col = head.findIndex((th) => th.textContent === "test accuracy");
      const order = () => Array.from(document.querySelectorAll("#summary tbody tr"),
                                     (tr) => tr.cells[col].dataset.value);
      head[col].querySelector("button").click();
      document.body.dataset.ascending = JSON.stringify(order());
      head[col].querySelector("button").click();
      document.body.dataset.descending = JSON.stringify(order());
    </script></body>"""
    page = tmp_path / "probe.html"
    page.write_text(report.html.read_text().replace("</body>", probe))
    dom, console = chromium(page, tmp_path)
    assert console == []
    body = elements(dom, "body")[0]
    ascending = [float(v) for v in json.loads(body["data-ascending"] or "")]
    descending = [float(v) for v in json.loads(body["data-descending"] or "")]
    assert len(ascending) == len(report.runs)
    assert ascending == sorted(ascending) and descending == ascending[::-1]


# ------------------------------------------------------------------ unwritable report folders
def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_an_unwritable_report_folder_is_one_line(
    grid: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A report folder that cannot be made (read-only, as on a read-only disk): one line naming
    it, exit 1, not an OSError traceback."""
    import errno

    def read_only(self: Path, *args: object, **kw: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    out = tmp_path / "report"
    monkeypatch.setattr(Path, "mkdir", read_only)
    assert cli.main(["report", str(grid / "sgp"), "--out", str(out)]) == 1
    assert _one_line_error(capsys) == (
        f"distsgd: run failed: cannot write {out}: Read-only file system")


def test_a_report_on_a_read_only_disk_is_one_line(
    grid: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """On a real read-only disk (a tmpfs remounted read-only; needs root): a run folder with no
    report yet (its report/ cannot be made), and one whose report/ exists (its files cannot be
    written)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        for name in ("fresh", "reported"):
            shutil.copytree(grid / "sgp", disk / name)
        assert cli.main(["report", str(disk / "reported")]) == 0
        remount = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True,
                                 text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only: {remount.stderr.strip()}")
        capsys.readouterr()
        assert cli.main(["report", str(disk / "fresh")]) == 1
        assert _one_line_error(capsys) == (
            f"distsgd: run failed: cannot write {disk / 'fresh' / 'report'}: "
            "Read-only file system")
        assert cli.main(["report", str(disk / "reported")]) == 1
        err = _one_line_error(capsys)
        assert err.startswith(f"distsgd: run failed: cannot write {disk / 'reported' / 'report'}/")
        assert err.endswith(": Read-only file system")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
