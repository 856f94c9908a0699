"""Build benchmarks/RESULTS.md: the goals summary followed by every results/*.md, in a fixed order."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
ORDER = ["analyze.md", "adapters-speed.md", "adapters-accuracy.md", "merge.md", "merge_experiments.md",
         "align.md", "align-signatures.md", "mnn.md", "ddp.md"]  # fmt: skip


def main() -> None:
    parts = [(HERE / "results" / "SUMMARY.md").read_text().rstrip()]
    for name in ORDER:
        path = HERE / "results" / name
        if path.is_file():
            body = path.read_text().strip()
            body = "\n".join("#" + line if line.startswith("#") else line for line in body.splitlines())
            parts.append(f"<!-- from results/{name} -->\n{body}")
    (HERE / "RESULTS.md").write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
