"""Few-step samplers on the foreign benchmark models: every diffusers scheduler at its defaults, per NFE.

The engine of ``bench/foreign_models.py``. Per model (a diffusers ``save_pretrained`` folder from
:mod:`fastsample.jobs.foreign_models`, or any conf/model config) and per NFE budget, every row of
:data:`DIFFUSERS_DEFAULTS` runs through ``sampler=diffusers`` on the same seeds and labels
(``class_labels=cycle``), beside converged reference runs (:data:`REFERENCES`, NFE >= 200). Each row is
scored by FID in two feature spaces on the same samples: the shipped classifier (``features=classifier``,
which also gives the class accuracy) and a held-out random CNN (``features=random_conv``, seed 0),
against the test split. Everything is built through conf/evaluate.yaml, :func:`fastsample.jobs.setup.plan`
and :meth:`Setup.score`, as :mod:`fastsample.jobs.benchmark` does, so a row is what ``evaluate.py
mode=generate`` reports for its settings.

Extension points (the tuner's rows): :class:`Row` (a label and config overrides, with ``{nfe}`` /
``{steps}`` filled in per budget), ``--row 'LABEL:OVERRIDE;OVERRIDE'`` and ``--samplers`` (fastsample
sampler specs as in ``bench/fid_vs_nfe.py``) on the command line, or ``run(settings, rows=...)`` from
Python. A row's step count is searched so that its NFE is the budget's (the largest with NFE <= the
budget where none hits it, e.g. Heun's 2 steps - 1), unless its overrides set ``sampler.steps``.

Results go to ``<out>/<model>/rows.csv`` after every row; a rerun skips the rows already there (same
model weights, row, budget and seeds), so an interrupted run resumes and other rows can be added
later; rows of other weights (the model was retrained) are dropped.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastsample.jobs.benchmark import compose, fmt, parse_sampler_spec
from fastsample.jobs.evaluation import PreviewGrid, build_evaluator, prepare_reference
from fastsample.jobs.setup import Setup, plan, resolve_device
from fastsample.utils.errors import brief, fail, find_user_error
from fastsample.utils.hashing import module_hash
from fastsample.utils.instantiation import instantiate
from fastsample.utils.io import write_bytes_atomic


@dataclass(frozen=True)
class Row:
    """One table row: a sampler given as conf/evaluate.yaml overrides.

    ``overrides`` may hold ``{nfe}`` and ``{steps}``. ``steps``: ``"nfe"`` searches the step count
    that spends the budget; an int runs that many; None leaves the steps to the overrides (e.g. a
    tuned-sampler file that fixes them). ``spec`` instead of overrides: a fastsample sampler spec as
    ``bench/fid_vs_nfe.py --samplers`` takes them. ``once``: a reference row, run once (budget 0), not
    per NFE budget.
    """

    label: str
    overrides: tuple[str, ...] = ()
    steps: int | str | None = "nfe"
    spec: str | None = None
    once: bool = False

    def config_overrides(self, steps: int | None, nfe: int) -> list[str]:
        """The overrides of this row at ``steps`` steps for the ``nfe`` budget."""
        if self.spec is not None:
            return parse_sampler_spec(self.spec, steps)[1]
        items = [item.format(nfe=nfe, steps=steps) for item in self.overrides]
        return items if steps is None or self.steps is None else [*items, f"sampler.steps={steps}"]


def diffusers_row(label: str, scheduler: str, **settings: Any) -> Row:
    """A ``sampler=diffusers`` row: ``scheduler`` with the model's config plus ``settings``."""
    extra = [f"+sampler.scheduler_config.{key}={value}" for key, value in settings.items()]
    return Row(label, ("sampler=diffusers", f"sampler.scheduler={scheduler}", *extra))


#: diffusers' schedulers at their defaults (on the model's own scheduler config, as
#: ``Scheduler.from_config(pipeline.scheduler.config)`` gives them). PNDM's default Runge-Kutta warm-up
#: needs >= 13 model calls, so it runs as PLMS (``skip_prk_steps``, what Stable Diffusion's configs set).
DIFFUSERS_DEFAULTS = (
    diffusers_row("DDIM", "DDIMScheduler"),
    diffusers_row("PNDM (PLMS)", "PNDMScheduler", skip_prk_steps="true"),
    diffusers_row("Euler", "EulerDiscreteScheduler"),
    diffusers_row("Heun", "HeunDiscreteScheduler"),
    diffusers_row("DPM++2M", "DPMSolverMultistepScheduler"),
    diffusers_row("DPM++3M", "DPMSolverMultistepScheduler", solver_order=3),
    diffusers_row("DPM++2M Karras", "DPMSolverMultistepScheduler", use_karras_sigmas="true"),
    diffusers_row("UniPC", "UniPCMultistepScheduler"),
    diffusers_row("UniPC Karras", "UniPCMultistepScheduler", use_karras_sigmas="true"),
    diffusers_row("DEIS", "DEISMultistepScheduler"),
)
#: the converged run (NFE >= 200); a second solver checks convergence (``--reference``, e.g.
#: ``'converged: heun 101 steps:sampler=heun;sampler.steps=101'``, NFE 201)
REFERENCES = (Row("converged: dpmpp_2m 200 steps", ("sampler=dpmpp_2m",), steps=200, once=True),)
DEFAULT_MODELS = ("eps_linear=outputs/foreign/eps_linear", "v_cosine=outputs/foreign/v_cosine")
#: the row label of the tuned sampler (``bench/foreign_models.py --tuned RUN_DIR``); its targets table
TUNED = "tuned"

COLUMNS = [
    "model",
    "row",
    "budget",
    "steps",
    "nfe",
    "fid_classifier",
    "fid_random_conv",
    "class_accuracy",
    "sampling_s",
    "seeds",
    "error",  # why the row has no scores (the sampler failed on this model)
    "weights",  # short hash of the model's weights (fastsample.utils.hashing.module_hash)
]


@dataclass
class ForeignBenchSettings:
    """What :func:`run` measures: ``rows`` x ``nfe`` (+ ``references`` once) on each model."""

    models: tuple[str, ...] = DEFAULT_MODELS  # NAME=<diffusers folder> or a conf/model name
    nfe: tuple[int, ...] = (4, 5, 6, 8, 10, 20)
    rows: tuple[Row, ...] = DIFFUSERS_DEFAULTS
    references: tuple[Row, ...] = REFERENCES
    num_samples: int = 2000
    first_seed: int = 0
    split: str = "test"
    batch_size: int = 250
    device: str = "auto"
    out: str = "outputs/bench/foreign_models"
    overrides: tuple[str, ...] = ()  # extra conf/evaluate.yaml overrides for every run

    @property
    def seeds(self) -> str:
        return f"{self.first_seed}-{self.first_seed + self.num_samples - 1}"


def model_overrides(entry: str) -> tuple[str, list[str]]:
    """A model's table name and overrides: ``NAME=<diffusers folder>`` or a conf/model config name."""
    name, sep, path = entry.partition("=")
    if sep:
        if not Path(path).is_dir():
            fail(
                f"--models {entry}: {path} is not a folder; train the foreign models with "
                "`make foreign-models` (or give NAME=<a diffusers save_pretrained folder>)"
            )
        return name, ["model=diffusers", f"model.path={path}", "class_labels=cycle"]
    return entry, [f"model={entry}", "class_labels=cycle"]


def base_overrides(settings: ForeignBenchSettings, model: list[str]) -> list[str]:
    """The conf/evaluate.yaml overrides every run of one model shares."""
    return [
        *model,
        f"split={settings.split}",
        f"device={settings.device}",
        f"batch_size={settings.batch_size}",
        f"seeds={settings.seeds}",
        f"paths.output_dir={settings.out}",
        "evaluator.scores=[fid]",
        "progress=false",
        *settings.overrides,
    ]


# -- the two feature spaces ---------------------------------------------------------------------------
@dataclass
class Judges:
    """The scoring evaluators: the classifier (FID + class accuracy) and the held-out random CNN."""

    classifier: Any
    random_conv: Any


def build_judges(base: list[str], device: torch.device) -> Judges:
    """Both evaluators with their reference statistics (cached in ``paths.cache_dir``)."""
    judges = []
    for features in (["features=classifier"], ["features=random_conv", "features.seed=0"]):
        cfg = compose([*base, *features])
        evaluator = build_evaluator(cfg, device)
        evaluator.reference = prepare_reference(cfg, evaluator)
        judges.append(evaluator)
    return Judges(*judges)


def score_both(setup: Setup, judges: Judges, preview: PreviewGrid | None = None) -> dict[str, Any]:
    """Generate the setup's seeds once and score the same images in both feature spaces."""
    images: list[torch.Tensor] = []

    def keep(batch: torch.Tensor) -> None:
        images.append(batch.detach().float().cpu())
        if preview is not None:
            preview(batch)

    scores = setup.score(judges.classifier, on_batch=keep)
    held_out = judges.random_conv.features(torch.cat(images), what="samples (random_conv)")
    return {
        "nfe": scores["nfe"],
        "fid_classifier": scores["fid"],
        "class_accuracy": scores.get("class_accuracy"),
        "sampling_s": scores["sampling_s"],
        "fid_random_conv": judges.random_conv.score_stats(held_out)["fid"],
    }


# -- step counts ----------------------------------------------------------------------------------------
def model_nfe(sampler: Any, model: Any) -> int:
    """The model calls ``sampler`` makes on ``model`` (a diffusers scheduler's count follows the model's
    scheduler config, e.g. PNDM's warm-up)."""
    if hasattr(sampler, "scheduler") and callable(sampler.scheduler):
        sampler.scheduler(model)  # updates sampler.nfe for this model's config
    return int(sampler.nfe)


def build_sampler(base: list[str], row: Row, steps: int | None, budget: int) -> Any:
    return instantiate(compose([*base, *row.config_overrides(steps, budget)]).sampler)


def sampler_for(base: list[str], row: Row, budget: int, model: Any) -> Any:
    """The row's sampler for ``budget``: its own steps, or the most steps whose NFE fits the budget."""
    if row.steps != "nfe":
        return build_sampler(base, row, row.steps, budget)
    chosen = None
    for steps in range(1, budget + 1):
        try:
            sampler = build_sampler(base, row, steps, budget)
            nfe = model_nfe(sampler, model)
        except Exception as err:  # too few steps for this scheduler (a UserError, maybe wrapped by Hydra)
            if find_user_error(err) is None:
                raise
            continue
        if nfe > budget:
            break
        chosen = sampler
    if chosen is None:
        fail(f"row {row.label!r}: no step count spends at most {budget} model calls")
    return chosen


# -- running --------------------------------------------------------------------------------------------
def run_model(settings: ForeignBenchSettings, entry: str, judges_cache: dict) -> list[dict]:
    """All rows of one model: references once, then every row at every budget (skipping done ones)."""
    name, model = model_overrides(entry)
    base = base_overrides(settings, model)
    cfg = compose(base)
    device = resolve_device(cfg.device)
    if "judges" not in judges_cache:
        judges_cache["judges"] = build_judges(base, device)
    judges = judges_cache["judges"]
    setup = plan(cfg, device=device)
    folder = Path(settings.out) / name
    weights = module_hash(setup.model)  # rows of other weights (a retrained model) are dropped
    rows = [row for row in read_rows(folder / "rows.csv") if row["weights"] == weights]
    done = {(row["row"], row["budget"]) for row in rows if row["seeds"] == settings.seeds}
    warm_up(setup, base, judges)
    print(f"{name}: {setup.describe()['model']}; {len(setup.seeds)} samples ({settings.seeds})", flush=True)
    plan_rows = [(row, 0) for row in settings.references]
    plan_rows += [(row, budget) for budget in settings.nfe for row in settings.rows]
    for row, budget in plan_rows:
        if (row.label, budget) in done:
            continue
        result = {
            "model": name,
            "row": row.label,
            "budget": budget,
            **run_row(setup, base, row, budget, judges),
        }
        if (preview := result.pop("preview", None)) is not None:
            preview.save(folder / f"grid-{slug(row.label)}.png")
        rows.append({**result, "seeds": settings.seeds, "weights": weights})
        write_rows(folder / "rows.csv", rows)
        if not result.get("error"):
            print(f"  {row_line(result)}", flush=True)
    return rows


def run_row(setup: Setup, base: list[str], row: Row, budget: int, judges: Judges) -> dict[str, Any]:
    """Steps, NFE and scores of one row; a sampler that fails on this model (diffusers' UniPC with
    Karras sigmas on a cosine table repeats timesteps and trips an assertion) is a row with its error."""
    sampler = sampler_for(base, row, budget, setup.model)
    preview = PreviewGrid(64) if row.once else None
    try:
        scores = score_both(replace(setup, sampler=sampler), judges, preview)
    except Exception as err:  # a third-party scheduler's failure is a result, not the end of the run
        print(f"  {row.label} at NFE <= {budget} failed: {brief(err)}", flush=True)
        return {"steps": sampler.steps, "nfe": sampler.nfe, "error": brief(err)}
    return {"steps": sampler.steps, **scores, "preview": preview}


def warm_up(setup: Setup, base: list[str], judges: Judges) -> None:
    """One tiny run first: first-call overheads must not land on the first row's time."""
    sampler = build_sampler(base, Row("warm-up", ("sampler=euler",)), 1, 1)
    images = replace(setup, sampler=sampler).generate(setup.seeds[:4])
    for judge in (judges.classifier, judges.random_conv):
        judge.extractor(images.float())


def slug(label: str) -> str:
    """A file-name-safe row label (``converged: dpmpp_2m 250 steps`` -> ``converged-dpmpp-2m-250-steps``)."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def row_line(row: dict) -> str:
    """One progress line: label, budget, NFE, both FIDs, class accuracy, time."""
    budget = "ref" if not row["budget"] else f"NFE<={row['budget']}"
    return (
        f"{row['row']:>32} {budget:>8} (NFE {row['nfe']}): FID classifier {fmt(row['fid_classifier'])}, "
        f"random_conv {fmt(row['fid_random_conv'])}, acc {fmt(row['class_accuracy'], 3)} "
        f"({row['sampling_s']:.1f} s)"
    )


def run(settings: ForeignBenchSettings) -> list[dict]:
    """Every model of ``settings``; writes ``<out>/<model>/rows.csv``, ``<out>/foreign_models.csv`` and
    ``.md``, and prints the markdown tables."""
    judges_cache: dict = {}
    for entry in settings.models:
        run_model(settings, entry, judges_cache)
    return report(settings)


def report(settings: ForeignBenchSettings) -> list[dict]:
    """The tables of every model's ``rows.csv`` under ``settings.out`` (no sampling)."""
    out = Path(settings.out)
    rows = [row for path in sorted(out.glob("*/rows.csv")) for row in read_rows(path)]
    rows = [row for row in rows if row["seeds"] == settings.seeds]
    if not rows:
        fail(f"no results under {out} for seeds {settings.seeds}; run the benchmark first")
    text = markdown_report(rows)
    write_rows(out / "foreign_models.csv", rows)
    write_bytes_atomic(out / "foreign_models.md", (text + "\n").encode())
    print(f"\n{text}\n\nCSV: {out / 'foreign_models.csv'}\ntables: {out / 'foreign_models.md'}")
    return rows


# -- files and tables -------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    """Rows of a ``rows.csv`` (numbers parsed; empty cells None); none when the file is missing."""
    if not path.is_file():
        return []
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row.setdefault("weights", "")
        row["error"] = row.get("error") or None
        for key in ("budget", "steps", "nfe"):
            row[key] = int(row[key])
        for key in ("fid_classifier", "fid_random_conv", "class_accuracy", "sampling_s"):
            row[key] = float(row[key]) if row[key] else None
    return rows


def write_rows(path: Path, rows: Sequence[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in COLUMNS})
    write_bytes_atomic(path, buffer.getvalue().encode())


def markdown_report(rows: Sequence[dict]) -> str:
    """Per model: the reference rows, then one FID table per feature space (rows x NFE budgets)."""
    parts = []
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        parts.append(f"### {model} ({mine[0]['seeds']})\n\n{reference_table(mine)}")
        for key, title in (
            ("fid_classifier", "FID, classifier features"),
            ("fid_random_conv", "FID, random-CNN features (seed 0)"),
            ("class_accuracy", "class accuracy (classifier)"),
        ):
            parts.append(f"{title}:\n\n{pivot_table(mine, key)}")
        if any(row["row"] == TUNED for row in mine):
            parts.append(
                f"tuned sampler against diffusers (FID classifier / random CNN):\n\n{targets_table(mine)}"
            )
    return "\n\n".join(parts)


def targets_table(rows: Sequence[dict]) -> str:
    """Per budget with a ``tuned`` row: the best diffusers default (lowest classifier FID) and the
    tuned sampler, with the ratios the issue's targets are about: tuned / best default and tuned /
    converged (the first reference row), in both feature spaces."""
    defaults = {row.label for row in pick_defaults("all")}
    references = [row for row in rows if not row["budget"] and not row.get("error")]
    lines = [
        "| NFE | best diffusers default | tuned | tuned / best default | tuned / converged |",
        "|---:|---|---|---:|---:|",
    ]
    for tuned in (row for row in rows if row["row"] == TUNED and not row.get("error")):
        scored = [
            r for r in rows if r["budget"] == tuned["budget"] and r["row"] in defaults and not r.get("error")
        ]
        if not scored:
            continue
        best = min(scored, key=lambda row: row["fid_classifier"])
        converged = ratios(tuned, references[0]) if references else "-"
        lines.append(
            f"| {tuned['budget']} | {best['row']}: {fid_pair(best)} | {fid_pair(tuned)} | "
            f"{ratios(tuned, best)} | {converged} |"
        )
    return "\n".join(lines)


def fid_pair(row: dict) -> str:
    return f"{fmt(row['fid_classifier'])} / {fmt(row['fid_random_conv'])}"


def ratios(row: dict, other: dict) -> str:
    keys = ("fid_classifier", "fid_random_conv")
    return " / ".join(f"{row[key] / other[key]:.2f}" for key in keys)


def reference_table(rows: Sequence[dict]) -> str:
    lines = [
        "| converged run | NFE | FID classifier | FID random CNN | class acc. |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if not row["budget"]:
            lines.append(
                f"| {row['row']} | {row['nfe']} | {fmt(row['fid_classifier'])} | "
                f"{fmt(row['fid_random_conv'])} | {fmt(row['class_accuracy'], 3)} |"
            )
    return "\n".join(lines)


def pivot_table(rows: Sequence[dict], key: str) -> str:
    """Rows x NFE budgets of ``key``; a cell whose NFE is not the budget says so (e.g. Heun: ``(3)``)."""
    budgets = sorted({row["budget"] for row in rows if row["budget"]})
    cells: dict[str, dict[int, str]] = {}
    for row in rows:
        if row["budget"]:
            note = "" if row["nfe"] == row["budget"] else f" ({row['nfe']})"
            digits = 3 if key == "class_accuracy" else 4
            value = "fails" if row.get("error") else fmt(row[key], digits)
            cells.setdefault(row["row"], {})[row["budget"]] = value + note
    best = {budget: best_cell(rows, key, budget) for budget in budgets}
    lines = [
        "| sampler | " + " | ".join(f"NFE {budget}" for budget in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for label, by_budget in cells.items():
        values = [by_budget.get(budget, "-") for budget in budgets]
        values = [f"**{v}**" if best[b] == label else v for v, b in zip(values, budgets, strict=True)]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def best_cell(rows: Sequence[dict], key: str, budget: int) -> str | None:
    """The label of the best row at ``budget`` (lowest FID, highest accuracy)."""
    scored = [
        row for row in rows if row["budget"] == budget and row[key] is not None and np.isfinite(row[key])
    ]
    if not scored:
        return None
    sign = -1 if key == "class_accuracy" else 1
    return min(scored, key=lambda row: sign * row[key])["row"]


# -- command line -----------------------------------------------------------------------------------------
def parse_row(text: str, once: bool = False) -> Row:
    """``LABEL:OVERRIDE;OVERRIDE`` (``--row`` / ``--reference``); a ``sampler.steps=`` override fixes the
    steps, else they are searched to spend each NFE budget."""
    label, sep, rest = text.partition(":")
    overrides = tuple(item.strip() for item in rest.split(";") if item.strip())
    if not sep or not label or not overrides:
        fail(
            f"row {text!r}: write LABEL:OVERRIDE;OVERRIDE, "
            "e.g. 'mine:sampler=dpmpp_2m;sampler.schedule.kind=vp'"
        )
    fixed = any(item.lstrip("+").startswith("sampler.steps=") for item in overrides)
    if once and not fixed:
        fail(f"--reference {text!r}: a reference row needs its step count (sampler.steps=N)")
    return Row(label, overrides, steps=None if fixed else "nfe", once=once)


def pick_defaults(names: str) -> tuple[Row, ...]:
    """``--diffusers``: ``all``, ``none`` or comma-separated labels of :data:`DIFFUSERS_DEFAULTS`."""
    if names == "all":
        return DIFFUSERS_DEFAULTS
    if names == "none":
        return ()
    by_label = {row.label: row for row in DIFFUSERS_DEFAULTS}
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in by_label]
    if unknown:
        fail(f"--diffusers: unknown row(s) {unknown}; choose from: {', '.join(by_label)}, all, none")
    return tuple(by_label[name] for name in wanted)


QUICK = {  # --quick: a seconds-long end-to-end run (the test's)
    "nfe": (3,),
    "rows": ("DDIM", "DPM++2M"),
    "references": (Row("converged: dpmpp_2m 6 steps", ("sampler=dpmpp_2m",), steps=6, once=True),),
    "num_samples": 16,
    "batch_size": 8,
    "overrides": ("dataset.val_subset=100",),
}


def parse_args(argv: list[str] | None = None) -> tuple[ForeignBenchSettings, bool]:
    """Settings from the command line (unknown ``key=value`` items are conf/evaluate.yaml overrides)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--models", default=",".join(DEFAULT_MODELS), help="NAME=<diffusers folder> or conf/model names")
    add("--nfe", default="4,5,6,8,10,20", help="comma-separated NFE budgets")
    add("--diffusers", default="all", help="diffusers default rows: all | none | comma-separated labels")
    add("--samplers", default="", help="fastsample sampler specs as in bench/fid_vs_nfe.py (dpmpp_2m@vp)")
    add("--row", action="append", default=[], help="extra row LABEL:OVERRIDE;OVERRIDE ({nfe} filled in)")
    add("--reference", action="append", default=None, help="converged row LABEL:OVERRIDES;sampler.steps=N")
    add("--no-references", action="store_true", help="skip the converged reference rows")
    add("--num-samples", type=int, default=2000, help="seeds first-seed .. first-seed + N - 1")
    add("--first-seed", type=int, default=0)
    add("--split", default="test", help="reference split of both feature spaces")
    add("--batch-size", type=int, default=250)
    add("--device", default="auto")
    add("--out", default=ForeignBenchSettings.out)
    add("--report", action="store_true", help="no sampling: tables of the results under --out")
    add("--quick", action="store_true", help="a tiny run (16 samples, NFE 3, two rows): tests, smoke runs")
    args, overrides = parser.parse_known_args(argv)
    unknown = [item for item in overrides if item.startswith("--")]
    if unknown:
        fail(f"unknown option(s) {' '.join(unknown)}; Hydra overrides are written key=value")
    return settings_from(args, overrides), args.report


def settings_from(args: argparse.Namespace, overrides: list[str]) -> ForeignBenchSettings:
    quick_rows = args.quick and args.diffusers == "all"  # --quick: two rows unless --diffusers says
    rows = pick_defaults(",".join(QUICK["rows"]) if quick_rows else args.diffusers)
    rows += tuple(Row(spec, spec=spec) for spec in args.samplers.split(",") if spec)
    rows += tuple(parse_row(text) for text in args.row)
    references = (
        REFERENCES if args.reference is None else tuple(parse_row(t, once=True) for t in args.reference)
    )
    settings = ForeignBenchSettings(
        models=tuple(item for item in args.models.split(",") if item),
        nfe=tuple(int(n) for n in args.nfe.split(",") if n),
        rows=rows,
        references=() if args.no_references else references,
        num_samples=args.num_samples,
        first_seed=args.first_seed,
        split=args.split,
        batch_size=args.batch_size,
        device=args.device,
        out=args.out,
        overrides=tuple(overrides),
    )
    if args.quick:
        settings = replace(
            settings,
            nfe=QUICK["nfe"],
            references=() if args.no_references else QUICK["references"],
            num_samples=QUICK["num_samples"],
            batch_size=QUICK["batch_size"],
            overrides=(*QUICK["overrides"], *settings.overrides),
        )
    return settings


def main(argv: list[str] | None = None) -> list[dict]:
    settings, report_only = parse_args(argv)
    return report(settings) if report_only else run(settings)
