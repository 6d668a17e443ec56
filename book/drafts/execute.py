"""Execute a draft notebook in a fresh kernel (cwd = its folder), write /tmp/exec_<name>, print its glued values and any
error. Run: python book/drafts/execute.py book/07_benchmark.ipynb"""
import sys, time, json
from pathlib import Path
import nbformat
from nbclient import NotebookClient

path = Path(sys.argv[1]).resolve()
nb = nbformat.read(path, as_version=4)
t = time.time()
try:
    NotebookClient(nb, timeout=3000, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    ok = True
except Exception as e:
    ok = False
    print("ERROR:", str(e)[-3000:])
out = Path("/tmp") / f"exec_{path.name}"
nbformat.write(nb, out)
print(f"executed in {time.time()-t:.0f}s ok={ok} -> {out}")
for c in nb.cells:
    for o in c.get("outputs", []):
        md = o.get("metadata", {}).get("scrapbook", {})
        if md.get("name"):
            print("glue", md["name"], "=", o.get("data", {}).get("application/papermill.record/text/plain"))
