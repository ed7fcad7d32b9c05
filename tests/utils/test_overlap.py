"""overlapped(): finish(i) runs on a worker while infer(i+1) runs, in order, errors surface."""

from __future__ import annotations

import threading

import pytest
import torch

from segcalib.utils.overlap import overlapped


def test_finish_of_a_case_runs_while_the_next_case_is_inferred() -> None:
    started = {i: threading.Event() for i in range(4)}
    log: list[str] = []
    threads: set[str] = set()

    def infer(i: int) -> tuple[torch.Tensor, ...]:
        if i > 0:  # would wait forever (and fail) if finish(i-1) only started after infer(i)
            assert started[i - 1].wait(timeout=30), f"finish({i - 1}) did not start during infer({i})"
        log.append(f"infer {i}")
        return (torch.full((2,), float(i)),)

    def finish(i: int, outputs: tuple[torch.Tensor, ...]) -> None:
        started[i].set()
        threads.add(threading.current_thread().name)
        log.append(f"finish {i} {outputs[0].tolist()}")

    overlapped(range(4), infer, finish)
    finished = [entry for entry in log if entry.startswith("finish")]
    assert finished == [f"finish {i} {[float(i)] * 2}" for i in range(4)]
    assert threads and threading.current_thread().name not in threads


def test_one_case_behind_never_more() -> None:
    active: list[int] = []
    seen_pending: list[int] = []
    lock = threading.Lock()

    def infer(i: int) -> tuple[torch.Tensor, ...]:
        with lock:
            seen_pending.append(len(active))
        return (torch.zeros(1),)

    def finish(i: int, outputs) -> None:
        with lock:
            active.append(i)
        threading.Event().wait(0.01)
        with lock:
            active.remove(i)

    overlapped(range(6), infer, finish)
    assert max(seen_pending) <= 1


def test_the_worker_takes_the_callers_grad_mode() -> None:
    modes: list[bool] = []
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            overlapped(range(2), lambda i: (torch.zeros(1),), lambda i, o: modes.append(torch.is_grad_enabled()))
    assert modes == [False, False, True, True]


@pytest.mark.parametrize("where", ["infer", "finish"])
def test_an_error_in_either_function_is_raised_and_stops_the_loop(where: str) -> None:
    done: list[int] = []

    def infer(i: int):
        if where == "infer" and i == 2:
            raise ValueError("bad case 2")
        return (torch.zeros(1),)

    def finish(i: int, outputs) -> None:
        if where == "finish" and i == 1:
            raise ValueError("bad case 1")
        done.append(i)

    with pytest.raises(ValueError, match="bad case"):
        overlapped(range(5), infer, finish)
    assert done == ([0, 1] if where == "infer" else [0])


def test_disabled_is_a_plain_loop_on_this_thread() -> None:
    names: list[str] = []
    overlapped(range(3), lambda i: (torch.zeros(1),), lambda i, o: names.append(threading.current_thread().name), enabled=False)
    assert names == [threading.current_thread().name] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_outputs_are_finished_on_a_side_stream_after_they_are_ready() -> None:
    device = torch.device("cuda")
    sums = torch.zeros((), dtype=torch.float64, device=device)
    streams: list[int] = []

    def infer(i: int):
        x = torch.full((4096, 1024), float(i), device=device)
        for _ in range(20):  # keep the main stream busy so that a missing wait would read early
            x = x * 1.0 + 0.0
        return (x,)

    def finish(i: int, outputs) -> None:
        streams.append(torch.cuda.current_stream().stream_id)
        sums.add_(outputs[0].double().sum())

    overlapped(range(5), infer, finish, device=device)
    assert float(sums) == sum(4096 * 1024 * i for i in range(5))
    assert all(s != torch.cuda.default_stream(device).stream_id for s in streams)
