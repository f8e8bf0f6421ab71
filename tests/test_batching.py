"""The server's batcher (``deploy.serve.batching``): requests that arrive together share one
forward pass, each gets its own predictions in its own order, a request without heat maps gets
none whatever the batch, and a failed pass reaches every request that waited on it."""

import threading
from types import SimpleNamespace

import pytest

from covidxray.deploy.serve.batching import Batcher


class SlowPredictor:
    """Answers each film with its name, after a pause long enough for others to queue."""

    def __init__(self, fail: bool = False):
        self.passes, self.fail = [], fail
        self.started = threading.Event()

    def predict_items(self, items, heatmaps):
        self.started.set()
        self.passes.append(len(items))
        threading.Event().wait(0.2)
        if self.fail:
            raise RuntimeError("the model failed")
        return [SimpleNamespace(name=item.name, heatmap="heat" if heatmaps else None,
                                image="image", lung_heat_share=0.5) for item in items]


def films(prefix, count):
    return [SimpleNamespace(name=f"{prefix}{i}") for i in range(count)]


def in_threads(batcher, requests):
    answers, errors = {}, {}

    def ask(name, items, heatmaps):
        try:
            answers[name] = batcher.predict(items, heatmaps)
        except RuntimeError as error:
            errors[name] = error
    threads = [threading.Thread(target=ask, args=request) for request in requests]
    threads[0].start()
    batcher.predictor.started.wait(5)  # the first pass runs: the others queue behind it
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(10)
    return answers, errors


def test_requests_that_wait_together_share_one_pass_and_keep_their_own_answers():
    predictor = SlowPredictor()
    batcher = Batcher(predictor, max_films=32, wait_s=0.05)
    requests = [("first", films("a", 1), True)] + [
        (f"r{k}", films(f"r{k}-", 2), k % 2 == 0) for k in range(4)]
    answers, errors = in_threads(batcher, requests)
    assert not errors
    assert predictor.passes == [1, 8]  # the four that queued went in one pass
    assert batcher.batches == 2 and batcher.films == 9
    for name, items, heatmaps in requests:
        assert [p.name for p in answers[name]] == [item.name for item in items]
        # heat maps only where asked, though the shared pass made them for all
        assert all((p.heatmap is not None) == heatmaps for p in answers[name])


def test_a_pass_stops_taking_requests_once_it_holds_the_allowed_films():
    predictor = SlowPredictor()
    batcher = Batcher(predictor, max_films=4, wait_s=0.05)
    answers, _ = in_threads(batcher, [("first", films("a", 1), False)] +
                            [(f"r{k}", films(f"r{k}-", 2), False) for k in range(4)])
    assert len(answers) == 5 and predictor.passes[0] == 1
    assert max(predictor.passes[1:]) <= 4 and sum(predictor.passes) == 9


def test_a_failed_pass_reaches_every_request_in_it():
    batcher = Batcher(SlowPredictor(fail=True), max_films=32, wait_s=0.05)
    answers, errors = in_threads(batcher, [("first", films("a", 1), False),
                                           ("second", films("b", 1), False)])
    assert not answers and set(errors) == {"first", "second"}
    with pytest.raises(RuntimeError, match="the model failed"):
        raise errors["second"]
