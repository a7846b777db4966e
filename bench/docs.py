"""docs/benchmarks.md from bench/results/: for every benchmark, what it measures and how to run
it (its module's docstring), where it ran, and its current results (the markdown the bench
wrote, or its rows as a table) with its plots. Earlier results are in git's history of
bench/results/.

  python -m bench.docs
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap

from bench import common

DOCS = os.path.join(os.path.dirname(common.RESULTS), os.pardir, "docs", "benchmarks.md")
# Result stem -> the bench module that wrote it, in the order the page shows them.
ORDER = (
    ("main_job", "main_job"),
    ("compare_channels", "compare"),
    ("compare_extras", "compare"),
    ("compare_linear_qk", "compare"),
    ("compare_tokens", "compare"),
    ("search_budget", "search_budget"),
    ("token_speed", "token_speed"),
    ("token_ladder", "token_ladder"),
    ("batch1", "batch1"),
    ("throughput_cpu", "throughput"),
    ("latency_model_cpu", "latency_model"),
    ("vs_timm_cpu", "vs_timm"),
    ("kept_tokens_asvit", "kept_tokens"),
    # the one-question studies, frozen with the commit that made them
    ("frozen/search_step_cpu_843d6db", "studies.search_step"),
    ("frozen/padding_cpu_9315f4a", "studies.padding"),
    ("frozen/search_multiple_cpu_9d3d210", "studies.search_multiple"),
    ("frozen/dtype_cpu_06663ea", "studies.dtype"),
    ("frozen/dense_profile_cpu_6cbf420", "studies.dense_profile"),
    ("frozen/attention_core_cpu_6cbf420", "studies.attention_core"),
    ("frozen/xla_flags_cpu_s32_reduce_60afe8b", "studies.xla_flags"),
)


def _table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = [c for c in rows[0] if not isinstance(rows[0][c], dict | list)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def _machine(meta: dict) -> str:
    keys = ("backend", "device", "cpus", "jax")
    return ", ".join(f"{k} {meta[k]}" for k in keys if k in meta)


def results_of(stem: str, files: list[str]) -> list[str]:
    """`stem` and its tagged runs (`stem_TAG`, from a bench's --tag), untagged first; a longer
    stem of ORDER keeps its own."""
    longer = [s for s, _ in ORDER if s != stem and s.startswith(stem)]
    tagged = sorted(
        f[: -len(".json")]
        for f in files
        if f.startswith(stem + "_")
        and f.endswith(".json")
        and not any(f == f"{s}.json" or f.startswith(s + "_") for s in longer)
    )
    return ([stem] if f"{stem}.json" in files else []) + tagged


def described(module: str) -> tuple[str, str]:
    """(title, the rest) of a bench's docstring: its first sentence on one line (a docstring's
    first line may end mid-sentence), and the text after it."""
    # The docstring without importing the bench: benches define flags of the same names.
    with open(os.path.join(os.path.dirname(__file__), *module.split(".")) + ".py") as f:
        doc = (ast.get_docstring(ast.parse(f.read())) or "").strip()
    first, _, rest = doc.partition("\n\n")
    title, *more = re.split(r"(?<=[.?!])\s+(?=[A-Z`(])", " ".join(first.split()), maxsplit=1)
    return title, "\n\n".join(p for p in (" ".join(more), _fenced(rest.strip("\n"))) if p)


def _fenced(text: str) -> str:
    """A docstring's indented lines (its commands) in code fences: markdown would run them
    together into one paragraph."""
    out, block = [], []
    for line in [*text.rstrip().splitlines(), ""]:
        if line.startswith("  "):
            block.append(line)
            continue
        if block:
            out += ["```", *textwrap.dedent("\n".join(block)).splitlines(), "```"]
            block = []
        out.append(line)
    return "\n".join(out).strip()


# A commit trailer for changes to a bench that cannot move its numbers (a flag check, a rename):
# they leave its results current.
SAME_RESULTS = "Bench-results: unchanged"


def provenance(meta: dict, module: str, git=None) -> str:
    """When and with what a result was made, and whether its bench changed since (stale):
    `git log COMMIT..HEAD -- bench/MODULE.py` without the commits that carry SAME_RESULTS
    (`git`: `common.git`, or a stand-in)."""
    git = git or common.git
    commit, date = meta.get("commit", "").rstrip("+"), meta.get("date", "an unrecorded date")
    argv = meta.get("argv")
    flags_used = "unrecorded flags" if argv is None else " ".join(argv) or "its defaults"
    if not commit:
        return (
            "**Unknown provenance**: made before results recorded their commit and flags; "
            "whether its bench changed since is unknown (rerun to refresh)."
        )
    made = f"Made at {commit} on {date} with {flags_used}"
    try:
        path = f"bench/{module.replace('.', '/')}.py"
        changed = git(
            "log", "--oneline", "--invert-grep", f"--grep=^{SAME_RESULTS}$", f"{commit}..HEAD",
            "--", path,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return f"{made} (a commit this checkout's history lacks)."
    n = len(changed.splitlines())
    if n:
        return f"**Stale**: {made}; {path} changed in {n} commit(s) since: rerun it."
    return f"{made}; {path} unchanged since."


def section(
    stem: str, module: str, files: list[str], siblings: tuple[str, ...] = (), told: str = ""
) -> str:
    """One result (`stem`.json, which `results_of` found in `files`) with its markdown and plots;
    `siblings` are the bench's other results, whose plots are theirs. `told`: the result whose
    section already holds the bench's description (a bench's text is on the page once)."""
    with open(os.path.join(common.RESULTS, f"{stem}.json")) as f:
        result = json.load(f)
    title, rest = described(module)
    if told:
        rest = f"How `bench.{module}` works and how to run it: under {told} above."
    meta = result["meta"]
    out = [f"## {stem}: {title}", "", rest, "", f"Measured on: {_machine(meta)}. "]
    out[-1] += provenance(meta, module)
    md = os.path.join(common.RESULTS, f"{stem}.md")
    if os.path.exists(md):
        with open(md) as f:
            body = f.read().strip()
        # The bench's own headings sit below this page's.
        body = "\n".join(
            ("##" + line if line.startswith("#") else line) for line in body.splitlines()
        )
        out += ["", body]
    else:
        out += ["", _table(result.get("rows", []))]
    pngs = sorted(
        p
        for p in files
        if p.startswith(stem)
        and p.endswith(".png")
        and not any(p.startswith(s) for s in siblings if s != stem and s.startswith(stem))
    )
    out += [""] + [f"![{p}](../bench/results/{p})" for p in pngs]
    return "\n".join(out).rstrip() + "\n"


def render() -> str:
    parts = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench.docs` from `bench/results/` (the current result of each "
        "benchmark; `git log bench/results` has the earlier ones). Every speed is a ratio "
        "measured in one run, with the ideal (dense MACs / pruned MACs) beside it; every "
        "comparison of methods pairs them by seed.",
        "",
    ]
    frozen = os.path.join(common.RESULTS, "frozen")
    files = os.listdir(common.RESULTS)
    files += [f"frozen/{f}" for f in (os.listdir(frozen) if os.path.isdir(frozen) else ())]
    told: dict[str, str] = {}  # bench module -> the result that described it
    for stem, module in ORDER:
        runs = tuple(results_of(stem, files))
        for run in runs:
            parts += [section(run, module, files, runs, told.get(module, ""))]
            told.setdefault(module, run)
    return "\n".join(parts)


README = os.path.join(os.path.dirname(common.RESULTS), os.pardir, "README.md")
# <!-- table: STEM [CONFIG] --> ... <!-- /table -->: a table generated from bench/results/STEM.json
_MARKED = re.compile(r"(<!-- table: ([\w/]+)(?: (\w+))? -->\n)(.*?)(<!-- /table -->)", re.S)
_NAMES = {"vit": "ViT", "flatten": "FLatten", "tokens": "ViT-mini4/4"}


def compare_table(result: dict, config: str | None = None) -> str:
    """A bench.compare result as the README shows it: the reference method's top-1 at every
    stage, each other method minus it (paired by seed, 95% interval; bold where it excludes 0)."""
    rows = [r for r in result["rows"] if config in (None, r["config"])]
    stages = ("after search", "after 1 fine-tune epoch", "end")
    ref_key = next(k for k in rows[0][stages[0]] if k.startswith("vs_") and k != "vs_dense")
    ref = ref_key[3:]
    lines = [
        "| model, MACs | method | seeds | achieved MACs | after search | after 1 fine-tune epoch "
        "| end (2 epochs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        where = f"{_NAMES.get(r['config'], r['config'])} {r['target']}"
        cells = [where if r["variant"] == ref else "", r["variant"], str(len(r["seeds"]))]
        cells.append(f"{r['achieved_macs']['mean']:.3f}")
        for stage in stages:
            if r["variant"] == ref:
                top = r[stage]["top1"]
                cells.append(f"{top['mean']:.2f}" if top["n"] else "")
                continue
            d = r[stage][ref_key]
            text = f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]" if d["n"] > 1 else ""
            cells.append(f"**{text}**" if d.get("verdict") in ("better", "worse") else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# <!-- value: STEM CONFIG TARGET VARIANT STAGE -->...<!-- /value -->: one number of a comparison
_VALUE = re.compile(
    r"(<!-- value: ([\w/]+) (\w+) ([\d.]+) (.+?) (after_search|end|after_1_epoch)"
    r"( vs_dense)? -->)(.*?)(<!-- /value -->)"
)
_STAGES = {"after_search": "after search", "after_1_epoch": "after 1 fine-tune epoch", "end": "end"}


def compare_value(
    result: dict, config: str, target: float, variant: str, stage: str, vs_dense: bool = False
) -> str:
    """The variant minus the reference with its interval (the reference: its top-1); with
    `vs_dense`, minus the equal-budget dense model."""
    row = next(
        r
        for r in result["rows"]
        if r["config"] == config and r["target"] == target and r["variant"] == variant
    )
    cell = row[_STAGES[stage]]
    ref_key = next((k for k in cell if k.startswith("vs_") and k != "vs_dense"), None)
    if vs_dense:
        ref_key = "vs_dense"
    elif variant == ref_key[3:]:  # the reference itself: its top-1
        return f"{cell['top1']['mean']:.2f}"
    d = cell[ref_key]
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


# <!-- count: STEM CONFIG -->N<!-- /count -->: how many paired comparisons the config's rows make
# (each variant against the reference, at each stage), for the chance-verdict caveat.
_COUNT = re.compile(r"(<!-- count: ([\w/]+) (\w+) -->)(.*?)(<!-- /count -->)")


def compare_count(result: dict, config: str) -> int:
    n = 0
    for r in (r for r in result["rows"] if r["config"] == config):
        for stage in _STAGES.values():
            refs = [k for k in r.get(stage) or {} if k.startswith("vs_") and k != "vs_dense"]
            n += bool(refs) and refs[0] != f"vs_{r['variant']}"  # not the reference itself
    return n


def _load(stem: str) -> dict:
    with open(os.path.join(common.RESULTS, f"{stem}.json")) as f:
        return json.load(f)


# <!-- md: STEM --> ... <!-- /md -->: the markdown report bench/results/STEM.md, as written
_MARKED_MD = re.compile(r"(<!-- md: ([\w/]+) -->\n)(.*?)(<!-- /md -->)", re.S)


def _markdown(stem: str) -> str:
    with open(os.path.join(common.RESULTS, f"{stem}.md")) as f:
        return f.read().rstrip("\n") + "\n"


def readme(text: str) -> str:
    """`text` with every marked table and value regenerated from its result file."""
    text = _MARKED_MD.sub(lambda m: m.group(1) + _markdown(m.group(2)) + m.group(4), text)
    text = _COUNT.sub(
        lambda m: m.group(1) + str(compare_count(_load(m.group(2)), m.group(3))) + m.group(5), text
    )
    text = _MARKED.sub(
        lambda m: m.group(1) + compare_table(_load(m.group(2)), m.group(3)) + m.group(5), text
    )
    return _VALUE.sub(
        lambda m: (
            m.group(1)
            + compare_value(
                _load(m.group(2)),
                m.group(3),
                float(m.group(4)),
                m.group(5),
                m.group(6),
                bool(m.group(7)),
            )
            + m.group(9)
        ),
        text,
    )


def main() -> int:
    path = os.path.normpath(DOCS)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(render())
    readme_path = os.path.normpath(README)
    with open(readme_path) as f:
        text = readme(f.read())  # every result read before the file is rewritten
    with open(readme_path, "w") as f:
        f.write(text)
    print(f"wrote {path}, the tables of {readme_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
