"""Figures drawn from robustness results: the SGR paper's robust accuracy against the decay length zeta of
long-range correlated (LRC) noise, one line per model (Roth, Kilcher, Hofmann 2018, section 4.3 and its Fig. 3 /
appendix Fig. 4: GN against SGR).

    advtrain report runs/mnist/{gn,sgr} --latest --lrc-plot runs/mnist/lrc.png --tensorboard runs/mnist/figures

The input is what ``advtrain report`` collects: (row name, results) pairs, the results being the
``robustness*.json`` files :func:`advtrain.evaluation.writers.write_results` writes. Each ``lrc`` setting of
``results.attacks`` carries its ``zeta``, ``eps`` (the per-pixel standard deviation), ``eps_label`` and
``accuracy`` (a fraction; for a randomized network the mean over draws). Entries drawn from a data set's
covariance (``covariance`` set) have no decay length and are left out, as are settings with a channel
correlation other than the paper's 0.5 (another covariance, not another point of the curve).

The figure has one panel per budget eps and a last panel with the accuracy averaged over the eps grid (the
paper's area-under-the-curve summary, as ``advtrain report --eps-average``): a point of that panel needs every
budget of the row's grid at that zeta, else it is left out rather than averaged over fewer budgets.
"""

from __future__ import annotations

from pathlib import Path

from .results import EvaluationResults

MEAN = "mean over eps"
PAPER_CHANNEL_CORRELATION = 0.5  # intra 1, inter 0.5 (section 4.3)


def lrc_curves(rows: list[tuple[str, EvaluationResults]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{row: {eps label or MEAN: [(zeta, accuracy in percent), ...] by increasing zeta}}`` for every row with
    LRC results (rows without any are left out). Panels are ordered by budget, the mean last."""
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for name, results in rows:
        by_eps: dict[tuple[float, str], dict[float, float]] = {}  # (eps, eps label) -> {zeta: accuracy}
        for entry in results.attacks:
            setting = entry.setting
            if entry.attack != "lrc" or setting.get("covariance") is not None or setting.get("omniscient"):
                continue
            if float(setting.get("channel_correlation", PAPER_CHANNEL_CORRELATION)) != PAPER_CHANNEL_CORRELATION:
                continue
            key = (float(entry.eps), str(setting["eps_label"]))
            # the last entry of a setting wins, as in advtrain report (a rerun appends)
            by_eps.setdefault(key, {})[float(setting["zeta"])] = 100 * entry.accuracy
        if not by_eps:
            continue
        row: dict[str, list[tuple[float, float]]] = {}
        for (_, label), at in sorted(by_eps.items()):
            row[label] = sorted(at.items())
        zetas = sorted({z for at in by_eps.values() for z in at})
        mean = [(z, sum(at[z] for at in by_eps.values()) / len(by_eps)) for z in zetas
                if all(z in at for at in by_eps.values())]
        if len(by_eps) > 1 and mean:
            row[MEAN] = mean
        curves[name] = row
    return curves


def panels(curves: dict[str, dict[str, list[tuple[float, float]]]]) -> list[str]:
    """The panel titles: every budget any row has, by increasing eps, then the mean if any row has it."""
    labels: dict[str, None] = {}
    for row in curves.values():
        labels.update(dict.fromkeys(label for label in row if label != MEAN))

    def value(label: str) -> float:
        from advtrain.attacks.budget import parse_budget

        return float(parse_budget(label))

    ordered = sorted(labels, key=value)
    return ordered + ([MEAN] if any(MEAN in row for row in curves.values()) else [])


def plot_lrc(curves: dict[str, dict[str, list[tuple[float, float]]]], title: str = ""):
    """A matplotlib Figure (Agg canvas, no pyplot state): accuracy (%) against zeta (log2 axis), a panel per
    budget and one for the mean over the eps grid, a line per row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    titles = panels(curves)
    fig = Figure(figsize=(3.2 * len(titles) + 1.5, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(titles), sharey=True, squeeze=False)[0]
    ticks = sorted({z for row in curves.values() for points in row.values() for z, _ in points})
    for ax, panel in zip(axes, titles, strict=True):
        for name, row in curves.items():
            if panel in row:
                zetas, accuracy = zip(*row[panel], strict=True)
                ax.plot(zetas, accuracy, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{z:g}" for z in ticks])
        ax.minorticks_off()
        ax.set_xlabel("LRC decay length zeta (pixels)")
        ax.set_title(panel if panel == MEAN else f"eps = {panel}", fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("robust accuracy (%)")
    axes[-1].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_lrc_figure(rows: list[tuple[str, EvaluationResults]], png: str | Path | None = None,
                     tensorboard: str | Path | None = None) -> dict:
    """Draw the LRC figure of ``rows`` into ``png`` and/or a TensorBoard event file in ``tensorboard`` (the figure
    as the image ``lrc/accuracy_vs_zeta``, and each curve as scalars ``lrc/<panel>/<row>`` with the step = zeta,
    for integer zetas: TensorBoard steps are integers). Returns the curves; raises ValueError without LRC
    results."""
    curves = lrc_curves(rows)
    if not curves:
        raise ValueError(f"none of the {len(rows)} results has LRC settings (attack: lrc with a zeta); add "
                         "{attack: lrc, zeta: 4, eps: 0.1} to evaluation.attacks and run advtrain test")
    fig = plot_lrc(curves, title="Robust accuracy under LRC noise (worst of k draws) against its decay length")
    if png is not None:
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png)
    if tensorboard is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(tensorboard))
        try:
            writer.add_figure("lrc/accuracy_vs_zeta", fig, global_step=0, close=False)
            for name, row in curves.items():
                for panel, points in row.items():
                    for zeta, accuracy in points:
                        if float(zeta).is_integer():
                            writer.add_scalar(f"lrc/{panel}/{name}", accuracy, global_step=int(zeta))
        finally:
            writer.close()
    return curves
