"""Smoke test of tools/bench.py: every case runs on the tiny shapes and reports finite ratios. No timing
thresholds: timings on a shared CI machine say nothing; the benchmark's own table is for people."""

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = (1, 2, 3, 4, 5, 6, 7, 8, 9)


def test_bench_quick_reports_every_case_with_finite_ratios(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench.py"), "--quick", "--cases", ",".join(map(str, CASES)),
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 0
    assert doc["args"]["shapes"] == ["tiny"]
    assert {"nproc", "cpu", "torch_threads", "clock"} <= set(doc["machine"])
    assert sorted(doc["cases"], key=int) == [str(c) for c in CASES]
    for case, res in doc["cases"].items():
        assert res["rows"], f"case {case} reported nothing"
        for row in res["rows"]:
            assert isinstance(row["ratio"], float) and math.isfinite(row["ratio"]) and row["ratio"] > 0, (case, row)
            assert row["met"] in (None, True, False)
    # case 6 is exact bookkeeping, not timing: the base is shared, never copied, and never gets a gradient
    for row in doc["cases"]["6"]["rows"]:
        assert row["exact"] and row["base_ptrs_unchanged"] and row["base_has_no_grad"], row
