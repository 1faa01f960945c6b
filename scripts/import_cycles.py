#!/usr/bin/env python3
"""Import cycles between the files of a Rust crate.

Usage: import_cycles.py CRATE_DIR [--layer MODULE:FORBIDDEN,FORBIDDEN ...]

Each file under CRATE_DIR/src is a module (`a/b.rs` and `a/b/mod.rs` are
`a::b`). An edge A -> B is a path in A's code (comments removed) that names
B: `crate::b::...`, `use crate::{b, ...}`, or `super::...` resolved from A.
A `mod` declaration and a parent's re-export of its child are not edges (a
module owning its children is not an import). Prints every strongly connected
group of two or more modules and exits 1 if there is one.

`--layer session:rig,storage_thread` also fails if module `session` (or any of
its children) imports `rig` or `storage_thread` (or their children).
"""
import os
import re
import sys


def modules(src):
    files = {}
    for d, _, fs in os.walk(src):
        for f in fs:
            if not f.endswith(".rs"):
                continue
            p = os.path.join(d, f)
            rel = os.path.relpath(p, src)[:-3]
            name = rel.replace("/", "::")
            if name.endswith("::mod"):
                name = name[:-5]
            if name in ("lib", "main") or name.startswith("bin::"):
                continue
            files[name] = open(p, encoding="utf-8").read()
    return files


def graph(files):
    mods = set(files)

    def resolve(path):
        parts = [p for p in path.split("::") if p]
        for i in range(len(parts), 0, -1):
            m = "::".join(parts[:i])
            if m in mods:
                return m
        return None

    g = {}
    for m, text in files.items():
        text = re.sub(r"//.*", "", text)
        deps = set()
        for hit in re.finditer(r"crate::((?:[a-z_0-9]+::)*[a-z_0-9]+)", text):
            deps.add(resolve(hit.group(1)))
        for hit in re.finditer(r"crate::\{([^}]*)\}", text):
            for item in hit.group(1).split(","):
                deps.add(resolve(item.strip().split("::{")[0]))
        parent = m.rsplit("::", 1)[0] if "::" in m else ""
        for hit in re.finditer(r"super::((?:[a-z_0-9]+::)*[a-z_0-9]+)", text):
            base = parent + "::" if parent else ""
            deps.add(resolve(base + hit.group(1)))
        deps.discard(None)
        deps.discard(m)
        g[m] = deps
    return g


def cycles(g):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def under(m, top):
    return m == top or m.startswith(top + "::")


def main():
    args = sys.argv[1:]
    if not args:
        print(__doc__)
        return 2
    g = graph(modules(os.path.join(args[0], "src")))
    bad = 0
    for group in cycles(g):
        print("import cycle: " + " -> ".join(group))
        bad += 1
    i = 1
    while i < len(args):
        if args[i] == "--layer" and i + 1 < len(args):
            top, forbidden = args[i + 1].split(":")
            for m, deps in g.items():
                if not under(m, top):
                    continue
                for d in deps:
                    if any(under(d, f) for f in forbidden.split(",")):
                        print(f"layering: {m} imports {d}")
                        bad += 1
            i += 2
        else:
            print(f"unknown argument {args[i]}")
            return 2
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
