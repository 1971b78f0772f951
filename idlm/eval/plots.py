"""PNG plots of a bench run (matplotlib, headless): throughput vs concurrency, acceptance per draft
position, TPF vs stride. Input: the ``results`` list of the bench's JSON line."""

from __future__ import annotations

from pathlib import Path


def _label(r: dict) -> str:
    if r["mode"] == "isd":
        return f"ISD N={r['stride']}"
    return {"ar": "AR (engine)", "hf": "transformers generate", "llamacpp": "llama.cpp", "ar-b1": "AR batch-1",
            "isd-b1": f"ISD batch-1 N={r['stride']}"}.get(r["mode"], r["mode"])


def write_bench_plots(results: list[dict], out_dir: str | Path, title: str = "") -> list[Path]:
    """Three PNGs from ``idlm bench``'s result rows: throughput vs concurrency, acceptance per draft position
    and TPF vs stride."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    isd = [r for r in results if r["mode"] == "isd" and r.get("acceptance_at")]
    return [_throughput(results, title, out / "throughput_vs_concurrency.png"),
            _acceptance(isd, out / "acceptance_per_position.png"),
            _tpf(isd, out / "tpf_vs_stride.png")]


def _throughput(results: list[dict], title: str, path: Path) -> Path:
    """Total throughput vs concurrency, one line per configuration."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        series.setdefault(_label(r), []).append((r["concurrency"], r["total_tokens_per_s"]))
    for name, pts in series.items():
        pts.sort()
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("requests in flight (concurrency)")
    ax.set_ylabel("total output tokens / s")
    ax.set_xscale("log", base=2)
    cs = sorted({r["concurrency"] for r in results})
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.minorticks_off()
    ax.set_title(title or "throughput vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _acceptance(isd: list[dict], path: Path) -> Path:
    """Acceptance per draft position at the lowest concurrency, one line per stride."""
    import matplotlib.pyplot as plt

    c0 = min((r["concurrency"] for r in isd), default=None)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in isd:
        if r["concurrency"] == c0:
            acc = r["acceptance_at"]
            ax.plot(range(1, len(acc) + 1), acc, marker="o", label=_label(r))
    ax.set_xticks(range(1, 1 + max((len(r["acceptance_at"]) for r in isd), default=1)))
    ax.set_xlabel("draft position j (1 = first draft after the anchor)")
    ax.set_ylabel("acceptance rate (accepted / tested)")
    ax.set_ylim(0, 1)
    ax.set_title(f"acceptance per draft position (C={c0})")
    ax.grid(alpha=0.3)
    if isd:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _tpf(isd: list[dict], path: Path) -> Path:
    """TPF vs stride N, one line per concurrency (fixed strides only), against the every-draft-accepted line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    by_c: dict[int, list[tuple[int, float]]] = {}
    for r in isd:
        if isinstance(r["stride"], int):
            by_c.setdefault(r["concurrency"], []).append((r["stride"], r["tpf"]))
    for c, pts in sorted(by_c.items()):
        pts.sort()
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=f"C={c}")
    if by_c:
        n = [x for pts in by_c.values() for x, _ in pts]
        ax.plot([1, max(n)], [1, max(n)], ls=":", c="gray", label="ideal (every draft accepted)")
        ax.set_xticks(range(1, max(n) + 1))
        ax.legend(fontsize=8)
    ax.set_xlabel("stride N (tokens a forward can commit)")
    ax.set_ylabel("tokens per forward (TPF)")
    ax.set_title("TPF vs stride")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
