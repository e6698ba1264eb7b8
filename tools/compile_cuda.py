"""Static gates for the CUDA kernels (csrc/*/*.cu), on any machine with nvcc, GPU or not.

Compiles every kernel file for each requested architecture (device code only, `nvcc -cubin`
with the extension's own flags) and reads, for every kernel instance:
  * from ptxas (-Xptxas -v): registers, stack frame, spill stores/loads, static shared memory;
  * from the SASS (cuobjdump -sass, the copy bundled with Triton when the toolkit lacks it):
    tensor-core MMAs (HMMA), cp.async (LDGSTS), 16-byte global loads/stores (LDG/STG .128),
    local-memory accesses (LDL/STL) and traps (BPT.TRAP).

usage: python tools/compile_cuda.py [--arch 90 --arch 75 ...] [--json out.json]
tests/test_cuda_compile.py runs it and compares the numbers with tests/snapshots/.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from cuda_headers import cuda_header_dirs  # noqa: E402

# Mnemonic prefixes counted per kernel (matched at the start of the SASS opcode).
INSTRUCTIONS = {
    "hmma": ("HMMA",),
    "ldgsts": ("LDGSTS",),
    "ldg128": ("LDG.E.128", "LDG.E.CONSTANT.128", "LDG.E.EL.128"),
    "stg128": ("STG.E.128",),
    "local": ("LDL", "STL"),
    "trap": ("BPT.TRAP",),
}


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    raise SystemExit(f"{name} not found (CUDA toolkit, or the copy bundled with triton)")


def _include_flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    dirs = include_paths() + [sysconfig.get_paths()["include"]] + cuda_header_dirs()
    try:
        import nvidia

        dirs += [os.path.join(p, "cu13", "include") for p in nvidia.__path__]
    except ImportError:
        pass
    return [f"-I{d}" for d in dirs if os.path.isdir(d)]


def _demangle(names: list[str]) -> dict[str, str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, out.stdout.splitlines()))


def _short(demangled: str) -> str:
    """'ultron::(anonymous namespace)::gather_nhwc_kernel<float, 3, 4, false>(...)' ->
    'gather_nhwc_kernel<float, 3, 4, false>'."""
    name = demangled.split("(anonymous namespace)::", 1)[-1]
    depth = 0
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def _ptxas_records(text: str) -> dict[str, dict]:
    records, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = records.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["static_smem"] = int(smem.group(1)) if smem else 0
    return records


def _sass_counts(cubin: str) -> dict[str, collections.Counter]:
    sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    counts, current = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            current = counts.setdefault(m.group(1), collections.Counter())
            continue
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and current is not None:
            opcode = m.group(1)
            for key, prefixes in INSTRUCTIONS.items():
                if opcode.startswith(prefixes):
                    current[key] += 1
    return counts


def compile_file(source: str, arch: int, workdir: str) -> list[dict]:
    cubin = os.path.join(workdir, f"{os.path.basename(source)}.sm_{arch}.cubin")
    cmd = [_tool("nvcc"), "-cubin", f"-arch=sm_{arch}", "-O3", "--use_fast_math", "-std=c++20",
           "-Xptxas", "-v,-warn-spills", *_include_flags(), source, "-o", cubin]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return [{"name": os.path.relpath(source, ROOT), "arch": arch, "ok": False,
                 "error": proc.stderr[-4000:]}]
    ptxas = _ptxas_records(proc.stderr)
    sass = _sass_counts(cubin)
    names = _demangle(sorted(ptxas))
    rows = []
    for mangled, stats in sorted(ptxas.items()):
        row = {"name": _short(names[mangled]), "file": os.path.relpath(source, ROOT), "arch": arch, "ok": True}
        row.update(stats)
        row.update({key: sass.get(mangled, collections.Counter())[key] for key in INSTRUCTIONS})
        rows.append(row)
    return rows


def compile_all(archs: list[int], jobs: int) -> list[dict]:
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*.cu")))
    with tempfile.TemporaryDirectory() as workdir, concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(compile_file, s, a, workdir) for a in archs for s in sources]
        return [row for f in futures for row in f.result()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="e.g. 90 (repeatable; default 90)")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    args = parser.parse_args(argv)
    rows = compile_all(args.arch or [90], args.jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    for r in rows:
        if not r["ok"]:
            print(f"FAILED {r['name']} sm_{r['arch']}:\n{r['error']}")
            continue
        print(f"sm_{r['arch']} {r['name']:<60} regs {r['registers']:>3} stack {r['stack']:>4} "
              f"spill {r['spill_stores']}/{r['spill_loads']} smem {r['static_smem']:>6} "
              + " ".join(f"{k} {r[k]}" for k in INSTRUCTIONS))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
