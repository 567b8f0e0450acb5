import numpy as np

from amoe_serve.sched.waves import WaveGate


def test_a_wave_split_by_reply_order_waits_to_be_whole():
    g = WaveGate(num_blocks=3, waves=2, max_batch_tokens=100, max_wait_s=1.0)
    g.dispatched(0, 0, 4)            # wave 0: 4 segments at the experts for block 0
    g.returned(0, [0, 0])            # two came back: block 1 of wave 0 holds 2 of 4
    Q = np.array([[0, 3], [2, 0], [0, 0]])
    g.queued(1, 0, True, now=0.0)
    g.queued(0, 1, True, now=0.0)
    r = g.ready(Q, now=0.01)
    assert r[1, 0] == 0              # waits for the other two
    assert r[0, 1] == 3              # wave 1 has nothing in flight: ready
    g.returned(0, [0, 0])
    assert g.ready(Q, now=0.02)[1, 0] == 2
    assert Q[1, 0] == 2              # the caller's matrix is never modified


def test_block_zero_waits_for_the_whole_wave_and_the_valve_opens():
    g = WaveGate(num_blocks=2, waves=1, max_batch_tokens=100, max_wait_s=0.5)
    g.dispatched(0, 0, 3)            # 3 segments left block 0
    g.queued(0, 0, True, now=0.0)    # a new request waits at block 0
    Q = np.array([[5], [0]])
    assert g.ready(Q, 0.1)[0, 0] == 0
    assert g.ready(Q, 0.6)[0, 0] == 5  # waited past max_wait
    g.sampled([0, 0, 0])
    assert g.ready(Q, 0.2)[0, 0] == 5
    assert g.ready(np.array([[100], [0]]), 0.0)[0, 0] == 100  # a full batch never waits


def test_new_requests_go_to_the_lightest_wave():
    g = WaveGate(4, 3, 64, 1.0)
    assert g.pick_wave([0, 0, 1, 2, 2]) == 1
    assert g.pick_wave([]) == 0


def test_waves_open_only_when_the_load_fills_them():
    g = WaveGate(4, 2, 64, 1.0, min_wave_requests=4)
    assert [g.pick_wave([0] * n) for n in (0, 2, 6)] == [0, 0, 0]  # fewer than 2 x 4 requests: one wave
    assert g.pick_wave([0] * 7) == 1                                  # the 8th request opens wave 1
    assert g.pick_wave([0] * 5 + [1] * 3) == 1


def test_a_wave_is_sampled_in_one_call_once_its_last_block_is_back():
    g = WaveGate(num_blocks=2, waves=2, max_batch_tokens=100, max_wait_s=0.5)
    g.dispatched(1, 0, 3)            # wave 0: 3 segments at the experts for the last block
    g.returned(1, [0])               # one finished: it waits for the other two
    g.sample_queued(0, True, now=0.0)
    assert not g.sample_ready(0, now=0.1)
    assert g.sample_ready(1, now=0.1)    # wave 1 has nothing at the experts
    assert g.sample_ready(0, now=0.6)    # waited past max_wait
    g.returned(1, [0, 0])
    assert g.sample_ready(0, now=0.2)


def test_segments_merged_by_attention_count_once_from_then_on():
    """Attention merges the segments it pops from one queue: the gate's in-flight count follows,
    so block 0 of the wave opens once the merged segment is sampled (no leaked count)."""
    g = WaveGate(num_blocks=2, waves=1, max_batch_tokens=100, max_wait_s=10.0)
    g.dispatched(0, 0, 1)            # two segments left block 0 separately
    g.dispatched(0, 0, 1)
    g.returned(0, [0, 0])
    g.dispatched(1, 0, 2, merged_into=1)  # block 1 ran them as one
    assert g.in_flight_W[0] == 1 and g.incoming_BW[0, 0] == 1
    g.returned(1, [0])
    g.sampled([0])
    g.queued(0, 0, True, now=0.0)
    assert g.ready(np.array([[7], [0]]), now=0.1)[0, 0] == 7


def test_auto_waves_overlap_only_with_cores_to_spare():
    from amoe_serve.sched.waves import auto_waves

    assert auto_waves(on_cpu=False, compute_ranks_here=9, threads_per_rank=1, cores=2) == 2  # GPUs overlap
    assert auto_waves(on_cpu=True, compute_ranks_here=2, threads_per_rank=1, cores=2) == 2
    assert auto_waves(on_cpu=True, compute_ranks_here=3, threads_per_rank=1, cores=2) == 1  # oversubscribed
    assert auto_waves(on_cpu=True, compute_ranks_here=2, threads_per_rank=2, cores=2) == 1


def test_ranks_on_this_node_reads_the_launchers(monkeypatch):
    from amoe_serve.procs import ranks_on_this_node

    for k in ("MPI_LOCALNRANKS", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID"):
        monkeypatch.delenv(k, raising=False)
    assert ranks_on_this_node(5) == 5
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x2),1")
    monkeypatch.setenv("SLURM_NODEID", "2")
    assert ranks_on_this_node(5) == 1
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert ranks_on_this_node(5) == 2
    monkeypatch.setenv("MPI_LOCALNRANKS", "3")
    assert ranks_on_this_node(5) == 3


def test_explicit_waves_win_over_auto():
    from amoe_serve.config import load_config
    from amoe_serve.engine.job import attention_waves

    assert attention_waves(load_config(None, ["scheduler.attention_waves=3"])) == 3
    assert attention_waves(load_config(None, ["scheduler.attention_waves=0"]), device="cuda:0") == 2
