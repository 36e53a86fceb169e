"""Calls release the GIL: Python threads segment in parallel and get the sequential results."""

from __future__ import annotations

import threading
import time

import numpy as np

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


def test_python_runs_while_a_call_computes(segmenter, colour_image):
    # If a call held the GIL, this thread could not run during it: the longest pause between two
    # of its loop turns would be about the call's length. Released, pauses are the OS scheduler's
    # time slices (milliseconds, even with the engine's threads busy on every core), so a pause of
    # half the call's length leaves a wide margin either way.
    samples = 30
    begun = time.perf_counter()
    segmenter.segment(colour_image, PROMPT, samples=samples)
    call_seconds = time.perf_counter() - begun

    worker = threading.Thread(target=segmenter.segment, args=(colour_image, PROMPT), kwargs={"samples": samples})
    longest_pause, turns = 0.0, 0
    worker.start()
    last = time.perf_counter()
    while worker.is_alive():
        now = time.perf_counter()
        longest_pause, last, turns = max(longest_pause, now - last), now, turns + 1
    worker.join()
    assert turns > 100
    assert longest_pause < call_seconds / 2, (longest_pause, call_seconds)
