"""The generated tables of README.md and docs/*.md (benchmarks/render_docs.py): every block matches
the committed results file it names, and a block that cannot be rendered says where and why."""

import json
import os

import pytest

from _script_helpers import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


D = load_script("render_docs")
_next = os.path.join("benchmarks", "results", "speedup-cpu-cpu", "speedup.json")  # the 5-seed run


def test_committed_documents_match_their_results_files():
    stale = D.run(D.documents(), check=True)
    assert stale == [], f"run `python benchmarks/render_docs.py`: stale blocks {stale}"


def test_readme_has_a_generated_headline():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert "<!-- render speedup " in text


def _doc(tmp_path, spec, body=""):
    p = tmp_path / "doc.md"
    p.write_text(f"before\n<!-- render {spec} -->\n{body}<!-- /render -->\nafter\n")
    return p


def test_render_rewrites_the_block_and_is_idempotent(tmp_path):
    p = _doc(tmp_path, f"speedup {_next} methods=imp,bip_alternating", "hand-typed 99.99\n")
    assert D.main([str(p)]) == 0
    text = p.read_text()
    assert "hand-typed" not in text
    assert text.startswith("before\n") and text.endswith("<!-- /render -->\nafter\n")
    with open(os.path.join(ROOT, _next)) as f:
        d = json.load(f)
    imp = [r for r in d["rows"] if r["method"] == "imp"][0]
    assert f"| IMP | {100 * imp['test_acc']:.2f} ± {100 * imp['test_acc_std']:.2f} |" in text
    assert "| BiP (fused) |" not in text  # only the methods asked for
    assert D.run([str(p)], check=True) == []  # a second pass changes nothing
    assert D.main(["--check", str(p)]) == 0


def test_check_names_a_hand_edited_block_and_changes_nothing(tmp_path):
    p = _doc(tmp_path, f"speedup {_next}")
    D.main([str(p)])
    edited = p.read_text().replace("| IMP |", "| IMP (edited) |", 1)
    p.write_text(edited)
    assert D.main(["--check", str(p)]) == 1
    assert p.read_text() == edited


def test_partial_file_says_so_with_a_continue_command(tmp_path):
    with open(os.path.join(ROOT, _next)) as f:
        d = json.load(f)
    d.update(complete=False, stopped_in="omp-r3-seed0", continue_command="python benchmarks/speedup.py "
             "--preset cpu --resume --max-minutes 0.05")
    (tmp_path / "r.json").write_text(json.dumps(d))
    p = _doc(tmp_path, "speedup r.json")
    D.run([str(p)], check=False, root=str(tmp_path))
    text = p.read_text()
    assert "**partial** (stopped in omp-r3-seed0" in text
    assert "--max-minutes N" in text and "--max-minutes 0.05" not in text


@pytest.mark.parametrize("spec, body, match", [
    ("speedup", "", "needs a renderer and a results file"),
    ("nosuch x.json", "", "unknown renderer"),
    ("speedup missing.json", "", "does not exist"),
    ("speedup bad.json", "", "not valid JSON"),
    ("speedup good.json", "", "lacks what the 'speedup' renderer reads"),
    ("speedup good.json methods", "", "not key=value"),
])
def test_bad_blocks_give_a_clear_error_and_leave_the_file(tmp_path, spec, body, match):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "good.json").write_text(json.dumps({"config": {"methods": ["imp"]}}))
    p = _doc(tmp_path, spec, body)
    before = p.read_text()
    with pytest.raises(D.RenderError, match=match):
        D.run([str(p)], check=False, root=str(tmp_path))
    assert p.read_text() == before


def test_unknown_method_and_unclosed_block(tmp_path):
    p = _doc(tmp_path, f"speedup {_next} methods=imp,nosuch")
    with pytest.raises(D.RenderError, match="not in the file"):
        D.run([str(p)], check=True)
    q = tmp_path / "open.md"
    q.write_text(f"<!-- render speedup {_next} -->\nno end\n")
    with pytest.raises(D.RenderError, match="never closed"):
        D.run([str(q)], check=True)
    assert D.main([str(q)]) == 2


def _assert_pairs_rows(text, d, ref, others):
    """The rows of a rendered pairs block, recomputed here by hand from the file's per-seed
    accuracies: per target the paired mean of ``ref`` minus each of ``others``, its interval's
    opening bracket, the seeds positive and a verdict. Returns the header line."""
    rows = {(r["method"], round(r["target_sparsity"], 4)): r for r in d["rows"]}
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]  # the rule line is |---|
    targets = sorted({t for m, t in rows if m == ref})
    assert len(lines) == 1 + len(targets)  # the header, then one row per target
    for t, line in zip(targets, lines[1:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == f"{100 * t:.1f}%"
        for cell, m in zip(cells[1:], others):
            a, b = rows[(ref, t)], rows[(m, t)]
            other = dict(zip(b["seeds"], b["test_acc_per_seed"]))
            diffs = [100 * (x - other[s]) for s, x in zip(a["seeds"], a["test_acc_per_seed"]) if s in other]
            assert cell.startswith(f"{sum(diffs) / len(diffs):+.2f} [")
            assert f" {sum(x > 0 for x in diffs)}/{len(diffs)} " in cell
            assert cell.split()[-1] in ("better", "non-inferior", "worse", "inconclusive")
    return lines[0]


def test_pairs_table_is_the_paired_difference_of_the_per_seed_accuracies(tmp_path):
    """speedup-pairs: BiP against each other method per target, recomputed here by hand from the
    rows' per-seed accuracies (mean and seeds positive), and a verdict for every cell."""
    with open(os.path.join(ROOT, _next)) as f:
        d = json.load(f)
    p = _doc(tmp_path, f"speedup-pairs {_next} methods=imp,gmp")
    D.run([str(p)], check=False)
    head = _assert_pairs_rows(p.read_text(), d, "bip_alternating", ["imp", "gmp"])
    assert head == "| sparsity | BiP (alternating) vs IMP | BiP (alternating) vs GMP |"
    q = _doc(tmp_path, f"speedup-pairs {_next} ref=nosuch")
    with pytest.raises(D.RenderError, match="not in the file"):
        D.run([str(q)], check=True)


def test_structured_table_and_mask_flips(tmp_path):
    with open(os.path.join(ROOT, "benchmarks", "results", "structured-cpu", "structured.json")) as f:
        d = json.load(f)
    bip = [r for r in d["rows"] if r["method"] == "bip_filter" and abs(r["target_sparsity"] - 0.8) < 1e-9][0]
    d["mask_flips"] = {"bip_filter": {"0.8": {"filters": [0.197, 0.047], "entries": [0.1, 0.02], "runs": 3,
                                              "last_tenth_filters": 0.047}},
                       "imp_filter": {"all targets": {"filters": [0.0, 0.25], "entries": [0.0, 0.2], "runs": 3,
                                                      "last_tenth_filters": 0.25}}}
    (tmp_path / "s.json").write_text(json.dumps(d))
    p = _doc(tmp_path, "structured s.json")
    D.run([str(p)], check=False, root=str(tmp_path))
    text = p.read_text()
    assert f"| {bip['label']} | per layer" in text
    assert f"{100 * bip['test_acc']:.2f} ± {100 * bip['test_acc_std']:.2f} (3)" in text
    assert f"| {bip['label']} | 80% | 3 | 19.7 | 4.7 |" in text
    assert "| IMP-F | all targets | 3 | 0.0 | 25.0 |" in text


def test_structured_pairs_are_the_paired_difference_of_the_per_seed_accuracies(tmp_path):
    src = os.path.join("benchmarks", "results", "structured-cpu", "structured.json")
    with open(os.path.join(ROOT, src)) as f:
        d = json.load(f)
    p = _doc(tmp_path, f"structured-pairs {src} methods=bip_filter,l1_filter,omp_filter")
    D.run([str(p)], check=False)
    head = _assert_pairs_rows(p.read_text(), d, "bip_filter", ["l1_filter", "omp_filter"])
    labels = {r["method"]: r["label"] for r in d["rows"]}
    assert head == f"| sparsity | {labels['bip_filter']} vs {labels['l1_filter']} | " \
                   f"{labels['bip_filter']} vs {labels['omp_filter']} |"
    q = _doc(tmp_path, f"structured-pairs {src} ref=bip_alternating")
    with pytest.raises(D.RenderError, match="not in the file"):
        D.run([str(q)], check=True)
