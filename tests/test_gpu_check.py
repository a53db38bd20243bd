"""benchmarks/gpu_check.py runs the real client step; on a CPU it is a smoke check."""

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out_json = tmp_path / "gpu_check.json"
    argv = ["--tiny", "--device", "cpu", "--steps", "2", "--batch-size", "4", "--warmup", "1"]
    rows = gpu_check.main([*argv, "--json", str(out_json)])
    assert [r["mode"] for r in rows] == ["bf16", "fp32"]
    for r in rows:
        assert r["steps"] == 2 and r["samples_per_s"] > 0 and math.isfinite(r["loss"])
    # on a CPU both modes are fp32: the same seeded steps give the same loss
    assert rows[0]["loss"] == rows[1]["loss"]
    printed = capsys.readouterr().out
    assert "samples/s" in printed and "bf16/fp32: speed x" in printed
    assert json.loads(out_json.read_text())["rows"][1]["mode"] == "fp32"
    last = json.loads(printed.strip().splitlines()[-1])  # what `python -m benchmarks record` keeps
    assert last["fp32"]["steps"] == 2 and last["speed_ratio"] > 0 and last["memory_ratio"] is None
