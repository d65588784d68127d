"""The validation report: report.json for tools, report.md (with report.png) for people."""

from __future__ import annotations

import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from runtime._files import (
    archive_members,
    bundle_around,
    bundle_files,
    damaged_archive,
    holds_only,
    refused_why,
    remove_leftovers,  # noqa: F401 (the exporter's callers import it from here)
    replace_directory,
    work_dir_beside,
)
from runtime._signature import SIGNATURE_FILE

from .budget import Budget, decimals
from .compress import compression_lines
from .strength import strength_lines

# metric -> its unit where it is not a share or a cosine (the budget names it the same way)
UNITS: dict[str, str] = {"accuracy-drop": "points", "perplexity-increase": "%"}


def metric_label(name: str) -> str:
    """A metric's name in the report's tables, with its unit: accuracy-drop 0.33 is a third
    of a point, not a third of the accuracy."""
    return f"{name} ({UNITS[name]})" if name in UNITS else name


def report_data(job) -> dict:
    """What report.json holds. `stage_seconds` has each finished stage's time and the time so
    far of the one under way (the bundle stage, which writes the report; the stage a
    rejection stops in); `export_seconds` is the wall time from export() to this report,
    imports and reading the texts included."""
    now = time.perf_counter()
    seconds = dict(job.timings)
    if job.stage is not None:
        seconds[job.stage[0]] = round(now - job.stage[1], 2)
    return {"name": job.output.name, "task": job.task, "target": job.target.name,
            "budget": str(job.budget), **job.records, "stage_seconds": seconds,
            "export_seconds": round(now - job.started, 2)}


def stage_time_lines(data: dict) -> list[str]:
    if not data.get("stage_seconds"):
        return []
    total = (f"; {data['export_seconds']:.0f} s from the start of the export to this report"
             if "export_seconds" in data else "")
    return ["## Stage times (s)", "",
            ", ".join(f"{k} {s}" for k, s in data["stage_seconds"].items()) + total, ""]


def accuracy_holds(v: dict) -> bool:
    """Whether the validation record `v` says the accuracy budget holds (a size / latency
    budget has its own line; records written before the two were told apart had one flag)."""
    return bool(v.get("accuracy_budget_holds", v.get("budget_holds")))


def render_markdown(data: dict, *, plot: str | None = None) -> str:
    """report.md; `plot` names the PNG beside it, if one was drawn."""
    # Imported here: partition imports onnx, and `python -m exporter` (--help,
    # --list-targets) imports this module on a device that has only the runtime.
    from .partition import partition_lines

    if data.get("task") == "text-generation":
        return render_decoder_markdown(data)
    v = data.get("validation", {})
    q = data.get("quantization", {})
    lines = [f"# Export report: {data['name']}", "",
             f"Task `{data['task']}`, target `{data['target']}`, accuracy budget "
             f"`{data['budget']}`: **{'holds' if accuracy_holds(v) else 'BROKEN'}**.", ""]
    if "float_check" in data:
        fc = data["float_check"]
        lines += [f"Float ONNX vs PyTorch: max abs diff {fc['max_abs_diff']:.2e} on "
                  f"{fc['texts']} texts (tolerance {fc['tolerance']:g}).", ""]
    if v:
        lat, size, rss = v["latency_ms_batch1"], v["size_bytes"], v["peak_rss_mb"]
        m = v["metrics"]
        budget = parsed_budget(data)
        lines += [
            f"## Accuracy ({eval_texts_text(v)}, {v['eval_data']})", "",
            "| metric | value |", "|---|---|",
            *(f"| {metric_label(k)} | {shown(val, budget.bounds(k), 5)} |"
              for k, val in m.items()),
            *(f"| cosine p{p} | {val:.5f} |" for p, val in v["cosine_percentiles"].items()),
            *(["", f"No accuracy: {v['unlabelled']}."] if v.get("unlabelled") else []),
            "", "Lowest-cosine texts:", "",
            *(f"- {w['cosine']:.4f}: {w['text']!r}"
              + (f" (the first {len(w['text']) - 1} of {w['chars']} characters)"
                 if "chars" in w else "") for w in v["worst_texts"]), "",
            *([f"![cosine to float per text, and each group's quantization harm]({plot})", ""]
              if plot else []),
            *([f"Integer products: {v['integer_products']}.", ""]
              if "integer_products" in v else []),
            *([f"Truncation: {truncation_text(v['truncation'], v['eval_texts'])}", ""]
              if v.get("truncation", {}).get("texts_cut") else []),
            "## Speed, size, memory", "",
            "| | float ONNX | bundle | ratio |", "|---|---|---|---|",
            f"| latency p50, batch 1 (ms) | {lat['float_onnx']['p50']:.3f} | "
            f"{lat['bundle']['p50']:.3f} | {lat['ratio_p50']:.2f} |",
            f"| latency p95, batch 1 (ms) | {lat['float_onnx']['p95']:.3f} | "
            f"{lat['bundle']['p95']:.3f} | |",
            f"| model file (MB) | {size['float_onnx'] / 1e6:.1f} | "
            f"{size['bundle_model'] / 1e6:.1f} | {size['ratio']:.2f} |",
            f"| peak RSS (MB) | {rss['float_onnx']} | {rss['bundle']} | |", "",
            *timed_on(lat),
            f"Peak RSS: {rss['what']}. The exporter itself peaked at {rss['exporter']} MB.",
            *original_size_lines(size),
            ""]
        if "size_latency_budget" in v:
            b = v["size_latency_budget"]
            lines += [f"Size / latency budget {b['budget']}: model {b['model_mb']} MB, "
                      f"latency p50 {b['latency_ms_p50']} ms: "
                      f"**{'holds' if b['holds'] else 'BROKEN'}**.", ""]
    if q.get("mode") == "none":
        lines += ["## Quantization", "", f"- none: {q['precision']} throughout", ""]
    elif q:
        cal = q["calibration"]
        out = q.get("outliers", {})
        lines += ["## Quantization", "",
                  f"- {q['mode']}: weights {q['weights']}, activations {q['activations']}"
                  + (f"; kernels: {q['integer_kernels']}" if "integer_kernels" in q else ""),
                  f"- calibration: {cal['method']} on {cal['samples']} texts of "
                  f"{data.get('calibration_source', 'smart-home utterances')} "
                  f"(sha256 {cal['data_sha256'][:12]}...)"
                  + (f", streamed, peak RSS {cal['peak_rss_mb']} MB (before: "
                     f"{cal['rss_before_mb']} MB)" if "peak_rss_mb" in cal else ""),
                  "- outliers: " + (f"SmoothQuant alpha {out['alpha']} on "
                                     f"{out['activations']} activations"
                                     + (f" ({out['folded_into_attention_value']} folded into "
                                        f"the attention V projection, no Mul)"
                                        if out.get("folded_into_attention_value") else "")
                                     if out.get("applied") else "none"),
                  f"- {int8_matmuls(q)} MatMuls int8; embeddings "
                  f"{q['embeddings']['mode']} ({', '.join(q['embeddings']['tables']) or 'none'})",
                  f"- kept in float: {len(q['excluded_nodes'])} nodes",
                  *(f"  - `{e['node']}`: {e['reason']}" for e in q["excluded_nodes"]), ""]
        compared = cal.get("methods_compared")
        if compared:
            lines += [f"### Calibration methods ({compared['data']})", "",
                      "| method | mean cosine | min cosine |", "|---|---|---|",
                      *(f"| {k}{' (used)' if k == cal['method'] else ''} | {v['cosine']:.5f} "
                        f"| {v['min-cosine']:.5f} |" for k, v in compared.items() if k != "data"),
                      ""]
    s = data.get("sensitivity", {})
    if s.get("applied"):
        search = s["search"]
        kept = kept_groups(search)
        budget = parsed_budget(data)
        lines += [f"## Sensitivity ({s['data']}; harm = {s['harm']})", "",
                  "| group | kind | nodes | harm | min cosine |", "|---|---|---|---|---|",
                  *(f"| {r['group']}{' **(kept float)**' if r['group'] in kept else ''} | "
                    f"{r['kind']} | {group_size(r)} | {r['harm']:.2e} | {r['min-cosine']:.5f} |"
                    for r in s["groups"]), "",
                  f"Budget search ({search['data']}, size limit {search_limit(data)}): "
                  + "; ".join(
                      f"{st['float_group'] or 'full int8'} -> cosine "
                      f"{shown(st['metrics']['cosine'], budget.bounds('cosine'), 5)} / min "
                      f"{shown(st['metrics']['min-cosine'], budget.bounds('min-cosine'), 5)}"
                      f"{' (holds)' if st['holds'] else ''}" for st in search["steps"])
                  + (f"; skipped for size: {', '.join(search['skipped_for_size'])}"
                     if search["skipped_for_size"] else "") + ".", "",
                  *(f"Left to validation: {note}." for note in
                    search.get("left_to_validation", [])),
                  *([""] if search.get("left_to_validation") else [])]
    lines += strength_lines(data.get("strength"))
    lines += compression_lines(data.get("compression"))
    lines += partition_lines(data.get("partition"))
    lines += stage_time_lines(data)
    return "\n".join(lines)


def render_decoder_markdown(data: dict) -> str:
    v, q, fc = data.get("validation", {}), data.get("quantization", {}), data.get("float_check")
    lines = [f"# Export report: {data['name']}", "",
             f"Task `text-generation`, target `{data['target']}`, accuracy budget "
             f"`{data['budget']}`: **{'holds' if v.get('budget_holds') else 'BROKEN'}**.", ""]
    if fc:
        lines += [f"Float ONNX vs PyTorch: logits max abs diff {fc['max_abs_diff']:.2e}; greedy "
                  f"agreement {100 * fc['greedy_agreement']:.0f}% over {fc['prompts']} prompts "
                  f"x {fc['greedy_tokens']} tokens.", ""]
    if q:
        lines += ["## Weights", "", f"- {q['weights']}: {q['matrices']}",
                  f"- source: {q.get('source', 'float')}",
                  *([f"- rounding error of the matrices: mean |w - w_float| "
                     f"{q['weight_error']['mean_abs']:.2e}, max "
                     f"{q['weight_error']['max_abs']:.2e}"] if q.get("weight_error") else []),
                  f"- embedding: {q['embedding']}; LM head: {q.get('lm_head', 'float32')}",
                  *([f"- MatMulNBits accuracy level {q['accuracy_level']} (int4 blocks), "
                     f"{q.get('int8_accuracy_level')} (8-bit blocks)"]
                    if "accuracy_level" in q else []),
                  *([f"- float16 activations: largest {h['largest_activation']:,.0f} "
                     f"({100 * h['share_of_float16_max']:.0f}% of float16's largest value, "
                     f"in `{h['in']}`) on {h['range_checked_on']}"]
                    if isinstance(h := q.get("float16"), dict) else []), ""]
    if v:
        m, pd, sp = v["metrics"], v["perplexity_data"], v["speed"]
        size, rss = v["size_bytes"], v["peak_rss_mb"]
        lines += [
            f"## Quality ({pd['windows']} windows of {pd['window']} tokens: {pd['source']})", "",
            "| metric | value |", "|---|---|",
            *(f"| {metric_label(k)} | {val} |" for k, val in m.items()),
            "", f"Greedy agreement with PyTorch float per prompt ({v['greedy']['tokens']} "
            f"tokens): {', '.join(str(g) for g in v['greedy']['per_prompt'])}", "",
            "## Speed, size, memory", "", "| | float ONNX | bundle | ratio |",
            "|---|---|---|---|",
            f"| prefill {sp['bundle']['prefill_tokens']} tokens (ms) | "
            f"{sp['float_onnx']['prefill_ms']} | {sp['bundle']['prefill_ms']} | "
            f"{sp['bundle']['prefill_ms'] / sp['float_onnx']['prefill_ms']:.2f} |",
            f"| decode, batch 1 (tokens/s) | {sp['float_onnx']['decode_tokens_per_s']} | "
            f"{sp['bundle']['decode_tokens_per_s']} | "
            f"{sp['bundle']['decode_tokens_per_s'] / sp['float_onnx']['decode_tokens_per_s']:.2f}"
            f" |",
            f"| model file (MB) | {size['float_onnx'] / 1e6:.1f} | "
            f"{size['bundle_model'] / 1e6:.1f} | {size['ratio']:.2f} |",
            f"| peak RSS (MB) | {rss['float_onnx']} | {rss['bundle']} | |", "",
            *timed_on(sp),
            f"Peak RSS: {rss['what']}. The exporter itself peaked at {rss['exporter']} MB.",
            *original_size_lines(size), ""]
    lines += compression_lines(data.get("compression"))
    lines += stage_time_lines(data)
    return "\n".join(lines)


def original_size_lines(size: dict) -> list[str]:
    """A compressed bundle's model file against the original model's size."""
    if "original_float32" not in size:
        return []
    return ["", f"Float ONNX is the compressed model's graph; the original model's parameters "
                f"in float32 take {size['original_float32'] / 1e6:.1f} MB, so the bundle's "
                f"model file is {size['ratio_to_original']:.2f} of the original's."]


def write_report_files(data: dict, directory: Path) -> list[Path]:
    files = [directory / "report.json", directory / "report.md"]
    files[0].write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    plot = directory / "report.png"
    drawn = plot_report(data, plot)
    # backslashreplace: a surrogate-escaped file name (export() refuses them; a caller of
    # this function may not) is written as "\udce9", not a crash at the last stage
    files[1].write_text(render_markdown(data, plot=plot.name if drawn else None),
                        encoding="utf-8", errors="backslashreplace")
    return files + ([plot] if drawn else [])


def kept_groups(search: dict) -> list[str]:
    """The groups the budget search gave back to float in the graph it chose: the steps up
    to `best_step` (a rejected search's best step reached may come before its last)."""
    steps = search["steps"]
    return [step["float_group"] for step in steps[1:search.get("best_step", len(steps) - 1) + 1]]


def plot_report(data: dict, path: Path) -> bool:
    """Draw report.png for an encoder export: the histogram of each held-out text's cosine
    to the float model, with the budget's thresholds, and, when the sensitivity search ran,
    the harm of quantizing each node group (log scale), the groups kept in float marked (a
    report rejected in the search, before validation, has that panel alone). False (nothing
    drawn) for decoders, with neither, or without matplotlib."""
    v, s = data.get("validation", {}), data.get("sensitivity", {})
    histogram = v.get("cosine_histogram")
    groups = s.get("groups", []) if s.get("applied") else []
    if data.get("task") == "text-generation" or not (histogram or groups):
        return False
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = max(4.5, 0.16 * len(groups) + 1.2)   # one readable row per group
    panels = bool(histogram) + bool(groups)
    fig, axes = plt.subplots(1, panels, figsize=(12 if panels == 2 else 6.5, height),
                             squeeze=False)
    axes = list(axes[0])
    if histogram:
        ax = axes.pop(0)
        edges, counts = histogram["edges"], histogram["counts"]
        ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.7)
        budget = parsed_budget(data)
        for key, style, label in (("cosine", "-", "mean"), ("min-cosine", "--", "min")):
            ax.axvline(v["metrics"][key], color="black", ls=style, lw=1,
                       label=f"{label} {shown(v['metrics'][key], budget.bounds(key), 4)}")
        for clause in data.get("budget", "").split(","):
            name, _, bound = clause.partition(">=")
            if name.strip() in ("cosine", "min-cosine") and bound:
                ax.axvline(float(bound), color="tab:red", ls=":", lw=1.2,
                           label=f"budget {name.strip()} >= {bound}")
        ax.set_xlabel("cosine of bundle to float output, per text")
        ax.set_ylabel("texts")
        ax.set_title(f"{eval_texts_text(v)} ({v['eval_data']})", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    if groups:
        kept = set(kept_groups(s["search"]))
        ax = axes.pop(0)
        rows = groups[::-1]   # the most harmful on top
        colors = {"int8": "tab:blue", "float by design": "lightgray"}
        ax.barh([g["group"] for g in rows], [max(g["harm"], 1e-9) for g in rows],
                color=["tab:orange" if g["group"] in kept else colors.get(g["kind"], "gray")
                       for g in rows])
        ax.set_xscale("log")
        ax.set_xlabel("harm: 1 - mean cosine with only this group int8\n(blue: int8; "
                      "orange: back to float for the budget; gray: float by design)")
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.01)
        ax.set_title("quantization sensitivity per node group", fontsize=10)
    fig.suptitle(f"{data['name']}: {data['target']}, budget {data.get('budget', '')}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return True


def temp_dir_beside(target: Path, fix: str = "Choose another --output") -> Path:
    """`work_dir_beside(target)`, a PermissionError naming the directory that refused (no
    permission, or a read-only file system: the directory chosen, not the machine failing)
    and what to do: `fix`."""
    try:
        return work_dir_beside(target)
    except OSError as e:
        why = refused_why(e, target.parent)
        if why is None:
            raise
        raise PermissionError(f"Cannot write {str(target)!r}: {why}. {fix}.") from None


def eval_texts_text(v: dict) -> str:
    """The evaluation texts in words: held out, or how many of them were calibration texts."""
    seen = v.get("eval_texts_in_calibration", 0)
    if not seen:
        return f"{v['eval_texts']} held-out texts"
    return (f"{v['eval_texts']} evaluation texts, {seen} of them also calibration texts: "
            f"optimistic")


def truncation_text(cut: dict, texts: int) -> str:
    """The truncation record in words (log and report)."""
    cost = cut.get("float_cosine_cut_vs_whole")
    return (f"{cut['texts_cut']} of {texts} evaluation texts are longer than the bundle's "
            f"{cut['max_length']} tokens (longest {cut['longest_tokens']}) and are cut; the "
            f"accuracy above compares bundle and float on the same cut texts"
            + (f"; the cut alone costs the float model cosine {cost['mean']:.4f} mean, "
               f"{cost['min']:.4f} min against the whole texts (its own limit "
               f"{cut['model_max_length']} tokens): raise runtime.max_sequence_length if "
               f"the device sees such texts" if cost else "") + ".")


def write_report(job, directory: Path) -> None:
    """Write report.json, report.md (and report.png) into `directory`, replacing it
    atomically."""
    tmp = temp_dir_beside(directory)
    write_report_files(report_data(job), tmp)
    replace_dir(tmp, directory)


REPORT_FILES = frozenset({"report.json", "report.md", "report.png"})


def written_here(path: Path) -> bool:
    """Whether directory `path` holds only what an export writes: a bundle (manifest.json and
    the files it lists) or, in `<output>.rejected`, a rejected export's report. An empty
    directory qualifies. (A user's folder of report.md and notes named `out` is not one.)"""
    known = bundle_files(path)
    if known is None:
        return False
    if path.name.endswith(".rejected"):
        known |= REPORT_FILES
    return holds_only(path, known)


NOT_AN_EXPORT = "no export wrote (it is not a bundle whose manifest.json lists them all)"


def check_replaceable(path: Path, *, ours: Callable[[Path], bool] = written_here,
                      why: str = NOT_AN_EXPORT) -> None:
    """Raise FileExistsError unless `path` is absent or a directory that `ours` says this
    tool wrote (by default `written_here`: an export's): a tool replaces its own output and
    nothing else of the user's. `why` ends the refusal's "holds files that ..."."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        what = "a link" if path.is_symlink() else "not a directory"
        raise FileExistsError(f"Output {str(path)!r} exists and is {what}; refusing to replace "
                              f"it. Choose another --output or move it away.")
    if not ours(path):
        raise FileExistsError(
            f"Output {str(path)!r} exists and holds files that {why}; refusing to replace it. "
            f"Choose another --output, or remove the directory if it is an old output.")


def check_not_in_bundle(path: Path) -> None:
    """Raise FileExistsError where `path` lies inside a bundle: written there, it would be a
    file that bundle's manifest does not list, and no export or runtime.unpack would replace
    that bundle any more."""
    if (bundle := bundle_around(path)) is not None:
        raise FileExistsError(f"Output {str(path)!r} lies inside the bundle {str(bundle)!r}, "
                              f"which would then hold files its manifest does not list (and "
                              f"no export could replace it). Choose an --output outside it, "
                              f"e.g. beside it.")


def check_archive_replaceable(archive: Path, name: str) -> None:
    """Raise FileExistsError unless `archive` is absent or a bundle archive of bundle `name`
    (one that an export wrote, which `--tar` replaces): a plain tar of directory `name`
    holding a manifest.json and exactly the files it lists (and its manifest.sig, where
    signed). A user's tar of notes in a directory of that name, or a compressed one,
    stays."""
    if not archive.exists() and not archive.is_symlink():
        return
    try:
        if archive.is_symlink() or not archive.is_file():
            raise ValueError("not a file")
        with tarfile.open(archive, "r:") as tar:   # (an export writes plain tars only)
            top, files = archive_members(tar, archive)
            if top != name:
                raise ValueError(f"it holds bundle {top!r}")
            with tar.extractfile(files["manifest.json"]) as f:
                listed = {entry["path"] for entry in json.load(f)["files"]}
        if set(files) - {SIGNATURE_FILE} != listed | {"manifest.json"}:
            raise ValueError("it holds files its manifest.json does not list, or lacks some")
    except Exception as e:   # a damaged .tar.gz too: EOFError, zlib.error
        if not isinstance(e, (ValueError, OSError, KeyError, TypeError, RecursionError)) \
                and not damaged_archive(e):
            raise
        raise FileExistsError(f"{str(archive)!r} exists and is not an archive of bundle "
                              f"{name!r}; refusing to replace it. Choose another --output or "
                              f"move it away.") from None


def remove_stale_archive(output: Path) -> Path | None:
    """Remove `<output>.tar` where it is an archive an export wrote of bundle `output.name`
    (so of the bundle just replaced: this export wrote none) and return its path; leave
    anything else there alone. Flashed, it would install the old model."""
    archive = output.with_name(output.name + ".tar")
    if not archive.exists():
        return None
    try:
        check_archive_replaceable(archive, output.name)
    except FileExistsError:
        return None   # not ours: the user's file
    archive.unlink()
    return archive


def replace_dir(new: Path, final: Path, *, ours: Callable[[Path], bool] = written_here,
                why: str = NOT_AN_EXPORT) -> None:
    """Move directory `new` to `final`, replacing any old `final` with renames only. An old
    `final` must be one that this tool wrote (`check_replaceable` with `ours` and `why`)."""
    check_replaceable(final, ours=ours, why=why)
    replace_directory(new, final)


def search_limit(data: dict) -> str:
    """The sensitivity search's size limit in words: the profile's max_size_ratio of float,
    or max_model_mb's bytes where that budget lowered it (records before max_bytes: the
    ratio)."""
    from .sensitivity import size_limit

    search = data["sensitivity"]["search"]
    float_bytes = data.get("export", {}).get("float_bytes")
    if "max_bytes" not in search or float_bytes is None:
        return f"{search['max_size_ratio']:.0%} of float"
    return size_limit(search["max_bytes"], search["max_size_ratio"], float_bytes)


def parsed_budget(data: dict) -> Budget:
    """The record's accuracy budget (no clauses where it does not parse)."""
    try:
        return Budget.parse(data.get("budget", ""))
    except (TypeError, ValueError):
        return Budget(())


def shown(value: float, bounds: list[float], places: int) -> str:
    """`value` with `places` decimals, or as many more as keep it on its side of `bounds`:
    a min-cosine of 0.979996 is not 0.98000 next to a broken min-cosine>=0.98."""
    return f"{value:.{decimals(value, bounds, places)}f}"


def group_size(row: dict) -> str:
    """The sensitivity table's "nodes" cell: the embeddings group is tables, not nodes (it
    said 0)."""
    if "tables" in row:
        n = len(row["tables"])
        return f"{n} embedding table{'s' if n != 1 else ''}"
    return str(row["nodes"])


def int8_matmuls(q: dict) -> int:
    """How many of the float graph's MatMuls the quantization record `q` says are int8: its
    shipped nodes, each QAttention counted as the Q, K and V MatMuls it fuses."""
    fused = q.get("fused_matmuls", {})
    return len(q["quantized_nodes"]) + sum(len(m) - 1 for m in fused.values())


def timed_on(speed: dict) -> list[str]:
    """The lines saying where the speeds were timed, and on how many runs (reports written
    before had neither)."""
    where = [f"Timed on {speed['timed_on']}.", ""] if "timed_on" in speed else []
    if "runs" not in speed["float_onnx"]:
        return where
    rounds = speed.get("rounds", 3)
    timed = f"the quietest of {rounds} rounds" if rounds > 1 else "one round"
    return where + [f"Batch-1 latency: {timed}, of {speed['float_onnx']['runs']} "
                    f"timed runs (float ONNX) and {speed['bundle']['runs']} (bundle) each; a "
                    f"round stops after {speed.get('round_seconds', 'a few')} s.", ""]
