"""Calls release the GIL: Python threads segment in parallel and get the sequential results."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import mcs_engine

from conftest import PROMPT


def test_two_threads_get_the_sequential_results(segmenter, colour_image):
    images = [colour_image, np.ascontiguousarray(colour_image[::-1])]
    sequential = [segmenter.segment(image, PROMPT, samples=4, seed=21) for image in images]
    results = [None, None]
    start = threading.Barrier(2)

    def work(i):
        start.wait()
        results[i] = segmenter.segment(images[i], PROMPT, samples=4, seed=21)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    for got, want in zip(results, sequential):
        np.testing.assert_array_equal(got.probability, want.probability)
        np.testing.assert_array_equal(got.uncertainty, want.uncertainty)
        np.testing.assert_array_equal(got.mask, want.mask)


class TimedNative:
    """Stands in for a Segmenter's native object and notes the time just before and just after
    each native call."""

    def __init__(self, native):
        self.native = native
        self.window = []

    def segment(self, *args):
        self.window.append(time.perf_counter())
        try:
            return self.native.segment(*args)
        finally:
            self.window.append(time.perf_counter())


def test_python_runs_while_a_call_computes(colour_image):
    # This thread notes the time of each turn of its loop while a worker thread segments. A native
    # call holding the GIL would leave no turn well inside the call: this thread could take the
    # GIL only when the worker runs Python code, just before or after the call, and not for longer
    # than the 5 ms switch interval (sys.getswitchinterval) plus scheduling delays, hence the
    # 25 ms margins. Released, this thread runs whenever the OS gives it a core; a busy machine
    # can starve it for one call, so up to three calls are tried.
    margin = 0.025
    segmenter = mcs_engine.Segmenter(device="cpu")
    timed = segmenter._native = TimedNative(segmenter._native)
    for _ in range(3):
        timed.window.clear()
        worker = threading.Thread(target=segmenter.segment, args=(colour_image, PROMPT), kwargs={"samples": 60})
        turns = []
        worker.start()
        while worker.is_alive():
            turns.append(time.perf_counter())
        worker.join()
        begun, ended = timed.window
        assert ended - begun > 3 * margin, "the call is too short to tell"
        if any(begun + margin < turn < ended - margin for turn in turns):
            return
    pytest.fail("no Python code ran while segment() computed: the call holds the GIL")
