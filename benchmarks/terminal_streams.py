"""Rewrites an executed notebook's stream outputs as a terminal would show them, in place:

    python -m benchmarks.terminal_streams NOTEBOOK.ipynb [...]

Consecutive outputs of one stream (stdout or stderr) are joined, and each line keeps only
what follows its last carriage return, so a progress bar that redrew itself 1,500 times
renders as its final line, not 1,500 lines. ``make notebooks`` and
``benchmarks/gpu_notebooks.sh`` run it between papermill and nbconvert.
"""

import sys

import nbformat


def terminal_text(text: str) -> str:
    """Each line of ``text`` as a terminal leaves it: the part after its last '\\r'."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def merge_streams(outputs: list) -> list:
    merged = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (
            out.get("output_type") == "stream"
            and prev is not None
            and prev.get("output_type") == "stream"
            and prev.get("name") == out.get("name")
        ):
            prev["text"] += out["text"]
        else:
            merged.append(out)
    for out in merged:
        if out.get("output_type") == "stream":
            out["text"] = terminal_text(out["text"])
    return merged


def main(paths: list[str]) -> None:
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs = merge_streams(cell.outputs)
        nbformat.write(nb, path)


if __name__ == "__main__":
    main(sys.argv[1:])
