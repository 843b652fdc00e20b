"""Execute a notebook in place of nbval and print every cell's text output: the record of a GPU run.

    python tools/run_notebook.py solutions/12_kernel_performance.ipynb [OUT.ipynb]
"""
import os
import sys

import nbformat
from nbclient import NotebookClient

path = sys.argv[1]
nb = nbformat.read(path, as_version=4)
NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}}).execute()
for i, cell in enumerate(nb.cells):
    if cell.cell_type != "code":
        continue
    text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
    if text.strip():
        print(f"--- cell {i}\n{text.rstrip()}")
if len(sys.argv) > 2:
    nbformat.write(nb, sys.argv[2])
