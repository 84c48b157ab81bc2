"""Execute notebooks top to bottom with nbclient, as the tests do, and save them with their outputs.

Full mode (the committed outputs) unless --quick (what the tests run: UFT_NOTEBOOK_QUICK=1). The kernel is this
very interpreter, so the notebooks import the project from the folder they sit in. Measure one with

    /usr/bin/time -v python course/run_notebooks.py notebooks/05_uft_vs_sft_vs_rft.ipynb

(wall time and peak memory of the kernel, which is a child of this process).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def execute(path: Path, quick: bool = False, write: bool = True, timeout: int = 3600) -> float:
    """Run one notebook in its own folder; returns the seconds it took. Raises on the first failing cell."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as root:
        spec = Path(root) / "kernels" / "python3"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3", "language": "python"}))
        env = {"JUPYTER_PATH": os.pathsep.join(filter(None, [root, os.environ.get("JUPYTER_PATH")])),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if quick:
            env["UFT_NOTEBOOK_QUICK"] = "1"
        else:
            os.environ.pop("UFT_NOTEBOOK_QUICK", None)
        os.environ.update(env)
        start = time.time()
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        seconds = time.time() - start
    if write:
        nbformat.write(nb, path)
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--quick", action="store_true", help="UFT_NOTEBOOK_QUICK=1, as in the tests")
    p.add_argument("--no-write", action="store_true", help="do not save the outputs")
    args = p.parse_args(argv)
    for path in args.notebooks:
        seconds = execute(path, quick=args.quick, write=not args.no_write)
        print(f"{path.name}: {seconds:.0f} s ({'quick' if args.quick else 'full'} mode)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
