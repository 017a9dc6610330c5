"""Scores of `cxr-train utility` (numpy) and its report: utility.md and the ROC plot (PIL).

AUROC of class c, one-vs-rest: the Mann-Whitney U of the scores p_c of the class-c images
against those of the others, over n1 n0 (ties count 1/2): the chance that a random image of
class c scores above a random other one. 95% intervals: stratified bootstrap over REAL_TEST
(each class resampled with replacement within itself, so every resample has both sides);
every regime and seed is scored on the SAME resamples, so differences between regimes are
paired. The interval of a K-seed mean is that of the mean over seeds on each resample: it
covers the test-set sampling, the +- std the spread over training seeds.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np

from cxr_ddpm.runtime.evaluation.metrics import ranks

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the boolean `positive` (rank formula)."""
    positive = np.asarray(positive, bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    r = ranks(np.asarray(scores, np.float64))
    return float((r[positive].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1); tied scores move together."""
    positive = np.asarray(positive, bool)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    s, y = np.asarray(scores)[order], positive[order]
    last = np.r_[s[1:] != s[:-1], True]                     # the last of each run of equal scores
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / max(1, (~y).sum())], np.r_[0.0, tp / max(1, y.sum())]


def confusion(labels: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """(k, k) counts: row = true class, column = predicted class."""
    return np.bincount(np.asarray(labels) * k + np.asarray(predicted), minlength=k * k).reshape(k, k)


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray, k: int) -> float:
    """Mean over classes of the share of that class's images predicted as it (mean recall)."""
    cm = confusion(labels, predicted, k)
    return float(np.mean(np.diag(cm) / cm.sum(axis=1)))


def scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Per-class AUROC, macro AUROC, balanced accuracy and confusion matrix of (N, K) probabilities."""
    k = probs.shape[1]
    per_class = [auroc(probs[:, c], labels == c) for c in range(k)]
    pred = probs.argmax(axis=1)
    return {"per_class_auroc": per_class, "macro_auroc": float(np.mean(per_class)),
            "balanced_accuracy": balanced_accuracy(labels, pred, k),
            "confusion": confusion(labels, pred, k).tolist()}


def bootstrap_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(n, N) stratified resamples of the test set: each class's images drawn from themselves."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, len(labels)), np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        out[:, members] = rng.choice(members, size=(n, len(members)), replace=True)
    return out


def resampled(probs: np.ndarray, labels: np.ndarray, resamples: np.ndarray) -> np.ndarray:
    """(B, K + 2): per-class AUROC, macro AUROC and balanced accuracy on every resample."""
    k = probs.shape[1]
    rows = []
    for idx in resamples:
        p, y = probs[idx], labels[idx]
        per = [auroc(p[:, c], y == c) for c in range(k)]
        rows.append([*per, float(np.mean(per)), balanced_accuracy(y, p.argmax(axis=1), k)])
    return np.asarray(rows)


def interval(values: np.ndarray) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def summarise(per_seed: Sequence[dict[str, Any]], boot: Sequence[np.ndarray], classes: Sequence[str],
              real: tuple[float, np.ndarray] | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """One regime over its seeds: mean, std (ddof 1; 0 for one seed) and the bootstrap interval of
    the seed mean, and the seed-mean resamples (B, K + 2). `real` (the real-only regime's mean macro
    AUROC and seed-mean resamples) adds the paired difference of macro AUROC against real only."""
    mean_boot = np.mean(np.stack(boot), axis=0)                       # (B, K + 2), mean over seeds

    def stat(values: list[float], col: int) -> dict[str, Any]:
        v = np.asarray(values)
        return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "ci95": interval(mean_boot[:, col])}

    k = len(classes)
    out: dict[str, Any] = {
        "macro_auroc": stat([s["macro_auroc"] for s in per_seed], k),
        "balanced_accuracy": stat([s["balanced_accuracy"] for s in per_seed], k + 1),
        "per_class_auroc": {c: stat([s["per_class_auroc"][i] for s in per_seed], i) for i, c in enumerate(classes)},
        "confusion_summed_over_seeds": np.sum([s["confusion"] for s in per_seed], axis=0).tolist(),
    }
    if real is not None:
        real_mean, real_boot = real
        out["macro_auroc_minus_real"] = {"mean": out["macro_auroc"]["mean"] - real_mean,
                                         "ci95": interval(mean_boot[:, k] - real_boot[:, k])}
    return out, mean_boot


def _pm(s: dict[str, Any]) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"


def markdown(report: dict[str, Any]) -> str:
    classes, regimes, k = report["classes"], report["regimes"], len(report["classes"])
    seeds = len(report["seeds"])
    lines = [
        f"# Utility of {report['synth']}: train on synthetic, test on real", "",
        "A ResNet-18 (one input channel, random initialisation) is trained under each regime with the same "
        f"steps ({report['steps']} x {report['batch']} images), seeds and augmentation, and tested on the real "
        f"images of {report['test']}. AUROC: one-vs-rest, the chance that an image of the class scores above one of "
        "another class (0.5 = chance, 1 = perfect); macro = mean over classes; balanced accuracy = mean per-class "
        f"recall. Each cell: mean ± std over {seeds} seed{'s' if seeds != 1 else ''} [95% stratified bootstrap "
        f"interval of the mean over REAL_TEST, {report['bootstrap']} resamples].", "",
        "**Patients must not overlap between the training images (real and the generator's) and REAL_TEST**, or "
        "these numbers measure recognition of patients, not of disease. This command refuses identical files; it "
        "cannot see the same patient in two different images. The Curated COVID-19 dataset has no patient ids: "
        "split it with care (by source, date, or not at all), and read any figure from it as an upper bound.", "",
        f"Images at {report['size']} px, {report['device']}; counts per class ({', '.join(classes)}): "
        f"train {report['counts']['train']}, test {report['counts']['test']}, synthetic {report['counts']['synth']}.",
        "",
    ]
    lines += ["| regime | training images | macro AUROC | balanced accuracy | "
              + " | ".join(f"AUROC {c}" for c in classes) + " |",
              "|---|---|---|---|" + "---|" * k]
    for name, r in regimes.items():
        lines.append(f"| {name} | {sum(r['train_counts'])} ({', '.join(map(str, r['train_counts']))}) | "
                     f"{_pm(r['macro_auroc'])} | {_pm(r['balanced_accuracy'])} | "
                     + " | ".join(_pm(r["per_class_auroc"][c]) for c in classes) + " |")
    if k == 2:
        lines += ["", "With two classes both one-vs-rest AUROCs are the macro AUROC (one score is 1 minus the other)."]
    lines += ["", "Macro AUROC minus real only (paired over the same resamples):", ""]
    for name, r in regimes.items():
        d = r.get("macro_auroc_minus_real")
        if d:
            lines.append(f"- {name}: {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
    lines += ["", f"Confusion matrices (rows: true class, columns: predicted; summed over {seeds} seeds):", ""]
    for name, r in regimes.items():
        cm = r["confusion_summed_over_seeds"]
        lines.append(f"- {name}: " + "; ".join(f"{c}: {row}" for c, row in zip(classes, cm)))
    gen = report["generator_data"]
    lines += ["", f"Generator's training data: {gen['verdict']}: {gen['detail']}"]
    lines += [f"", f"ROC curves: {report['plot']} (one panel per class, every seed's curve). "
              f"{report['seconds']:.0f} s in all.", ""]
    return "\n".join(lines)


def roc_png(curves: dict[str, list[list[tuple[np.ndarray, np.ndarray]]]], classes: Sequence[str],
            labels: dict[str, str] | None = None, panel: int = 260) -> bytes:
    """ROC curves: one panel per class, one colour per regime, one line per seed; PNG bytes.
    curves[regime][class] = [(fpr, tpr) per seed]; labels: regime -> its legend entry."""
    from PIL import Image, ImageDraw
    margin, legend_h = 34, 18 * len(curves) + 10
    w, h = len(classes) * (panel + margin) + margin, panel + 2 * margin + legend_h
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    for j, name in enumerate(classes):
        x0, y0 = margin + j * (panel + margin), margin
        d.rectangle([x0, y0, x0 + panel, y0 + panel], outline="black")
        d.line([x0, y0 + panel, x0 + panel, y0], fill=(190, 190, 190))              # chance
        d.text((x0, 8), f"{name} vs rest", fill="black")
        d.text((x0, y0 + panel + 4), "0   false positive rate   1", fill="black")
        d.text((x0 - 26, y0), "TPR", fill="black")
        d.text((x0 - 10, y0 + panel - 10), "0", fill="black")
        for i, (regime, per_class) in enumerate(curves.items()):
            colour = COLOURS[i % len(COLOURS)]
            for fpr, tpr in per_class[j]:
                pts = [(x0 + float(f) * panel, y0 + panel - float(t) * panel) for f, t in zip(fpr, tpr)]
                d.line(pts, fill=colour, width=2)
    for i, regime in enumerate(curves):
        y = h - legend_h + 18 * i
        d.line([margin, y + 6, margin + 24, y + 6], fill=COLOURS[i % len(COLOURS)], width=3)
        d.text((margin + 32, y), (labels or {}).get(regime, regime), fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
