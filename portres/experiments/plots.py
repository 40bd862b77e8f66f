"""The experiments' figures (matplotlib, the ``plot`` extra). Each writer returns ``None`` when it
wrote the file, or a one-line note saying why it could not (matplotlib missing)."""

from __future__ import annotations

from pathlib import Path

MISSING = "skipped {name}: plotting needs matplotlib (pip install 'portres[plot]')"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(figure, plt, path: Path) -> None:
    """Write atomically: a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.tight_layout()
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)


def _colours(count: int):
    plt = _pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(count)]


def plot_degradation(path, results: dict) -> str | None:
    """Training error (left) and test error (right) per epoch, one line per network: plain dashed,
    residual solid, one colour per depth (the papers' Figure 6)."""
    plt = _pyplot()
    if plt is None:
        return MISSING.format(name=Path(path).name)
    depths = sorted({row["depth"] for row in results["nets"]})
    colour = dict(zip(depths, _colours(len(depths))))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for row in results["nets"]:
        style = {"color": colour[row["depth"]], "linestyle": "--" if row["family"] == "plain" else "-",
                 "label": f"{row['network']} ({row['family']})"}
        epochs = [point["epoch"] for point in row["curve"]]
        axes[0].plot(epochs, [100 * point["train_error"] for point in row["curve"]], **style)
        tested = [(point["epoch"], 100 * point["test_error"]) for point in row["curve"]
                  if point["test_error"] is not None]
        if tested:
            axes[1].plot(*zip(*tested), **style)
    for axis, what in zip(axes, ("training error (%)", "test error (%)")):
        axis.set_xlabel("epoch")
        axis.set_ylabel(what)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    recipe = results["recipe"]
    figure.suptitle(f"Degradation on {results['data']} ({results['backend']}, {recipe['epochs']} epochs, "
                    f"{recipe['schedule']}, lr {recipe['lr']}): plain dashed, residual solid")
    _save(figure, plt, path)
    return None


def plot_gradflow(path, flows: list[dict]) -> str | None:
    """Four panels, one line per network: the loss's gradient norm at each block's input; the
    neighbouring-point correlation of the gradient at each block's input (shattered gradients);
    each 3x3 conv's response deviation (Figure 7); the image gradient at one pixel along the line."""
    plt = _pyplot()
    if plt is None:
        return MISSING.format(name=Path(path).name)
    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    for flow, colour in zip(flows, _colours(len(flows))):
        style = {"color": colour, "linestyle": "--" if flow["family"] == "plain" else "-", "label": flow["network"]}
        blocks = range(1, len(flow["blocks"]) + 1)
        axes[0, 0].semilogy(blocks, [row["grad_norm"] for row in flow["blocks"]], marker=".", **style)
        correlations = [flow["input_line_correlation"]] + [row["line_correlation"] for row in flow["blocks"]]
        axes[0, 1].plot([0, *blocks], correlations, marker=".", **style)
        axes[1, 0].plot(range(1, len(flow["responses"]) + 1), [row["std"] for row in flow["responses"]], marker=".",
                        **style)
        line = flow["line_gradient"]
        axes[1, 1].plot([-1 + 2 * i / (len(line) - 1) for i in range(len(line))], line, marker=".", **style)
    titles = [("block (input side first)", "‖∂loss/∂(block input)‖", "gradient at each block's input"),
              ("block (0 = the image)", "correlation of neighbours' gradients",
               "shattered gradients: gradient correlation along a line of inputs"),
              ("3x3 conv layer", "std of the response (v1: after its BN)", "layer responses (He et al. 2015, Fig. 7)"),
              ("position t on the line", "∂f/∂x at one pixel (scaled)", "the input gradient along the line")]
    for axis, (x_label, y_label, title) in zip(axes.flat, titles):
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    first = flows[0]
    figure.suptitle(f"Gradient flow at {first['weights']} ({first['backend']}, {first['dtype']}, "
                    f"batch {first['batch']}, {first['input_size']}x{first['input_size']})")
    _save(figure, plt, path)
    return None


def plot_lesion(path, studies: list[dict]) -> str | None:
    """Test error after deleting each single block; after deleting k random blocks (mean and
    spread); and, for residual networks, the path-length distribution and each length's share of
    the gradient (Veit et al. 2016, Figures 3, 5 and 6)."""
    plt = _pyplot()
    if plt is None:
        return MISSING.format(name=Path(path).name)
    with_paths = [study for study in studies if study["paths"]]
    figure, axes = plt.subplots(1, 3 if with_paths else 2, figsize=(16 if with_paths else 11, 4.5))
    for study, colour in zip(studies, _colours(len(studies))):
        style = {"color": colour, "linestyle": "--" if study["family"] == "plain" else "-"}
        index = {block: i + 1 for i, block in enumerate(study["blocks"])}
        axes[0].plot([index[row["block"]] for row in study["single"]],
                     [100 * row["test_error"] for row in study["single"]], marker="o", markersize=3,
                     label=study["network"], **style)
        axes[0].axhline(100 * study["baseline_error"], color=colour, linewidth=0.8, linestyle=":")
        ks = [row["k"] for row in study["random"]]
        means = [100 * row["mean"] for row in study["random"]]
        spread = [100 * row["std"] for row in study["random"]]
        axes[1].errorbar(ks, means, yerr=spread, capsize=2, label=study["network"], **style)
    axes[0].set(xlabel="deleted block", ylabel="test error (%)", title="deleting one block (dotted: intact)")
    axes[1].set(xlabel="blocks deleted (random)", ylabel="test error (%)",
                title="deleting k random blocks (mean ± std)")
    for axis in axes[:2]:
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=0)
        axis.legend(fontsize=8)
    if with_paths:
        axis = axes[2]
        for study, colour in zip(studies, _colours(len(studies))):  # each network keeps its colour
            paths = study["paths"]
            if not paths:
                continue
            axis.plot(paths["lengths"], paths["share_of_paths"], color=colour, linestyle=":",
                      label=f"{study['network']}: share of paths")
            axis.plot(paths["lengths"], paths["share_of_gradient"], color=colour, marker=".",
                      label=f"{study['network']}: share of gradient")
        axis.set(xlabel="path length (residual branches passed)", ylabel="share",
                 title="path lengths and the gradient they carry")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"Lesion study on {studies[0]['data']} ({studies[0]['backend']})")
    _save(figure, plt, path)
    return None
