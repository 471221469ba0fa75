"""`medimgen benchmark-segmentation`: the Dice that synthetic data adds to (or takes from) nnU-Net on one dataset.

Two arms, trained by nnU-Net's own ``nnUNetv2_train`` with the same configuration, fold, trainer and plans:
``real`` on the dataset itself, ``real+synthetic`` on a dataset made by ``export-dataset --mix-real`` (the real
cases, ``synthetic`` generated image+label pairs on the training side of every fold) and preprocessed with the
real dataset's plans. Both are scored by nnU-Net's final validation (fold_F/validation/summary.json) on the same
real validation cases; the benchmark refuses to run when a synthetic case could be validated on, when the arms'
validation cases differ, or when the generation model trained on a validation case.

Results: JSON and a Markdown table (mean Dice per label per arm, their difference, the spread of the per-case
differences with a bootstrap 95% interval) in the output folder, and an MLflow parent run with a child run per arm.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medimgen.core.atomic import atomic_path
from medimgen.core.errors import MedimgenError
from medimgen.nnunet.plans import read_json
from medimgen.core.requests import ModelRef, SampleOptions

ARMS = ("real", "real+synthetic")
MEAN = "mean"  # the row of every case's mean over labels (nnU-Net's foreground mean)
BOOTSTRAP = 10000


@dataclass(frozen=True)
class BenchmarkSetup:
    """What both arms share: nnU-Net's ``configuration`` (default: 3d_fullres, 2d for 2D data), ``fold``,
    ``trainer`` (nnU-Net's class name), ``device`` (None: cuda when available)."""

    configuration: str | None = None
    fold: int = 0
    trainer: str = "nnUNetTrainer"
    device: str | None = None


@dataclass(frozen=True)
class Generator:
    """The generation model that exports the synthetic cases: ``model`` (ldm, ddpm, auto, a run folder or an
    MLflow URI), ``dim`` (None: 3d for 3D data), ``splitting`` it was trained with (5-fold: on the benchmark's
    fold, so it never saw a validation case)."""

    model: str = "auto"
    dim: str | None = None
    splitting: str = "5-fold"


# ---------------------------------------------------------------------------------------------- checks
def check_splits(real: dict, mixed: dict, real_cases: set[str], fold: int) -> list[str]:
    """The validation cases of fold ``fold``, after checking that the mixed arm's split validates on exactly the
    real arm's cases, none of them synthetic (not a real case), and trains on the same real cases."""
    leaked = sorted(set(mixed["val"]) - set(real_cases))
    if leaked:
        raise MedimgenError(f"fold {fold} of the real+synthetic dataset validates on {len(leaked)} case(s) that are "
                            f"not real ({leaked[0]}...): a synthetic case would be scored as validation")
    if sorted(real["val"]) != sorted(mixed["val"]):
        only = sorted(set(real["val"]) ^ set(mixed["val"]))
        raise MedimgenError(f"fold {fold} validates on different real cases in the two arms ({only[0]} is in one "
                            f"only): the Dice would not be comparable")
    real_train = sorted(c for c in mixed["train"] if c in real_cases)
    if real_train != sorted(real["train"]):
        raise MedimgenError(f"fold {fold} trains on different real cases in the two arms "
                            f"({len(real['train'])} vs {len(real_train)}): only the synthetic cases may differ")
    return sorted(real["val"])


def _fold_of(splits_file: Path, fold: int) -> dict:
    if not splits_file.is_file():
        raise MedimgenError(f"{splits_file} is missing: the mixed dataset has no folds (export it with --mix-real)")
    splits = read_json(splits_file)
    if not isinstance(splits, list) or not all(isinstance(f, dict) and {"train", "val"} <= set(f) for f in splits):
        raise MedimgenError(f"{splits_file} is not nnU-Net's splits file (a list of folds with 'train' and 'val')")
    if not 0 <= fold < len(splits):
        raise MedimgenError(f"fold {fold} does not exist: {splits_file} has folds 0-{len(splits) - 1}")
    return splits[fold]


# ---------------------------------------------------------------------------------------------- scores
def label_names(dataset_json: dict) -> dict[str, str]:
    """nnU-Net's summary.json keys ('1', '(1, 2)' for regions) -> the dataset's label names."""
    names = {}
    for name, value in (dataset_json.get("labels") or {}).items():
        key = str(tuple(int(v) for v in value)) if isinstance(value, (list, tuple)) else str(int(value))
        if key != "0" and name != "ignore":  # nnU-Net's ignore label is never scored
            names[key] = name
    return names


def read_summary(path: Path, names: dict[str, str], file_ending: str = ".nii.gz") -> dict[str, dict[str, float]]:
    """Per-case Dice per label name from nnU-Net's validation summary.json (NaN where nnU-Net has none: a label
    absent from reference and prediction)."""
    if not path.is_file():
        raise MedimgenError(f"{path} is missing: nnU-Net's final validation of this arm did not finish")
    data = read_json(path)
    out = {}
    for entry in data.get("metric_per_case", []) if isinstance(data, dict) else []:
        if not isinstance(entry, dict) or "reference_file" not in entry or not isinstance(entry.get("metrics"), dict):
            raise MedimgenError(f"{path} is not nnU-Net's validation summary (a case without reference_file/metrics)")
        ref = Path(entry["reference_file"]).name
        case = ref[:-len(file_ending)] if ref.endswith(file_ending) else ref.split(".")[0]
        out[case] = {names.get(k, k): _num(m.get("Dice")) for k, m in entry["metrics"].items()}
    if not out:
        raise MedimgenError(f"{path} has no per-case metrics")
    return out


def _num(value) -> float:
    return float(value) if value is not None and math.isfinite(float(value)) else float("nan")


def _clean(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def difference_stats(diffs: list[float], seed: int = 0) -> dict:
    """Mean, std, min, max and a bootstrap 95% interval of the mean of per-case differences."""
    d = np.asarray([x for x in diffs if math.isfinite(x)], dtype=float)
    if d.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "ci95": [None, None]}
    means = d[np.random.RandomState(seed).randint(0, d.size, (BOOTSTRAP, d.size))].mean(axis=1)
    return {"n": int(d.size), "mean": float(d.mean()), "std": float(d.std(ddof=1)) if d.size > 1 else 0.0,
            "min": float(d.min()), "max": float(d.max()),
            "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}


def compare(real: dict[str, dict[str, float]], mixed: dict[str, dict[str, float]], labels: list[str]) -> dict:
    """Per label (and the per-case mean over labels): each arm's mean Dice (NaN cases left out, as nnU-Net does),
    the difference of the means and the statistics of the per-case differences (mixed - real)."""
    cases = sorted(real)
    if sorted(mixed) != cases:
        raise MedimgenError(f"the arms were validated on different cases ({sorted(set(real) ^ set(mixed))[:3]}): "
                            f"not comparable")

    def per_case(scores, case, label):
        if label == MEAN:
            vals = [v for v in scores[case].values() if math.isfinite(v)]
            return float(np.mean(vals)) if vals else float("nan")
        return scores[case].get(label, float("nan"))

    rows = {}
    for label in [*labels, MEAN]:
        a = [per_case(real, c, label) for c in cases]
        b = [per_case(mixed, c, label) for c in cases]
        ma, mb = (_clean(float(np.nanmean(x))) if any(math.isfinite(v) for v in x) else None for x in (a, b))
        rows[label] = {"real": ma, "real+synthetic": mb,
                       "difference": mb - ma if ma is not None and mb is not None else None,
                       "per_case_difference": difference_stats([y - x for x, y in zip(a, b)])}
    return rows


def _pct(x: float | None, sign: bool = False) -> str:
    return "n/a" if x is None else (f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}")


def markdown_table(result: dict) -> str:
    """The results as Markdown: setup line, one row per label and the mean (Dice in points, 0-100)."""
    lines = [f"Segmentation benchmark of {result['dataset']}: nnU-Net {result['configuration']} fold "
             f"{result['fold']}, {result['trainer']}, {result['plans']}; {result['real_training_cases']} real "
             f"training cases, +{result['synthetic_cases']} synthetic ({result['mixed_dataset']}); "
             f"{len(result['validation_cases'])} real validation cases.",
             "",
             "| label | Dice real | Dice real+synthetic | difference | per-case difference mean ± std | min / max "
             "| 95% CI (bootstrap) | cases |",
             "|---|---|---|---|---|---|---|---|"]
    for label, row in result["labels"].items():
        s = row["per_case_difference"]
        spread = "n/a" if s["mean"] is None else f"{_pct(s['mean'], True)} ± {_pct(s['std'])}"
        lines.append(f"| {label} | {_pct(row['real'])} | {_pct(row['real+synthetic'])} | "
                     f"{_pct(row['difference'], True)} | {spread} | {_pct(s['min'], True)} / {_pct(s['max'], True)} | "
                     f"[{_pct(s['ci95'][0], True)}, {_pct(s['ci95'][1], True)}] | {s['n']} |")
    lines += ["", "Dice in points (0-100); difference = real+synthetic - real. An interval that contains 0 is no "
                  "evidence of a gain (or a loss) on these cases."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- the command
def _default_configuration(plans) -> str:
    return "3d_fullres" if "3d_fullres" in plans.manager.available_configurations else "2d"


def _generator_cases(ref: ModelRef, plans, identifiers: list[str]) -> list[str] | None:
    """The cases the generation model trained on (its split's training cases; its validation cases only chose the
    checkpoint), None when its run folder does not say."""
    from medimgen.data.splits import get_split
    from medimgen.runs.folders import find_run

    if ref.is_uri:
        return None
    root = Path(ref.model) if Path(ref.model).is_dir() else find_run(ref).root
    if root.name == "train-val-test":
        split = get_split(plans.folder, identifiers, "train-val-test")
    elif root.name.startswith("fold_") and root.name[5:].isdigit():
        split = get_split(plans.folder, identifiers, "5-fold", int(root.name[5:]))
    else:
        return None
    return list(split.train)


def _mixed_dataset(src: str, target_id: int, synthetic: int | None, ref: ModelRef, options: SampleOptions,
                   echo) -> tuple[Path, bool]:
    """nnUNet_raw/DatasetTTT_*: the mixed dataset exported now (``synthetic`` cases), or one exported before."""
    from medimgen.generation.export import export_dataset
    from medimgen.core.paths import nnunet_raw, nnunet_results

    found = sorted(nnunet_raw().glob(f"Dataset{target_id:03d}_*"))
    if not found:
        if not synthetic:
            raise MedimgenError(f"dataset {target_id:03d} does not exist yet: give --synthetic N to export N "
                                f"generated cases into it")
        stale = sorted(nnunet_results().glob(f"Dataset{target_id:03d}_*"))
        if stale:  # trainings of an earlier dataset of this id would be reused as this one's
            raise MedimgenError(f"{stale[0]} holds nnU-Net trainings of an earlier dataset {target_id:03d}: remove "
                                f"it or choose another --target-id")
        echo(f"exporting the real cases of {src} + {synthetic} synthetic cases as dataset {target_id:03d}")
        return export_dataset(src, synthetic, target_id, ref, options, mix_real=True), True
    folder = found[0]
    ds = read_json(folder / "dataset.json") if (folder / "dataset.json").is_file() else {}
    if ds.get("medimgen_source_dataset") != src or not ds.get("medimgen_real_cases"):
        raise MedimgenError(f"{folder.name} exists and is not a real + synthetic dataset of {src} "
                            f"(made by export-dataset --mix-real): choose another --target-id")
    if synthetic and synthetic != ds.get("medimgen_synthetic_cases"):
        raise MedimgenError(f"{folder.name} holds {ds.get('medimgen_synthetic_cases')} synthetic cases, not "
                            f"--synthetic {synthetic}: leave --synthetic out to reuse it, or choose another --target-id")
    echo(f"reusing {folder.name} ({ds.get('medimgen_synthetic_cases')} synthetic cases)")
    return folder, False


def _train_arm(arm: str, dataset: str, setup: BenchmarkSetup, configuration: str, plans_identifier: str,
               device: str, out: Path, echo) -> Path:
    """Train (or continue, or reuse) one arm; its fold folder."""
    from medimgen.nnunet.commands import nnunet_train
    from medimgen.core.paths import nnunet_results

    fold_dir = (nnunet_results() / dataset / f"{setup.trainer}__{plans_identifier}__{configuration}"
                / f"fold_{setup.fold}")
    if (fold_dir / "checkpoint_final.pth").is_file() and (fold_dir / "validation" / "summary.json").is_file():
        echo(f"[{arm}] reusing nnU-Net's finished training in {fold_dir}")
        return fold_dir
    resume = (fold_dir / "checkpoint_latest.pth").is_file() or (fold_dir / "checkpoint_final.pth").is_file()
    echo(f"[{arm}] nnUNetv2_train {dataset} {configuration} {setup.fold} -tr {setup.trainer} -p {plans_identifier} "
         f"-device {device}" + (" --c (continuing)" if resume else ""))
    nnunet_train(dataset, configuration, setup.fold, setup.trainer, plans_identifier, device,
                 out / f"nnunet_{arm.replace('+', '_')}.log", resume=resume, echo=lambda m: echo(f"  [{arm}] {m}"))
    return fold_dir


def benchmark_segmentation(dataset_id: int | str, target_id: int, synthetic: int | None = None,
                           setup: BenchmarkSetup = BenchmarkSetup(), generator: Generator = Generator(),
                           options: SampleOptions = SampleOptions(), output: Path | str | None = None,
                           track: bool = True, echo=print) -> dict:
    """Train nnU-Net on the real cases and on real + ``synthetic`` generated cases (dataset ``target_id``, exported
    now or reused) with the same setup, compare their validation Dice; see the module doc. Returns the result
    dict, with the paths of its JSON (``json``) and Markdown (``markdown``) files."""
    import torch

    from medimgen.data.cases import open_cases
    from medimgen.data.splits import get_split
    from medimgen.nnunet.commands import preprocess_with_plans
    from medimgen.generation.export import mixed_splits
    from medimgen.core.paths import medimgen_results, nnunet_preprocessed, nnunet_raw, nnunet_results
    from medimgen.nnunet.plans import DatasetPlans

    plans = DatasetPlans.planned(dataset_id)
    src = plans.name
    configuration = setup.configuration or _default_configuration(plans)
    if configuration not in plans.manager.available_configurations:
        raise MedimgenError(f"{src} has no nnU-Net configuration {configuration!r} in {plans.plans_identifier} "
                            f"(it has {', '.join(plans.manager.available_configurations)})")
    nnunet_results()  # set, else one line
    device = setup.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref = ModelRef(generator.model, plans.dataset_id,
                   generator.dim or ("3d" if "3d" in plans.available_dims else "2d"), generator.splitting, setup.fold)
    data_folder = plans.folder / plans.manager.get_configuration(configuration).data_identifier
    if not data_folder.is_dir():
        raise MedimgenError(f"{data_folder} is missing: run `nnUNetv2_preprocess -d {plans.dataset_id} -c "
                            f"{configuration} -plans_name {plans.plans_identifier}`")
    identifiers = open_cases(data_folder).identifiers
    real_split = get_split(plans.folder, identifiers, "5-fold", setup.fold)  # nnU-Net's splits_final.json
    real = {"train": real_split.train, "val": real_split.val}
    real_cases = set(identifiers)
    val_cases = sorted(real["val"])

    # a generation model that exports now must not have seen a validation case (its samples could copy it)
    exported_before = any(nnunet_raw().glob(f"Dataset{int(target_id):03d}_*"))
    seen = None if exported_before else _generator_cases(ref, plans, identifiers)
    if seen is not None and set(seen) & set(val_cases):
        raise MedimgenError(f"the generation model trained on {len(set(seen) & set(val_cases))} of the "
                            f"{len(val_cases)} validation cases of fold {setup.fold}: its samples could copy them. "
                            f"Train it on nnU-Net's fold (`medimgen train ldm {plans.dataset_id} 5-fold {ref.dim} "
                            f"-f {setup.fold}`) or pass such a run with --model")
    # export-dataset --mix-real makes nnU-Net's default folds: the real dataset must use them too
    default = mixed_splits(sorted(real_cases), [])
    if setup.fold < len(default) and sorted(default[setup.fold]["val"]) != val_cases:
        raise MedimgenError(f"{plans.folder / 'splits_final.json'} is not nnU-Net's default split, which "
                            f"export-dataset --mix-real gives the mixed dataset: fold {setup.fold} would validate "
                            f"on other cases")

    mixed_folder, exported = _mixed_dataset(src, int(target_id), synthetic, ref, options, echo)
    mixed = mixed_folder.name
    mixed_json = read_json(mixed_folder / "dataset.json")
    check_splits(real, _fold_of(nnunet_preprocessed() / mixed / "splits_final.json", setup.fold), real_cases,
                 setup.fold)
    mixed_plans = nnunet_preprocessed() / mixed / f"{plans.plans_identifier}.json"
    mixed_data = nnunet_preprocessed() / mixed / plans.manager.get_configuration(configuration).data_identifier
    if exported or not mixed_plans.is_file() or not mixed_data.is_dir():
        echo(f"preprocessing {mixed} with the plans of {src} ({plans.plans_identifier}, {configuration})")
        preprocess_with_plans(plans.dataset_id, int(target_id), plans.plans_identifier, [configuration])

    out = Path(output) if output else (medimgen_results() / src / "segbench"
                                       / f"{mixed}__{setup.trainer}__{configuration}__fold_{setup.fold}")
    out.mkdir(parents=True, exist_ok=True)
    folds = {arm: _train_arm(arm, ds, setup, configuration, plans.plans_identifier, device, out, echo)
             for arm, ds in zip(ARMS, (src, mixed))}

    names = label_names(plans.dataset_json)
    ending = plans.file_ending
    scores = {arm: read_summary(folds[arm] / "validation" / "summary.json", names, ending) for arm in ARMS}
    for arm in ARMS:
        if sorted(scores[arm]) != val_cases:
            raise MedimgenError(f"the {arm} arm was validated on other cases than fold {setup.fold}'s real validation "
                                f"cases ({folds[arm] / 'validation'}): delete that fold folder and run again")
    result = {
        "dataset": src, "mixed_dataset": mixed, "configuration": configuration, "fold": setup.fold,
        "trainer": setup.trainer, "plans": plans.plans_identifier, "device": device,
        "synthetic_cases": int(mixed_json.get("medimgen_synthetic_cases", 0)),
        "real_training_cases": len(real["train"]), "validation_cases": val_cases,
        "generator": {"model": ref.model, "dim": ref.dim, "splitting": ref.splitting, "fold": ref.fold,
                      "training_cases_known": seen is not None,
                      "description": mixed_json.get("description")},
        "arms": {arm: {"dataset": ds, "fold_folder": str(folds[arm]),
                       "summary": str(folds[arm] / "validation" / "summary.json"),
                       "per_case_dice": {c: {k: _clean(v) for k, v in d.items()} for c, d in scores[arm].items()}}
                 for arm, ds in zip(ARMS, (src, mixed))},
        "labels": compare(scores["real"], scores["real+synthetic"], list(names.values())),
    }
    json_file, md_file = out / "segbench.json", out / "segbench.md"
    result["json"], result["markdown"] = str(json_file), str(md_file)
    with atomic_path(json_file, suffix=".json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    table = markdown_table(result)
    with atomic_path(md_file, suffix=".md") as tmp:
        tmp.write_text(table)
    result["mlflow_run_id"] = _track(result, folds, table) if track else None
    return result


def _track(result: dict, folds: dict[str, Path], table: str) -> str | None:
    """One parent run (the differences, the table) with one child run per arm (its Dice, nnU-Net's summary.json).
    Never raises: one warning instead."""
    from medimgen.runs.tracking import ClientRuns, brief

    runs = ClientRuns(True, result["dataset"], what="the benchmark")
    if not runs.enabled:
        return None
    params = {k: result[k] for k in ("mixed_dataset", "configuration", "fold", "trainer", "plans",
                                     "synthetic_cases", "real_training_cases")}
    params["validation_cases"] = len(result["validation_cases"])
    name = f"segbench_{result['configuration']}_fold{result['fold']}"
    try:
        parent = runs.attach_project_run(name, {"medimgen.command": "benchmark-segmentation"})
        attached = parent is not None
        parent = parent or runs.create(name, {"medimgen.command": "benchmark-segmentation"})
        if not parent:
            return None
        runs.log_params(parent, params, [result["json"], result["markdown"]])
        gains = {f"dice_gain.{k}": r["difference"] for k, r in result["labels"].items()}
        runs.log(parent, gains, status=None if attached else "FINISHED")
        for arm in ARMS:
            child = runs.create(arm.replace("+", "_"), {"medimgen.arm": arm}, parent=parent)
            if not child:
                return parent
            runs.log_params(child, {**params, "dataset": result["arms"][arm]["dataset"]},
                            [folds[arm] / "validation" / "summary.json"])
            runs.log(child, {f"dice.{k}": r[arm] for k, r in result["labels"].items()}, status="FINISHED")
        return parent
    except Exception as e:
        warnings.warn(f"could not log the benchmark to MLflow ({brief(e)}); the results are in {result['json']}",
                      stacklevel=2)
        return None
