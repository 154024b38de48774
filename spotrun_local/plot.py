"""The demo's picture: loss against step, one colour per attempt, interruptions marked."""

from __future__ import annotations

from pathlib import Path

from spotrun_local.metrics import JobTimeline


def plot_timeline(timeline: JobTimeline, path: Path, title: str) -> Path:
    """Write ``path`` (PNG) and return it."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and none needed
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.5), dpi=110)
    attempts = timeline.attempts()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    losses = timeline.losses()
    for index, instance_id in enumerate(attempts):
        points = [(step, loss) for step, loss, owner in losses if owner == instance_id]
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        axes.plot(
            steps,
            values,
            marker=".",
            linewidth=1.2,
            color=colours[index % len(colours)],
            label=f"attempt {index + 1} ({instance_id})",
        )
    for _instance, resumed_from in timeline.attempt_starts():
        if resumed_from:
            axes.axvline(resumed_from, color="grey", linestyle=":", linewidth=1)
    for number, outcome in enumerate(timeline.interruptions(), start=1):
        if outcome.step_at_notice is None:
            continue
        axes.axvline(outcome.step_at_notice, color="red", linestyle="--", linewidth=1)
        label = f"{outcome.kind} {number}"
        if outcome.time_to_safe_seconds is not None:
            label += f"\nsafe {outcome.time_to_safe_seconds:.1f}s"
        axes.annotate(
            label,
            xy=(outcome.step_at_notice, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -4),
            textcoords="offset points",
            va="top",
            fontsize=8,
            color="red",
        )
    axes.plot([], [], color="red", linestyle="--", linewidth=1, label="notice (step reached)")
    axes.plot([], [], color="grey", linestyle=":", linewidth=1, label="resumed from")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if attempts:
        axes.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
