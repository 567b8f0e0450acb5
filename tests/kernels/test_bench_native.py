"""The native-kernel micro-benchmark keeps working (its timings are not checked)."""

import pytest

from amoe_kernels import bench_native, native


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
def test_small_run_reports_every_shape(capsys):
    assert bench_native.main(["--small", "--reps", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(bench_native.SMALL_LINEAR) + 2
    assert all("ms," in ln and ln.endswith("GFLOP/s") for ln in lines)
    assert lines[0].startswith("linear 8 x 32 -> 64")
    assert lines[-1].startswith("expert FFN 8 x (32 x 64), 3 rows each")
