"""State round trip: save mid-run, load into a fresh reducer, continue — bit for bit."""

from __future__ import annotations

import io

import pytest
import torch

from gradwire.compressors import make_reducer
from tests.ranks import run_ranks

SHAPES = [(24, 16), (16,), (8, 4, 3, 3), (10, 24)]
CONFIGS = {
    "powersgd": ("powersgd", {"rank": 2, "min_compression_rate": 0}),
    "topk-ef": ("topk", {"ratio": 0.05}),
    "topk-ef21": ("topk", {"ratio": 0.05, "feedback": "ef21"}),
    "topk-ef21-sgdm": ("topk", {"ratio": 0.05, "feedback": "ef21-sgdm", "eta": 0.2}),
    "topk-econtrol": ("topk", {"ratio": 0.05, "feedback": "econtrol", "eta": 0.3}),
    "qsgd-ef": ("qsgd", {"feedback": "ef", "levels": 4}),
    "randk-ef": ("randk", {"ratio": 0.1}),
    "sign-ef": ("sign", {}),
    "sign-2bit-ef": ("sign", {"bits": 2, "block": 32}),
    "fp16-ef": ("fp16", {"feedback": "ef"}),
}


def grads(rank, step):
    gen = torch.Generator().manual_seed(97 * rank + step)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def through_bytes(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def round_trip(rank, world):
    """(uninterrupted outputs of steps 3..5, resumed outputs of steps 3..5) per config."""
    results = {}
    for label, (name, params) in CONFIGS.items():
        full = make_reducer(name, **params)
        saved = None
        straight = []
        for step in range(6):
            if step == 3:
                saved = through_bytes(full.state_dict())
            out = full.reduce(grads(rank, step))
            if step >= 3:
                straight.append(out)
        resumed = make_reducer(name, **params)
        resumed.load_state_dict(saved)
        again = [resumed.reduce(grads(rank, step)) for step in range(3, 6)]
        results[label] = (straight, again, resumed.stats()["steps"])
    return results


def assert_bitwise(results):
    for label, (straight, again, steps) in results.items():
        assert steps == 6, label
        for a_step, b_step in zip(straight, again):
            for a, b in zip(a_step, b_step):
                assert torch.equal(a, b), f"{label}: resumed trajectory differs"


def test_round_trip_in_one_process():
    assert_bitwise(round_trip(0, 1))


@pytest.mark.multiprocess
def test_round_trip_on_two_ranks():
    for results in run_ranks(round_trip, 2):
        assert_bitwise(results)


def test_fresh_reducer_without_state_diverges():
    # guards the round-trip test: skipping the load must change the trajectory
    name, params = CONFIGS["topk-ef21"]
    full, fresh = make_reducer(name, **params), make_reducer(name, **params)
    for step in range(3):
        full.reduce(grads(0, step))
    a, b = full.reduce(grads(0, 3)), fresh.reduce(grads(0, 3))
    assert not all(torch.equal(x, y) for x, y in zip(a, b))


def _save_two_ranks(rank, world):
    r = make_reducer("topk", ratio=0.1, feedback="ef21")
    psgd = make_reducer("powersgd", rank=2, min_compression_rate=0)
    for step in range(3):
        r.reduce(grads(rank, step))
        psgd.reduce(grads(rank, step))
    return r.state_dict(), psgd.state_dict()


@pytest.mark.multiprocess
def test_loading_into_a_different_world_size_keeps_shared_state():
    (ef21_state, psgd_state), _ = run_ranks(_save_two_ranks, 2)
    assert ef21_state["world_size"] == 2
    one = make_reducer("topk", ratio=0.1, feedback="ef21")
    one.load_state_dict(ef21_state)
    assert one.step == 3
    for key, buffers in one.feedback.state.items():
        # per-worker estimate rebuilt from the shared one: g = mean_i g_i holds for one worker
        assert torch.equal(buffers["g_i"], buffers["g"])
        assert torch.equal(buffers["g"], ef21_state["feedback"][key]["g"])
    psgd = make_reducer("powersgd", rank=2, min_compression_rate=0)
    psgd.load_state_dict(psgd_state)
    assert psgd.feedback.state == {}  # EF residuals are per worker: dropped
    for key, q in psgd_state["compressor_state"]["q"].items():
        assert torch.equal(psgd.compressor._q[key], q)  # shared Q carried over


def test_loading_state_of_another_compressor_is_refused():
    r = make_reducer("topk", ratio=0.1)
    r.reduce(grads(0, 0))
    with pytest.raises(ValueError, match="saved by compressor 'topk'"):
        make_reducer("sign").load_state_dict(r.state_dict())
    with pytest.raises(ValueError, match="feedback 'ef'"):
        make_reducer("topk", ratio=0.1, feedback="ef21").load_state_dict(r.state_dict())


def test_hook_state_pickles_without_its_thread_and_lock():
    # like torch's PowerSGDState: what cannot travel is dropped and made again at first use
    import pickle

    from gradwire.compressors import make_hook

    state, _ = make_hook("powersgd", min_compression_rate=0)
    state.reducer.reduce(grads(0, 0))
    copy = pickle.loads(pickle.dumps(state))
    assert copy._worker is None and copy._lock is not state._lock and copy._keys == {}
    a, b = state.reducer.reduce(grads(0, 1)), copy.reducer.reduce(grads(0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
