"""`amoe-serve generate` as a user runs it: real mpiexec jobs, bad input, bad checkpoints,
dead ranks, and the embedded default model."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import PROMPTS, REPO, group_process, read_results, run_cli, write_requests


@pytest.mark.mpi(ranks=4)
def test_bad_lines_fail_alone_and_the_rest_are_served(checkpoints, hf_reference, tmp_path):
    inp = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"id": "ok0", "prompt_token_ids": PROMPTS[0], "max_tokens": 8}),
        "{this is not json",
        json.dumps({"id": "long", "prompt_token_ids": list(range(1, 40)), "max_tokens": 8}),
        json.dumps({"id": "badtemp", "prompt_token_ids": [1, 2], "temperature": -1}),
        json.dumps({"id": "ok1", "prompt_token_ids": PROMPTS[1], "max_tokens": 8}),
    ]
    inp.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    p = run_cli(["generate", "--model", str(checkpoints["mixtral"]), "--input", str(inp), "--output", str(out),
                 "--mode", "aep", "engine.max_model_len=40"])
    assert p.returncode == 0, p.stderr[-3000:]
    res = {r["id"]: r for r in read_results(out)}
    assert list(res) == ["ok0", "line-2", "long", "badtemp", "ok1"]  # input order, one line each
    assert res["ok0"]["output_token_ids"] == hf_reference["mixtral"][0]
    assert res["ok1"]["output_token_ids"] == hf_reference["mixtral"][1]
    assert res["line-2"]["error"].startswith("line 2: invalid JSON")
    assert "exceeds the context limit of 40" in res["long"]["error"]
    assert res["badtemp"]["error"].startswith("line 4:") and "temperature" in res["badtemp"]["error"]
    assert "3 failed" in p.stderr


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_missing_checkpoint_is_one_clear_line(tmp_path):
    inp = write_requests(tmp_path / "in.jsonl")
    p = run_cli(["generate", "--model", str(tmp_path / "nope"), "--input", str(inp), "--output", str(tmp_path / "o")])
    assert p.returncode == 2
    assert p.stderr.startswith("amoe-serve: error:") and "nope" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
@pytest.mark.parametrize("damage", ["truncate", "drop_expert", "bad_json", "unknown_arch"])
def test_corrupt_checkpoint_is_refused_before_launch(checkpoints, tmp_path, damage):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["qwen2_moe"], ck)
    st = ck / "model.safetensors"
    if damage == "truncate":
        st.write_bytes(st.read_bytes()[:-1000])
    elif damage == "drop_expert":
        from safetensors.torch import load_file, save_file
        w = load_file(st)
        w = {k: v for k, v in w.items() if ".experts.4." not in k}
        save_file(w, st)
    elif damage == "bad_json":
        (ck / "config.json").write_text("{oops")
    else:
        cfg = json.loads((ck / "config.json").read_text())
        cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
        (ck / "config.json").write_text(json.dumps(cfg))
    inp = write_requests(tmp_path / "in.jsonl")
    p = run_cli(["generate", "--model", str(ck), "--input", str(inp), "--output", str(tmp_path / "o"), "--mode", "aep"])
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("amoe-serve: error:") and "Traceback" not in p.stderr
    expect = {"truncate": "truncated", "drop_expert": "experts.4", "bad_json": "config.json",
              "unknown_arch": "MixtralForCausalLM"}[damage]
    assert expect in p.stderr


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_bad_cli_values_are_refused(checkpoints, tmp_path):
    inp = write_requests(tmp_path / "in.jsonl")
    base = ["generate", "--model", str(checkpoints["mixtral"]), "--input", str(inp), "--output", str(tmp_path / "o")]
    for extra, msg in [(["--expert-ranks", "9"], "exceeds the model's 6 experts"),
                       (["scheduler.policy=fastest"], "scheduler.policy"),
                       (["no_such.key=1"], "invalid configuration")]:
        p = run_cli(base + extra)
        assert p.returncode == 2 and msg in p.stderr, (extra, p.stderr)
    p = run_cli(["generate", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")])
    assert p.returncode == 2 and "input file not found" in p.stderr


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _rank_pids(root: int) -> dict[int, int]:
    """PMI rank -> pid of the rank processes descending from one `amoe-serve` process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if b"amoe_serve.engine.rank_main" not in (d / "cmdline").read_bytes():
                continue
            env = (d / "environ").read_bytes().split(b"\0")
            pid = int(d.name)
            anc = pid
            while anc > 1 and anc != root:
                anc = _ppid(anc)
        except (OSError, ValueError):
            continue
        if anc != root:
            continue
        for kv in env:
            if kv.startswith(b"PMI_RANK="):
                out[int(kv.split(b"=")[1])] = pid
    return out


@pytest.mark.mpi(ranks=4)
@pytest.mark.parametrize("victim", [1, 3])  # an attention rank, an expert rank
def test_killed_rank_ends_the_job_promptly(checkpoints, tmp_path, victim):
    inp = write_requests(tmp_path / "in.jsonl", prompts=PROMPTS * 8, max_tokens=200)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    with group_process([sys.executable, "-m", "amoe_serve.cli", "generate", "--model", str(checkpoints["olmoe"]),
                        "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--mode", "aep",
                        "--timeout", "120"],
                       cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        deadline = time.monotonic() + 60
        pids = {}
        while len(pids) < 4 and time.monotonic() < deadline:
            time.sleep(0.3)
            pids = _rank_pids(p.pid)
        assert len(pids) == 4, f"ranks did not start: {pids}"
        time.sleep(3)  # past start-up, into generation
        os.kill(pids[victim], signal.SIGKILL)
        t0 = time.monotonic()
        out, err = p.communicate(timeout=30)
        elapsed = time.monotonic() - t0
    assert p.returncode != 0
    assert "the data-plane job failed" in err
    assert elapsed < 15, f"job took {elapsed:.1f} s to end after rank {victim} died"
    from amoe_serve.procs import alive
    deadline = time.monotonic() + 5  # killed ranks may still be zombies waiting to be reaped
    while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids.values() if alive(pid)], "rank processes left behind"
    assert not (tmp_path / "o.jsonl").exists()
    from amoe_serve.procs import _mapped_shm
    live = _mapped_shm()
    assert not [f for f in Path("/dev/shm").glob("mpich_shm_*") if f.name not in live], "MPI segments leaked"


@pytest.mark.slow  # over ~3 s here: left out of scripts/test.sh --fast
def test_default_model_with_no_arguments(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt": "Hello, experts", "max_tokens": 6}) + "\n"
                   + json.dumps({"id": "b", "prompt_token_ids": [1, 80, 81], "max_tokens": 4}) + "\n")
    out = tmp_path / "out.jsonl"
    p = run_cli(["generate", "--input", str(inp), "--output", str(out)],
                env_extra={"AMOE_SERVE_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-3000:]
    res = read_results(out)
    assert [len(r["output_token_ids"]) for r in res] == [6, 4] or all(r["finish_reason"] == "stop" for r in res)
    assert all(isinstance(r["text"], str) for r in res)
    assert (tmp_path / "cache" / "default-model-v1" / "config.json").is_file()


def test_orphaned_mpi_segments_are_cleaned_and_live_ones_kept(tmp_path):
    import mmap

    from amoe_serve.procs import clean_orphaned_mpi_shm
    shm = Path("/dev/shm")
    orphan, live = shm / "mpich_shm_test_orphan_0", shm / "mpich_shm_test_live_0"
    for f in (orphan, live):
        f.write_bytes(b"\0" * 4096)
    with open(live, "r+b") as fh, mmap.mmap(fh.fileno(), 4096):
        assert clean_orphaned_mpi_shm() >= 1
        assert not orphan.exists() and live.exists()
    live.unlink()
