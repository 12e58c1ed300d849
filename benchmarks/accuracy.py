"""Accuracy benchmark: `+experiment=best` against the study's default CNN, over several seeds; or,
with --folder, `+experiment=best_folder` on a Kermany/Kaggle image folder.

    python benchmarks/accuracy.py              # 3 seeds of each
    python benchmarks/accuracy.py --seeds 5
    python benchmarks/accuracy.py --seeds 3 --first-seed 4   # seeds 4, 5, 6: a fresh set of runs
    python benchmarks/accuracy.py --quick      # one seed, one short epoch: a smoke test
    python benchmarks/accuracy.py --calibration temperature   # temperature scaling fitted on val
    python benchmarks/accuracy.py --folder PATH [--heldout TEST_PATH]
    python benchmarks/accuracy.py --folder PATH --site SITE [--site-fractions 0.05,0.1,0.2]
    python benchmarks/accuracy.py --folder PATH --task bacterial_viral   # +experiment=best_bacterial_viral
    python benchmarks/accuracy.py --folder PATH --task normal_bacterial_viral   # three classes
    python benchmarks/accuracy.py --folder PATH --task bacterial_viral --pretrain   # from scratch, fine-tuned, linear probe

Everything about a run is chosen on the validation split (checkpoint, temperature, threshold);
each run's test split is evaluated once, after training, and only reported here. In folder mode
the test split is the folder's test/, or the development test drawn from train/ by patient; with
--heldout, each run's best checkpoint is also evaluated once on that folder (test/ or the class
folders), e.g. the Kaggle test images the recipe never saw. The last line is machine-readable
(RESULT ...): ece= is the test ECE (15 bins) of the recipe, and with --calibration temperature,
ece_uncalibrated= is the same before temperature scaling; folder mode adds the folder's figures
(folder_acc= folder_auroc=, and heldout_acc= heldout_auroc= with --heldout). For three or more
classes, folder_auroc= is the macro one-vs-rest AUROC, and the line adds the macro F1 and each
class's recall; the table gives each seed's confusion matrix.

With --site, each run is also taken to another site, a folder of labeled images (test/ or the
class folders; `--site bundled` writes the bundled PneumoniaMNIST test split there as PNGs: Kaggle's
test images, collected apart from its train images). evaluate's site protocol splits the site by
patient into a calibration part (each of --site-fractions, default 0.2) and a test part, and the
run is reported on the test part four ways: as it is, adapted (site.adapt=bn on every site
image, labels unread), recalibrated (on the calibration part's labels), and both, beside the one
`site.choose=true` chose on the calibration part. The RESULT line gives, for the largest fraction,
the mean and the worst seed of accuracy, AUROC and specificity of each and of the chosen one, how many seeds chose each (chosen_as_is= ...), and bound_acc_spec90_worst=, the worst seed's best
accuracy of any threshold with specificity >= 0.90 on the test part (its labels read: a limit to
report, never a choice).

    python benchmarks/accuracy.py --site /path/to/chest_xray_train224 [--site-fractions 0.2]

is the other way round: +experiment=best on the bundled data, and as its site the development test
that +experiment=best_folder seed=1 draws from the folder by patient. PneumoniaMNIST's train and val
splits are these very X-rays (MedMNIST's crops of them), so this site measures a shift of
preprocessing on images the model has seen, not a new population.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from sites import test_part_bounds, write_bundled_test, write_development_test

from xray_cls.evaluate import evaluate
from xray_cls.evaluation.site_choice import CANDIDATES
from xray_cls.runtime.configs import CONFIG_DIR
from xray_cls.train import train

PUBLISHED = [  # ACC / AUROC on the same 624-image test set (MedMNIST v2 and its benchmarks)
    ("ResNet-18, 28 px", 0.854, 0.944),
    ("AutoKeras", 0.878, 0.947),
    ("Google AutoML Vision", 0.946, 0.991),
]


SITE = ["site.adapt=bn", "site.adapt_on=all", "site.choose=true"]  # evaluate's site protocol: every candidate, and the choice


def run(overrides: list[str], seed: int, heldout: Path | None = None, site: Path | None = None,
        fractions: list[float] | None = None) -> dict[str, Any]:
    """One training run's metrics; with `heldout`, its best checkpoint's metrics there too; with
    `site`, its site protocol's metrics for each fraction (`metrics["site"][f]`)."""
    with tempfile.TemporaryDirectory() as out:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[f"paths.output_dir={Path(out)}", f"seed={seed}", *overrides])
        metrics = train(cfg)
        ckpt = Path(out) / metrics["best_checkpoint"]["path"]
        if heldout is not None:
            metrics["heldout"] = evaluated(out, "heldout", ckpt, heldout, cfg.data.get("cache_dir"), [])
        for fraction in fractions if site is not None else []:
            metrics.setdefault("site", {})[fraction] = evaluated(out, f"site_{fraction}", ckpt, site, cfg.data.get("cache_dir"),
                                                                 [f"site.calibration_fraction={fraction}", *SITE])["site"]
            metrics["site"][fraction]["bounds"] = test_part_bounds(ckpt, site, fraction)  # read the test part's labels: reported only
        return metrics


def evaluated(out: str, name: str, ckpt: Path, root: Path, cache_dir: str | None, overrides: list[str]) -> dict[str, Any]:
    """`ckpt` evaluated on the folder `root` (sharing the run's image cache, where it has one)."""
    cache = [f"data.cache_dir='{cache_dir}'"] if cache_dir else []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        eval_cfg = compose("evaluate", overrides=[
            f"paths.output_dir={Path(out) / name}", f"ckpt='{ckpt}'", "data=folder", f"data.root='{root}'",
            *cache, "gradcam_samples=0", *overrides,
        ])
    return evaluate(eval_cfg)


def summarize(name: str, results: list[dict[str, Any]]) -> dict[str, float]:
    print(f"\n{name}")
    print(f"  {'seed':>4}  {'ACC':>6}  {'AUROC':>6}  {'sens':>6}  {'spec':>6}  {'threshold':>9}  {'ECE':>6}  {'train min':>9}")
    for r in results:
        t = r["test"]
        print(
            f"  {r['hparams']['seed']:>4}  {t['accuracy']:.4f}  {t['auroc']:.4f}  {t['recall']:.4f}  "
            f"{t['specificity']:.4f}  {r['threshold']:>9.4f}  {r['calibration']['test_ece']:.4f}  {r['train_seconds'] / 60:>9.2f}"
        )
    columns = {k: [r["test"][k] for r in results] for k in ("accuracy", "auroc", "recall", "specificity")}
    means = {k: statistics.mean(v) for k, v in columns.items()}
    stds = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in columns.items()}
    print(
        "  mean  " + "  ".join(f"{means[k]:.4f}" for k in columns) + "\n  std   " + "  ".join(f"{stds[k]:.4f}" for k in columns)
    )
    if all("heldout" in r for r in results):
        held = [r["heldout"] for r in results]
        print("  held out: " + "  ".join(
            f"seed {r['hparams']['seed']}: ACC {h['test']['accuracy']:.4f} AUROC {h['test']['auroc']:.4f} "
            f"sens {h['test']['recall']:.4f} spec {h['test']['specificity']:.4f}" for r, h in zip(results, held)
        ))
        means["heldout_acc"] = statistics.mean(h["test"]["accuracy"] for h in held)
        means["heldout_auroc"] = statistics.mean(h["test"]["auroc"] for h in held)
        print(f"  held-out mean  ACC {means['heldout_acc']:.4f}  AUROC {means['heldout_auroc']:.4f}")
    calibration = [r["calibration"] for r in results]
    return {
        **{k: v for k, v in means.items() if k.startswith("heldout")},
        "ece": statistics.mean(c["test_ece"] for c in calibration),
        "ece_uncalibrated": statistics.mean(c.get("test_ece_uncalibrated", c["test_ece"]) for c in calibration),
        "acc": means["accuracy"],
        "sens": means["recall"],
        "spec": means["specificity"],
        "auroc": means["auroc"],
        "acc_std": stds["accuracy"],
        "minutes": statistics.median(r["train_seconds"] / 60 for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    parser.add_argument("--first-seed", type=int, default=1, help="the first seed; the others follow it (default 1)")
    parser.add_argument("--quick", action="store_true", help="one seed and one short epoch, as a smoke test")
    parser.add_argument("--calibration", choices=["none", "temperature"], default="none",
                        help="calibration of the recipe (default none)")
    parser.add_argument("--folder", type=Path, help="a Kermany/Kaggle folder: run +experiment=best_folder on it instead")
    parser.add_argument("--heldout", type=Path, help="with --folder: a folder of test images to evaluate each run on once")
    parser.add_argument("--site", help="with --folder: another site's labeled folder, or `bundled` (PneumoniaMNIST's test split); "
                                       "without: a Kermany folder whose development test is the site of runs on the bundled data")
    parser.add_argument("--site-fractions", default="0.2", help="calibration fractions of the site (default 0.2)")
    parser.add_argument("--task", choices=sorted(RECIPES), default="pneumonia",
                        help="with --folder: the task, trained with its recipe (default pneumonia: +experiment=best_folder)")
    parser.add_argument("--pretrain", action="store_true",
                        help="with --folder: the recipe from scratch, fine-tuned from a pretraining and as its linear probe")
    parser.add_argument("--pretrain-epochs", type=int, default=100, help="with --pretrain: epochs of the pretraining (default 100)")
    parser.add_argument("--method", choices=["simclr", "byol"], default="simclr", help="with --pretrain: the method (default simclr)")
    args = parser.parse_args()
    seeds = [args.first_seed] if args.quick else list(range(args.first_seed, args.first_seed + args.seeds))
    quick = ["trainer.max_epochs=1", "trainer.limit_train_batches=10"] if args.quick else []
    common = ["trainer.enable_progress_bar=false", *quick]

    calibrated = [f"calibration={args.calibration}"]
    if args.folder is not None and args.pretrain:
        from pretraining import side_by_side

        recipe = [f"+experiment={RECIPES[args.task]}", f"data.root={args.folder}", *calibrated, *common]
        side_by_side(run, recipe, args.folder, args.task, seeds, 1 if args.quick else args.pretrain_epochs, args.method,
                     ["trainer.limit_train_batches=3"] if args.quick else [])
        return
    if args.folder is not None:
        fractions = [float(f) for f in args.site_fractions.split(",")]
        with tempfile.TemporaryDirectory() if args.site == "bundled" else nullcontext() as written:
            site = write_bundled_test(Path(written)) if args.site == "bundled" else (Path(args.site) if args.site else None)
            folder_main(args.folder, args.heldout, seeds, [*calibrated, *common], args.calibration, site, fractions, args.task)
        return
    if args.site == "bundled":
        parser.error("--site bundled takes the runs of --folder to the bundled test split; without --folder, --site is a "
                     "Kermany folder whose development test is the site")
    if args.site is not None:  # the other way round: trained on the bundled data, a Kaggle folder's development test as the site
        fractions = [float(f) for f in args.site_fractions.split(",")]
        with tempfile.TemporaryDirectory() as written:
            site = write_development_test(Path(args.site), Path(written))
            results = [run(["+experiment=best", *calibrated, *common], s, site=site, fractions=fractions) for s in seeds]
        summarize("+experiment=best", results)
        print(site_summary(results, fractions))
        return
    best = summarize("+experiment=best", [run(["+experiment=best", *calibrated, *common], s) for s in seeds])
    baseline = summarize("the study's default CNN", [run(common, s) for s in seeds])
    print("\npublished on the same test set (ACC / AUROC): " + ", ".join(f"{n} {a:.3f} / {u:.3f}" for n, a, u in PUBLISHED))
    print(
        f"RESULT acc={best['acc']:.4f} auroc={best['auroc']:.4f} acc_std={best['acc_std']:.4f} seeds={len(seeds)} "
        f"minutes_per_run={best['minutes']:.2f} baseline_acc={baseline['acc']:.4f} baseline_auroc={baseline['auroc']:.4f} "
        f"ece={best['ece']:.4f}" + (f" ece_uncalibrated={best['ece_uncalibrated']:.4f}" if args.calibration == "temperature" else "")
    )


RECIPES = {"pneumonia": "best_folder", "bacterial_viral": "best_bacterial_viral",  # --task: its folder recipe
           "normal_bacterial_viral": "best_normal_bacterial_viral"}


def folder_main(root: Path, heldout: Path | None, seeds: list[int], overrides: list[str], calibration: str,
                site: Path | None = None, fractions: list[float] | None = None, task: str = "pneumonia") -> None:
    recipe = [f"+experiment={RECIPES[task]}", f"data.root={root}", *overrides]
    results = [run(recipe, s, heldout, site, fractions) for s in seeds]
    names = results[0]["class_names"]
    if len(names) > 2:
        return multiclass_summary(f"+experiment={RECIPES[task]} on {root}", results)
    best = summarize(f"+experiment={RECIPES[task]} on {root} (sens: {names[1]} recall, spec: {names[0]} recall)", results)
    held = f" heldout_acc={best['heldout_acc']:.4f} heldout_auroc={best['heldout_auroc']:.4f}" if heldout else ""
    print(
        f"RESULT folder_acc={best['acc']:.4f} folder_auroc={best['auroc']:.4f} folder_acc_std={best['acc_std']:.4f} "
        f"folder_sens={best['sens']:.4f} folder_spec={best['spec']:.4f}{held} "
        f"seeds={len(seeds)} minutes_per_run={best['minutes']:.2f} ece={best['ece']:.4f}"
        + (f" ece_uncalibrated={best['ece_uncalibrated']:.4f}" if calibration == "temperature" else "")
    )
    if site is not None:
        print(site_summary(results, fractions or []))


def multiclass_summary(name: str, results: list[dict[str, Any]]) -> None:
    """Three or more classes: each seed's accuracy, macro AUROC and F1, per-class recall and
    confusion matrix; the means and spread, then the RESULT line."""
    names = results[0]["class_names"]
    print(f"\n{name}: {len(names)} classes, each image called its most probable (AUROC and F1: macro, one vs rest)")
    print(f"  {'seed':>4}  {'ACC':>6}  {'AUROC':>6}  {'F1':>6}  " + "  ".join(f"{'rec ' + n[:8]:>12}" for n in names)
          + f"  {'ECE':>6}  {'train min':>9}")
    for r in results:
        t, per_class = r["test"], r["per_class"]
        print(f"  {r['hparams']['seed']:>4}  {t['accuracy']:.4f}  {t['auroc']:.4f}  {t['f1']:.4f}  "
              + "  ".join(f"{per_class[n]['recall']:>12.4f}" for n in names)
              + f"  {r['calibration']['test_ece']:.4f}  {r['train_seconds'] / 60:>9.2f}")
    for r in results:
        rows = "; ".join(f"{n} {row}" for n, row in zip(names, r["confusion_matrix"]["matrix"]))
        print(f"  seed {r['hparams']['seed']} matrix (rows true, columns {', '.join(names)}): {rows}")
    accuracy = [r["test"]["accuracy"] for r in results]
    mean = {k: statistics.mean(r["test"][k] for r in results) for k in ("accuracy", "auroc", "f1")}
    recalls = {n: statistics.mean(r["per_class"][n]["recall"] for r in results) for n in names}
    minutes = statistics.median(r["train_seconds"] / 60 for r in results)
    print(
        f"RESULT folder_acc={mean['accuracy']:.4f} folder_auroc={mean['auroc']:.4f} "
        f"folder_acc_std={statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0:.4f} folder_f1={mean['f1']:.4f} "
        + " ".join(f"recall_{n.lower()}={v:.4f}" for n, v in recalls.items())
        + f" seeds={len(results)} minutes_per_run={minutes:.2f} ece={statistics.mean(r['calibration']['test_ece'] for r in results):.4f}"
    )


def site_summary(results: list[dict[str, Any]], fractions: list[float]) -> str:
    """Per fraction, each seed's site test part four ways and the one chosen on the calibration part;
    then the RESULT line of the largest fraction."""
    lines = []
    for fraction in fractions:
        first = results[0]["site"][fraction]
        lines.append(f"\nsite, calibration fraction {fraction}: test part {first['parts']['test']['images']} images, calibration part "
                     f"{first['parts']['calibration']['per_class']}, adapted candidates on {first['choice']['adaptation']['images']} "
                     f"images ({first['choice']['adaptation']['part']})")
        lines.append(f"  {'seed':>4}  " + "  ".join(f"{v:>20}" for v in (*CANDIDATES, "chosen")) + "   (ACC / AUROC / specificity)"
                     "  chosen  as_is's best ACC of any threshold / with specificity >= 0.90 (the test part's labels read)")
        for r in results:
            site = r["site"][fraction]
            cells = [site["candidates"][v]["test"] for v in (*CANDIDATES, site["choice"]["chosen"])]
            lines.append(f"  {r['hparams']['seed']:>4}  " + "  ".join(
                f"{t['accuracy']:.3f}/{t['auroc']:.3f}/{t['specificity']:.3f}".rjust(20) for t in cells)
                         + f"   {site['choice']['chosen']}  {site['bounds']['best_acc']:.3f} / {site['bounds']['best_acc_spec90']:.3f}")
    fraction = max(fractions)
    values = []
    for variant in (*CANDIDATES, "chosen"):
        for key, short in (("accuracy", "acc"), ("auroc", "auroc"), ("specificity", "spec")):
            scores = [site_scores(r["site"][fraction], variant)[key] for r in results]
            values += [f"{variant}_{short}={statistics.mean(scores):.4f}", f"{variant}_{short}_worst={min(scores):.4f}"]
    chosen = [r["site"][fraction]["choice"]["chosen"] for r in results]
    values += [f"chosen_{variant}={chosen.count(variant)}" for variant in CANDIDATES]  # how many seeds chose each
    bound = min(r["site"][fraction]["bounds"]["best_acc_spec90"] for r in results)
    return "\n".join(lines) + f"\nRESULT site_fraction={fraction} " + " ".join(values) + f" bound_acc_spec90_worst={bound:.4f}"


def site_scores(site: dict[str, Any], variant: str) -> dict[str, float]:
    return site["candidates"][site["choice"]["chosen"] if variant == "chosen" else variant]["test"]


if __name__ == "__main__":
    main()
